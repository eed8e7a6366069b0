//! Writing GGUF files: random-weight models in a named shape ([`generate`]), requantized
//! copies of real ones ([`requantize`]) and real ones rewritten in another llama-like
//! architecture's layout ([`derive`]), in llama.cpp's quantization layouts
//! ([`layout`]), through a streaming writer ([`writer`]) that holds one tensor at a time.
//!
//! What they are for: speed measurements and parity between two implementations of the same
//! math need models in real shapes (an 8B model for the GPU check, a Llama-3-shaped Q4_K_M for
//! the CPU kernels) that this project cannot download. Random weights are never passed off as
//! a model: a generated file says so in `general.name` (`random <shape> <scheme>`), and only
//! its tokenizer is real (copied from a GGUF the user names, so prompts tokenize as they would).
//!
//! Quantization itself is candle's (`QTensor::quantize`, which implements GGML's block formats
//! as llama.cpp does), run over row chunks on every core.

pub mod derive;
pub mod layout;
pub mod writer;

pub use layout::Scheme;
pub use writer::{GgufWriter, TensorPlan};

use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// The dimensions of a llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// `llama`, `qwen2` (the same tensors plus q/k/v biases, metadata under `qwen2.*`) or
    /// `qwen3` (plus per-head q/k norm weights).
    pub architecture: &'static str,
    /// Vocabulary size the shape requires; `None`: whatever the tokenizer has.
    pub vocab: Option<usize>,
    pub dim: usize,
    pub layers: usize,
    pub ff: usize,
    pub heads: usize,
    pub kv_heads: usize,
    /// A head's width where it is not `dim / heads` (Qwen3: 128 over 1024 / 16), written as
    /// `attention.key_length`; qwen3 shapes only.
    pub head_dim: Option<usize>,
    pub context: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    /// No `output.weight`: the output layer is the token embedding.
    pub tied_embeddings: bool,
}

/// The named shapes: `llama-3-8b` (the product's model), `llama-3-mini` (a Llama-3-shaped model
/// small enough for CPU benchmarks), `smollm2-135m` (the default test model's shape),
/// `qwen2.5-0.5b` (Qwen2.5-0.5B's, architecture `qwen2`; its vocabulary is the tokenizer's:
/// llama.cpp's `ggml-vocab-qwen2.gguf`), `qwen3-0.6b` (Qwen3-0.6B's, architecture `qwen3`,
/// heads of 128 over a 1024 embedding; the same vocabulary).
pub const SHAPES: &[(&str, ModelShape)] = &[
    (
        "llama-3-8b",
        ModelShape {
            architecture: "llama",
            vocab: Some(128_256),
            dim: 4096,
            layers: 32,
            ff: 14336,
            heads: 32,
            kv_heads: 8,
            head_dim: None,
            context: 8192,
            rope_base: 500_000.0,
            rms_eps: 1e-5,
            tied_embeddings: false,
        },
    ),
    (
        "llama-3-mini",
        ModelShape {
            architecture: "llama",
            vocab: Some(128_256),
            dim: 1024,
            layers: 8,
            ff: 3584,
            heads: 8,
            kv_heads: 2,
            head_dim: None,
            context: 8192,
            rope_base: 500_000.0,
            rms_eps: 1e-5,
            tied_embeddings: false,
        },
    ),
    (
        "smollm2-135m",
        ModelShape {
            architecture: "llama",
            vocab: Some(49_152),
            dim: 576,
            layers: 30,
            ff: 1536,
            heads: 9,
            kv_heads: 3,
            head_dim: None,
            context: 8192,
            rope_base: 100_000.0,
            rms_eps: 1e-5,
            tied_embeddings: true,
        },
    ),
    (
        "qwen2.5-0.5b",
        ModelShape {
            architecture: "qwen2",
            vocab: None,
            dim: 896,
            layers: 24,
            ff: 4864,
            heads: 14,
            kv_heads: 2,
            head_dim: None,
            context: 32_768,
            rope_base: 1_000_000.0,
            rms_eps: 1e-6,
            tied_embeddings: true,
        },
    ),
    (
        "qwen3-0.6b",
        ModelShape {
            architecture: "qwen3",
            vocab: None,
            dim: 1024,
            layers: 28,
            ff: 3072,
            heads: 16,
            kv_heads: 8,
            head_dim: Some(128),
            context: 40_960,
            rope_base: 1_000_000.0,
            rms_eps: 1e-6,
            tied_embeddings: true,
        },
    ),
];

