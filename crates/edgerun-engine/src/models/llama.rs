//! `general.architecture = llama`: Llama 2/3, SmolLM2, Mistral-style dense models; and the
//! decoder every llama-like family shares ([`Variant`]: `qwen2.rs` is this with biases on q, k
//! and v and rotary embeddings over halves; `qwen3.rs` with halves and each head of q and k
//! RMS-normalised instead of biases).
//!
//! One call to [`CausalLm::forward`] runs one scheduler step. The step's tokens from every
//! sequence (one token for a decoding sequence, a chunk of prompt for a prefilling one) are laid
//! end to end in a single `(tokens, hidden)` matrix, so every weight matrix is applied with one
//! quantized matmul per step for the whole batch and read from memory once. Only attention is
//! per sequence: each segment attends over its own cache. This is candle-transformers'
//! `quantized_llama` rebuilt for serving: per-sequence caches instead of one inside the model,
//! positions past 4096, per-token RoPE positions, and logits only where a token will be sampled.

use super::attention::{attention, causal_mask, PagedStep};
use super::{optional_tensor, required_tensor, CausalLm, ModelConfig, Segment};
use crate::error::{EngineError, Result};
use crate::kernels::{FusedLinear, Kernels, QLinear};
use crate::kv_cache::KvLayout;
use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};
use std::fs::File;
use std::sync::Arc;

/// How a llama-like family differs from llama itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// The `general.architecture` it loads (its metadata keys' prefix).
    pub architecture: &'static str,
    /// How rotary embeddings pair a head's dimensions.
    pub rope: RopeStyle,
    /// q, k and v have biases (`blk.N.attn_{q,k,v}.bias`), all three required.
    pub qkv_bias: bool,
    /// Each head of q and of k is RMS-normalised before the rotary embeddings, with weights
    /// `blk.N.attn_{q,k}_norm.weight` (head_dim values, one for all heads; both required).
    pub qk_norm: bool,
}

/// How rotary embeddings pair a head's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i + 1)`: llama GGUFs, whose q and k rows llama.cpp's converter
    /// permuted for it (ggml's "normal" mode).
    Interleaved,
    /// Pairs `(i, i + d/2)` over the two halves of a head: the Hugging Face layout, kept as is
    /// by the converter for Qwen2 and most later families (ggml's NEOX mode).
    Halves,
}

impl Variant {
    pub const LLAMA: Variant = Variant {
        architecture: "llama",
        rope: RopeStyle::Interleaved,
        qkv_bias: false,
        qk_norm: false,
    };
}

struct Layer {
    attn_norm: Tensor,
    /// q, k and v: one matmul when their formats match.
    qkv: FusedLinear,
    /// Added to q, k and v after the matmul (qwen2), each `(width,)`.
    qkv_bias: Option<[Tensor; 3]>,
    /// RMSNorm weights of each q head and each k head (qwen3), each `(head_dim,)`.
    qk_norm: Option<[Tensor; 2]>,
    wo: QLinear,
    ffn_norm: Tensor,
    /// gate and up: one matmul when their formats match.
    gate_up: FusedLinear,
    w_down: QLinear,
}

/// A llama-architecture model loaded from GGUF. Immutable once loaded: all per-sequence state
/// lives in [`crate::KvCache`]s, so one model serves any number of sequences.
pub struct LlamaModel {
    cfg: ModelConfig,
    embeddings: Arc<QTensor>,
    layers: Vec<Layer>,
    norm: Tensor,
    output: QLinear,
    /// RoPE tables for every position of the context window, `(context_length, rope_dim / 2)`.
    cos: Tensor,
    sin: Tensor,
    device: Device,
    variant: Variant,
}

/// [`super::Loader`] for this architecture.
pub fn load(
    ct: &gguf_file::Content,
    file: &mut File,
    device: &Device,
    kernels: Kernels,
) -> Result<Box<dyn CausalLm>> {
    load_variant(ct, file, device, kernels, Variant::LLAMA)
}

/// The loader of a llama-like family: its file's `load` is this with its [`Variant`].
pub fn load_variant(
    ct: &gguf_file::Content,
    file: &mut File,
    device: &Device,
    kernels: Kernels,
    variant: Variant,
) -> Result<Box<dyn CausalLm>> {
    Ok(Box::new(LlamaModel::from_gguf(
        ct, file, device, kernels, variant,
    )?))
}

