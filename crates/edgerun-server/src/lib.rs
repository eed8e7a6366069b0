//! # edgerun-server
//!
//! The HTTP face of an edgerun node: Workers-AI-compatible routes (and OpenAI-compatible ones)
//! in front of one [`edgerun_engine::Engine`], and the `edgerun` binary that wires
//! configuration, model loading and the listener together.
//!
//! ## Request flow
//!
//! ```text
//! POST /run/{model} | /client/v4/accounts/{id}/ai/run/{model}        (routes/workers_ai.rs)
//!   └─ request id (edgerun_protocol's rule: kept or made) ─ Cloudflare Access JWT, when
//!      configured (403 / 10000, see [`access`]) ─ bearer auth (401 / 10000)    (routes/mod.rs)
//!      └─ model name (literal or %2F slashes; unknown: 400 / 5007)
//!         └─ body ≤ limit (413 / 3006), within its deadline and minimum rate (408 / 3007)
//!            └─ ValidatedRequest (400 / 5006, from edgerun-protocol)
//!               └─ GenerationInput: the engine's PromptInput, SamplingConfig, StopCriteria,
//!                  tools and tool choice, OutputFormat (response_format's JSON schema)
//!                  └─ generation::start                                  (generation.rs)
//!                     ├─ draining? 503 ─ Engine::reserve: a queue place or 429 / 3040,
//!                     │  decided before any work proportional to the prompt
//!                     ├─ a forced tool call becomes the format (the engine's grammar for the
//!                     │  model's tool-call family; with a response_format too: 400)
//!                     ├─ on the bounded prepare pool: Engine::prepare (template with the tools
//!                     │  + tokenize) and Engine::constrain (schema → grammar; bad: 400 / 5006)
//!                     └─ Engine::submit_reserved (context window 400)
//!                     ├─ with tools, text that may be a call is held back (ToolCallSplitter)
//!                     │  and the calls go out once, at the end (Framing::tool_calls)
//!                     ├─ stream: Generation::stream with the dialect's Framing
//!                     │          (Workers AI: `data: {"response":..}` per token, usage,
//!                     │          [DONE]); comment heartbeats while queued or prefilling
//!                     └─ JSON:   Generation::collect (text and parsed tool calls), then the
//!                                dialect's envelope; JSON mode: `response` is the JSON value
//!                                (not JSON, i.e. cut at max_tokens: 400 "JSON Mode couldn't
//!                                be met")
//!
//! POST /v1/chat/completions | /v1/completions | /client/v4/accounts/{id}/ai/v1/chat/completions,
//! GET /v1/models                                                          (routes/openai.rs)
//!   └─ the same request id, Access and bearer layers (errors in OpenAI's shape under /v1/)
//!      └─ body limits ─ OpenAiRequest (400, from edgerun-protocol) ─ the model in the body
//!         (404 model_not_found on /v1, 400 / 5007 on Workers AI's route)
//!         └─ GenerationInput (stop strings in StopCriteria, logprobs in SamplingConfig)
//!            └─ generation::start, then collect or stream as above, framed as
//!               chat.completion(.chunk) / text_completion
//!
//! POST /run?version=3 (the Workers binding: what a Worker's env.AI sends)  (routes/binding.rs)
//!   └─ the same layers (errors in the binding's {"internalCode",..} shape, which the runtime
//!      throws as `InferenceUpstreamError` "<code>: <cause>")
//!      └─ version 3 (400 / 7000) ─ cf-consn-model-id (400 / 3003; unknown: 400 / 5007)
//!         └─ body limits ─ {inputs, options} (inputs validated as a run body, 400 / 5006)
//!            └─ workers_ai::answer, the run route's own path, answering bare (no envelope)
//!
//! GET /client/v4/accounts/{id}/ai/models/search | .../ai/models/schema,
//! GET /ai-api/models/search (binding), GET /v1/models/{id}        (routes/models.rs, binding.rs,
//!   └─ the same layers; edgerun_protocol::models: entries, pages, schemas        openai.rs)
//! ```
//!
//! Below the router, [`serve`] owns connections: a cap on open connections, header-read and
//! idle timeouts, and the graceful part of a drain. [`Drain`] is the rest of it: `/health`
//! says draining, new requests get 503, and at the deadline every generation still running is
//! cut with an error (event or envelope) and counted, so the process can exit non-zero.
//!
//! A new API dialect is a file in `routes/` that converts its wire request into a
//! [`generation::GenerationInput`], calls [`generation::start`], and implements
//! [`generation::Framing`] for its stream; nothing else changes.
//!
//! Errors before the first byte are JSON bodies with their HTTP status; an error after it
//! ends the stream with the framing's error event. All errors come from
//! [`error::ServerError::api_error`], the one place engine failures are mapped to the wire
//! (status, code, message), and are rendered by [`error::respond`], in the route family's
//! [`error::ErrorStyle`] (Cloudflare's envelope, or OpenAI's `{"error":{..}}` under `/v1/`).
//!
//! ## Must never
//!
//! * run model or tokenizer work on a tokio worker (the engine has its own thread; templating
//!   and tokenizing go through `spawn_blocking`);
//! * keep a sequence running for a client that is gone: dropping the response body drops the
//!   engine's `TokenStream`, which cancels the sequence;
//! * answer a run route without checking the bearer token when tokens are configured, or the
//!   `Cf-Access-Jwt-Assertion` when Access is configured.
//! * hold anything a client controls without a bound: connections (cap, header and idle
//!   timeouts in [`serve`]), bodies (size, deadline, minimum rate), streams it stopped reading
//!   (the engine pauses, then drops them), the CPU work before the engine (the prepare pool);
//! * do work proportional to a prompt before the request has a queue place (a 429 must cost
//!   the same for any prompt);
//! * end a stream silently or exit 0 after cutting one: at the drain deadline every running
//!   generation gets an error and the exit status says so.

