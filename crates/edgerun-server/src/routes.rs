//! Route table and handlers.

use crate::access::require_access;
use crate::auth::require_bearer;
use crate::error::{IntoHttp, ServerError};
use crate::telemetry;
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
    model_from_path, run_route_tail, ApiError, SuccessEnvelope, TextGenerationOutput, Usage,
    ValidatedRequest, JSON_CONTENT_TYPE,
};
use std::convert::Infallible;
use std::time::{Duration, Instant};

/// How long a streaming response waits for the engine's first event before sending headers.
const FIRST_EVENT_GRACE: Duration = Duration::from_secs(1);

/// Workers AI's request-id header, kept when the caller (or the edge Worker) sent one.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("cf-ai-req-id");

/// The node's routes. Run routes need the Access JWT (when configured), then the bearer token;
/// `/health` and `/metrics` need neither, so health checks and scrapers keep working.
pub fn router(state: AppState) -> Router {
    let run = post(run_model).fallback(method_not_allowed);
    let authed = Router::new()
        .route("/run/{*model}", run.clone())
        .route("/client/v4/accounts/{account_id}/ai/run/{*model}", run)
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_bearer,
        ))
        // Added last, so it runs first: Access proves the request came through Cloudflare.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_access,
        ));
    Router::new()
        .merge(authed)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(no_route)
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let Some(handle) = &state.metrics else {
        return ApiError::no_route().into_http();
    };
    let body = crate::telemetry::render(handle, state.engine.get().map(|e| e.stats()));
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
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
    let started = Instant::now();
    let is_run = req.uri().path().contains("/run/");
    let mut resp = next.run(req).await;
    if is_run {
        let status = resp.status().as_u16().to_string();
        metrics::counter!(telemetry::REQUESTS, "status" => status).increment(1);
        if !resp.status().is_success() {
            metrics::histogram!(telemetry::REQUEST_DURATION, "outcome" => "error")
                .record(started.elapsed().as_secs_f64());
        }
    }
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
        Some(engine) if !engine.is_ready() => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "engine stopped"})),
        )
            .into_response(),
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

async fn run_inner(state: &AppState, uri: &Uri, body: Body) -> Result<Response, ServerError> {
    let started = Instant::now();
    let model = run_route_tail(uri.path())
        .and_then(model_from_path)
        .unwrap_or_default();
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
    let timer = TokenTimer::new(started);
    if request.stream {
        // A failure the engine reports at once (say the KV cache cannot be allocated) still
        // gets a proper status and JSON envelope: hold the headers back until the first event
        // or for at most FIRST_EVENT_GRACE, which delays no token.
        let mut stream = stream;
        let first = match tokio::time::timeout(FIRST_EVENT_GRACE, stream.recv()).await {
            Ok(Some(GenerationEvent::Failed(e))) => return Err(ApiError::internal(e).into()),
            Ok(None) => return Err(edgerun_engine::EngineError::Stopped.into()),
            Ok(Some(event)) => Some(event),
            Err(_) => None,
        };
        Ok(stream_response(stream, first, state.heartbeat, timer))
    } else {
        collect_response(stream, prompt_tokens, timer).await
    }
}

/// Waits for the whole generation and answers with the success envelope.
async fn collect_response(
    mut stream: TokenStream,
    prompt_tokens: usize,
    mut timer: TokenTimer,
) -> Result<Response, ServerError> {
    let mut text = String::new();
    loop {
        match stream.recv().await {
            Some(GenerationEvent::Token { text: t }) => {
                timer.token();
                text.push_str(&t)
            }
            Some(GenerationEvent::PromptProcessed { .. }) => {}
            Some(GenerationEvent::Finished { usage, .. }) => {
                timer.finish();
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
fn stream_response(
    stream: TokenStream,
    first: Option<GenerationEvent>,
    heartbeat: Duration,
    timer: TokenTimer,
) -> Response {
    let events = futures::stream::unfold(Some((stream, first, timer)), move |state| async move {
        let (mut stream, mut pending, mut timer) = state?;
        loop {
            let next = match pending.take() {
                Some(event) => Ok(Some(event)),
                None => tokio::time::timeout(heartbeat, stream.recv()).await,
            };
            let (frame, keep) = match next {
                Err(_) => (sse::heartbeat().to_string(), true),
                Ok(Some(GenerationEvent::PromptProcessed { .. })) => continue,
                Ok(Some(GenerationEvent::Token { text })) => {
                    timer.token();
                    (sse::token_event(&text), true)
                }
                Ok(Some(GenerationEvent::Finished { usage, .. })) => {
                    timer.finish();
                    (finish_frames(&usage), false)
                }
                Ok(Some(GenerationEvent::Failed(e))) => {
                    (sse::error_event(&ApiError::internal(e)), false)
                }
                Ok(None) => (
                    sse::error_event(&ApiError::unavailable("the engine stopped")),
                    false,
                ),
            };
            let frame = Ok::<_, Infallible>(Bytes::from(frame));
            return Some((frame, keep.then_some((stream, None, timer))));
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

/// Records time to first token, inter-token latency and request duration as a generation's
/// events go out.
struct TokenTimer {
    started: Instant,
    last: Option<Instant>,
}

impl TokenTimer {
    fn new(started: Instant) -> Self {
        Self {
            started,
            last: None,
        }
    }

    fn token(&mut self) {
        let now = Instant::now();
        match self.last {
            None => metrics::histogram!(telemetry::TTFT).record((now - self.started).as_secs_f64()),
            Some(prev) => {
                metrics::histogram!(telemetry::INTER_TOKEN).record((now - prev).as_secs_f64())
            }
        }
        self.last = Some(now);
    }

    fn finish(&self) {
        metrics::histogram!(telemetry::REQUEST_DURATION, "outcome" => "ok")
            .record(self.started.elapsed().as_secs_f64());
    }
}
