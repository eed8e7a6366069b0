//! # edgerun-protocol
//!
//! The wire contract of edgerun: a self-hosted server that answers like
//! Cloudflare Workers AI text generation (`@cf/meta/llama-3-8b-instruct`).
//! This crate is the single source of truth for what goes over the wire, so
//! the node's HTTP server and the Cloudflare Worker in front of it accept the
//! same bodies, reject bad ones with byte-identical errors, and frame answers
//! the same way. The contract it implements is written down in
//! `shared/reference/workers-ai-api.md` (§1 requests, §2 JSON answers and
//! errors, §3 streaming); section numbers in the docs below refer to it.
//!
//! ## What it owns
//!
//! * [`error`]: [`ApiError`], the one error type — HTTP status, Cloudflare
//!   internal code, message — with a constructor per failure a client can
//!   see, and its v4 envelope `{"errors":[..],"success":false,"result":..,
//!   "messages":[]}`.
//! * [`request`]: request-body validation against the model's published
//!   input schema, producing a [`ValidatedRequest`] (prompt or messages,
//!   sampling parameters with defaults applied, `stream`, `rejectIfBusy`,
//!   `tools` and `tool_choice`, `response_format` as a [`ResponseFormat`] shared with the
//!   OpenAI dialect; a schema with `stream` is Workers AI's 5023, `json_object` streams).
//! * [`limits`]: the bounds on everything a caller controls ([`RequestLimits`]): each JSON
//!   schema measured before anything compiles it (size, nodes, depth following `$ref`s, `$ref`
//!   chains; [`check_schema`]), tools, messages, content parts; node and Worker refuse alike.
//! * [`tools`]: tool definitions in Workers AI's legacy shape or OpenAI's, `tool_choice`, and
//!   assistant `tool_calls` sent back, normalised to one shape for chat templates.
//! * [`response`]: the non-streaming output ([`TextGenerationOutput`],
//!   [`Usage`]) and the success envelope ([`SuccessEnvelope`]).
//! * [`openai`]: the OpenAI-compatible dialect (reference §4): validation of
//!   `chat/completions` and `completions` bodies into an [`OpenAiRequest`] ([`openai::request`]:
//!   structured outputs, tools, `tool_choice`, tool messages; what the node cannot do is
//!   refused, never ignored), the `chat.completion` / `text_completion` answers and stream chunks
//!   with tool calls and their ids, the model list ([`openai::response`]), and how they go on the
//!   wire with OpenAI's `{"error":{..}}` body ([`openai::frame`]).
//! * `fields` (private): the one JSON field reader both dialects validate with — lookup with
//!   `null` as absent, JSON type names, integral numbers, typed readers whose errors name the
//!   field, in Workers AI's wording or OpenAI's.
//! * [`embeddings`]: text embeddings in both dialects: Workers AI's `{text, pooling,
//!   truncate_inputs}` → `{shape, data, pooling}` and OpenAI's `/v1/embeddings` (`input` as
//!   strings or token ids, `encoding_format` float or base64) → the `list` of `embedding`s.
//! * [`load`]: the node's load as it reports it to the Worker (`x-edgerun-load`, [`NodeLoad`])
//!   and Workers AI's `x-session-affinity`, which the Worker picks a node of a region by.
//! * [`query`]: one form-decoded query-string parameter ([`query_param`]).
//! * [`binding`]: the Workers binding protocol (reference §6.1) — `POST /run?version=3`
//!   with the model in `cf-consn-model-id` and the body `{inputs, options}`, answered with the
//!   bare output — and the error body the runtime turns into a useful thrown error.
//! * [`models`]: Workers AI's model catalogue (reference §5) for the names a node serves: the
//!   `models/search` entries and list envelope (with pagination), and the `models/schema`
//!   input and output schemas (the schema validation enforces).
//! * [`sse`]: the native `/ai/run` server-sent-event framing
//!   (`data: {"response":..}\n\n` ... `data: [DONE]\n\n`) and an incremental
//!   parser for it ([`SseParser`]).
//! * [`auth`]: bearer-token parsing and the constant-time [`TokenSet`] the
//!   node and the Worker both check callers with.
//! * [`route`]: reading the model name out of a URL path, accepting both the
//!   raw (`@cf/meta/...`) and the SDKs' percent-encoded (`@cf%2Fmeta%2F...`)
//!   forms, the node's route table ([`NodeRoute`], with the OpenAI-compatible
//!   routes, [`OpenAiRoute`], the binding's, [`BindingEndpoint`], and the catalogue's,
//!   [`ModelsEndpoint`]), the error style of each route family ([`ErrorStyle`]), and the
//!   request-id rule ([`request_id`]).
//!
//! ## Policies the node and the Worker share
//!
//! Anything both sides of the edge decide lives here once, so they cannot fork: which paths
//! are model runs ([`run_route_tail`]) and which routes exist with which methods ([`NodeRoute`]),
//! which error body each route family gets ([`ErrorStyle`]), whether a caller's `cf-ai-req-id` is kept
//! ([`accepted_request_id`]), which errors carry `Retry-After` ([`ApiError::retry_after`]),
//! request validation, the error envelope and bearer-token checks.
//!
//! ## How data flows
//!
//! The modules' imports form no cycle: leaves ([`error`], `fields`, [`query`]) at the bottom;
//! [`limits`] ← [`tools`] ← [`request`] ← [`openai`] / [`binding`] / [`models`]; [`route`] on
//! top, naming each dialect's error body and re-exporting [`OpenAiEndpoint`] and
//! [`query_param`]. A dialect never imports the route table.
//!
//! ```text
//! request:  path tail ──route::model_from_path──▶ model name (server checks it)
//!           body bytes ──ValidatedRequest::from_json_bytes──▶ ValidatedRequest
//!                                                      └──▶ ApiError (400/405)
//! answer:   text + usage (converted by the node) ──▶ TextGenerationOutput ──▶ SuccessEnvelope::to_json
//!           engine tokens ──▶ sse::token_event* ─▶ sse::usage_event ─▶ sse::DONE_EVENT
//! failure:  ApiError ──▶ ApiError::to_json (before the first byte, with ApiError::status)
//!                   └──▶ sse::error_event   (after streaming started)
//! ```
//!
//! The server adds what needs the model and the runtime — tokenising, the
//! context-window check ([`ApiError::context_window_exceeded`]), queueing
//! ([`ApiError::capacity`]), auth — but reports every failure through
//! [`ApiError`], so the wire format never forks.
//!
//! ## What it must never do
//!
//! * **No I/O and no async runtime.** Everything is a pure function over
//!   bytes, strings and `serde_json::Value`s; the only dependencies are
//!   `serde`, `serde_json`, `thiserror`, `percent-encoding`, `subtle`
//!   (constant-time comparison) and `sha2` (token digests). Nothing is
//!   platform-specific, so the crate builds for `wasm32-unknown-unknown` and
//!   runs inside the Worker.
//! * **No model knowledge beyond the schema.** It knows field names, types
//!   and ranges from the published input schema; it does not know tokenizers,
//!   chat templates, context windows or which models exist.
//! * **Never panic on input.** Any byte sequence fed to
//!   [`ValidatedRequest::from_json_bytes`] or [`SseParser::push`], and any
//!   string fed to [`route::model_from_path`], yields a value or an
//!   [`ApiError`]; there is no `unwrap` on untrusted data, no indexing that
//!   can go out of bounds, and no recursion over client-controlled nesting
//!   (serde_json's recursion limit bounds parsing at 128 levels; schemas are measured with an
//!   explicit stack).
//! * **No work beyond O(n log n) in the body's size.** Validation runs on the node's async
//!   workers: every list is bounded and checked in linear time (duplicate tool names with a
//!   hash set), schemas are measured in one pass plus one pointer lookup per `$ref`.
//!
//! ## Deliberate leniency
//!
//! The real validator's behaviour on some inputs is unverified; where in
//! doubt this crate accepts what a client plausibly sends rather than break
//! it: unknown top-level keys are ignored, `null` means absent, boolean
//! strings `"true"`/`"false"` are coerced, integral floats count as integers.
//! The full list is in [`request`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod binding;
pub mod embeddings;
pub mod error;
mod fields;
pub mod limits;
pub mod load;
pub mod models;
pub mod openai;
pub mod query;
pub mod request;
pub mod response;
pub mod route;
pub mod sse;
pub mod tools;

pub use auth::{bearer_token, TokenSet};
pub use error::{ApiError, ErrorEnvelope, ErrorItem};
pub use limits::{check_schema, RequestLimits, SchemaLimits};
pub use load::{session_of, NodeLoad, LOAD_HEADER, SESSION_AFFINITY_HEADER};
pub use openai::{OpenAiInput, OpenAiRequest};
pub use request::{
    ChatMessage, PromptInput, ResponseFormat, Role, SamplingParams, ValidatedRequest,
    DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, MAX_PROMPT_CHARS,
};
pub use response::{SuccessEnvelope, TextGenerationOutput, Usage, JSON_CONTENT_TYPE};
pub use route::{
    accepted_request_id, model_from_path, openai_model_id, query_param, request_id, run_route_tail,
    BindingEndpoint, ErrorStyle, ModelsEndpoint, NodeRoute, OpenAiBase, OpenAiEndpoint,
    OpenAiRoute, NOT_STARTED_HEADER, REQUEST_ID_HEADER,
};
pub use sse::{
    error_event, heartbeat, token_event, usage_event, SseEvent, SseParser, DONE_EVENT,
    EVENT_STREAM_CONTENT_TYPE,
};
pub use tools::{ToolChoice, ToolDefinition};
