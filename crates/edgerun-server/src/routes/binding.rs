//! The Workers binding's dialect (reference §6.1): `POST /run?version=3` and
//! `GET /ai-api/models/search`, what workerd's `env.AI` sends to the service bound as its
//! `fetcher`, so a Worker's `env.AI.run(...)` (and `new Ai(env.AI)` of `@cloudflare/ai`) runs
//! on this node unchanged.
//!
//! A binding run is a Workers AI run ([`super::workers_ai::answer`], the same generation and
//! the same stream) with the model in the `cf-consn-model-id` header, the body
//! `{"inputs":{..},"options":{..}}` ([`edgerun_protocol::binding::parse_body`]) and the answer
//! bare: the output object with `content-type: application/json` exactly (the runtime parses
//! nothing else), or the `text/event-stream` the runtime hands back as a stream. Errors are the
//! binding's `{"internalCode","name","message","description","errors"}`
//! ([`ErrorStyle::Binding`]), which the runtime throws as an `InferenceUpstreamError` named
//! after the error, with the message `"<code>: <description>"`. Checked in this order: the
//! protocol version (400/7000), the model header (400/3003), the model (400/5007), the body
//! (413, 408, then 400/5006).

use super::models::served_models;
use super::read_body;
use super::workers_ai::{answer, Envelope};
use crate::error::{ErrorStyle, ServerError};
use crate::AppState;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use edgerun_protocol::binding::{self, MODEL_HEADER};
use edgerun_protocol::models::{ModelList, SearchQuery};
use edgerun_protocol::ApiError;
use std::time::Instant;

/// `POST /run?version=3`.
pub(super) async fn run(
    State(state): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_inner(&state, &uri, &headers, body)
        .await
        .unwrap_or_else(|e| {
            tracing::debug!(error = %e, "binding request rejected");
            e.into_response_as(ErrorStyle::Binding)
        })
}

async fn run_inner(
    state: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ServerError> {
    let started = Instant::now();
    binding::check_version(uri.query())?;
    let model = binding::model_from_header(
        headers
            .get(MODEL_HEADER)
            .map(|v| v.to_str().unwrap_or_default()),
    )?;
    if let Some(slot) = state.embedder(&model) {
        let bytes = read_body(body, &state.body).await?;
        let request = binding::parse_embedding_body(&bytes)?;
        return super::embeddings::run(state, slot, request, Envelope::Bare).await;
    }
    let Some(slot) = state.generator(&model) else {
        return Err(ApiError::no_such_model(&model).into());
    };
    let bytes = read_body(body, &state.body).await?;
    let request = binding::parse_body_with(&bytes, &state.limits)?;
    answer(state, slot, request, started, Envelope::Bare).await
}

/// `GET /ai-api/models/search` (`env.AI.models(params)`, which returns the answer's `result`).
pub(super) async fn models_search(State(state): State<AppState>, uri: Uri) -> Response {
    match SearchQuery::parse(uri.query()) {
        Ok(query) => {
            super::json_response(ModelList::search(&served_models(&state), &query).to_json())
        }
        Err(e) => ServerError::from(e).into_response_as(ErrorStyle::Binding),
    }
}
