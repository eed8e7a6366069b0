//! A real llama GGUF rewritten in another llama-like architecture's layout, computing the same
//! function: how a family this project cannot download a checkpoint of gets a model with real
//! weights (and so real, decisive logits) for parity tests — random weights give near-flat
//! logits where every step is a near tie.
//!
//! [`llama_as_qwen2`]: llama.cpp's converter permutes llama's q and k rows so that ggml's
//! adjacent-pair rotary embeddings apply; Qwen2 keeps the Hugging Face order and rotates
//! halves. Undoing the permutation (whole rows, so quantized blocks are moved, never
//! requantized) and naming the file `qwen2` gives a Qwen2 model equal to the llama one; with
//! zero biases it computes the same logits, with random biases (`bias_seed`) a perturbed but
//! still coherent model whose reference is the float64 forward over the same file.
//! [`llama_as_qwen3`]: the same rows, named `qwen3`, with per-head q and k norm weights (ones,
//! or near one from a seed): the norms change the function, so its reference is the float64
//! forward over the rewritten file. `general.name` says what the file is.

use super::writer::{GgufWriter, TensorPlan};
use super::{splitmix_uniform, Summary};
use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use std::path::Path;

/// Writes `input` (a llama GGUF) as a `qwen2` GGUF at `out`: q and k rows back in the Hugging
/// Face order, `llama.*` keys as `qwen2.*`, and q/k/v biases — zeros, or uniform with standard
/// deviation 0.1 drawn from `bias_seed`.
pub fn llama_as_qwen2(input: &Path, out: &Path, bias_seed: Option<u64>) -> Result<Summary> {
    let what = match bias_seed {
        Some(seed) => format!("random q/k/v biases (seed {seed})"),
        None => "zero q/k/v biases".into(),
    };
    rewrite_llama(input, out, "qwen2", &what, |cfg| {
        let (q, kv) = (
            cfg.head_count * cfg.head_dim,
            cfg.head_count_kv * cfg.head_dim,
        );
        (0..cfg.block_count)
            .flat_map(|i| {
                [("attn_q", q), ("attn_k", kv), ("attn_v", kv)]
                    .map(move |(n, len)| (format!("blk.{i}.{n}.bias"), len))
            })
            .map(|(name, len)| {
                let values = match bias_seed {
                    Some(seed) => splitmix_uniform(seed, &name, len, 0.1),
                    None => vec![0f32; len],
                };
                (name, values)
            })
            .collect()
    })
}

/// Writes `input` (a llama GGUF) as a `qwen3` GGUF at `out`: q and k rows back in the Hugging
/// Face order, `llama.*` keys as `qwen3.*`, and each layer's q and k head norms
/// (`attn_{q,k}_norm.weight`) — ones, or `1 + u` with `u` uniform of standard deviation 0.1
/// drawn from `norm_seed`. Unlike qwen2's zero biases, the norms change the function (each
/// head of q and k is scaled to RMS 1): the result is a coherent model of its own, whose
/// reference is the float64 forward over the same file.
pub fn llama_as_qwen3(input: &Path, out: &Path, norm_seed: Option<u64>) -> Result<Summary> {
    let what = match norm_seed {
        Some(seed) => format!("random q/k head norms (seed {seed})"),
        None => "unit q/k head norms".into(),
    };
    rewrite_llama(input, out, "qwen3", &what, |cfg| {
        let hd = cfg.head_dim;
        (0..cfg.block_count)
            .flat_map(|i| {
                ["attn_q_norm", "attn_k_norm"].map(move |n| format!("blk.{i}.{n}.weight"))
            })
            .map(|name| {
                let values = match norm_seed {
                    Some(seed) => splitmix_uniform(seed, &name, hd, 0.1)
                        .into_iter()
                        .map(|u| 1.0 + u)
                        .collect(),
                    None => vec![1f32; hd],
                };
                (name, values)
            })
            .collect()
    })
}