/// A named shape.
pub fn shape(name: &str) -> Result<ModelShape> {
    SHAPES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| s.clone())
        .ok_or_else(|| {
            let names: Vec<_> = SHAPES.iter().map(|(n, _)| *n).collect();
            EngineError::InvalidRequest(format!(
                "unknown shape `{name}` (expected {} or custom dimensions)",
                names.join(", ")
            ))
        })
}

impl ModelShape {
    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        if !matches!(self.architecture, "llama" | "qwen2" | "qwen3") {
            return bad(format!(
                "architecture `{}`: shapes are llama, qwen2 or qwen3",
                self.architecture
            ));
        }
        if [
            self.dim,
            self.layers,
            self.ff,
            self.heads,
            self.kv_heads,
            self.context,
        ]
        .contains(&0)
        {
            return bad("every dimension must be at least 1".into());
        }
        if !self.dim.is_multiple_of(self.heads) || !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "dim {} / {} heads / {} kv heads do not divide evenly",
                self.dim, self.heads, self.kv_heads
            ));
        }
        if let Some(hd) = self.head_dim {
            if self.architecture != "qwen3" {
                return bad("a head width of its own is for qwen3 shapes".into());
            }
            if hd == 0 || !(hd * self.heads).is_multiple_of(32) {
                return bad(format!(
                    "head width {hd} × {} heads is not a multiple of 32 (quantization blocks)",
                    self.heads
                ));
            }
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad("the head dimension must be even (RoPE)".into());
        }
        if !self.dim.is_multiple_of(32) || !self.ff.is_multiple_of(32) {
            return bad("dim and ff must be multiples of 32 (quantization blocks)".into());
        }
        Ok(())
    }

    fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.dim / self.heads)
    }
}

/// What a written file holds: tensors per block type, and its size.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub types: BTreeMap<String, usize>,
    pub bytes: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let types: Vec<String> = self.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
        write!(
            f,
            "{} ({:.1} MiB)",
            types.join(", "),
            self.bytes as f64 / (1 << 20) as f64
        )
    }
}

