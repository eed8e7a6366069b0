//! Embeddings, in every dialect, over one path ([`embed`]):
//!
//! * Workers AI: `POST /run/{model}` and `.../ai/run/{model}` for an embedding model
//!   (`workers_ai.rs` hands those here): `{text, pooling?, truncate_inputs?}` →
//!   `{"result":{"shape","data","pooling"},"success":true,..}`;
//! * the binding: `POST /run?version=3` with an embedding model in `cf-consn-model-id`
//!   (`binding.rs` hands it here): the same output, bare;
//! * OpenAI: `POST /v1/embeddings` and Workers AI's `.../ai/v1/embeddings`: the `list` of
//!   `embedding`s with `usage` (errors in OpenAI's shape under `/v1/`, Cloudflare's envelope on
//!   the account path, as for chat completions).
//!
//! The wire types and validation are `edgerun-protocol`'s ([`edgerun_protocol::embeddings`]).
//! Pooling: the run routes default to `mean`, Workers AI's documented default; the OpenAI
//! routes use the model's own (its sentence-transformers pipeline). A text longer than the
//! model reads is a 400 unless the caller asked for truncation (`truncate_inputs`).
//!
//! Tokenizing runs on the prepare pool (as templating does); the vectors come from the model's
//! batching thread ([`edgerun_engine::Embedder`]); the queue is bounded (429 / 3040 beyond it);
//! a client that hangs up abandons its job.

use super::json_response;
use super::read_body;
use super::workers_ai::Envelope;
use crate::error::{ErrorStyle, ServerError};
use crate::state::EmbeddingSlot;
use crate::AppState;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::Uri;
use axum::response::Response;
use edgerun_engine::{EmbedInput, Pooling};
use edgerun_protocol::embeddings::{
    openai_embedding_response, EmbeddingInput, EmbeddingRun, EmbeddingRunOutput,
    OpenAiEmbeddingRequest, PoolingChoice,
};
use edgerun_protocol::{ApiError, OpenAiBase, OpenAiEndpoint, OpenAiRoute, SuccessEnvelope};

/// What [`embed`] gives back.
struct Embedded {
    vectors: Vec<Vec<f32>>,
    /// Tokens read (after truncation), for usage.
    tokens: usize,
    dimensions: usize,
    pooling: Pooling,
}

/// Tokenizes (on the prepare pool), queues and awaits one request's inputs on `slot`'s model;
/// `pooling` `None` is the model's own.
async fn embed(
    state: &AppState,
    slot: &EmbeddingSlot,
    inputs: Vec<EmbedInput>,
    truncate: bool,
    pooling: Option<Pooling>,
) -> Result<Embedded, ServerError> {
    if state.drain.is_draining() {
        return Err(ServerError::Draining);
    }
    let backend = slot.backend.get().ok_or(ServerError::NotReady)?.clone();
    let info = backend.info();
    let pooling = pooling.unwrap_or(info.pooling);
    let permit = state.prepare_permit().await?;
    let tokenizer = backend.clone();
    let tokens = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        tokenizer.tokenize(&inputs, truncate)
    })
    .await
    .map_err(|e| ServerError::Task(e.to_string()))??;
    let count = tokens.iter().map(Vec::len).sum();
    let vectors = backend.submit(tokens, pooling)?.await?;
    metrics::counter!(crate::telemetry::EMBEDDING_INPUTS).increment(vectors.len() as u64);
    metrics::counter!(crate::telemetry::EMBEDDING_TOKENS).increment(count as u64);
    Ok(Embedded {
        vectors,
        tokens: count,
        dimensions: info.dimensions,
        pooling,
    })
}

fn pooling_of(choice: PoolingChoice) -> Pooling {
    match choice {
        PoolingChoice::Mean => Pooling::Mean,
        PoolingChoice::Cls => Pooling::Cls,
    }
}

fn choice_of(pooling: Pooling) -> PoolingChoice {
    match pooling {
        Pooling::Mean => PoolingChoice::Mean,
        Pooling::Cls => PoolingChoice::Cls,
    }
}

/// A Workers AI run (or binding run, `envelope` bare) of an embedding model.
pub(super) async fn run(
    state: &AppState,
    slot: &EmbeddingSlot,
    request: EmbeddingRun,
    envelope: Envelope,
) -> Result<Response, ServerError> {
    let inputs = request.texts.into_iter().map(EmbedInput::Text).collect();
    let done = embed(
        state,
        slot,
        inputs,
        request.truncate,
        Some(pooling_of(request.pooling)),
    )
    .await?;
    let out = EmbeddingRunOutput::new(done.vectors, done.dimensions, choice_of(done.pooling));
    Ok(json_response(match envelope {
        Envelope::V4 => SuccessEnvelope::new(out).to_json(),
        Envelope::Bare => serde_json::to_string(&out)
            .map_err(|e| ApiError::internal(format_args!("failed to serialize the answer: {e}")))?,
    }))
}

/// The run route's body for an embedding model.
pub(super) fn run_request(bytes: &Bytes) -> Result<EmbeddingRun, ServerError> {
    Ok(EmbeddingRun::from_json_bytes(bytes)?)
}

/// `POST /v1/embeddings` and `POST /client/v4/accounts/{id}/ai/v1/embeddings`.
pub(super) async fn openai(State(state): State<AppState>, uri: Uri, body: Body) -> Response {
    let style = ErrorStyle::of_path(uri.path());
    let result = match OpenAiRoute::of(uri.path()) {
        Some(route) if route.endpoint == OpenAiEndpoint::Embeddings => {
            openai_inner(&state, route, body).await
        }
        _ => Err(ApiError::no_route().into()),
    };
    result.unwrap_or_else(|e| {
        tracing::debug!(error = %e, "embedding request rejected");
        e.into_response_as(style)
    })
}

async fn openai_inner(
    state: &AppState,
    route: OpenAiRoute,
    body: Body,
) -> Result<Response, ServerError> {
    let bytes = read_body(body, &state.body).await?;
    let request = OpenAiEmbeddingRequest::from_json_bytes(&bytes)?;
    let Some(slot) = state.embedder(&request.model) else {
        return Err(if state.serves(&request.model) {
            ApiError::invalid_request(format_args!(
                "{} is a text-generation model; embeddings need an embedding model",
                request.model
            ))
        } else {
            match route.base {
                OpenAiBase::V1 => ApiError::model_not_found(&request.model),
                OpenAiBase::WorkersAi => ApiError::no_such_model(&request.model),
            }
        }
        .into());
    };
    if let (Some(asked), Some(backend)) = (request.dimensions, slot.backend.get()) {
        let own = backend.info().dimensions;
        if asked != own {
            return Err(ApiError::invalid_request(format_args!(
                "'dimensions' {asked} is not supported: {} gives {own}-dimensional vectors only",
                request.model
            ))
            .into());
        }
    }
    let inputs = request
        .inputs
        .into_iter()
        .map(|i| match i {
            EmbeddingInput::Text(t) => EmbedInput::Text(t),
            EmbeddingInput::Tokens(t) => EmbedInput::Tokens(t),
        })
        .collect();
    let done = embed(state, slot, inputs, request.truncate, None).await?;
    Ok(json_response(openai_embedding_response(
        &request.model,
        &done.vectors,
        request.encoding,
        done.tokens,
    )))
}
