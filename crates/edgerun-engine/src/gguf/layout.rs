//! Which block type each tensor gets in a quantization scheme, decided as llama.cpp's
//! `llama-quantize` decides it for llama-architecture models (`llama_tensor_get_type` in
//! `src/llama-quant.cpp`), so generated and requantized files have the same mix as the files
//! users download.
//!
//! The rules that apply to the schemes here:
//!
//! * only 2-D `*.weight` tensors are quantized, never a `*_norm.weight`; norms, `rope_freqs`
//!   and other vectors stay as they are (f32);
//! * the output matrix (`output.weight`, or `token_embd.weight` when the embeddings are tied)
//!   gets Q6_K, or Q8_0 when its rows are not a multiple of 256 (or the scheme is Q8_0);
//! * Q4_K_M and Q5_K_M give Q6_K to `attn_v` and `ffn_down` in the layers `use_more_bits` picks
//!   (the first and last eighth, and every third one between);
//! * every other matrix gets the scheme's type, and a K-quant whose rows are not a multiple of
//!   256 falls back to a 32-block type (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0), or F16 when
//!   even 32 does not divide them.
//!
//! Checked against llama.cpp 0c1e570 (the `llama-cpp-python==0.3.36` sdist's
//! `vendor/llama.cpp/src/llama-quant.cpp`); rules for imatrix files, MoE models, Falcon and
//! 70B-class models do not apply to what this writes.

use candle_core::quantized::GgmlDType;

/// The quantization schemes (llama.cpp's `ftype`s) the generator and `edgerun quantize` write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Q4KM,
    Q5KM,
    Q6K,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl Scheme {
    pub const ALL: [Scheme; 6] = [
        Scheme::Q4KM,
        Scheme::Q5KM,
        Scheme::Q6K,
        Scheme::Q8_0,
        Scheme::Q4_0,
        Scheme::Q4_1,
    ];

    /// llama.cpp's name (`Q4_K_M`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Q4KM => "Q4_K_M",
            Self::Q5KM => "Q5_K_M",
            Self::Q6K => "Q6_K",
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn file_type(&self) -> u32 {
        match self {
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
            Self::Q5KM => 17,
            Self::Q6K => 18,
        }
    }

    /// The type of every matrix no rule singles out.
    pub fn default_type(&self) -> GgmlDType {
        match self {
            Self::Q4KM => GgmlDType::Q4K,
            Self::Q5KM => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
        }
    }
}

