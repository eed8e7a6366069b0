//! The route table, and what every route shares: the request id, auth layers, body reading,
//! `/health`, `/metrics` and the fallbacks.
//!
//! Each API dialect is one file here, with its handlers converting wire requests into
//! [`crate::generation::GenerationInput`] and framing the answers; the generation itself is
//! [`crate::generation`]'s, for every dialect.
//!
//! * [`workers_ai`]: `POST /run/{model}` and `POST /client/v4/accounts/{id}/ai/run/{model}`.
//! * [`openai`]: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`,
//!   `GET /v1/models/{id}` and `POST /client/v4/accounts/{id}/ai/v1/chat/completions`.
//! * [`binding`]: the Workers binding's `POST /run?version=3` and `GET /ai-api/models/search`.
//! * [`embeddings`]: every dialect's embeddings (`POST /v1/embeddings`,
//!   `.../ai/v1/embeddings`, and the run routes when the model is an embedding model).
//! * [`models`]: Workers AI's catalogue, `GET /client/v4/accounts/{id}/ai/models/search` and
//!   `.../ai/models/schema`.
//!
//! Every error these routes and their fallbacks answer goes through
//! [`crate::error::respond`], in the path's [`ErrorStyle`] (OpenAI's shape under `/v1/`, the
//! binding's under `/run` and `/ai-api/`).

mod binding;
mod embeddings;
pub(crate) mod models;
mod openai;
mod workers_ai;

#[cfg(test)]
mod tests;
use crate::access::require_access;
use crate::auth::require_bearer;
use crate::error::{respond, ErrorStyle, IntoHttp};
use crate::http_layers::{self, CorsOrigins};
use crate::telemetry;
use crate::{AppState, BodyLimits};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use edgerun_engine::Health;
use edgerun_protocol::{request_id as choose_request_id, ApiError, NodeRoute, JSON_CONTENT_TYPE};
use std::time::{Duration, Instant};

/// Workers AI's request-id header, kept when the caller (or the edge Worker) sent one that
/// `edgerun_protocol::accepted_request_id` accepts.
pub const REQUEST_ID_HEADER: HeaderName =
    HeaderName::from_static(edgerun_protocol::REQUEST_ID_HEADER);

/// The node's routes. Run routes (and the OpenAI-compatible ones) need the Access JWT (when
/// configured), then the bearer token; `/health` and `/metrics` need neither, so health checks
/// and scrapers keep working.
pub fn router(state: AppState) -> Router {
    openai::note_start();
    let run = post(workers_ai::run).fallback(method_not_allowed);
    let chat = post(openai::chat_completions).fallback(method_not_allowed);
    let authed = Router::new()
        .route("/run/{*model}", run.clone())
        .route("/client/v4/accounts/{account_id}/ai/run/{*model}", run)
        .route("/v1/chat/completions", chat.clone())
        .route(
            "/client/v4/accounts/{account_id}/ai/v1/chat/completions",
            chat,
        )
        .route(
            "/v1/completions",
            post(openai::completions).fallback(method_not_allowed),
        )
        .route(
            "/v1/embeddings",
            post(embeddings::openai).fallback(method_not_allowed),
        )
        .route(
            "/client/v4/accounts/{account_id}/ai/v1/embeddings",
            post(embeddings::openai).fallback(method_not_allowed),
        )
        .route("/v1/models", get(openai::models).fallback(get_only))
        .route("/v1/models/{*id}", get(openai::model).fallback(get_only))
        .route("/run", post(binding::run).fallback(method_not_allowed))
        .route(
            "/ai-api/models/search",
            get(binding::models_search).fallback(get_only),
        )
        .route(
            "/client/v4/accounts/{account_id}/ai/models/search",
            get(models::search).fallback(get_only),
        )
        .route(
            "/client/v4/accounts/{account_id}/ai/models/schema",
            get(models::schema).fallback(get_only),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_bearer,
        ))
        // Added last, so it runs first: Access proves the request came through Cloudflare.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_access,
        ));
    let cors = state.cors.as_ref().map(CorsOrigins::layer);
    let router = Router::new()
        .merge(authed)
        .route("/health", get(health).fallback(get_only))
        .route("/metrics", get(metrics_text).fallback(get_only))
        .fallback(no_route)
        .layer(http_layers::trace())
        .layer(middleware::from_fn(request_id))
        .layer(middleware::from_fn_with_state(state.clone(), report_load))
        .with_state(state);
    // Outermost: a browser's preflight is answered before Access and the bearer check.
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// The request id [`request_id`] chose, for the layers inside it (the trace span).
#[derive(Debug, Clone)]
pub(crate) struct RequestId(pub String);