impl LlamaModel {
    /// Loads every tensor of a GGUF of `variant`'s architecture onto `device`.
    pub fn from_gguf(
        ct: &gguf_file::Content,
        file: &mut File,
        device: &Device,
        kernels: Kernels,
        variant: Variant,
    ) -> Result<Self> {
        let cfg = ModelConfig::from_gguf(ct)?;
        if cfg.architecture != variant.architecture {
            return Err(EngineError::Load(format!(
                "general.architecture is `{}`, not `{}`",
                cfg.architecture, variant.architecture
            )));
        }
        if cfg.rope_dim != cfg.head_dim {
            return Err(EngineError::Load(format!(
                "partial rotary embeddings (rope dimension {} of head dimension {}) are not supported",
                cfg.rope_dim, cfg.head_dim
            )));
        }
        if cfg.expert_count > 1 {
            return Err(EngineError::Load(
                "mixture-of-experts models are not supported yet".into(),
            ));
        }
        let embeddings = Arc::new(required_tensor(ct, file, "token_embd.weight", device)?);
        let norm = required_tensor(ct, file, "output_norm.weight", device)?.dequantize(device)?;
        let mut layers = Vec::with_capacity(cfg.block_count);
        for i in 0..cfg.block_count {
            let p = format!("blk.{i}");
            let mut qm = |n: &str| -> Result<QLinear> {
                let t = required_tensor(ct, file, &format!("{p}.{n}.weight"), device)?;
                Ok(QLinear::new(t, kernels)?)
            };
            let wo = qm("attn_output")?;
            let w_down = qm("ffn_down")?;
            // Matrices applied to the same input are read on the host and stacked there, so
            // the device gets each stacked matrix once.
            let mut fused = |names: &[&str]| -> Result<FusedLinear> {
                let ts = names
                    .iter()
                    .map(|n| required_tensor(ct, file, &format!("{p}.{n}.weight"), &Device::Cpu))
                    .collect::<Result<Vec<_>>>()?;
                FusedLinear::new(ts, device, kernels)
                    .map_err(|e| EngineError::Load(format!("{p}: stacking {names:?}: {e}")))
            };
            let qkv = fused(&["attn_q", "attn_k", "attn_v"])?;
            let gate_up = fused(&["ffn_gate", "ffn_up"])?;
            let mut vector = |n: &str, len: usize| -> Result<Tensor> {
                let t =
                    required_tensor(ct, file, &format!("{p}.{n}"), device)?.dequantize(device)?;
                if t.dims() != [len] {
                    return Err(EngineError::Load(format!(
                        "tensor `{p}.{n}`: shape {:?}, expected [{len}]",
                        t.dims()
                    )));
                }
                Ok(t)
            };
            let dim = cfg.embedding_length;
            let (qd, kv) = (
                cfg.head_count * cfg.head_dim,
                cfg.head_count_kv * cfg.head_dim,
            );
            let qkv_bias = if variant.qkv_bias {
                Some([
                    vector("attn_q.bias", qd)?,
                    vector("attn_k.bias", kv)?,
                    vector("attn_v.bias", kv)?,
                ])
            } else {
                None
            };
            let qk_norm = if variant.qk_norm {
                Some([
                    vector("attn_q_norm.weight", cfg.head_dim)?,
                    vector("attn_k_norm.weight", cfg.head_dim)?,
                ])
            } else {
                None
            };
            layers.push(Layer {
                qk_norm,
                attn_norm: vector("attn_norm.weight", dim)?,
                ffn_norm: vector("ffn_norm.weight", dim)?,
                qkv,
                qkv_bias,
                wo,
                gate_up,
                w_down,
            });
        }
        // Absent: tied embeddings (SmolLM2 and other small models). Present but unreadable: an
        // error (from `optional_tensor`), never silently tied.
        let output = match optional_tensor(ct, file, "output.weight", device)? {
            Some(t) => QLinear::head(t, kernels)?,
            None => QLinear::shared(embeddings.clone(), kernels)?,
        };
        // Llama-3.1 and later carry per-frequency RoPE divisors (their long-context scaling).
        let freq_factors = optional_tensor(ct, file, "rope_freqs.weight", device)?
            .map(|t| -> Result<Vec<f32>> {
                Ok(t.dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1::<f32>()?)
            })
            .transpose()
            .map_err(|e| EngineError::Load(format!("tensor `rope_freqs.weight`: {e}")))?;
        let (cos, sin) = rope_tables(&cfg, freq_factors.as_deref(), device)?;
        Ok(Self {
            cfg,
            embeddings,
            layers,
            norm,
            output,
            cos,
            sin,
            device: device.clone(),
            variant,
        })
    }
}

