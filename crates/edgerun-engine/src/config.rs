//! Model hyper-parameters read from GGUF metadata.

use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file;

/// The shape of a llama-architecture model, as its GGUF metadata states it. Nothing here is
/// assumed: context length and RoPE base come from the file (Llama-3: 8192 / 500000; SmolLM2:
/// 8192 / 100000), so no window is silently capped.
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
}

fn get<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| EngineError::Load(format!("GGUF metadata has no `{key}`")))
}

fn get_usize(ct: &gguf_file::Content, key: &str) -> Result<usize> {
    let v = get(ct, key)?;
    v.to_u32()
        .map(|x| x as usize)
        .or_else(|_| v.to_u64().map(|x| x as usize))
        .or_else(|_| v.to_i32().map(|x| x.max(0) as usize))
        .map_err(|e| EngineError::Load(format!("`{key}` is not an integer: {e}")))
}

impl ModelConfig {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let architecture = get(ct, "general.architecture")?
            .to_string()
            .map_err(|e| EngineError::Load(e.to_string()))?
            .clone();
        if architecture != "llama" {
            return Err(EngineError::Load(format!(
                "general.architecture is `{architecture}`; edgerun runs llama-architecture GGUF models"
            )));
        }
        let a = |k: &str| format!("{architecture}.{k}");
        let embedding_length = get_usize(ct, &a("embedding_length"))?;
        let head_count = get_usize(ct, &a("attention.head_count"))?;
        let head_count_kv = get_usize(ct, &a("attention.head_count_kv")).unwrap_or(head_count);
        if head_count == 0 || head_count_kv == 0 || head_count % head_count_kv != 0 {
            return Err(EngineError::Load(format!(
                "unsupported head counts: {head_count} query heads, {head_count_kv} key/value heads"
            )));
        }
        let head_dim = embedding_length / head_count;
        let rope_dim = get_usize(ct, &a("rope.dimension_count")).unwrap_or(head_dim);
        if rope_dim != head_dim {
            return Err(EngineError::Load(format!(
                "partial rotary embeddings (rope dimension {rope_dim} of head dimension {head_dim}) are not supported"
            )));
        }
        let rope_freq_base = get(ct, &a("rope.freq_base"))
            .and_then(|v| v.to_f32().map_err(|e| EngineError::Load(e.to_string())))
            .unwrap_or(10_000.0);
        let rms_norm_eps = get(ct, &a("attention.layer_norm_rms_epsilon"))
            .and_then(|v| v.to_f32().map_err(|e| EngineError::Load(e.to_string())))
            .unwrap_or(1e-5) as f64;
        let scaling = get(ct, &a("rope.scaling.type"))
            .ok()
            .and_then(|v| v.to_string().ok().cloned())
            .unwrap_or_else(|| "none".into());
        let rope_linear_scale = match scaling.as_str() {
            // Llama-3.1-style scaling is baked into the `rope_freqs.weight` tensor.
            "none" | "llama3" => 1.0,
            "linear" => get(ct, &a("rope.scaling.factor"))
                .and_then(|v| v.to_f32().map_err(|e| EngineError::Load(e.to_string())))
                .unwrap_or(1.0),
            other => {
                return Err(EngineError::Load(format!(
                    "RoPE scaling `{other}` is not supported yet"
                )))
            }
        };
        if get_usize(ct, &a("expert_count")).unwrap_or(0) > 1 {
            return Err(EngineError::Load(
                "mixture-of-experts llama models are not supported yet".into(),
            ));
        }
        Ok(Self {
            name: get(ct, "general.name")
                .ok()
                .and_then(|v| v.to_string().ok().cloned()),
            block_count: get_usize(ct, &a("block_count"))?,
            feed_forward_length: get_usize(ct, &a("feed_forward_length"))?,
            context_length: get_usize(ct, &a("context_length"))?,
            vocab_size: get_usize(ct, &a("vocab_size")).ok(),
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
