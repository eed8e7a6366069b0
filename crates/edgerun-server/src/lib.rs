//! # edgerun-server
//!
//! The HTTP face of an edgerun node: Workers-AI-compatible routes (and OpenAI-compatible ones)
//! in front of one [`edgerun_engine::Engine`] per text-generation model (and an
//! [`edgerun_engine::Embedder`] per embedding model), and the `edgerun` binary that wires
//! configuration, model loading and the listener together. A request's model name picks its
//! engine ([`AppState::generator`]); the node's load, health and metrics are all its models'.
//!
//! The routes never hold the engine itself: [`AppState`] (`state.rs`) holds a
//! [`backend::Backend`] per text-generation model, the seam between HTTP and batching, which the engine implements and
//! [`fake::FakeBackend`] implements with scripted events, so routes, framing, heartbeats and
//! error mapping are tested without a model (`routes/tests.rs`).
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
//!                     ├─ draining? 503 ─ Backend::reserve: a queue place or 429 / 3040,
//!                     │  decided before any work proportional to the prompt (Reservation)
//!                     ├─ a forced tool call becomes the format (the engine's grammar for the
//!                     │  model's tool-call family; with a response_format too: 400)
//!                     ├─ on the bounded prepare pool: Reservation::prepare (template with the
//!                     │  tools + tokenize, schema → grammar; bad: 400 / 5006) → Submission
//!                     └─ Submission::submit (context window 400) → Events
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
//! POST /v1/embeddings | .../ai/v1/embeddings, and the run routes above for an embedding model
//!   └─ the same layers ─ body limits ─ edgerun_protocol::embeddings (400) ─ the model (an
//!      embedding model's name; the chat model: 400) ─ tokenize on the prepare pool ─
//!      EmbedBackend::submit (its model's batching thread; 429 when its queue is full) ─ the
//!      dialect's answer                                             (routes/embeddings.rs)
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
pub mod backend;
pub mod error;
pub mod fake;
pub mod generation;
pub mod http_layers;
pub mod model_set;
pub mod models;
mod routes;
pub mod serve;
mod state;
pub mod telemetry;

pub use auth::TokenSet;
pub use routes::router;

pub use state::{AppState, BodyLimits, Drain, EmbeddingSlot, GenerationSlot};