impl LlamaModel {
    /// The feed-forward half of a layer, residual included.
    fn mlp(&self, layer: &Layer, x1: &Tensor) -> candle_core::Result<Tensor> {
        let h = candle_nn::ops::rms_norm(x1, &layer.ffn_norm, self.cfg.rms_norm_eps as f32)?;
        let [gate, up]: [Tensor; 2] = layer
            .gate_up
            .forward(&h)?
            .try_into()
            .map_err(|_| candle_core::Error::Msg("gate, up: two outputs".into()))?;
        layer
            .w_down
            .forward(&(candle_nn::ops::silu(&gate)? * up)?)?
            + x1
    }
}

impl CausalLm for LlamaModel {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn device(&self) -> &Device {
        &self.device
    }

    /// Activations are f32. Caches are f32 on the CPU (attention reads them in place there)
    /// and f16 on a GPU: half the memory per position, and attention copies each history to a
    /// contiguous f32 tensor anyway, so the conversion rides on a copy already made.
    fn kv_layout(&self) -> KvLayout {
        KvLayout {
            layers: self.cfg.block_count,
            kv_heads: self.cfg.head_count_kv,
            head_dim: self.cfg.head_dim,
            dtype: if self.device.is_cpu() {
                DType::F32
            } else {
                DType::F16
            },
        }
    }

    fn forward(
        &self,
        segments: &mut [Segment<'_>],
        want_logits: &[usize],
    ) -> Result<Option<Tensor>> {
        let cfg = &self.cfg;
        let (n_head, n_kv, hd) = (cfg.head_count, cfg.head_count_kv, cfg.head_dim);
        let groups = n_head / n_kv;
        let scale = 1.0 / (hd as f64).sqrt();

        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut bounds = Vec::with_capacity(segments.len());
        for seg in segments.iter() {
            let start = seg.cache.len();
            if seg.tokens.is_empty() {
                return Err(EngineError::Model(candle_core::Error::Msg(
                    "empty segment".into(),
                )));
            }
            if start + seg.tokens.len() > cfg.context_length {
                return Err(EngineError::Model(candle_core::Error::Msg(format!(
                    "position {} past the context window",
                    start + seg.tokens.len()
                ))));
            }
            bounds.push((ids.len(), seg.tokens.len(), start));
            ids.extend_from_slice(seg.tokens);
            positions.extend((start..start + seg.tokens.len()).map(|p| p as u32));
        }
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, &self.device)?;
        let positions = Tensor::from_vec(positions, total, &self.device)?;
        let cos = self.cos.index_select(&positions, 0)?;
        let sin = self.sin.index_select(&positions, 0)?;
        // Paged caches (GPUs): one plan of pool rows for the step, used by every layer.
        let paged = match segments[0].cache.paged() {
            Some((pool, _)) => Some(PagedStep::new(pool, segments, &bounds, &self.device)?),
            None => None,
        };
        // Contiguous caches: causal masks for segments of more than one token, `(t, kv_len)`,
        // additive.
        let masks = if paged.is_some() {
            Vec::new()
        } else {
            bounds
                .iter()
                .map(|&(_, t, start)| {
                    (t > 1)
                        .then(|| causal_mask(t, start, &self.device))
                        .transpose()
                })
                .collect::<candle_core::Result<Vec<_>>>()?
        };

        let mut x = self.embeddings.embedding(&ids)?; // (total, hidden)
        for (li, layer) in self.layers.iter().enumerate() {
            let residual = &x;
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.rms_norm_eps as f32)?;
            let [mut q, mut k, mut v]: [Tensor; 3] = layer
                .qkv
                .forward(&h)?
                .try_into()
                .map_err(|_| candle_core::Error::Msg("q, k, v: three outputs".into()))?;
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                q = q.broadcast_add(bq)?;
                k = k.broadcast_add(bk)?;
                v = v.broadcast_add(bv)?;
            }
            // (total, heads * hd) -> (1, heads, total, hd) for RoPE.
            let mut q = q.reshape((1, total, n_head, hd))?;
            let mut k = k.reshape((1, total, n_kv, hd))?;
            if let Some([nq, nk]) = &layer.qk_norm {
                let eps = cfg.rms_norm_eps as f32;
                q = candle_nn::ops::rms_norm(&q.contiguous()?, nq, eps)?;
                k = candle_nn::ops::rms_norm(&k.contiguous()?, nk, eps)?;
            }
            let q = q.transpose(1, 2)?.contiguous()?;
            let k = k.transpose(1, 2)?.contiguous()?;
            let (q, k) = match self.variant.rope {
                RopeStyle::Interleaved => (
                    candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?,
                ),
                RopeStyle::Halves => (
                    candle_nn::rotary_emb::rope(&q, &cos, &sin)?,
                    candle_nn::rotary_emb::rope(&k, &cos, &sin)?,
                ),
            };
            let (q, k) = (q.squeeze(0)?, k.squeeze(0)?);
            if let Some(paged) = &paged {
                let y = paged.attend(li, &q, &k, &v, groups, scale)?;
                let x1 = (layer.wo.forward(&y)? + residual)?;
                x = self.mlp(layer, &x1)?;
                continue;
            }
            let v = v.reshape((total, n_kv, hd))?.transpose(0, 1)?;

