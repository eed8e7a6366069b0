//! # edgerun-parity
//!
//! The engine measured against candle-transformers' `quantized_llama` on the same GGUF: the
//! parity test (`tests/parity.rs`: the same next tokens and logits within a few tenths, prompts
//! read whole and in chunks) and the forward-pass benchmark (`examples/forward_bench.rs`). A
//! crate of its own so that candle-transformers is built for these alone, not for every test
//! build of the engine. It has no library code.
