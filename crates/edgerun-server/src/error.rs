//! The server's one error type, and the one place errors become HTTP responses.

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
                EngineError::Busy => ApiError::capacity(),
                EngineError::Stopped => ApiError::unavailable("the engine is not running"),
                EngineError::Load(m) | EngineError::Config(m) => ApiError::internal(m),
                EngineError::Model(m) => ApiError::internal(m),
            },
            Self::Generation(m) => ApiError::internal(m),
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

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        if self.not_started() {
            not_started(self.api_error())
        } else {
            self.api_error().into_http()
        }
    }
}

/// The response for a request the node turned away before starting it (loading, draining,
/// over the connection cap, busy, Access keys too stale): the error's envelope plus
/// `edgerun-not-started: 1` ([`edgerun_protocol::NOT_STARTED_HEADER`]), which tells the Worker
/// it may send the request to another node without risking a double generation.
pub fn not_started(error: ApiError) -> Response {
    let mut resp = error.into_http();
    resp.headers_mut().insert(
        header::HeaderName::from_static(edgerun_protocol::NOT_STARTED_HEADER),
        HeaderValue::from_static("1"),
    );
    resp
}

/// Renders an [`ApiError`] as its HTTP response.
pub trait IntoHttp {
    fn into_http(self) -> Response;
}

impl IntoHttp for ApiError {
    fn into_http(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, self.to_json()).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(JSON_CONTENT_TYPE),
        );
        if let Some(secs) = self.retry_after() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(secs));
        }
        resp
    }
}
