//! `general.architecture = qwen3`: Qwen3 (dense: 0.6B to 32B, and the R1 distills on them).
//!
//! The llama decoder ([`super::llama`]) with Qwen3's differences, as llama.cpp's converter
//! keeps them: each head of q and of k is RMS-normalised (weights `blk.N.attn_{q,k}_norm.weight`,
//! `head_dim` values, required) before the rotary embeddings, which pair a head's two halves
//! (ggml's NEOX mode); no biases; heads wider than embedding / heads where
//! `qwen3.attention.key_length` says so (Qwen3-0.6B: 16 heads of 128 over a 1024 embedding).
//! Everything else — GQA, SwiGLU, RMSNorm, tied or separate output, metadata under `qwen3.*`
//! read strictly, contiguous and paged caches — is llama's code.

use super::llama::{RopeStyle, Variant};
use super::CausalLm;
use crate::error::Result;
use crate::kernels::Kernels;
use candle_core::quantized::gguf_file;
use candle_core::Device;
use std::fs::File;

/// How Qwen3 differs from llama.
pub const VARIANT: Variant = Variant {
    architecture: "qwen3",
    rope: RopeStyle::Halves,
    qkv_bias: false,
    qk_norm: true,
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
