//! # edgerun-server
//!
//! The HTTP face of an edgerun node: Workers-AI-compatible routes in front of one
//! [`edgerun_engine::Engine`], and the `edgerun` binary that wires configuration, model loading
//! and the listener together.
//!
//! ## Request flow
//!
//! ```text
//! POST /run/{model} | /client/v4/accounts/{id}/ai/run/{model}        (routes/workers_ai.rs)
//!   └─ request id (edgerun_protocol's rule: kept or made) ─ Cloudflare Access JWT, when
//!      configured (403 / 10000, see [`access`]) ─ bearer auth (401 / 10000)    (routes/mod.rs)
//!      └─ model name (literal or %2F slashes; unknown: 400 / 5007)
//!         └─ body ≤ limit (413 / 3006) ─ ValidatedRequest (400 / 5006, from edgerun-protocol)
//!            └─ GenerationInput: the engine's PromptInput, SamplingConfig, StopCriteria
//!               └─ generation::start                                     (generation.rs)
//!                  ├─ Engine::prepare on a blocking thread (template + tokenize)
//!                  └─ Engine::submit (context window 400, busy 429 / 3040)
//!                     ├─ stream: Generation::stream with the dialect's Framing
//!                     │          (Workers AI: `data: {"response":..}` per token, usage,
//!                     │          [DONE]); comment heartbeats while queued or prefilling
//!                     └─ JSON:   Generation::collect, then the dialect's envelope
//! ```
//!
//! A new API dialect is a file in `routes/` that converts its wire request into a
//! [`generation::GenerationInput`], calls [`generation::start`], and implements
//! [`generation::Framing`] for its stream; nothing else changes.
//!
//! Errors before the first byte are JSON envelopes with their HTTP status; an error after it
//! ends the stream with the framing's error event. All error bodies come from
//! [`error::ServerError::api_error`], the one place engine failures are mapped to the wire.
//!
//! ## Must never
//!
//! * run model or tokenizer work on a tokio worker (the engine has its own thread; templating
//!   and tokenizing go through `spawn_blocking`);
//! * keep a sequence running for a client that is gone: dropping the response body drops the
//!   engine's `TokenStream`, which cancels the sequence;
//! * answer a run route without checking the bearer token when tokens are configured, or the
//!   `Cf-Access-Jwt-Assertion` when Access is configured.

pub mod access;
pub mod auth;
pub mod error;
pub mod generation;
pub mod models;
mod routes;
pub mod telemetry;

pub use auth::TokenSet;
pub use routes::router;

use edgerun_engine::Engine;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Set once the model has loaded and warmed up; until then run routes answer 503 and
    /// `/health` reports loading.
    pub engine: Arc<OnceLock<Engine>>,
    /// Model names this node answers to (Workers AI names such as
    /// `@cf/meta/llama-3-8b-instruct`, and the model's own name).
    pub served_names: Arc<Vec<String>>,
    pub tokens: TokenSet,
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// Idle time after which a stream gets an SSE comment, so proxies keep it open.
    pub heartbeat: Duration,
    /// Renders `/metrics`; `None` when this process has no recorder installed.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Cloudflare Access verification for the run routes; `None` (the default) turns it off.
    pub access: Option<Arc<access::AccessVerifier>>,
}

impl AppState {
    pub fn new(served_names: Vec<String>, tokens: TokenSet) -> Self {
        Self {
            engine: Arc::new(OnceLock::new()),
            served_names: Arc::new(served_names),
            tokens,
            body_limit: 1 << 20,
            heartbeat: Duration::from_secs(15),
            metrics: None,
            access: None,
        }
    }

    pub fn serves(&self, model: &str) -> bool {
        self.served_names.iter().any(|n| n == model)
    }
}
