//! Hyper-parameters read from GGUF metadata, shared by the architectures in this folder.

use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file;

/// The shape of a decoder-only transformer as its GGUF metadata states it, under the
/// `{general.architecture}.` keys llama.cpp uses for every architecture. Nothing here is assumed:
/// context length and RoPE base come from the file (Llama-3: 8192 / 500000; SmolLM2: 8192 /
/// 100000), so no window is silently capped. What an architecture cannot run (partial rotary
/// embeddings, experts, ...) is refused by its own file, not here.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub name: Option<String>,
    pub block_count: usize,
    pub embedding_length: usize,
    pub feed_forward_length: usize,
    pub head_count: usize,
    pub head_count_kv: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub rope_freq_base: f32,
    pub rms_norm_eps: f64,
    pub context_length: usize,
    pub vocab_size: Option<usize>,
    /// Linear RoPE scaling (`rope.scaling.type = linear`): positions are divided by it.
    pub rope_linear_scale: f32,
    /// Mixture-of-experts: experts per layer (0 for a dense model).
    pub expert_count: usize,
}

fn get<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| EngineError::Load(format!("GGUF metadata has no `{key}`")))
}

fn as_usize(key: &str, v: &gguf_file::Value) -> Result<usize> {
    let n = v
        .to_u32()
        .map(u64::from)
        .or_else(|_| v.to_u64())
        .or_else(|_| v.to_i32().map(i64::from).and_then(non_negative))
        .or_else(|_| v.to_i64().and_then(non_negative))
        .map_err(|e| EngineError::Load(format!("`{key}` is not a non-negative integer: {e}")))?;
    usize::try_from(n).map_err(|_| EngineError::Load(format!("`{key}` = {n} is too large")))
}

fn non_negative(x: i64) -> candle_core::Result<u64> {
    u64::try_from(x).map_err(|_| candle_core::Error::Msg(format!("{x} is negative")))
}

fn get_usize(ct: &gguf_file::Content, key: &str) -> Result<usize> {
    as_usize(key, get(ct, key)?)
}

/// An optional key: absent is `None`; present with the wrong type is an error, never a silent
/// default.
fn opt_usize(ct: &gguf_file::Content, key: &str) -> Result<Option<usize>> {
    ct.metadata.get(key).map(|v| as_usize(key, v)).transpose()
}

fn opt_f32(ct: &gguf_file::Content, key: &str) -> Result<Option<f32>> {
    ct.metadata
        .get(key)
        .map(|v| {
            v.to_f32()
                .or_else(|_| v.to_f64().map(|x| x as f32))
                .map_err(|e| EngineError::Load(format!("`{key}` is not a float: {e}")))
        })
        .transpose()
}

fn opt_string(ct: &gguf_file::Content, key: &str) -> Result<Option<String>> {
    ct.metadata
        .get(key)
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| EngineError::Load(format!("`{key}` is not a string: {e}")))
        })
        .transpose()
}

impl ModelConfig {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let architecture = opt_string(ct, "general.architecture")?.ok_or_else(|| {
            EngineError::Load("GGUF metadata has no `general.architecture`".into())
        })?;
        let a = |k: &str| format!("{architecture}.{k}");
        let embedding_length = get_usize(ct, &a("embedding_length"))?;
        let head_count = get_usize(ct, &a("attention.head_count"))?;
        let head_count_kv = opt_usize(ct, &a("attention.head_count_kv"))?.unwrap_or(head_count);
        if head_count == 0 || head_count_kv == 0 || head_count % head_count_kv != 0 {
            return Err(EngineError::Load(format!(
                "unsupported head counts: {head_count} query heads, {head_count_kv} key/value heads"
            )));
        }
        // A head's width: `attention.key_length` where the file says (Qwen3, Gemma: wider
        // than embedding / heads), which `attention.value_length` must then equal.
        let head_dim = match opt_usize(ct, &a("attention.key_length"))? {
            Some(k) => {
                let v = opt_usize(ct, &a("attention.value_length"))?.unwrap_or(k);
                if k == 0 || v != k {
                    return Err(EngineError::Load(format!(
                        "attention.key_length {k} and attention.value_length {v}: heads whose \
                         keys and values differ in width (or are empty) are not supported"
                    )));
                }
                k
            }
            None => {
                if embedding_length % head_count != 0 {
                    return Err(EngineError::Load(format!(
                        "embedding length {embedding_length} is not a multiple of {head_count} heads"
                    )));
                }
                embedding_length / head_count
            }
        };
        let rope_dim = opt_usize(ct, &a("rope.dimension_count"))?.unwrap_or(head_dim);
        let rope_freq_base = opt_f32(ct, &a("rope.freq_base"))?.unwrap_or(10_000.0);
        let rms_norm_eps =
            opt_f32(ct, &a("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5) as f64;
        let scaling = opt_string(ct, &a("rope.scaling.type"))?.unwrap_or_else(|| "none".into());
        let rope_linear_scale = match scaling.as_str() {
            // Llama-3.1-style scaling is baked into the `rope_freqs.weight` tensor.
            "none" | "llama3" => 1.0,
            "linear" => opt_f32(ct, &a("rope.scaling.factor"))?.unwrap_or(1.0),
            other => {
                return Err(EngineError::Load(format!(
                    "RoPE scaling `{other}` is not supported yet"
                )))
            }
        };
        if !(rope_linear_scale.is_finite() && rope_linear_scale > 0.0) {
            return Err(EngineError::Load(format!(
                "rope.scaling.factor {rope_linear_scale} is not a positive number"
            )));
        }
        Ok(Self {
            name: opt_string(ct, "general.name")?,
            block_count: get_usize(ct, &a("block_count"))?,
            feed_forward_length: get_usize(ct, &a("feed_forward_length"))?,
            context_length: get_usize(ct, &a("context_length"))?,
            vocab_size: opt_usize(ct, &a("vocab_size"))?,
            expert_count: opt_usize(ct, &a("expert_count"))?.unwrap_or(0),
            architecture,
            embedding_length,
            head_count,
            head_count_kv,
            head_dim,
            rope_dim,
            rope_freq_base,
            rms_norm_eps,
            rope_linear_scale,
        })
    }
}
