//! The model generator and `requantize`: files candle reads back, in llama-quantize's layouts,
//! that the engine loads and runs; a requantized real model still answers.

use crate::harness;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::Device;
use edgerun_engine::gguf::{self, ModelShape, Scheme};
use edgerun_engine::{
    Engine, GenerationEvent, GenerationRequest, LoadedModel, PromptInput, QueuePolicy,
    SamplingConfig, SchedulerConfig, StopCriteria,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("edgerun-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn small() -> ModelShape {
    harness::small_shape()
}

fn types(path: &Path) -> (HashMap<String, GgmlDType>, gguf_file::Content) {
    let ct = gguf_file::Content::read(&mut std::fs::File::open(path).unwrap()).unwrap();
    let types = ct
        .tensor_infos
        .iter()
        .map(|(n, i)| (n.clone(), i.ggml_dtype))
        .collect();
    (types, ct)
}

/// Greedy text for a chat prompt, and how many tokens it took.
fn answer(path: &Path, prompt: &str, max_tokens: usize) -> (String, usize) {
    let loaded = LoadedModel::load(path, None, &Device::Cpu).unwrap();
    let engine = Engine::start(loaded, SchedulerConfig::default(), None).unwrap();
    let input = PromptInput::Prompt {
        text: prompt.into(),
        raw: false,
    };
    let request = GenerationRequest {
        prompt: engine.prepare(&input, &[]).unwrap(),
        sampling: SamplingConfig::GREEDY,
        stopping: StopCriteria::max_tokens(max_tokens),
        constraint: edgerun_engine::Constraint::Free,
    };
    let mut stream = engine.submit(request, QueuePolicy::Wait).unwrap();
    let mut text = String::new();
    while let Some(ev) = stream.blocking_recv() {
        match ev {
            GenerationEvent::Token { text: t, .. } => text.push_str(&t),
            GenerationEvent::Finished { usage, .. } => return (text, usage.completion_tokens),
            GenerationEvent::Failed(e) | GenerationEvent::FormatUnmet(e) => panic!("{e}"),
            GenerationEvent::PromptProcessed { .. } => {}
        }
    }
    panic!("no Finished event");
}

#[test]
fn generated_models_have_llama_quantizes_mix_a_real_tokenizer_and_run() {
    let vocab = harness::model_path();
    for scheme in [Scheme::Q4KM, Scheme::Q8_0] {
        let out = dir().join(format!("small-{scheme}.gguf"));
        let summary = gguf::generate("small", &small(), scheme, &vocab, 7, &out).unwrap();
        let (types, ct) = types(&out);
        assert!(summary.bytes > 0 && summary.bytes < std::fs::metadata(&out).unwrap().len());
        match scheme {
            Scheme::Q4KM => {
                assert_eq!(types["output.weight"], GgmlDType::Q6K);
                assert_eq!(types["token_embd.weight"], GgmlDType::Q4K);
                // 2 layers: use_more_bits picks layer 1 (>= 7/8 of 2) and not layer 0.
                assert_eq!(types["blk.0.attn_v.weight"], GgmlDType::Q4K);
                assert_eq!(types["blk.1.attn_v.weight"], GgmlDType::Q6K);
                assert_eq!(types["blk.1.ffn_down.weight"], GgmlDType::Q6K);
                assert_eq!(types["blk.0.ffn_gate.weight"], GgmlDType::Q4K);
            }
            _ => assert!(types
                .iter()
                .all(|(n, &t)| t == GgmlDType::Q8_0 || n.ends_with("norm.weight"))),
        }
        assert_eq!(types["blk.0.attn_norm.weight"], GgmlDType::F32);
        let name = ct.metadata["general.name"].to_string().unwrap().clone();
        assert!(name.starts_with("random "), "{name}");
        assert_eq!(
            ct.metadata["general.file_type"].to_u32().unwrap(),
            scheme.file_type()
        );
        // The tokenizer is SmolLM2's, the weights random: it loads and generates something.
        let (_, generated) = answer(&out, "Hello", 4);
        assert!((1..=4).contains(&generated));
    }
    // The same seed writes the same bytes; another seed other weights.
    let a = dir().join("seed-a.gguf");
    let b = dir().join("seed-b.gguf");
    let c = dir().join("seed-c.gguf");
    gguf::generate("small", &small(), Scheme::Q4_1, &vocab, 1, &a).unwrap();
    gguf::generate("small", &small(), Scheme::Q4_1, &vocab, 1, &b).unwrap();
    gguf::generate("small", &small(), Scheme::Q4_1, &vocab, 2, &c).unwrap();
    let bytes = |p: &Path| std::fs::read(p).unwrap();
    assert_eq!(bytes(&a), bytes(&b));
    assert_ne!(bytes(&a), bytes(&c));
}

#[test]
fn a_named_shape_needs_a_tokenizer_of_its_size() {
    let shape = gguf::shape("llama-3-mini").unwrap();
    let e = gguf::generate(
        "llama-3-mini",
        &shape,
        Scheme::Q4KM,
        &harness::model_path(),
        0,
        &dir().join("never.gguf"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("128256") && e.contains("49152"), "{e}");
    assert!(!dir().join("never.gguf").exists());
    assert!(gguf::shape("llama-3-70b").is_err());
}

#[test]
fn a_requantized_real_model_keeps_its_metadata_and_still_answers() {
    let src = harness::model_path();
    for (scheme, want_attn) in [
        (Scheme::Q8_0, GgmlDType::Q8_0),
        (Scheme::Q4KM, GgmlDType::Q5_0),
    ] {
        let out = dir().join(format!("smollm2-{scheme}.gguf"));
        gguf::requantize(&src, scheme, &out).unwrap();
        let (_, original) = types(&src);
        let (got, ct) = types(&out);
        assert_eq!(got.len(), original.tensor_infos.len());
        // SmolLM2's rows of 576 are not a multiple of 256: K-quants fall back as llama.cpp's do.
        assert_eq!(got["blk.3.attn_q.weight"], want_attn);
        assert_eq!(got["token_embd.weight"], GgmlDType::Q8_0);
        assert_eq!(
            ct.metadata["tokenizer.chat_template"].to_string().unwrap(),
            original.metadata["tokenizer.chat_template"]
                .to_string()
                .unwrap()
        );
        let (text, _) = answer(
            &out,
            "What is the capital of France? Answer in one word.",
            32,
        );
        assert!(text.contains("Paris"), "{scheme}: {text:?}");
    }
}
