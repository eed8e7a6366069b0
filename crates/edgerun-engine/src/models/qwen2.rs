//! `general.architecture = qwen2`: Qwen2 and Qwen2.5 (chat, coder, math), QwQ, and the
//! DeepSeek-R1 distills built on them.
//!
//! The llama decoder ([`super::llama`]) with two differences, both from the Hugging Face model
//! as llama.cpp's converter keeps it: q, k and v have biases (`blk.N.attn_{q,k,v}.bias`, f32,
//! required), and rotary embeddings pair the two halves of a head (ggml's NEOX mode), since the
//! converter leaves Qwen2's q and k rows in their own order where it permutes llama's for
//! adjacent pairs. Everything else — GQA, SwiGLU, RMSNorm, tied or separate output, metadata
//! under `qwen2.*` read strictly, contiguous and paged caches — is llama's code.

use super::llama::{RopeStyle, Variant};
use super::CausalLm;
use crate::error::Result;
use crate::kernels::Kernels;
use candle_core::quantized::gguf_file;
use candle_core::Device;
use std::fs::File;

/// How Qwen2 differs from llama.
pub const VARIANT: Variant = Variant {
    architecture: "qwen2",
    rope: RopeStyle::Halves,
    qkv_bias: true,
    qk_norm: false,
};

/// [`super::Loader`] for this architecture.
pub fn load(
    ct: &gguf_file::Content,
    file: &mut File,
    device: &Device,
    kernels: Kernels,
) -> Result<Box<dyn CausalLm>> {
    super::llama::load_variant(ct, file, device, kernels, VARIANT)
}