pub mod access;
pub mod auth;
pub mod error;
pub mod generation;
pub mod models;
mod routes;
pub mod serve;
pub mod telemetry;

pub use auth::TokenSet;
pub use routes::router;

use edgerun_engine::Engine;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// How a request body must arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Largest request body accepted, in bytes (413 beyond).
    pub max_bytes: usize,
    /// The whole body must arrive within this (408 otherwise).
    pub timeout: Duration,
    /// After [`BodyLimits::grace`], the body must keep arriving at this many bytes per second
    /// (408 otherwise), so a trickle cannot hold a connection for the whole timeout.
    pub min_rate: usize,
    pub grace: Duration,
}

impl Default for BodyLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1 << 20,
            timeout: Duration::from_secs(30),
            min_rate: 1024,
            grace: Duration::from_secs(5),
        }
    }
}

/// The node's shutdown state: draining (no new work), then, at the deadline, cut (every
/// generation still running ends with an error, and is counted).
#[derive(Debug)]
pub struct Drain {
    draining: AtomicBool,
    cut: watch::Sender<bool>,
    cut_requests: AtomicUsize,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            draining: AtomicBool::new(false),
            cut: watch::channel(false).0,
            cut_requests: AtomicUsize::new(0),
        }
    }
}

impl Drain {
    /// From now on `/health` says draining and new requests get 503.
    pub fn start(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The deadline has come: every generation still running ends now.
    pub fn cut(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.cut.send_replace(true);
    }

    /// Generations ended by [`Drain::cut`].
    pub fn cut_requests(&self) -> usize {
        self.cut_requests.load(Ordering::Relaxed)
    }

    /// Resolves when [`Drain::cut`] is called (at once if it was).
    pub(crate) fn cut_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.cut.subscribe();
        async move {
            if rx.wait_for(|cut| *cut).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    pub(crate) fn note_cut(&self) {
        self.cut_requests.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(telemetry::REQUESTS_CUT).increment(1);
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Set once the model has loaded and warmed up; until then run routes answer 503 and
    /// `/health` reports loading.
    pub engine: Arc<OnceLock<Engine>>,
    /// Model names this node answers to (Workers AI names such as
    /// `@cf/meta/llama-3-8b-instruct`, and the model's own name).
    pub served_names: Arc<Vec<String>>,
    /// What the model is, for the model catalogue (`models/search`): the catalog's
    /// description, or the model file's name.
    pub model_description: Arc<String>,
    pub tokens: TokenSet,
    /// How request bodies must arrive.
    pub body: BodyLimits,
    /// Bounds the CPU work before the engine (templating, tokenizing): at most this many
    /// prompts are prepared at once; the others wait, holding their queue place.
    pub prepare: Arc<Semaphore>,
    pub drain: Arc<Drain>,
    /// Idle time after which a stream gets an SSE comment, so proxies keep it open.
    pub heartbeat: Duration,
    /// Bounds on what a request carries (lists, schemas), checked by validation as the Worker
    /// checks them (`edgerun-protocol`'s `limits`).
    pub limits: edgerun_protocol::RequestLimits,
    /// How compiling a request's output format is bounded: its thread's stack (sized for
    /// `limits.schema.max_depth`) and time budget.
    pub grammar: edgerun_engine::GrammarLimits,
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
            model_description: Arc::new("Text generation model served by edgerun".into()),
            tokens,
            body: BodyLimits::default(),
            prepare: Arc::new(Semaphore::new(2)),
            drain: Arc::new(Drain::default()),
            heartbeat: Duration::from_secs(15),
            limits: edgerun_protocol::RequestLimits::DEFAULT,
            grammar: edgerun_engine::GrammarLimits::DEFAULT,
            metrics: None,
            access: None,
        }
    }

    pub fn serves(&self, model: &str) -> bool {
        self.served_names.iter().any(|n| n == model)
    }
}