/// Writes a GGUF of `shape`'s architecture with random weights in `scheme`'s layout, the tokenizer
/// (every `tokenizer.*` key) copied from `vocab_from`. The same `seed` gives the same file.
pub fn generate(
    shape_name: &str,
    shape: &ModelShape,
    scheme: Scheme,
    vocab_from: &Path,
    seed: u64,
    out: &Path,
) -> Result<Summary> {
    shape.check()?;
    layout::check_layer_count(shape.layers)?;
    let tokenizer = tokenizer_metadata(vocab_from)?;
    let n_vocab = match tokenizer.iter().find(|(k, _)| k == "tokenizer.ggml.tokens") {
        Some((_, Value::Array(tokens))) => tokens.len(),
        _ => {
            return Err(EngineError::Load(format!(
                "{}: no tokenizer.ggml.tokens array",
                vocab_from.display()
            )))
        }
    };
    if let Some(v) = shape.vocab.filter(|&v| v != n_vocab) {
        return Err(EngineError::InvalidRequest(format!(
            "{shape_name} has a vocabulary of {v} tokens, {} has {n_vocab}: name a tokenizer of that size \
             (llama-3 shapes: llama.cpp's models/ggml-vocab-llama-bpe.gguf)",
            vocab_from.display()
        )));
    }
    let (dim, hd) = (shape.dim, shape.head_dim());
    let (qd, kv) = (shape.heads * hd, shape.kv_heads * hd);
    let u32v = |x: usize| Value::U32(x as u32);
    let arch = shape.architecture;
    let key = |k: &str| format!("{arch}.{k}");
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            "general.name".into(),
            Value::String(format!("random {shape_name} {scheme}")),
        ),
        ("general.file_type".into(), Value::U32(scheme.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        (key("vocab_size"), u32v(n_vocab)),
        (key("context_length"), u32v(shape.context)),
        (key("embedding_length"), u32v(dim)),
        (key("block_count"), u32v(shape.layers)),
        (key("feed_forward_length"), u32v(shape.ff)),
        (key("attention.head_count"), u32v(shape.heads)),
        (key("attention.head_count_kv"), u32v(shape.kv_heads)),
        (key("rope.dimension_count"), u32v(hd)),
        (key("rope.freq_base"), Value::F32(shape.rope_base)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Value::F32(shape.rms_eps),
        ),
    ];
    if arch == "qwen3" {
        meta.push((key("attention.key_length"), u32v(hd)));
        meta.push((key("attention.value_length"), u32v(hd)));
        // As `derive::llama_as_qwen3`: candle-transformers' quantized_qwen3 (the parity
        // tests' reference) builds its RoPE tables in f16 unless this says f32.
        meta.push(("general.dtype".into(), Value::U32(0)));
    }
    meta.extend(tokenizer);

    let mut tensors: Vec<(String, Vec<usize>)> =
        vec![("token_embd.weight".into(), vec![n_vocab, dim])];
    for i in 0..shape.layers {
        for (n, s) in [
            ("attn_norm", vec![dim]),
            ("attn_q", vec![qd, dim]),
            ("attn_k", vec![kv, dim]),
            ("attn_v", vec![kv, dim]),
            ("attn_output", vec![dim, qd]),
            ("ffn_norm", vec![dim]),
            ("ffn_gate", vec![shape.ff, dim]),
            ("ffn_up", vec![shape.ff, dim]),
            ("ffn_down", vec![dim, shape.ff]),
        ] {
            tensors.push((format!("blk.{i}.{n}.weight"), s));
        }
        if arch == "qwen2" {
            for (n, len) in [("attn_q", qd), ("attn_k", kv), ("attn_v", kv)] {
                tensors.push((format!("blk.{i}.{n}.bias"), vec![len]));
            }
        }
        if arch == "qwen3" {
            for n in ["attn_q_norm", "attn_k_norm"] {
                tensors.push((format!("blk.{i}.{n}.weight"), vec![hd]));
            }
        }
    }
    tensors.push(("output_norm.weight".into(), vec![dim]));
    let output_name = if shape.tied_embeddings {
        "token_embd.weight"
    } else {
        tensors.push(("output.weight".into(), vec![n_vocab, dim]));
        "output.weight"
    };
    let plans: Vec<TensorPlan> = tensors
        .into_iter()
        .map(|(name, shape_)| {
            let dtype = layout::tensor_type(scheme, &name, &shape_, shape.layers, output_name)
                .unwrap_or(GgmlDType::F32);
            TensorPlan {
                name,
                shape: shape_,
                dtype,
            }
        })
        .collect();
    let summary = summarize(&plans)?;
    let mut w = GgufWriter::create(out, &meta, plans.clone())?;
    for plan in &plans {
        let values = random_values(seed, plan);
        let bytes = encode(values, &plan.shape, plan.dtype)?;
        w.write_tensor(&plan.name, &bytes)?;
    }
    w.finish()?;
    Ok(summary)
}