impl std::str::FromStr for Scheme {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|q| q.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(Scheme::name).collect();
                format!(
                    "unknown quantization `{s}` (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// llama.cpp treats 80-layer llama models (70B-class) specially (`attn_v` gets Q5_K instead of
/// Q4_K or Q3_K); that rule is not implemented, so such files are refused rather than written
/// with another mix.
pub fn check_layer_count(n_layers: usize) -> crate::error::Result<()> {
    if n_layers == 80 {
        return Err(crate::error::EngineError::InvalidRequest(
            "80-layer (70B-class) llama layouts are not implemented".into(),
        ));
    }
    Ok(())
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third layer
/// in between.
pub fn use_more_bits(i_layer: usize, n_layers: usize) -> bool {
    let eighth = n_layers / 8;
    // Past the first clause `i_layer >= eighth`, so the subtraction cannot underflow.
    i_layer < eighth || i_layer >= 7 * n_layers / 8 || (i_layer - eighth) % 3 == 2
}

/// The layer index of a `blk.N.` tensor.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// The type `name` (candle-order `shape`, rows first) gets under `scheme` in a model of
/// `n_layers` layers whose output matrix is `output_name` (`output.weight`, or
/// `token_embd.weight` when tied). `None`: the tensor is not quantized (kept as it is).
pub fn tensor_type(
    scheme: Scheme,
    name: &str,
    shape: &[usize],
    n_layers: usize,
    output_name: &str,
) -> Option<GgmlDType> {
    if shape.len() != 2 || !name.ends_with("weight") || name.contains("_norm.weight") {
        return None;
    }
    let row = shape[1];
    let chosen = if name == output_name {
        if !row.is_multiple_of(256) || scheme.default_type() == GgmlDType::Q8_0 {
            GgmlDType::Q8_0
        } else {
            GgmlDType::Q6K
        }
    } else {
        let more_bits = matches!(scheme, Scheme::Q4KM | Scheme::Q5KM)
            && (name.contains("attn_v.weight") || name.contains("ffn_down"))
            && layer_of(name).is_some_and(|i| use_more_bits(i, n_layers));
        if more_bits {
            GgmlDType::Q6K
        } else {
            scheme.default_type()
        }
    };
    Some(fallback(chosen, row))
}

/// A K-quant needs rows that are a multiple of 256; llama.cpp then takes a 32-block type, and
/// F16 when even that does not divide the rows (`tensor_type_fallback`).
fn fallback(dtype: GgmlDType, row: usize) -> GgmlDType {
    if row.is_multiple_of(dtype.block_size()) {
        return dtype;
    }
    let smaller = match dtype {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    };
    if row.is_multiple_of(smaller.block_size()) {
        smaller
    } else {
        GgmlDType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names and shapes of a llama model's matrices, in file order.
    fn llama(
        layers: usize,
        dim: usize,
        kv: usize,
        ff: usize,
        vocab: usize,
    ) -> Vec<(String, Vec<usize>)> {
        let mut t = vec![("token_embd.weight".to_string(), vec![vocab, dim])];
        for i in 0..layers {
            for (n, s) in [
                ("attn_q", vec![dim, dim]),
                ("attn_k", vec![kv, dim]),
                ("attn_v", vec![kv, dim]),
                ("attn_output", vec![dim, dim]),
                ("ffn_gate", vec![ff, dim]),
                ("ffn_up", vec![ff, dim]),
                ("ffn_down", vec![dim, ff]),
            ] {
                t.push((format!("blk.{i}.{n}.weight"), s));
            }
            t.push((format!("blk.{i}.attn_norm.weight"), vec![dim]));
        }
        t.push(("output.weight".to_string(), vec![vocab, dim]));
        t
    }

    fn count(
        scheme: Scheme,
        tensors: &[(String, Vec<usize>)],
        layers: usize,
        output: &str,
    ) -> Vec<(GgmlDType, usize)> {
        let mut counts: Vec<(GgmlDType, usize)> = Vec::new();
        for (name, shape) in tensors {
            if let Some(t) = tensor_type(scheme, name, shape, layers, output) {
                match counts.iter_mut().find(|(d, _)| *d == t) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((t, 1)),
                }
            }
        }
        counts
    }

    #[test]
    fn seventy_b_class_layouts_are_refused_not_guessed() {
        assert!(check_layer_count(80).is_err());
        assert!(check_layer_count(32).is_ok());
    }

    #[test]
    fn use_more_bits_picks_llama_cpps_layers() {
        let picked: Vec<_> = (0..8).filter(|&i| use_more_bits(i, 8)).collect();
        assert_eq!(picked, [0, 3, 6, 7]);
        let picked: Vec<_> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            picked,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
    }

    #[test]
    fn q4_k_m_of_a_llama_3_shape_is_49_q4_k_and_9_q6_k() {
        // The mix llama-quantize gave the 8-layer Llama-3-shaped test model.
        let t = llama(8, 1024, 256, 3584, 128_256);
        let counts = count(Scheme::Q4KM, &t, 8, "output.weight");
        assert_eq!(counts, [(GgmlDType::Q4K, 49), (GgmlDType::Q6K, 9)]);
    }

    #[test]
    fn llama_3_8b_q4_k_m_matches_the_published_file() {
        // Llama-3-8B-Instruct Q4_K_M: 193 Q4_K, 33 Q6_K (output + 16 attn_v + 16 ffn_down).
        let t = llama(32, 4096, 1024, 14336, 128_256);
        let counts = count(Scheme::Q4KM, &t, 32, "output.weight");
        assert_eq!(counts, [(GgmlDType::Q4K, 193), (GgmlDType::Q6K, 33)]);
    }

    #[test]
    fn rows_that_are_not_a_multiple_of_256_fall_back() {
        // SmolLM2-135M: dim 576, ff 1536, tied embeddings.
        let t: Vec<_> = llama(30, 576, 192, 1536, 49_152)
            .into_iter()
            .filter(|(n, _)| n != "output.weight")
            .collect();
        let types = |scheme| {
            t.iter()
                .filter_map(|(n, s)| {
                    Some((
                        n.as_str(),
                        tensor_type(scheme, n, s, 30, "token_embd.weight")?,
                    ))
                })
                .collect::<std::collections::HashMap<_, _>>()
        };
        let q = types(Scheme::Q4KM);
        assert_eq!(q["token_embd.weight"], GgmlDType::Q8_0);
        assert_eq!(q["blk.1.attn_q.weight"], GgmlDType::Q5_0);
        assert_eq!(q["blk.0.attn_v.weight"], GgmlDType::Q8_0); // Q6_K, rows of 576
        assert_eq!(q["blk.4.ffn_down.weight"], GgmlDType::Q4K); // rows of 1536
        assert_eq!(q["blk.0.ffn_down.weight"], GgmlDType::Q6K);
        let q = types(Scheme::Q4_1);
        assert_eq!(q["blk.1.attn_q.weight"], GgmlDType::Q4_1);
        assert_eq!(q["token_embd.weight"], GgmlDType::Q8_0);
        assert!(types(Scheme::Q8_0).values().all(|&t| t == GgmlDType::Q8_0));
    }

    #[test]
    fn vectors_are_never_quantized_and_schemes_parse_by_name() {
        assert_eq!(
            tensor_type(
                Scheme::Q4KM,
                "blk.0.attn_norm.weight",
                &[64],
                1,
                "output.weight"
            ),
            None
        );
        assert_eq!(
            tensor_type(Scheme::Q4KM, "rope_freqs.weight", &[64], 1, "output.weight"),
            None
        );
        assert_eq!("q4_k_m".parse::<Scheme>(), Ok(Scheme::Q4KM));
        assert!("Q3_K_S".parse::<Scheme>().unwrap_err().contains("Q4_K_M"));
        assert_eq!(Scheme::Q4KM.file_type(), 15);
    }
}