/// The shared rewrite: `input`'s tensors with q and k rows unpermuted, metadata under
/// `arch.*`, plus the f32 vectors `extra` gives for its config.
fn rewrite_llama(
    input: &Path,
    out: &Path,
    arch: &str,
    what: &str,
    extra: impl Fn(&crate::ModelConfig) -> Vec<(String, Vec<f32>)>,
) -> Result<Summary> {
    let io = |e: std::io::Error| EngineError::Load(format!("{}: {e}", input.display()));
    let mut file = std::fs::File::open(input).map_err(io)?;
    let ct = gguf_file::Content::read(&mut file)
        .map_err(|e| EngineError::Load(format!("{}: not a GGUF file: {e}", input.display())))?;
    let cfg = crate::ModelConfig::from_gguf(&ct)?;
    if cfg.architecture != "llama" {
        return Err(EngineError::Load(format!(
            "general.architecture is `{}`: only a llama GGUF can be rewritten as {arch}",
            cfg.architecture
        )));
    }
    if ct.tensor_infos.contains_key("rope_freqs.weight")
        || cfg.rope_linear_scale != 1.0
        || cfg.expert_count > 0
        || cfg.rope_dim != cfg.head_dim
    {
        return Err(EngineError::Load(format!(
            "only plain-RoPE dense llama models can be rewritten as {arch} (it has no \
             rope_freqs, experts or partial rotary embeddings)"
        )));
    }
    let hd = cfg.head_dim;
    let name = match ct.metadata.get("general.name") {
        Some(Value::String(n)) => n.clone(),
        _ => input.display().to_string(),
    };
    let mut meta: Vec<(String, Value)> = ct
        .metadata
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "general.architecture" | "general.name" | "general.alignment"
            )
        })
        .map(|(k, v)| match k.strip_prefix("llama.") {
            Some(rest) => (format!("{arch}.{rest}"), v.clone()),
            None => (k.clone(), v.clone()),
        })
        .collect();
    if arch == "qwen3" {
        // Real Qwen3 files state their head width (wider than embedding / heads there).
        for key in ["attention.key_length", "attention.value_length"] {
            meta.push((format!("{arch}.{key}"), Value::U32(cfg.head_dim as u32)));
        }
        // candle-transformers' `quantized_qwen3` (the parity test's reference) builds its
        // rotary tables in the float type this key names, f16 when absent: f32 here, as the
        // exact forward. Other readers ignore it.
        meta.push(("general.dtype".into(), Value::U32(0)));
    }
    meta.sort_by(|a, b| a.0.cmp(&b.0));
    meta.push(("general.architecture".into(), Value::String(arch.into())));
    meta.push((
        "general.name".into(),
        Value::String(format!("{name}, rewritten as {arch} with {what}")),
    ));

    let mut infos: Vec<_> = ct.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, i)| i.offset);
    let mut plans: Vec<TensorPlan> = infos
        .iter()
        .map(|(name, info)| TensorPlan {
            name: (*name).clone(),
            shape: info.shape.dims().to_vec(),
            dtype: info.ggml_dtype,
        })
        .collect();
    let extra = extra(&cfg);
    for (name, values) in &extra {
        plans.push(TensorPlan {
            name: name.clone(),
            shape: vec![values.len()],
            dtype: GgmlDType::F32,
        });
    }
    let summary = super::summarize(&plans)?;
    let mut w = GgufWriter::create(out, &meta, plans.clone())?;
    for plan in &plans {
        if let Some((_, values)) = extra.iter().find(|(n, _)| *n == plan.name) {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.write_tensor(&plan.name, &bytes)?;
            continue;
        }
        let t = ct
            .tensor(&mut file, &plan.name, &Device::Cpu)
            .map_err(|e| EngineError::Load(format!("tensor `{}`: {e}", plan.name)))?;
        let data = t.data()?;
        let heads = if plan.name.ends_with(".attn_q.weight") {
            Some(cfg.head_count)
        } else if plan.name.ends_with(".attn_k.weight") {
            Some(cfg.head_count_kv)
        } else {
            None
        };
        match heads {
            Some(heads) => w.write_tensor(&plan.name, &unpermute_rows(&data, heads, hd)?)?,
            None => w.write_tensor(&plan.name, &data)?,
        }
    }
    w.finish()?;
    Ok(summary)
}

/// The rows of a q or k matrix (`heads × head_dim` rows, each row's bytes whole, whatever its
/// block format) from llama.cpp's llama order back to the Hugging Face order: within a head,
/// GGUF row `2i + h` is Hugging Face row `h · head_dim/2 + i`.
pub fn unpermute_rows(data: &[u8], heads: usize, head_dim: usize) -> Result<Vec<u8>> {
    let rows = heads * head_dim;
    if rows == 0 || !data.len().is_multiple_of(rows) || !head_dim.is_multiple_of(2) {
        return Err(EngineError::Load(format!(
            "{} bytes do not split into {heads} heads of {head_dim} rows",
            data.len()
        )));
    }
    let row = data.len() / rows;
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(data.len());
    for head in 0..heads {
        for hf in 0..head_dim {
            let (h, i) = (hf / half, hf % half);
            let src = head * head_dim + 2 * i + h;
            out.extend_from_slice(&data[src * row..(src + 1) * row]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::unpermute_rows;

    /// llama.cpp's converter: `reshape(heads, 2, hd/2, cols).swapaxes(1, 2)`.
    fn permute(rows: &[u32], heads: usize, hd: usize) -> Vec<u32> {
        let mut out = vec![0; rows.len()];
        for head in 0..heads {
            for h in 0..2 {
                for i in 0..hd / 2 {
                    out[head * hd + i * 2 + h] = rows[head * hd + h * (hd / 2) + i];
                }
            }
        }
        out
    }

    #[test]
    fn unpermuting_undoes_the_converters_permutation() {
        let (heads, hd) = (3, 8);
        let hf: Vec<u32> = (0..(heads * hd) as u32).collect();
        let gguf = permute(&hf, heads, hd);
        // Rows of 2 bytes each.
        let bytes: Vec<u8> = gguf.iter().flat_map(|&r| [r as u8, 0xAA]).collect();
        let back = unpermute_rows(&bytes, heads, hd).unwrap();
        let rows: Vec<u32> = back.chunks(2).map(|c| u32::from(c[0])).collect();
        assert_eq!(rows, hf);
        assert!(unpermute_rows(&bytes[1..], heads, hd).is_err());
    }
}