            let mut ys = Vec::with_capacity(segments.len());
            for (si, seg) in segments.iter().enumerate() {
                let (off, t, _) = bounds[si];
                let (k_all, v_all) =
                    seg.cache
                        .write(li, &k.narrow(1, off, t)?, &v.narrow(1, off, t)?)?;
                let q_s = q.narrow(1, off, t)?.contiguous()?;
                ys.push(attention(
                    &q_s,
                    &k_all,
                    &v_all,
                    masks[si].as_ref(),
                    groups,
                    scale,
                )?);
            }
            let y = if ys.len() == 1 {
                ys.pop().expect("one segment")
            } else {
                Tensor::cat(&ys, 0)?
            };
            let x1 = (layer.wo.forward(&y)? + residual)?;
            x = self.mlp(layer, &x1)?;
        }
        for seg in segments.iter_mut() {
            seg.cache.commit(seg.tokens.len());
        }
        if want_logits.is_empty() {
            return Ok(None);
        }
        let last_rows: Vec<u32> = want_logits
            .iter()
            .map(|&i| (bounds[i].0 + bounds[i].1 - 1) as u32)
            .collect();
        let n = last_rows.len();
        let rows = Tensor::from_vec(last_rows, n, &self.device)?;
        let x = x.index_select(&rows, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, cfg.rms_norm_eps as f32)?;
        let logits = self.output.forward(&x)?.to_dtype(DType::F32)?;
        Ok(Some(logits))
    }
}

/// cos/sin of `position * inv_freq` for every position of the context window, with llama.cpp's
/// adjustments: `rope_freqs` divisors per frequency and linear position scaling.
fn rope_tables(
    cfg: &ModelConfig,
    freq_factors: Option<&[f32]>,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let dim = cfg.rope_dim;
    if let Some(f) = freq_factors {
        if f.len() != dim / 2 {
            return Err(EngineError::Load(format!(
                "rope_freqs has {} values, expected {}",
                f.len(),
                dim / 2
            )));
        }
    }
    let inv_freq: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| {
            let factor = freq_factors.map_or(1.0, |f| f[i / 2]);
            1f32 / cfg.rope_freq_base.powf(i as f32 / dim as f32) / factor / cfg.rope_linear_scale
        })
        .collect();
    let n = inv_freq.len();
    let inv_freq = Tensor::from_vec(inv_freq, (1, n), device)?;
    let t = Tensor::arange(0u32, cfg.context_length as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((cfg.context_length, 1))?;
    let freqs = t.matmul(&inv_freq)?;
    Ok((freqs.cos()?, freqs.sin()?))
}
