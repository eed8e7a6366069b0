//! The end-to-end tests, one binary: the real `edgerun` binary on the real model over loopback
//! HTTP, driven the way clients drive it (raw HTTP, the official SDKs, a Worker in workerd).
//! The harness they share is the `edgerun-e2e` library (`tests/lib.rs`, `tests/edge.rs`);
//! each file here is one subject.

mod affinity;
mod binding;
mod edge;
mod embeddings;
mod hostile;
mod json_mode;
mod models;
mod node;
mod openai;
mod pydantic_tools;
mod reliability;
mod several_models;
mod streams;
mod tools;
