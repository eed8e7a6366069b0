//! The engine's forward pass against candle-transformers' models — `quantized_llama` on the
//! real model, `quantized_qwen2` on the real model rewritten as qwen2 (`gguf::derive`: the
//! Hugging Face row order, rotary embeddings over halves, random q/k/v biases),
//! `quantized_qwen3` on it rewritten as qwen3 (random per-head q/k norms) — each an
//! implementation of its architecture that shares no code with ours but candle's kernels.

use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_llama, quantized_qwen2, quantized_qwen3};
use edgerun_engine::{Kernels, KvCache, Segment};
use std::path::{Path, PathBuf};

/// The real model rewritten by `derive` (a `gguf::derive` function with its seed), written
/// once per test process under `name`.
fn derived(
    name: &str,
    derive: impl Fn(&Path, &Path) -> edgerun_engine::Result<edgerun_engine::gguf::Summary>,
) -> PathBuf {
    static ONCE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    let out =
        std::env::temp_dir().join(format!("edgerun-parity-{name}-{}.gguf", std::process::id()));
    if !out.exists() {
        derive(&edgerun_testkit::model_path(), &out).unwrap();
    }
    out
}

/// The real model as qwen2 with random biases.
fn qwen2_model() -> PathBuf {
    derived("qwen2", |i, o| {
        edgerun_engine::gguf::derive::llama_as_qwen2(i, o, Some(3))
    })
}

/// The real model as qwen3 with random q/k head norms.
fn qwen3_model() -> PathBuf {
    derived("qwen3", |i, o| {
        edgerun_engine::gguf::derive::llama_as_qwen3(i, o, Some(5))
    })
}

/// One model's forward: token ids `(1, n)` at a position to the last token's logits.
type Forward = Box<dyn FnMut(&Tensor, usize) -> candle_core::Result<Tensor>>;

