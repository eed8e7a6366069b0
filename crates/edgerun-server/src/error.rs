//! The server's one error type, and the one place errors become HTTP responses.
//!
//! [`ServerError::api_error`] maps every failure to an [`ApiError`] (status, code, message);
//! [`respond`] turns an `ApiError` into a response. The status, `Retry-After` and the
//! not-started header are decided once, whatever the dialect; only the body differs by
//! [`ErrorStyle`]: Cloudflare's v4 envelope, OpenAI's `{"error":{..}}` on `/v1/...`, or the
//! Workers binding's `{"internalCode",..}` on `/run` and `/ai-api/...`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use edgerun_engine::EngineError;
use edgerun_protocol::{ApiError, JSON_CONTENT_TYPE};
use thiserror::Error;

/// Everything a request can fail with. Converted to the wire error by
/// [`ServerError::api_error`], the one place engine failures become HTTP errors; nothing else
/// in the server builds error bodies (JSON envelopes and stream error events alike).
#[derive(Debug, Error)]
pub enum ServerError {
    /// Malformed or out-of-contract input, already in wire form (from `edgerun-protocol`).
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The engine refused the request, or stopped.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The engine failed a generation it had accepted (`GenerationEvent::Failed`).
    #[error("generation failed: {0}")]
    Generation(String),
    /// The output could not follow the requested format any further
    /// (`GenerationEvent::FormatUnmet`): the caller's schema, a 400.
    #[error("the output format could not be followed: {0}")]
    FormatUnmet(String),
    /// The model is still loading (or failed to load).
    #[error("the model is not loaded yet")]
    NotReady,
    /// A blocking task panicked or was cancelled.
    #[error("internal task failed: {0}")]
    Task(String),
    /// The node is draining: no new work.
    #[error("the node is shutting down")]
    Draining,
    /// The drain deadline ended the generation before it finished.
    #[error("the node shut down before the generation finished")]
    Cut,
    /// The engine dropped a streamed generation whose client stopped reading it for the
    /// stalled-stream timeout (`SequenceEnd::stalled`): 408 / 3007, in the stream.
    #[error("stream stalled: {0}")]
    Stalled(String),
}

impl ServerError {
    /// The wire form of this error. Client mistakes keep their detail; engine failures are
    /// reported without internals that would only confuse a client.
    pub fn api_error(&self) -> ApiError {
        match self {
            Self::Api(e) => e.clone(),
            Self::Engine(e) => match e {
                EngineError::ContextWindowExceeded {
                    prompt_tokens,
                    max_tokens,
                    context_window,
                } => {
                    ApiError::context_window_exceeded(*prompt_tokens, *max_tokens, *context_window)
                }
                EngineError::Template(m) => ApiError::bad_input(format!("chat template: {m}")),
                EngineError::Tokenizer(m) => ApiError::bad_input(format!("tokenizer: {m}")),
                EngineError::KvCacheBudgetExceeded { .. } => ApiError::bad_input(e),
                EngineError::InvalidRequest(m) => ApiError::bad_input(m),
                EngineError::InvalidFormat(m) => {
                    ApiError::bad_input(format!("the output format cannot be used: {m}"))
                }
                EngineError::FormatLimit(m) => {
                    ApiError::bad_input(format!("the output format is over a limit: {m}"))
                }
                EngineError::Busy => ApiError::capacity(),
                EngineError::Stopped => ApiError::unavailable("the engine is not running"),
                EngineError::Load(m) | EngineError::Config(m) => ApiError::internal(m),
                EngineError::Model(m) => ApiError::internal(m),
                EngineError::Preflight(m) => ApiError::internal(m.to_string()),
            },
            Self::Generation(m) => ApiError::internal(m),
            Self::Stalled(m) => {
                let timeout = ApiError::timeout();
                ApiError::new(
                    timeout.status,
                    timeout.code,
                    format!("{}: {m}", timeout.message),
                )
            }
            Self::FormatUnmet(m) => ApiError::bad_input(format!(
                "the output could not follow the requested format (response_format, or a forced \
                 tool call): {m}"
            )),
            Self::NotReady => ApiError::unavailable("the model is loading, try again shortly"),
            Self::Task(m) => ApiError::internal(m),
            Self::Draining => ApiError::unavailable("the node is shutting down, try another"),
            Self::Cut => ApiError::unavailable(self),
        }
    }

    /// The node certainly did not start this request: another node may run it.
    pub fn not_started(&self) -> bool {
        matches!(
            self,
            Self::NotReady | Self::Draining | Self::Engine(EngineError::Busy)
        )
    }
}

impl ServerError {
    /// The response for this error with its body in `style`.
    pub fn into_response_as(self, style: ErrorStyle) -> Response {
        let not_started = self.not_started();
        respond(self.api_error(), style, not_started)
    }
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        self.into_response_as(ErrorStyle::Cloudflare)
    }
}

/// How a route family writes an error's body (Cloudflare's envelope, OpenAI's shape under
/// `/v1/`, the binding's under `/run` and `/ai-api/`). A policy the Worker shares, so it lives in
/// `edgerun-protocol`.
pub use edgerun_protocol::ErrorStyle;

/// The one renderer of errors: `error`'s status, its body in `style`, `Retry-After` when
/// [`ApiError::retry_after`] says so, and, for a request the node turned away before starting
/// it (loading, draining, over the connection cap, busy, Access keys too stale),
/// `edgerun-not-started: 1` ([`edgerun_protocol::NOT_STARTED_HEADER`]), which tells the Worker
/// it may send the request to another node without risking a double generation.
pub fn respond(error: ApiError, style: ErrorStyle, not_started: bool) -> Response {
    let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, style.body(&error)).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(JSON_CONTENT_TYPE),
    );
    if let Some(secs) = error.retry_after() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static(secs));
    }
    if not_started {
        headers.insert(
            header::HeaderName::from_static(edgerun_protocol::NOT_STARTED_HEADER),
            HeaderValue::from_static("1"),
        );
    }
    resp
}

/// [`respond`] for a request turned away before it started, in Cloudflare's envelope.
pub fn not_started(error: ApiError) -> Response {
    respond(error, ErrorStyle::Cloudflare, true)
}

/// Renders an [`ApiError`] as its HTTP response, in Cloudflare's envelope ([`respond`]).
pub trait IntoHttp {
    fn into_http(self) -> Response;
}

impl IntoHttp for ApiError {
    fn into_http(self) -> Response {
        respond(self, ErrorStyle::Cloudflare, false)
    }
}
