//! The engine's integration tests, one binary (one link of candle and the engine, not one per
//! file): the real model (SmolLM2-135M-Instruct Q4_1) and generated GGUFs, through the engine's
//! public API. `harness.rs` is what they share; each other file is one subject.

mod harness;

mod batching;
mod constrained;
mod embeddings;
mod faults;
mod fidelity;
mod gguf;
mod kquants;
mod loading;
mod paged;
mod templates;
mod text;
mod tool_templates;
mod vocab_vectors;
