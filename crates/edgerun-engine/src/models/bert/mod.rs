//! BERT encoders (bge-small/base/large-en-v1.5, all-MiniLM, e5, gte …) for embeddings, from a
//! Hugging Face model directory: `config.json`, `model.safetensors`, and sentence-transformers'
//! `modules.json`, `1_Pooling/config.json` and `sentence_bert_config.json` where present.
//!
//! The forward pass is the one `transformers`' `BertModel` runs (absolute positions, token
//! type 0, post-layer-norm blocks, erf GELU, an additive mask over padding), in f32, in one of
//! two implementations chosen at load ([`BertKernels`]):
//!
//! * on an x86 CPU with AVX-512 or AVX2, `cpu.rs`'s: no candle, weights repacked for our dense kernel
//!   ([`crate::kernels::dense_f32`]), texts packed without padding, buffers reused;
//! * elsewhere (GPUs, other CPUs) `CandleBert`, on candle-nn over a padded batch: `(batch, len)`
//!   ids and a 0/1 mask in, the last hidden states `(batch, len, hidden)` out. Written on
//!   candle-nn rather than taken from candle-transformers, which would bring that crate (a
//!   long build, on every target the engine's tests are built for) into the engine for ~150
//!   lines.
//!
//! [`BertEncoder::pooled`] gives each text's pooled vector either way; normalisation is the
//! embedding service's (`crate::embedding`). The two agree to float rounding (a test compares
//! them on the real all-MiniLM).
//!
//! Loading is strict, as for GGUF models: a `config.json` field of the wrong type, a missing
//! tensor or a shape that does not match the config is an error naming it.

mod cpu;

use crate::embedding::Pooling;
use crate::error::{EngineError, Result};
use crate::kernels::dense_f32::{self, Activation, DenseF32};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;
use std::path::Path;

/// What `config.json` says about the encoder (the fields this file reads; others are ignored).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_type_vocab() -> usize {
    2
}

fn default_act() -> String {
    "gelu".into()
}

impl BertConfig {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        if let Some(t) = &config.model_type {
            if t != "bert" {
                return Err(EngineError::Load(format!(
                    "{}: model_type `{t}` is not an encoder this build runs (bert)",
                    path.display()
                )));
            }
        }
        if !matches!(config.hidden_act.as_str(), "gelu" | "gelu_new" | "relu") {
            return Err(EngineError::Load(format!(
                "{}: hidden_act `{}` is not supported (gelu, gelu_new, relu)",
                path.display(),
                config.hidden_act
            )));
        }
        if let Some(p) = &config.position_embedding_type {
            if p != "absolute" {
                return Err(EngineError::Load(format!(
                    "{}: position_embedding_type `{p}` is not supported (absolute)",
                    path.display()
                )));
            }
        }
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(EngineError::Load(format!(
                "{}: hidden_size {} is not a multiple of num_attention_heads {}",
                path.display(),
                config.hidden_size,
                config.num_attention_heads
            )));
        }
        Ok(config)
    }
}

struct Layer {
    /// query, key and value stacked into one `(3 × hidden, hidden)` matrix: one product per
    /// layer instead of three.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    up: Linear,
    down: Linear,
    out_norm: LayerNorm,
}

/// Which implementation of the forward pass [`BertEncoder::load`] picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BertKernels {
    /// Ours on an AVX-512 or AVX2 CPU (`cpu.rs`), candle's elsewhere.
    #[default]
    Auto,
    /// Candle's everywhere (the reference the CPU path is tested against).
    Candle,
}

/// A loaded BERT encoder.
pub struct BertEncoder {
    config: BertConfig,
    device: Device,
    imp: Imp,
}

enum Imp {
    Candle(CandleBert),
    Packed(cpu::PackedBert),
}

