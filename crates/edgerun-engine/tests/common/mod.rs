//! Shared by the engine's integration tests: the real test model.

#![allow(dead_code)]

use edgerun_engine::{Engine, GenerationEvent, LoadedModel, SchedulerConfig, TokenStream};
use std::path::PathBuf;
use std::sync::OnceLock;

/// SmolLM2-135M-Instruct Q4_1, fetched by `models/fetch-default.sh` (run here if missing).
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("EDGERUN_TEST_MODEL") {
            return PathBuf::from(p);
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let script = root.join("models/fetch-default.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .output()
            .expect("run models/fetch-default.sh");
        assert!(
            out.status.success(),
            "models/fetch-default.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

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
