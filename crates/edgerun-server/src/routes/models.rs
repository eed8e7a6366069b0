//! Workers AI's model catalogue (reference §5): `GET /client/v4/accounts/{id}/ai/models/search`
//! and `GET /client/v4/accounts/{id}/ai/models/schema?model=<name>`, what the official
//! `cloudflare` SDKs' `client.ai.models.list()` and `client.ai.models.schema.get()` call.
//!
//! The entries, the list envelope, pagination and the schemas are `edgerun-protocol`'s
//! ([`edgerun_protocol::models`]); this file says what the node serves: every name it answers
//! to, with its description and, once its model has loaded, its context window.

use super::json_response;
use crate::error::ServerError;
use crate::AppState;
use axum::extract::State;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use edgerun_protocol::models::{self, ModelList, SearchQuery, ServedModel, ServedTask};
use edgerun_protocol::ApiError;

/// Every name the node answers to, as catalogue facts.
pub(crate) fn served_models(state: &AppState) -> Vec<ServedModel> {
    state
        .generators
        .iter()
        .flat_map(|slot| {
            let context_window = slot.backend.get().map(|b| b.context_window());
            slot.names.iter().map(move |name| ServedModel {
                name: name.clone(),
                description: slot.description.clone(),
                context_window,
                task: ServedTask::TextGeneration,
            })
        })
        .chain(state.embedders.iter().flat_map(|slot| {
            let info = slot.backend.get().map(|b| b.info());
            slot.names.iter().map(move |name| ServedModel {
                name: name.clone(),
                description: slot.description.clone(),
                context_window: None,
                task: ServedTask::TextEmbeddings {
                    dimensions: info.as_ref().map(|i| i.dimensions),
                    max_input_tokens: info.as_ref().map(|i| i.max_tokens),
                },
            })
        }))
        .collect()
}

/// `GET .../ai/models/search`: the v4 list envelope (filters `search`, `task`, `author`; pages
/// `page`, `per_page`).
pub(super) async fn search(State(state): State<AppState>, uri: Uri) -> Response {
    match SearchQuery::parse(uri.query()) {
        Ok(query) => json_response(ModelList::search(&served_models(&state), &query).to_json()),
        Err(e) => ServerError::from(e).into_response(),
    }
}

/// `GET .../ai/models/schema?model=<name>`: the input and output schemas of a served model;
/// 400/5006 without `model`, 400/5007 for a model the node does not serve.
pub(super) async fn schema(State(state): State<AppState>, uri: Uri) -> Response {
    let result = models::schema_model(uri.query()).and_then(|model| {
        if state.serves(&model) {
            Ok(json_response(models::schema_envelope()))
        } else if state.embedder(&model).is_some() {
            Ok(json_response(models::embedding_schema_envelope()))
        } else {
            Err(ApiError::no_such_model(&model))
        }
    });
    result.unwrap_or_else(|e| ServerError::from(e).into_response())
}