impl BertEncoder {
    /// Loads `model.safetensors` from `dir` (memory-mapped) for `device`, with the
    /// implementation `kernels` asks for.
    pub fn load(dir: &Path, device: &Device, kernels: BertKernels) -> Result<Self> {
        let candle = CandleBert::load(dir, device)?;
        let config = candle.config.clone();
        let imp = if kernels == BertKernels::Auto && device.is_cpu() && DenseF32::available() {
            Imp::Packed(candle.pack().map_err(tensor_err("packing the encoder"))?)
        } else {
            Imp::Candle(candle)
        };
        Ok(Self {
            config,
            device: device.clone(),
            imp,
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Which implementation runs: `"cpu-avx512"`, `"cpu-avx2"` (ours, by the dense kernel's
    /// tile) or `"candle"`.
    pub fn kernels(&self) -> &'static str {
        match self.imp {
            Imp::Packed(_) if dense_f32::tile_isa() == "avx512" => "cpu-avx512",
            Imp::Packed(_) => "cpu-avx2",
            Imp::Candle(_) => "candle",
        }
    }

    /// Each text's pooled (not normalised) vector, `pooling[i]` for text `i`.
    pub fn pooled(&self, texts: &[&[u32]], poolings: &[Pooling]) -> Result<Vec<Vec<f32>>> {
        assert_eq!(texts.len(), poolings.len(), "a pooling per text");
        match &self.imp {
            Imp::Packed(p) => p.pooled(texts, poolings),
            Imp::Candle(c) => c.pooled(texts, poolings),
        }
    }
}

/// The encoder on candle-nn, over padded batches.
struct CandleBert {
    config: BertConfig,
    words: Embedding,
    positions: Embedding,
    token_types: Embedding,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    device: Device,
}

fn tensor_err(what: &str) -> impl Fn(candle_core::Error) -> EngineError + '_ {
    move |e| EngineError::Load(format!("{what}: {e}"))
}

impl CandleBert {
    /// Loads `model.safetensors` from `dir` (memory-mapped) onto `device`.
    fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = BertConfig::read(dir)?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(EngineError::Load(format!(
                "{}: no model.safetensors",
                dir.display()
            )));
        }
        // SAFETY: the file is mapped read-only; like every safetensors loader, this relies on
        // nobody truncating the file while it is mapped (it is copied to the device at once).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .map_err(tensor_err(&weights.display().to_string()))?;
        // Checkpoints saved from BertForMaskedLM and friends put the encoder under `bert.`.
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            vb
        };
        let h = config.hidden_size;
        let eps = config.layer_norm_eps;
        let emb = vb.pp("embeddings");
        let words = candle_nn::embedding(config.vocab_size, h, emb.pp("word_embeddings"))
            .map_err(tensor_err("embeddings.word_embeddings"))?;
        let positions = candle_nn::embedding(
            config.max_position_embeddings,
            h,
            emb.pp("position_embeddings"),
        )
        .map_err(tensor_err("embeddings.position_embeddings"))?;
        let token_types =
            candle_nn::embedding(config.type_vocab_size, h, emb.pp("token_type_embeddings"))
                .map_err(tensor_err("embeddings.token_type_embeddings"))?;
        let embed_norm = candle_nn::layer_norm(h, eps, emb.pp("LayerNorm"))
            .map_err(tensor_err("embeddings.LayerNorm"))?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let name = |s: &str| format!("encoder.layer.{i}.{s}");
            let lin = |vb: VarBuilder, i_dim, o_dim, what: &str| {
                candle_nn::linear(i_dim, o_dim, vb)
                    .map_err(|e| EngineError::Load(format!("{}: {e}", name(what))))
            };
            let att = l.pp("attention");
            let (q, k, v) = (
                lin(att.pp("self").pp("query"), h, h, "attention.self.query")?,
                lin(att.pp("self").pp("key"), h, h, "attention.self.key")?,
                lin(att.pp("self").pp("value"), h, h, "attention.self.value")?,
            );
            let stack = |parts: [Option<&Tensor>; 3]| -> Result<Option<Tensor>> {
                match parts {
                    [Some(a), Some(b), Some(c)] => Ok(Some(Tensor::cat(&[a, b, c], 0)?)),
                    [None, None, None] => Ok(None),
                    _ => Err(EngineError::Load(format!(
                        "{}: query, key and value differ in having a bias",
                        name("attention.self")
                    ))),
                }
            };
            let qkv = Linear::new(
                stack([Some(q.weight()), Some(k.weight()), Some(v.weight())])?
                    .expect("three weights"),
                stack([q.bias(), k.bias(), v.bias()])?,
            );
            layers.push(Layer {
                qkv,
                attn_out: lin(att.pp("output").pp("dense"), h, h, "attention.output.dense")?,
                attn_norm: candle_nn::layer_norm(h, eps, att.pp("output").pp("LayerNorm"))
                    .map_err(|e| {
                        EngineError::Load(format!("{}: {e}", name("attention.output.LayerNorm")))
                    })?,
                up: lin(
                    l.pp("intermediate").pp("dense"),
                    h,
                    config.intermediate_size,
                    "intermediate.dense",
                )?,
                down: lin(
                    l.pp("output").pp("dense"),
                    config.intermediate_size,
                    h,
                    "output.dense",
                )?,
                out_norm: candle_nn::layer_norm(h, eps, l.pp("output").pp("LayerNorm"))
                    .map_err(|e| EngineError::Load(format!("{}: {e}", name("output.LayerNorm"))))?,
            });
        }
        Ok(Self {
            config,
            words,
            positions,
            token_types,
            embed_norm,
            layers,
            device: device.clone(),
        })
    }

    /// The same weights for [`cpu::PackedBert`] (the candle tensors are dropped after).
    fn pack(self) -> candle_core::Result<cpu::PackedBert> {
        let vec = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let dense = |l: &Linear| -> candle_core::Result<DenseF32> {
            let (n, k) = l.weight().dims2()?;
            let bias = l.bias().map(vec).transpose()?;
            Ok(DenseF32::new(&vec(l.weight())?, n, k, bias.as_deref()))
        };
        let norm = |l: &LayerNorm| -> candle_core::Result<cpu::Norm> {
            Ok(cpu::Norm {
                weight: vec(l.weight())?,
                bias: match l.bias() {
                    Some(b) => vec(b)?,
                    None => vec![0.0; self.config.hidden_size],
                },
                eps: self.config.layer_norm_eps as f32,
            })
        };
        let act = match self.config.hidden_act.as_str() {
            "gelu" => Activation::GeluErf,
            "gelu_new" => Activation::GeluTanh,
            _ => Activation::Relu,
        };
        let mut packed = cpu::PackedBert::new(&self.config, act);
        packed.words = vec(self.words.embeddings())?;
        packed.positions = vec(self.positions.embeddings())?;
        packed.type0 = self.token_types.embeddings().get(0)?.to_vec1::<f32>()?;
        packed.embed_norm = norm(&self.embed_norm)?;
        for l in &self.layers {
            packed.layers.push(cpu::Layer {
                qkv: dense(&l.qkv)?,
                attn_out: dense(&l.attn_out)?,
                attn_norm: norm(&l.attn_norm)?,
                up: dense(&l.up)?,
                down: dense(&l.down)?,
                out_norm: norm(&l.out_norm)?,
            });
        }
        Ok(packed)
    }

    /// Each text's pooled vector: one padded forward pass, then mean or [CLS] pooling.
    fn pooled(&self, texts: &[&[u32]], poolings: &[Pooling]) -> Result<Vec<Vec<f32>>> {
        let len = texts.iter().map(|r| r.len()).max().unwrap_or(0);
        if texts.is_empty() || len == 0 {
            return Ok(vec![Vec::new(); texts.len()]);
        }
        let mut ids = vec![0u32; texts.len() * len];
        let mut mask = vec![0u32; texts.len() * len];
        for (r, row) in texts.iter().enumerate() {
            ids[r * len..r * len + row.len()].copy_from_slice(row);
            mask[r * len..r * len + row.len()].fill(1);
        }
        let ids = Tensor::from_vec(ids, (texts.len(), len), &self.device)?;
        let mask = Tensor::from_vec(mask, (texts.len(), len), &self.device)?;
        let hidden = self.forward(&ids, &mask)?;
        let mean = if poolings.contains(&Pooling::Mean) {
            Some(mean_pool(&hidden, &mask)?.to_vec2::<f32>()?)
        } else {
            None
        };
        let cls = if poolings.contains(&Pooling::Cls) {
            Some(cls_pool(&hidden)?.to_vec2::<f32>()?)
        } else {
            None
        };
        Ok(poolings
            .iter()
            .enumerate()
            .map(|(r, pooling)| {
                let source = match pooling {
                    Pooling::Mean => mean.as_ref(),
                    Pooling::Cls => cls.as_ref(),
                };
                source.expect("computed for every pooling asked")[r].clone()
            })
            .collect())
    }

    /// The last hidden states `(batch, len, hidden)` of a padded batch: `ids` and `mask` are
    /// `(batch, len)` u32 tensors (mask 1 for a token, 0 for padding) on the model's device.
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (batch, len) = ids.dims2()?;
        let c = &self.config;
        if len > c.max_position_embeddings {
            return Err(EngineError::InvalidRequest(format!(
                "{len} tokens; the encoder reads at most {}",
                c.max_position_embeddings
            )));
        }
        let positions = Tensor::arange(0u32, len as u32, &self.device)?;
        let types = Tensor::zeros((batch, len), DType::U32, &self.device)?;
        let x = self
            .words
            .forward(ids)?
            .broadcast_add(&self.positions.forward(&positions)?)?
            .add(&self.token_types.forward(&types)?)?;
        let x = self.embed_norm.forward(&x)?;
        // The additive mask transformers uses: 0 where attended, the most negative f32 over
        // padding, so padded keys get exactly zero weight after the softmax.
        let bias = ((mask.to_dtype(DType::F32)? - 1.0)? * f64::from(f32::MAX))?
            .reshape((batch, 1, 1, len))?;
        let heads = c.num_attention_heads;
        let head_dim = c.hidden_size / heads;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((batch, len, heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        // Every weight is applied to all the batch's tokens at once, as one (batch × len, hidden)
        // matrix: a few large matrix products instead of one small one per input.
        let rows = batch * len;
        let mut x = x.reshape((rows, c.hidden_size))?;
        let split = |t: Tensor| split(t.reshape((batch, len, c.hidden_size))?);
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x)?;
            let h = c.hidden_size;
            let q = split(qkv.narrow(1, 0, h)?)?;
            let k = split(qkv.narrow(1, h, h)?)?;
            let v = split(qkv.narrow(1, 2 * h, h)?)?;
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((rows, c.hidden_size))?;
            let attended = layer
                .attn_norm
                .forward(&(layer.attn_out.forward(&ctx)? + &x)?)?;
            let up = layer.up.forward(&attended)?;
            let up = match c.hidden_act.as_str() {
                "gelu" => gelu_erf(&up)?,
                "gelu_new" => up.gelu()?,
                _ => up.relu()?,
            };
            x = layer
                .out_norm
                .forward(&(layer.down.forward(&up)? + attended)?)?;
        }
        Ok(x.reshape((batch, len, c.hidden_size))?)
    }
}

