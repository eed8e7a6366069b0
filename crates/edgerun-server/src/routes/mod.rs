//! The route table, and what every route shares: the request id, auth layers, body reading,
//! `/health`, `/metrics` and the fallbacks.
//!
//! Each API dialect is one file here, with its handlers converting wire requests into
//! [`crate::generation::GenerationInput`] and framing the answers; the generation itself is
//! [`crate::generation`]'s, for every dialect.
//!
//! * [`workers_ai`]: `POST /run/{model}` and `POST /client/v4/accounts/{id}/ai/run/{model}`.

mod workers_ai;

use crate::access::require_access;
use crate::auth::require_bearer;
use crate::error::IntoHttp;
use crate::telemetry;
use crate::AppState;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use edgerun_protocol::{request_id as choose_request_id, ApiError, JSON_CONTENT_TYPE};
use std::time::Instant;

/// Workers AI's request-id header, kept when the caller (or the edge Worker) sent one that
/// `edgerun_protocol::accepted_request_id` accepts.
pub const REQUEST_ID_HEADER: HeaderName =
    HeaderName::from_static(edgerun_protocol::REQUEST_ID_HEADER);

/// The node's routes. Run routes need the Access JWT (when configured), then the bearer token;
/// `/health` and `/metrics` need neither, so health checks and scrapers keep working.
pub fn router(state: AppState) -> Router {
    let run = post(workers_ai::run).fallback(method_not_allowed);
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
        .route("/health", get(health).fallback(get_only))
        .route("/metrics", get(metrics_text).fallback(get_only))
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

/// The 405 envelope for the open GET routes, with `Allow` as RFC 9110 asks.
async fn get_only() -> Response {
    let mut resp = ApiError::method_not_allowed().into_http();
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    resp
}

/// Tags every response with a request id: the caller's when the shared rule keeps it.
async fn request_id(req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok());
    let id = HeaderValue::from_str(&choose_request_id(presented, new_request_id))
        .expect("accepted ids are visible ASCII, fresh ones hex");
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

/// Reads a request body of at most `limit` bytes: 413 / 3006 beyond it.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|e| match std::error::Error::source(&e) {
            Some(s) if s.is::<http_body_util::LengthLimitError>() => {
                ApiError::request_too_large(limit)
            }
            _ => ApiError::bad_input(format!("could not read the request body: {e}")),
        })
}

/// A successful JSON answer, with the content type the Workers binding requires exactly.
pub(crate) fn json_response(body: String) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(JSON_CONTENT_TYPE),
    );
    resp
}
