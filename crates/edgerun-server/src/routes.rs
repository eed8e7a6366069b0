//! Route table and handlers.

use crate::auth::require_bearer;
use crate::error::{IntoHttp, ServerError};
use crate::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use edgerun_engine::{GenerationEvent, TokenStream};
use edgerun_protocol::sse::{self, EVENT_STREAM_CONTENT_TYPE};
use edgerun_protocol::{
    model_from_path, ApiError, SuccessEnvelope, TextGenerationOutput, Usage, ValidatedRequest,
    JSON_CONTENT_TYPE,
};
use std::convert::Infallible;
use std::time::Duration;

/// Workers AI's request-id header, kept when the caller (or the edge Worker) sent one.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("cf-ai-req-id");

/// The node's routes. Run routes need the bearer token; `/health` does not.
pub fn router(state: AppState) -> Router {
    let run = post(run_model).fallback(method_not_allowed);
    let authed = Router::new()
        .route("/run/{*model}", run.clone())
        .route("/client/v4/accounts/{account_id}/ai/run/{*model}", run)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_bearer,
        ));
    Router::new()
        .merge(authed)
        .route("/health", get(health))
        .fallback(no_route)
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

async fn no_route() -> Response {
    ApiError::no_route().into_http()
}

async fn method_not_allowed() -> Response {
    ApiError::method_not_allowed().into_http()
}

/// Tags every response with a request id.
async fn request_id(req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(&REQUEST_ID_HEADER)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&new_request_id()).expect("hex is a valid header value")
        });
    let mut resp = next.run(req).await;
    resp.headers_mut().insert(REQUEST_ID_HEADER, id);
    resp
}

fn new_request_id() -> String {
    let bits: u128 = rand::random();
    let h = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `200 {"status":"ok",...}` once the model has loaded and warmed up, `503` before.
async fn health(State(state): State<AppState>) -> Response {
    match state.engine.get() {
        Some(engine) => {
            let stats = engine.stats();
            let body = serde_json::json!({
                "status": "ok",
                "models": *state.served_names,
                "context_window": engine.context_window(),
                "stats": stats,
            });
            (StatusCode::OK, Json(body)).into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "loading"})),
        )
            .into_response(),
    }
}

async fn run_model(State(state): State<AppState>, uri: Uri, body: Body) -> Response {
    match run_inner(&state, &uri, body).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(error = %e, "request rejected");
            e.into_response()
        }
    }
}

/// The model segment of either run route, as sent (decoded later).
fn model_tail(path: &str) -> &str {
    match path.find("/ai/run/") {
        Some(i) if path.starts_with("/client/") => &path[i + "/ai/run/".len()..],
        _ => path.strip_prefix("/run/").unwrap_or(""),
    }
}

async fn run_inner(state: &AppState, uri: &Uri, body: Body) -> Result<Response, ServerError> {
    let model = model_from_path(model_tail(uri.path())).unwrap_or_default();
    if !state.serves(&model) {
        return Err(ApiError::no_such_model(&model).into());
    }
    let bytes = axum::body::to_bytes(body, state.body_limit)
        .await
        .map_err(|e| match std::error::Error::source(&e) {
            Some(s) if s.is::<http_body_util::LengthLimitError>() => {
                ApiError::request_too_large(state.body_limit)
            }
            _ => ApiError::bad_input(format!("could not read the request body: {e}")),
        })?;
    let request = ValidatedRequest::from_json_bytes(&bytes)?;
    if request.response_format.is_some() {
        return Err(ApiError::bad_input(
            "response_format (JSON mode) is not supported by this node yet",
        )
        .into());
    }
    let engine = state.engine.get().ok_or(ServerError::NotReady)?.clone();
    let prompt = {
        let engine = engine.clone();
        let input = request.input.clone();
        let tools = request.tools.clone();
        tokio::task::spawn_blocking(move || engine.prepare(&input, tools.as_ref()))
            .await
            .map_err(|e| ServerError::Task(e.to_string()))??
    };
    let prompt_tokens = prompt.len();
    let stream = engine.submit(prompt, request.params, request.reject_if_busy)?;
    if request.stream {
        Ok(stream_response(stream, state.heartbeat))
    } else {
        collect_response(stream, prompt_tokens).await
    }
}

/// Waits for the whole generation and answers with the success envelope.
async fn collect_response(
    mut stream: TokenStream,
    prompt_tokens: usize,
) -> Result<Response, ServerError> {
    let mut text = String::new();
    loop {
        match stream.recv().await {
            Some(GenerationEvent::Token { text: t }) => text.push_str(&t),
            Some(GenerationEvent::PromptProcessed { .. }) => {}
            Some(GenerationEvent::Finished { usage, .. }) => {
                let out = TextGenerationOutput {
                    response: text,
                    tool_calls: Vec::new(),
                    usage,
                };
                return Ok(json_response(SuccessEnvelope::new(out).to_json()));
            }
            Some(GenerationEvent::Failed(e)) => return Err(ApiError::internal(e).into()),
            None => {
                tracing::error!(
                    prompt_tokens,
                    "engine dropped a sequence without finishing it"
                );
                return Err(edgerun_engine::EngineError::Stopped.into());
            }
        }
    }
}

fn json_response(body: String) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(JSON_CONTENT_TYPE),
    );
    resp
}

/// Server-sent events: one `data:` event per text delta as soon as the engine sends it, the
/// usage event, then `[DONE]`. While nothing happens for `heartbeat` (queued, or reading a
/// long prompt) an SSE comment keeps proxies from closing the connection.
fn stream_response(stream: TokenStream, heartbeat: Duration) -> Response {
    let events = futures::stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        loop {
            let next = tokio::time::timeout(heartbeat, stream.recv()).await;
            let (frame, keep) = match next {
                Err(_) => (sse::heartbeat().to_string(), true),
                Ok(Some(GenerationEvent::PromptProcessed { .. })) => continue,
                Ok(Some(GenerationEvent::Token { text })) => (sse::token_event(&text), true),
                Ok(Some(GenerationEvent::Finished { usage, .. })) => (finish_frames(&usage), false),
                Ok(Some(GenerationEvent::Failed(e))) => {
                    (sse::error_event(&ApiError::internal(e)), false)
                }
                Ok(None) => (
                    sse::error_event(&ApiError::unavailable("the engine stopped")),
                    false,
                ),
            };
            let frame = Ok::<_, Infallible>(Bytes::from(frame));
            return Some((frame, keep.then_some(stream)));
        }
    });
    let mut resp = Response::new(Body::from_stream(events));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(EVENT_STREAM_CONTENT_TYPE),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tell nginx-style proxies not to buffer the stream.
    h.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    resp
}

fn finish_frames(usage: &Usage) -> String {
    format!("{}{}", sse::usage_event(usage), sse::DONE_EVENT)
}