/// Mean of the hidden states over each row's tokens (`mask` 1), `(batch, hidden)`.
fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
    let sum = hidden.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9f32, f32::MAX)?;
    Ok(sum.broadcast_div(&count)?)
}

/// The first token's (`[CLS]`) hidden state of each row, `(batch, hidden)`.
fn cls_pool(hidden: &Tensor) -> Result<Tensor> {
    Ok(hidden.narrow(1, 0, 1)?.squeeze(1)?)
}

/// GELU with the exact erf, `x · (1 + erf(x / √2)) / 2`. On the CPU: in parallel chunks, with
/// [`dense_f32::gelu_erf`] (vectorisable, within f32 rounding of the exact one), instead of a
/// libm `erff` call per element on one thread (9% of an embedding batch's time); elsewhere
/// candle's `gelu_erf`.
fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        Ok(x.contiguous()?.apply_op1_no_bwd(&CpuGeluErf)?)
    } else {
        Ok(x.gelu_erf()?)
    }
}

struct CpuGeluErf;

impl candle_core::CustomOp1 for CpuGeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let candle_core::CpuStorage::F32(values) = storage else {
            candle_core::bail!("gelu-erf: f32 only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("gelu-erf: a contiguous tensor only");
        };
        let src = &values[start..end];
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(16_384)
            .zip(src.par_chunks(16_384))
            .for_each(|(out, src)| {
                for (o, &x) in out.iter_mut().zip(src) {
                    *o = dense_f32::gelu_erf(x);
                }
            });
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn gelu_erf_is_within_f32_rounding_of_the_exact_one() {
        let mut worst = 0f64;
        for i in -20_000..=20_000 {
            let x = i as f32 / 1000.0;
            let exact =
                0.5 * f64::from(x) * (1.0 + libm_erf(f64::from(x) / std::f64::consts::SQRT_2));
            let got = f64::from(super::dense_f32::gelu_erf(x));
            worst = worst.max((got - exact).abs() / exact.abs().max(1.0));
        }
        assert!(worst < 1e-6, "worst error {worst}");
    }

    /// erf in f64 by its series (|x| < 3) and continued fraction (beyond), for the test only.
    fn libm_erf(x: f64) -> f64 {
        let a = x.abs();
        let r = if a < 3.0 {
            let mut term = a;
            let mut sum = a;
            let mut n = 0.0;
            loop {
                n += 1.0;
                term *= -a * a / n;
                let add = term / (2.0 * n + 1.0);
                sum += add;
                if add.abs() < 1e-17 {
                    break;
                }
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc by Lentz's continued fraction.
            let mut f = a;
            for k in (1..60).rev() {
                f = a + (k as f64 / 2.0) / f;
            }
            1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
        };
        r.copysign(x)
    }
}