async fn metrics_text(State(state): State<AppState>) -> Response {
    let Some(handle) = &state.metrics else {
        return ApiError::no_route().into_http();
    };
    let healthy = state.generators.iter().all(|slot| {
        slot.backend
            .get()
            .is_some_and(|b| b.health() == Health::Ready)
    });
    let mut body = crate::telemetry::render(
        handle,
        state.generation_stats(),
        state.has_generation_model() && healthy,
        state.drain.is_draining(),
    );
    let generators: Vec<_> = state
        .generators
        .iter()
        .filter_map(|slot| {
            let backend = slot.backend.get()?;
            let healthy = backend.health() == Health::Ready;
            Some((slot.names.first()?.clone(), backend.stats(), healthy))
        })
        .collect();
    body.push_str(&crate::telemetry::render_generators(&generators));
    let embedders: Vec<_> = state
        .embedders
        .iter()
        .filter_map(|slot| Some((slot.names.first()?.clone(), slot.backend.get()?.stats())))
        .collect();
    body.push_str(&crate::telemetry::render_embedders(&embedders));
    let mut resp = (StatusCode::OK, body).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

async fn no_route(uri: Uri) -> Response {
    respond(ApiError::no_route(), ErrorStyle::of_path(uri.path()), false)
}

/// The 405 for the POST routes, with `Allow` as RFC 9110 asks.
async fn method_not_allowed(uri: Uri) -> Response {
    not_allowed(&uri, NodeRoute::RUN_METHODS)
}

/// The 405 for the GET routes, with `Allow` as RFC 9110 asks.
async fn get_only(uri: Uri) -> Response {
    not_allowed(&uri, NodeRoute::OPEN_METHODS)
}

fn not_allowed(uri: &Uri, allow: &'static str) -> Response {
    let style = ErrorStyle::of_path(uri.path());
    let mut resp = respond(ApiError::method_not_allowed(), style, false);
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// Tags every response with a request id (the caller's when the shared rule keeps it), and
/// counts it in `edgerun_requests_total` by route and status: every route the router answers
/// (unknown paths too), whatever the dialect and whichever layer answered (auth, Access, the
/// handler), but `/health` and `/metrics`, which probes and scrapers call all the time.
async fn request_id(mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok());
    let chosen = choose_request_id(presented, new_request_id);
    let id =
        HeaderValue::from_str(&chosen).expect("accepted ids are visible ASCII, fresh ones hex");
    req.extensions_mut().insert(RequestId(chosen));
    let started = Instant::now();
    let route = telemetry::request_route(req.uri().path());
    let mut resp = next.run(req).await;
    if let Some((label, generates)) = route {
        let status = resp.status().as_u16().to_string();
        metrics::counter!(telemetry::REQUESTS, "route" => label, "status" => status).increment(1);
        if generates && !resp.status().is_success() {
            metrics::histogram!(telemetry::REQUEST_DURATION, "outcome" => "error")
                .record(started.elapsed().as_secs_f64());
        }
    }
    resp.headers_mut().insert(REQUEST_ID_HEADER, id);
    resp
}

/// Adds the node's load (`x-edgerun-load`, [`edgerun_protocol::NodeLoad`]: every
/// text-generation model's sequences, queue and KV pool together) to every answer once the
/// models have loaded, read when the answer's head is written: the edge Worker sends
/// requests without a session to the least loaded node of a region by it. Reports are
/// numbered in the order the counters were read (one lock around reading and numbering), so
/// the Worker can drop a report that reaches it after a newer one.
async fn report_load(State(state): State<AppState>, req: Request, next: Next) -> Response {
    /// The last report's number in this process.
    static REPORTS: std::sync::Mutex<u64> = std::sync::Mutex::new(0);
    let mut resp = next.run(req).await;
    if state.has_generation_model() {
        let mut reports = REPORTS.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = state.generation_stats() else {
            return resp;
        };
        *reports += 1;
        let load = edgerun_protocol::NodeLoad {
            seq: Some(*reports),
            ..edgerun_protocol::NodeLoad::from_counts(
                s.active_sequences,
                s.queued_requests,
                s.kv_pool_free_blocks,
                s.kv_pool_total_blocks,
            )
        };
        drop(reports);
        if let Ok(value) = HeaderValue::from_str(&load.to_header()) {
            resp.headers_mut().insert(
                HeaderName::from_static(edgerun_protocol::LOAD_HEADER),
                value,
            );
        }
    }
    resp
}

pub(crate) fn new_request_id() -> String {
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

/// `200 {"status":"ok",...}` once every model has loaded and warmed up; `503` with the status
/// `loading`, `draining`, `failing` (with the reason: repeated device failures, an embedding
/// model stopped) or `engine stopped` otherwise.
async fn health(State(state): State<AppState>) -> Response {
    let unavailable =
        |body: serde_json::Value| (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    if state.drain.is_draining() {
        return unavailable(serde_json::json!({"status": "draining"}));
    }
    // Every embedding model, loaded or not: the node is ready only when all of them are.
    let mut embeddings = Vec::new();
    for slot in state.embedders.iter() {
        let Some(backend) = slot.backend.get() else {
            return unavailable(serde_json::json!({"status": "loading"}));
        };
        if !backend.is_running() {
            return unavailable(serde_json::json!({
                "status": "failing",
                "reason": format!("the embedding model {} stopped", slot.names[0]),
            }));
        }
        let info = backend.info();
        embeddings.push(serde_json::json!({
            "models": slot.names,
            "dimensions": info.dimensions,
            "max_input_tokens": info.max_tokens,
            "stats": backend.stats(),
        }));
    }
    if !state.has_generation_model() {
        let body = serde_json::json!({
            "status": "ok",
            "models": state.all_names(),
            "embeddings": embeddings,
        });
        return (StatusCode::OK, Json(body)).into_response();
    }
    // Every text-generation model, each ready: the node is ready only when all of them are.
    let mut generation = Vec::new();
    for slot in state.generators.iter() {
        let Some(engine) = slot.backend.get() else {
            return unavailable(serde_json::json!({"status": "loading"}));
        };
        let several = state.generators.len() > 1;
        let named = |reason: String| {
            if several {
                format!("{}: {reason}", slot.names[0])
            } else {
                reason
            }
        };
        match engine.health() {
            Health::Ready => {}
            Health::Starting => return unavailable(serde_json::json!({"status": "loading"})),
            Health::Failing(reason) => {
                return unavailable(serde_json::json!({
                    "status": "failing",
                    "reason": named(reason),
                    "stats": engine.stats(),
                }))
            }
            Health::Stopped => {
                let mut body = serde_json::json!({"status": "engine stopped"});
                if several {
                    body["model"] = slot.names[0].clone().into();
                }
                return unavailable(body);
            }
        }
        generation.push(serde_json::json!({
            "models": slot.names,
            "context_window": engine.context_window(),
            "stats": engine.stats(),
        }));
    }
    // The first model's window, and the node's figures (every model's together), at the top
    // as a one-model node has always reported them; each model's under `generation`.
    let mut body = serde_json::json!({
        "status": "ok",
        "models": state.all_names(),
        "context_window": generation[0]["context_window"],
        "stats": state.generation_stats(),
        "generation": generation,
    });
    if !embeddings.is_empty() {
        body["embeddings"] = serde_json::Value::Array(embeddings);
    }
    (StatusCode::OK, Json(body)).into_response()
}

/// Reads a request body within `limits`: 413 / 3006 beyond the size limit (at once when the
/// declared length says so), 408 / 3007 when the whole body does not arrive within the
/// timeout or, after the grace period, arrives slower than the minimum rate.
pub(crate) async fn read_body(body: Body, limits: &BodyLimits) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let mut body = body;
    if http_body::Body::size_hint(&body).lower() > limits.max_bytes as u64 {
        return Err(ApiError::request_too_large(limits.max_bytes));
    }
    let started = tokio::time::Instant::now();
    let deadline = started + limits.timeout;
    let mut buf = Vec::new();
    loop {
        let wake = deadline.min(tokio::time::Instant::now() + Duration::from_millis(500));
        match tokio::time::timeout_at(wake, body.frame()).await {
            Ok(None) => return Ok(Bytes::from(buf)),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > limits.max_bytes {
                        return Err(ApiError::request_too_large(limits.max_bytes));
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_input(format!(
                    "could not read the request body: {e}"
                )))
            }
            Err(_) => {}
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            metrics::counter!(telemetry::BODY_TIMEOUTS, "reason" => "deadline").increment(1);
            return Err(ApiError::timeout());
        }
        let beyond_grace = (now - started).saturating_sub(limits.grace).as_secs_f64();
        if (buf.len() as f64) < limits.min_rate as f64 * beyond_grace {
            metrics::counter!(telemetry::BODY_TIMEOUTS, "reason" => "rate").increment(1);
            return Err(ApiError::timeout());
        }
    }
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