/// Rewrites the llama GGUF `input` in `scheme`'s layout (what `llama-quantize
/// --allow-requantize` does): matrices are dequantized and quantized again, everything else is
/// copied, the metadata is kept with `general.file_type` updated. Metadata goes through
/// candle's reader, which decodes strings lossily: a token that is not valid UTF-8 would come
/// out as U+FFFD (GGUF tokenizers store valid UTF-8, byte-level BPE included).
pub fn requantize(input: &Path, scheme: Scheme, out: &Path) -> Result<Summary> {
    let io = |e: std::io::Error| EngineError::Load(format!("{}: {e}", input.display()));
    let mut file = std::fs::File::open(input).map_err(io)?;
    let ct = gguf_file::Content::read(&mut file)
        .map_err(|e| EngineError::Load(format!("{}: not a GGUF file: {e}", input.display())))?;
    let arch = match ct.metadata.get("general.architecture") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err(EngineError::Load("no general.architecture".into())),
    };
    if arch != "llama" {
        return Err(EngineError::Load(format!(
            "general.architecture is `{arch}`: the quantization layouts here are llama's"
        )));
    }
    let n_layers = match ct.metadata.get("llama.block_count") {
        Some(v) => v
            .to_u64()
            .map_err(|e| EngineError::Load(format!("llama.block_count: {e}")))?
            as usize,
        None => return Err(EngineError::Load("no llama.block_count".into())),
    };
    let experts = match ct.metadata.get("llama.expert_count") {
        Some(v) => v.to_u64().unwrap_or(u64::MAX),
        None => 0,
    };
    if experts > 0 || ct.tensor_infos.values().any(|i| i.shape.rank() > 2) {
        return Err(EngineError::Load(
            "mixture-of-experts files (3-D expert tensors) are not supported by these layouts"
                .into(),
        ));
    }
    layout::check_layer_count(n_layers)?;
    let output_name = if ct.tensor_infos.contains_key("output.weight") {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    // File order, so that the output reads like the input.
    let mut infos: Vec<_> = ct.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, i)| i.offset);
    let plans: Vec<TensorPlan> = infos
        .iter()
        .map(|(name, info)| {
            let shape = info.shape.dims().to_vec();
            let dtype = layout::tensor_type(scheme, name, &shape, n_layers, output_name)
                .unwrap_or(info.ggml_dtype);
            TensorPlan {
                name: (*name).clone(),
                shape,
                dtype,
            }
        })
        .collect();
    let mut meta: Vec<(String, Value)> = ct
        .metadata
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "general.file_type" | "general.quantization_version" | "general.alignment"
            )
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    meta.push(("general.file_type".into(), Value::U32(scheme.file_type())));
    meta.push(("general.quantization_version".into(), Value::U32(2)));
    let summary = summarize(&plans)?;
    let mut w = GgufWriter::create(out, &meta, plans.clone())?;
    for (plan, (name, info)) in plans.iter().zip(&infos) {
        let t = ct
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| EngineError::Load(format!("tensor `{name}`: {e}")))?;
        if plan.dtype == info.ggml_dtype {
            w.write_tensor(name, &t.data()?)?;
        } else {
            let values = t
                .dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            w.write_tensor(name, &encode(values, &plan.shape, plan.dtype)?)?;
        }
    }
    w.finish()?;
    Ok(summary)
}

fn summarize(plans: &[TensorPlan]) -> Result<Summary> {
    let mut s = Summary::default();
    for p in plans {
        *s.types.entry(format!("{:?}", p.dtype)).or_default() += 1;
        s.bytes += p.byte_len()? as u64;
    }
    Ok(s)
}

/// Every `tokenizer.*` key of a GGUF.
fn tokenizer_metadata(path: &Path) -> Result<Vec<(String, Value)>> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
    let ct = gguf_file::Content::read(&mut f)
        .map_err(|e| EngineError::Load(format!("{}: not a GGUF file: {e}", path.display())))?;
    let mut keys: Vec<(String, Value)> = ct
        .metadata
        .into_iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(keys)
}

/// Deterministic values for a tensor: norms are ones, matrices and biases uniform with
/// standard deviation 0.02 (as models are initialised), from a generator seeded by `seed` and
/// the tensor's name.
fn random_values(seed: u64, plan: &TensorPlan) -> Vec<f32> {
    let n: usize = plan.shape.iter().product();
    if plan.shape.len() == 1 && !plan.name.ends_with(".bias") {
        return vec![1.0; n];
    }
    splitmix_uniform(seed, &plan.name, n, 0.02)
}

/// `n` values uniform with standard deviation `std`, from a generator seeded by `seed` and
/// `name` (the same pair gives the same values).
pub(crate) fn splitmix_uniform(seed: u64, name: &str, n: usize, std: f32) -> Vec<f32> {
    let mut state = name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    });
    let half_width = std * 3f32.sqrt();
    (0..n)
        .map(|_| {
            // splitmix64
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * half_width
        })
        .collect()
}

/// `values` (row-major, `shape`) in `dtype`'s on-disk bytes, quantized over row chunks on
/// every core.
fn encode(values: Vec<f32>, shape: &[usize], dtype: GgmlDType) -> Result<Vec<u8>> {
    if dtype == GgmlDType::F32 {
        return Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect());
    }
    let cols = *shape.last().unwrap_or(&1);
    if values.is_empty() || cols == 0 {
        return Ok(Vec::new());
    }
    let rows = values.len() / cols;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = rows.div_ceil(threads).max(1);
    let chunks: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = values
            .chunks(per * cols)
            .map(|chunk| {
                s.spawn(move || -> Result<Vec<u8>> {
                    let t = Tensor::from_slice(chunk, (chunk.len() / cols, cols), &Device::Cpu)?;
                    Ok(QTensor::quantize(&t, dtype)?.data()?.into_owned())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(EngineError::Load("quantization panicked".into())))
            })
            .collect()
    });
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}
