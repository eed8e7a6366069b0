//! Generated `Q4_K_M`, `Q5_K_M` and `Q8_0` models (random weights in a shape whose matrices are all
//! multiples of 256 wide, so llama-quantize's K-quant mix applies to every tensor; SmolLM2's
//! tokenizer) through our kernels: the forward pass agrees with candle's kernels, a sequence's
//! logits are bitwise the same alone or batched with others (the row invariance of the Q4_K,
//! Q5_K, Q6_K and Q8_0 kernels, through the whole model), and the engine generates the same tokens
//! alone or in a batch.

use crate::harness;

use candle_core::Device;
use edgerun_engine::gguf::{self, ModelShape, Scheme};
use edgerun_engine::{
    Engine, GenerationRequest, Kernels, KvCache, LoadedModel, PromptInput, QueuePolicy,
    SamplingConfig, SchedulerConfig, Segment, StopCriteria, TokenStream,
};
use std::path::{Path, PathBuf};

fn shape() -> ModelShape {
    ModelShape {
        architecture: "llama",
        vocab: None,
        dim: 256,
        layers: 4,
        ff: 768,
        heads: 4,
        kv_heads: 2,
        head_dim: None,
        context: 1024,
        rope_base: 10_000.0,
        rms_eps: 1e-5,
        tied_embeddings: false,
    }
}

