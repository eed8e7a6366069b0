//! Shared by the engine's integration tests: the real test model.

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