fn reference_logits(path: &Path, tokens: &[u32], chunks: &[usize]) -> Vec<Vec<f32>> {
    let mut f = std::fs::File::open(path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let arch = ct.metadata["general.architecture"]
        .to_string()
        .unwrap()
        .clone();
    let mut forward: Forward = match arch.as_str() {
        "llama" => {
            let mut m = quantized_llama::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
            Box::new(move |x, pos| m.forward(x, pos))
        }
        "qwen2" => {
            let mut m = quantized_qwen2::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
            Box::new(move |x, pos| m.forward(x, pos))
        }
        "qwen3" => {
            let mut m = quantized_qwen3::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
            Box::new(move |x, pos| m.forward(x, pos))
        }
        other => panic!("no reference for {other}"),
    };
    let mut out = Vec::new();
    let mut pos = 0;
    for &n in chunks {
        let input = Tensor::new(&tokens[pos..pos + n], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = forward(&input, pos).unwrap();
        out.push(logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        pos += n;
    }
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let e: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
    let s: f32 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

/// With candle's kernels the forward pass reproduces `quantized_llama` to float rounding;
/// with ours (SIMD Q4_1) it agrees to the noise of 8-bit activation quantization: logits within
/// 4% of their scale, the same greedy token and next-token probabilities within 0.02.
#[test]
fn logits_match_quantized_llama_for_prefill_and_decode() {
    let path = edgerun_testkit::model_path();
    check_against_reference(&path, Kernels::CandleOnly, 1e-3, 0.02);
    // Measured: at most 0.75 on logits of magnitude ~35 (2%), from rounding differences that
    // 8-bit activation quantization amplifies over 30 layers (the reference itself moves by as
    // much when a prompt is read in chunks).
    check_against_reference(&path, Kernels::Fastest, 0.04, 0.02);
}

/// The same for qwen2 (rotary embeddings over halves, q/k/v biases). With candle's kernels the
/// same bound: the architecture's own math reproduces `quantized_qwen2` to float rounding. With
/// ours, the logits' bound is the same; the random biases leave this model nearer ties than
/// SmolLM2 (a top-2 margin of 0.2 at the first step), where the same logit noise moves the
/// probabilities further (measured 0.038).
#[test]
fn logits_match_quantized_qwen2_for_prefill_and_decode() {
    let path = qwen2_model();
    check_against_reference(&path, Kernels::CandleOnly, 1e-3, 0.02);
    check_against_reference(&path, Kernels::Fastest, 0.04, 0.06);
}

/// The same for qwen3 (per-head q and k RMSNorm before rotary embeddings over halves), to a
/// looser bound: candle-transformers 0.11's `quantized_qwen3` runs a CPU flash-attention path
/// of its own, and its logits differ from ours by up to 0.6 on a scale of 29 (2%) with
/// candle's kernels as with ours (measured 2026-12-08), where `quantized_qwen2` agrees to
/// float rounding. The greedy token and the probabilities agree. The tight check of the qwen3
/// math is the engine's float64 test (`fidelity::qwen3_follows_exact_math`), which our qwen3
/// follows closer (logits 0.12 rms from exact) than our qwen2 does (0.22), itself equal to
/// `quantized_qwen2`: the 2% is quantized_qwen3's.
#[test]
fn logits_match_quantized_qwen3_for_prefill_and_decode() {
    let path = qwen3_model();
    check_against_reference(&path, Kernels::CandleOnly, 0.04, 0.06);
    check_against_reference(&path, Kernels::Fastest, 0.04, 0.06);
}

/// qwen3 with heads wider than embedding / heads (Qwen3's own layout: `attention.key_length`
/// 96 over a 256 embedding of 4 heads), random weights generated by `gguf::generate`: the
/// logits of a prefill and three decode steps within 4% of their scale of `quantized_qwen3`'s
/// with candle's kernels and with ours (measured 1.1% with candle's: the same disagreement as
/// on real weights above). Random weights give near-flat logits, so no greedy token is
/// compared.
#[test]
fn wide_qwen3_heads_match_quantized_qwen3() {
    use edgerun_engine::gguf::{generate, ModelShape, Scheme};
    let shape = ModelShape {
        architecture: "qwen3",
        vocab: None,
        dim: 256,
        layers: 3,
        ff: 512,
        heads: 4,
        kv_heads: 2,
        head_dim: Some(96),
        context: 1024,
        rope_base: 1_000_000.0,
        rms_eps: 1e-6,
        tied_embeddings: true,
    };
    let path = std::env::temp_dir().join(format!(
        "edgerun-parity-wide-qwen3-{}.gguf",
        std::process::id()
    ));
    generate(
        "wide-qwen3",
        &shape,
        Scheme::Q8_0,
        &edgerun_testkit::model_path(),
        11,
        &path,
    )
    .unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 977 + 13) % 49_000).collect();
    let chunks = [37, 1, 1, 1];
    let reference = reference_logits(&path, &tokens, &chunks);
    for (kernels, tolerance) in [(Kernels::CandleOnly, 0.04), (Kernels::Fastest, 0.04)] {
        let loaded =
            edgerun_engine::LoadedModel::load_with(&path, None, &Device::Cpu, kernels).unwrap();
        assert_eq!(loaded.model.config().head_dim, 96);
        for (step, ours) in engine_logits(&loaded, &tokens, &chunks).iter().enumerate() {
            let diff = max_abs_diff(ours, &reference[step]);
            let scale = reference[step].iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(
                diff <= tolerance * scale,
                "{kernels:?} step {step}: max |diff| {diff} (logit scale {scale})"
            );
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// The engine's last-token logits after each chunk of `tokens`, over one cache.
fn engine_logits(
    loaded: &edgerun_engine::LoadedModel,
    tokens: &[u32],
    chunks: &[usize],
) -> Vec<Vec<f32>> {
    let model = &loaded.model;
    let mut cache = KvCache::new(&model.kv_layout(), tokens.len(), model.device()).unwrap();
    let mut pos = 0;
    chunks
        .iter()
        .map(|&n| {
            let mut segs = [Segment {
                tokens: &tokens[pos..pos + n],
                cache: &mut cache,
            }];
            let logits = model.forward(&mut segs, &[0]).unwrap().unwrap();
            pos += n;
            logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap()
        })
        .collect()
}

fn check_against_reference(path: &Path, kernels: Kernels, rel_tolerance: f32, p_tolerance: f32) {
    let loaded = edgerun_engine::LoadedModel::load_with(path, None, &Device::Cpu, kernels).unwrap();
    let text = "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n<|im_start|>assistant\n";
    let mut tokens = loaded.tokenizer.encode(text).unwrap();
    // Then three decode steps with fixed tokens.
    tokens.extend(loaded.tokenizer.encode(" Paris is").unwrap());
    let prompt_len = tokens.len() - 3;
    let chunks = [prompt_len, 1, 1, 1];
    let reference = reference_logits(path, &tokens, &chunks);
    for (step, ours) in engine_logits(&loaded, &tokens, &chunks)
        .into_iter()
        .enumerate()
    {
        let diff = max_abs_diff(&ours, &reference[step]);
        let scale = reference[step].iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(
            diff <= rel_tolerance * scale.max(1.0),
            "{kernels:?} step {step}: max |diff| {diff} (logit scale {scale})"
        );
        let p_diff = max_abs_diff(&softmax(&ours), &softmax(&reference[step]));
        assert!(
            p_diff < p_tolerance,
            "{kernels:?} step {step}: probabilities differ by {p_diff}"
        );
        assert_eq!(
            edgerun_engine::argmax(&ours),
            edgerun_engine::argmax(&reference[step]),
            "step {step}: greedy token differs"
        );
    }
}

#[test]
fn chunked_prefill_agrees_with_whole_prefill() {
    // Activations are quantized to 8 bits per matmul row block and the attention matmul's
    // blocking depends on its shape, so a prompt read in chunks differs slightly from one read
    // whole (quantized_llama shows the same ~0.5 logit spread). The scheduler therefore chunks
    // every prompt at the same boundaries whatever else is running; here the two readings must
    // still agree on the next token and closely on the logits.
    let loaded =
        edgerun_engine::LoadedModel::load(&edgerun_testkit::model_path(), None, &Device::Cpu)
            .unwrap();
    let model = &loaded.model;
    let tokens = loaded
        .tokenizer
        .encode(
            "The quick brown fox jumps over the lazy dog. "
                .repeat(8)
                .as_str(),
        )
        .unwrap();
    let run = |chunk: usize| {
        let mut cache = KvCache::new(&model.kv_layout(), tokens.len(), model.device()).unwrap();
        let mut last = None;
        for c in tokens.chunks(chunk) {
            let mut segs = [Segment {
                tokens: c,
                cache: &mut cache,
            }];
            last = model.forward(&mut segs, &[0]).unwrap();
        }
        assert_eq!(cache.len(), tokens.len());
        last.unwrap().to_vec2::<f32>().unwrap().remove(0)
    };
    let whole = run(tokens.len());
    for chunk in [7, 32] {
        let chunked = run(chunk);
        let diff = max_abs_diff(&whole, &chunked);
        assert!(diff < 2.0, "chunk {chunk}: max |diff| {diff}");
        assert_eq!(
            edgerun_engine::argmax(&whole),
            edgerun_engine::argmax(&chunked)
        );
    }
    // The same chunking is exactly reproducible.
    assert_eq!(run(7), run(7));
}
