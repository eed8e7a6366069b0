//! Model architectures: one file each, behind one seam, [`CausalLm`].
//!
//! # The contract
//!
//! An architecture is a type that loads itself from a GGUF and runs **one batched step**:
//! [`CausalLm::forward`] takes the step's [`Segment`]s (one per sequence: one token for a
//! decoding sequence, a chunk of prompt for a prefilling one, each with its own [`KvCache`]),
//! lays their tokens end to end, applies every weight once for the whole batch, appends each
//! segment's keys and values to its cache, and returns the logits of the last token of the
//! segments the scheduler will sample. The model holds no per-request state, so one instance
//! serves any number of sequences, and the scheduler never knows which architecture it drives.
//!
//! What every implementation must keep:
//!
//! * a segment's output depends only on its own tokens and cache, never on the others in the
//!   step (bitwise, on the CPU: the engine's batch-invariance tests rely on it);
//! * positions go to the model's own context length, never a smaller built-in cap;
//! * weights are applied through [`crate::kernels::QLinear`], never a named kernel;
//! * loading is strict: a tensor the file names but that cannot be read is an error naming it,
//!   never a silent fallback (only a tensor that is *absent* may select an alternative, such as
//!   tied embeddings).
//!
//! # Adding an architecture
//!
//! Write `models/<arch>.rs` with a type implementing [`CausalLm`] and a loader, and add one
//! line to [`ARCHITECTURES`] with its `general.architecture` name. Shared metadata parsing is in
//! [`ModelConfig`]; anything the new file cannot run it refuses at load with a clear error.

mod attention;
pub mod bert;
mod config;
pub mod llama;
pub mod qwen2;
pub mod qwen3;

pub use config::ModelConfig;

use crate::error::{EngineError, Result};
use crate::kernels::Kernels;
use crate::kv_cache::{KvCache, KvLayout};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use std::fs::File;

/// One sequence's share of a step: the tokens to append and the cache they extend.
pub struct Segment<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// A causal language model that runs batched steps over per-sequence KV caches.
pub trait CausalLm: Send + Sync {
    /// The hyper-parameters the model was loaded with.
    fn config(&self) -> &ModelConfig;

    /// Where its weights live; caches are allocated there too.
    fn device(&self) -> &Device;

    /// The shape and dtype of one sequence's KV cache.
    fn kv_layout(&self) -> KvLayout;

    /// Runs one step: appends each segment's tokens to its cache and returns the logits of the
    /// last token of every segment whose index is in `want_logits` (in that order), as a
    /// `(want_logits.len(), vocab)` f32 tensor, or `None` when no logits are wanted.
    fn forward(
        &self,
        segments: &mut [Segment<'_>],
        want_logits: &[usize],
    ) -> Result<Option<Tensor>>;
}

/// Loads one architecture from an open GGUF.
pub type Loader = fn(&gguf_file::Content, &mut File, &Device, Kernels) -> Result<Box<dyn CausalLm>>;

/// Every architecture this build runs, by `general.architecture`.
pub const ARCHITECTURES: &[(&str, Loader)] = &[
    ("llama", llama::load),
    ("qwen2", qwen2::load),
    ("qwen3", qwen3::load),
];

/// Loads the model a GGUF describes, choosing the architecture by `general.architecture`.
pub fn load(
    ct: &gguf_file::Content,
    file: &mut File,
    device: &Device,
    kernels: Kernels,
) -> Result<Box<dyn CausalLm>> {
    let arch = ct
        .metadata
        .get("general.architecture")
        .ok_or_else(|| EngineError::Load("GGUF metadata has no `general.architecture`".into()))?
        .to_string()
        .map_err(|e| EngineError::Load(format!("`general.architecture`: {e}")))?;
    match ARCHITECTURES.iter().find(|(name, _)| name == arch) {
        Some((_, loader)) => loader(ct, file, device, kernels),
        None => Err(EngineError::Load(format!(
            "general.architecture is `{arch}`; this build runs: {}",
            ARCHITECTURES
                .iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Reads a tensor the model needs; the error names it.
pub(crate) fn required_tensor(
    ct: &gguf_file::Content,
    file: &mut File,
    name: &str,
    device: &Device,
) -> Result<candle_core::quantized::QTensor> {
    ct.tensor(file, name, device)
        .map_err(|e| EngineError::Load(format!("tensor `{name}`: {e}")))
}

/// Reads a tensor the model can do without: `None` only when the file does not name it. A
/// tensor that is named but unreadable is an error, never taken for absent.
pub(crate) fn optional_tensor(
    ct: &gguf_file::Content,
    file: &mut File,
    name: &str,
    device: &Device,
) -> Result<Option<candle_core::quantized::QTensor>> {
    if !ct.tensor_infos.contains_key(name) {
        return Ok(None);
    }
    required_tensor(ct, file, name, device).map(Some)
}