/// The generated file for `scheme`, written once per test process (the tests run in parallel
/// threads of one process, and the writer's partial file is named after the process).
fn generated(scheme: Scheme) -> PathBuf {
    static ONCE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("edgerun-kquants-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("gen-{scheme}.gguf"));
    if !out.exists() {
        gguf::generate(
            "kquants",
            &shape(),
            scheme,
            &harness::model_path(),
            11,
            &out,
        )
        .unwrap();
    }
    out
}

/// Logits of a prompt read whole, then of three decode steps.
fn logits(path: &Path, kernels: Kernels, tokens: &[u32]) -> Vec<Vec<f32>> {
    let loaded = LoadedModel::load_with(path, None, &Device::Cpu, kernels).unwrap();
    let model = &loaded.model;
    let mut cache = KvCache::new(&model.kv_layout(), tokens.len(), model.device()).unwrap();
    let prompt = tokens.len() - 3;
    let mut out = Vec::new();
    let mut pos = 0;
    for n in [prompt, 1, 1, 1] {
        let mut segs = [Segment {
            tokens: &tokens[pos..pos + n],
            cache: &mut cache,
        }];
        let l = model.forward(&mut segs, &[0]).unwrap().unwrap();
        out.push(l.squeeze(0).unwrap().to_vec1::<f32>().unwrap());
        pos += n;
    }
    out
}

#[test]
fn our_kernels_agree_with_candles_on_generated_k_quant_and_q8_0_models() {
    let tokenizer = harness::load().tokenizer;
    let tokens = tokenizer
        .encode("The lighthouse keeper counted the ships: one, two, three, four.")
        .unwrap();
    for scheme in [Scheme::Q4KM, Scheme::Q5KM, Scheme::Q8_0] {
        let path = generated(scheme);
        let ours = logits(&path, Kernels::Fastest, &tokens);
        let reference = logits(&path, Kernels::CandleOnly, &tokens);
        for (step, (o, r)) in ours.iter().zip(&reference).enumerate() {
            let scale = r.iter().fold(0f32, |m, x| m.max(x.abs())).max(1.0);
            let diff = o.iter().zip(r).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // Both quantize activations to 8 bits with the same rounding; what differs is
            // the order of float sums (and candle's Q6_K / Q4_K repacked tiles' scaling).
            assert!(
                diff <= 0.02 * scale,
                "{scheme} step {step}: max |diff| {diff}, logit scale {scale}"
            );
            assert!(o.iter().all(|v| v.is_finite()));
        }
        // Our K-quant kernels were used: their float sums run in another order than
        // candle's, so the bits differ somewhere. (Our Q8_0 kernel gives candle's bits.)
        if scheme != Scheme::Q8_0 {
            assert!(
                ours != reference,
                "{scheme}: the same bits as candle's kernels"
            );
        }
    }
}

/// One sequence's logits for a prompt read whole and then three decode steps, run alone and
/// then batched with two other sequences in every step (so each matmul sees m = 1 alone and
/// m = 3 batched when decoding): bitwise equal. Candle's kernels (Q6_K switching kernel between
/// m = 1 and m > 1) fail this.
#[test]
fn a_sequences_logits_are_bitwise_the_same_alone_and_batched() {
    let tokenizer = harness::load().tokenizer;
    let enc = |t: &str| tokenizer.encode(t).unwrap();
    let a = enc("Once upon a time there was a lighthouse");
    let others = [enc("Seventeen times three is"), enc("Red, orange, yellow")];
    let next = [enc(" keeper"), enc(" who"), enc(" lived")].concat();
    for scheme in [Scheme::Q4KM, Scheme::Q5KM, Scheme::Q8_0] {
        let loaded = LoadedModel::load(&generated(scheme), None, &Device::Cpu).unwrap();
        let model = &loaded.model;
        let cache = |n: usize| KvCache::new(&model.kv_layout(), n, model.device()).unwrap();
        // Alone.
        let mut solo = cache(a.len() + 3);
        let mut alone = Vec::new();
        let mut step: Vec<&[u32]> = vec![&a];
        step.extend(next.chunks(1));
        for tokens in &step {
            let mut segs = [Segment {
                tokens,
                cache: &mut solo,
            }];
            let l = model.forward(&mut segs, &[0]).unwrap().unwrap();
            alone.push(l.to_vec2::<f32>().unwrap().remove(0));
        }
        // Batched: the other two sequences read their prompts, then decode the same tokens.
        let mut caches = [cache(a.len() + 3), cache(20), cache(20)];
        let [ca, cb, cc] = &mut caches;
        for (s, tokens) in step.iter().enumerate() {
            let (tb, tc): (&[u32], &[u32]) = if s == 0 {
                (&others[0], &others[1])
            } else {
                (&next[s - 1..s], &next[s - 1..s])
            };
            let mut segs = [
                Segment {
                    tokens: tb,
                    cache: &mut *cb,
                },
                Segment {
                    tokens,
                    cache: &mut *ca,
                },
                Segment {
                    tokens: tc,
                    cache: &mut *cc,
                },
            ];
            let l = model.forward(&mut segs, &[1]).unwrap().unwrap();
            let batched = l.to_vec2::<f32>().unwrap().remove(0);
            let same = batched
                .iter()
                .zip(&alone[s])
                .all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{scheme} step {s}: logits differ alone and batched");
        }
    }
}

fn submit(engine: &Engine, prompt: &str, max_tokens: usize) -> TokenStream {
    let input = PromptInput::Prompt {
        text: prompt.into(),
        raw: true,
    };
    let request = GenerationRequest {
        prompt: engine.prepare(&input, &[]).unwrap(),
        sampling: SamplingConfig::GREEDY,
        stopping: StopCriteria::max_tokens(max_tokens),
        constraint: edgerun_engine::Constraint::Free,
    };
    engine.submit(request, QueuePolicy::Wait).unwrap()
}

#[test]
fn a_sequence_generates_the_same_alone_or_in_a_batch_on_generated_models() {
    let prompts = [
        "Write a haiku about the sea.",
        "What is 17 times 3?",
        "List three colours of the rainbow, then describe each one.",
        "Tell me a very short story about a robot who learns to paint, with a twist.",
        "Hi",
    ];
    for scheme in [Scheme::Q4KM, Scheme::Q5KM, Scheme::Q8_0] {
        let loaded = LoadedModel::load(&generated(scheme), None, &Device::Cpu).unwrap();
        let engine = Engine::start(
            loaded,
            SchedulerConfig {
                // Small chunks: prompts are still being read while others decode, so every
                // step mixes prefill rows and decode rows of different sequences.
                prefill_chunk: 5,
                ..SchedulerConfig::default()
            },
            None,
        )
        .unwrap();
        let alone: Vec<_> = prompts
            .iter()
            .map(|p| harness::collect(submit(&engine, p, 24)))
            .collect();
        assert_eq!(engine.stats().peak_batch_size, 1);
        let streams: Vec<_> = prompts.iter().map(|p| submit(&engine, p, 24)).collect();
        let together: Vec<_> = streams.into_iter().map(harness::collect).collect();
        assert_eq!(engine.stats().peak_batch_size, prompts.len(), "{scheme}");
        for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
            assert_eq!(a.1, 24, "{scheme} prompt {i} stopped early: {a:?}");
            assert_eq!(a, b, "{scheme}: prompt {i} differs alone and in a batch");
        }
    }
}
