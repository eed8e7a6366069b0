//! Shared by the engine's integration tests: the real test model, llama.cpp's test data from
//! the pinned sdist, a small generated shape.

use edgerun_engine::{Engine, GenerationEvent, LoadedModel, SchedulerConfig, TokenStream};

pub use edgerun_testkit::model_path;

pub fn load() -> LoadedModel {
    LoadedModel::load(&model_path(), None, &candle_core::Device::Cpu).expect("load the test model")
}

pub fn engine(config: SchedulerConfig) -> Engine {
    Engine::start(load(), config, None).expect("start the engine")
}

/// Drains a stream: the text and the completion token count (panics on a failure).
pub fn collect(mut stream: TokenStream) -> (String, usize) {
    let mut text = String::new();
    while let Some(ev) = stream.blocking_recv() {
        match ev {
            GenerationEvent::Token { text: t, .. } => text.push_str(&t),
            GenerationEvent::Finished { usage, .. } => return (text, usage.completion_tokens),
            GenerationEvent::Failed(e) | GenerationEvent::FormatUnmet(e) => {
                panic!("generation failed: {e}")
            }
            GenerationEvent::PromptProcessed { .. } => {}
        }
    }
    panic!("stream ended without Finished");
}

/// A folder of llama.cpp's test data from the pinned llama-cpp-python sdist, extracted once
/// into the cache: `--templates` (its chat templates) or `--vocab` (its `ggml-vocab-*.gguf`
/// with their test vectors) (`scripts/fetch-llama-cpp-sdist.sh`).
pub fn sdist_dir(what: &str) -> std::path::PathBuf {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = std::process::Command::new("bash")
        .arg(root.join("scripts/fetch-llama-cpp-sdist.sh"))
        .arg(what)
        .output()
        .expect("run scripts/fetch-llama-cpp-sdist.sh");
    assert!(
        out.status.success(),
        "fetch-llama-cpp-sdist.sh {what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A small llama whose matrices are all multiples of 256 wide, so K-quants apply everywhere.
pub fn small_shape() -> edgerun_engine::gguf::ModelShape {
    edgerun_engine::gguf::ModelShape {
        architecture: "llama",
        vocab: None,
        dim: 256,
        layers: 2,
        ff: 512,
        heads: 4,
        kv_heads: 2,
        head_dim: None,
        context: 512,
        rope_base: 10_000.0,
        rms_eps: 1e-5,
        tied_embeddings: false,
    }
}
