//! Workers AI's dialect: `POST /run/{model}` and `POST /client/v4/accounts/{id}/ai/run/{model}`
//! (reference §1-3). Validation is `edgerun-protocol`'s (the Worker runs the same); the answer
//! is `{"result":{"response",...},"success":true,...}` or `data: {"response":...}` events.

use super::{json_response, read_body};
use crate::error::ServerError;
use crate::generation::{self, Framing, GenerationInput};
use crate::{AppState, GenerationSlot};
use axum::body::Body;
use axum::extract::State;
use axum::http::Uri;
use axum::response::{IntoResponse, Response};
use edgerun_engine::{
    ChatMessage, Logprobs, PromptInput, SamplingConfig, StopCriteria, StopReason, TokenLogprob,
    ToolCall, Usage,
};
use edgerun_protocol::{
    model_from_path, run_route_tail, sse, ApiError, SuccessEnvelope, TextGenerationOutput,
    ValidatedRequest,
};
use serde_json::Value;
use std::time::Instant;

/// The run route's handler.
pub(super) async fn run(State(state): State<AppState>, uri: Uri, body: Body) -> Response {
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
    // The router's patterns are wider than the shared rule (an empty account segment, say):
    // what the rule does not call a run route is no route, as the Worker answers it.
    let Some(tail) = run_route_tail(uri.path()) else {
        return Err(ApiError::no_route().into());
    };
    let model = model_from_path(tail).unwrap_or_default();
    if let Some(slot) = state.embedder(&model) {
        let bytes = read_body(body, &state.body).await?;
        let request = super::embeddings::run_request(&bytes)?;
        return super::embeddings::run(state, slot, request, Envelope::V4).await;
    }
    let Some(slot) = state.generator(&model) else {
        return Err(ApiError::no_such_model(&model).into());
    };
    let bytes = read_body(body, &state.body).await?;
    let request = ValidatedRequest::from_json_bytes_with(&bytes, &state.limits)?;
    answer(state, slot, request, started, Envelope::V4).await
}

/// How a whole (non-streamed) answer is wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Envelope {
    /// `{"result":<output>,"success":true,"errors":[],"messages":[]}`: the REST routes.
    V4,
    /// The output alone: the Workers binding (`routes/binding.rs`).
    Bare,
}

/// Generates the answer to a validated Workers AI request: streamed as `data:
/// {"response":..}` events, or whole in `envelope`. The binding's route answers through this
/// too, so both give the same output for the same input.
pub(super) async fn answer(
    state: &AppState,
    model: &GenerationSlot,
    request: ValidatedRequest,
    started: Instant,
    envelope: Envelope,
) -> Result<Response, ServerError> {
    let stream = request.stream;
    let json_mode = request.response_format.is_json();
    let generation = generation::start(state, model, generation_input(request), started).await?;
    if stream {
        // JSON mode streams only `json_object` (validation refused a schema): as text deltas.
        generation.stream(WorkersAiStream, state.heartbeat).await
    } else {
        let done = generation.collect().await?;
        let response = if json_mode {
            json_response_value(&done.text, done.reason)?
        } else {
            Value::String(done.text)
        };
        let out = TextGenerationOutput {
            response,
            tool_calls: done.tool_calls.iter().map(legacy_call).collect(),
            usage: generation::wire_usage(&done.usage),
        };
        Ok(json_response(match envelope {
            Envelope::V4 => SuccessEnvelope::new(out).to_json(),
            Envelope::Bare => serde_json::to_string(&out).map_err(|e| {
                ApiError::internal(format_args!("failed to serialize the answer: {e}"))
            })?,
        }))
    }
}

/// A call in Workers AI's (legacy) shape: `{"name", "arguments": {..}}` (reference §2.2).
fn legacy_call(call: &ToolCall) -> Value {
    serde_json::json!({"name": call.name, "arguments": call.arguments})
}

/// JSON mode's `response`: the JSON value the constrained output is (an object, as Workers AI
/// answers). Output cut at `max_tokens` is not a value: an error saying so, never a string.
fn json_response_value(text: &str, reason: StopReason) -> Result<Value, ServerError> {
    serde_json::from_str(text).map_err(|e| {
        let why = if reason.is_length() {
            "the answer reached max_tokens before the JSON was complete; raise max_tokens".into()
        } else {
            format!("the answer is not JSON ({e})")
        };
        ApiError::json_mode_not_met(why).into()
    })
}

/// A validated Workers AI request in the engine's terms, with the schema's defaults and the
/// engine's neutral values for everything not given.
pub(crate) fn generation_input(request: ValidatedRequest) -> GenerationInput {
    let p = request.params;
    let prompt = match request.input {
        edgerun_protocol::PromptInput::Prompt { text, raw } => PromptInput::Prompt { text, raw },
        edgerun_protocol::PromptInput::Messages(messages) => PromptInput::Messages(
            messages
                .into_iter()
                .map(|m| ChatMessage {
                    role: m.role,
                    content: m.content,
                    tool_call_id: m.tool_call_id,
                    tool_calls: m.tool_calls,
                    name: m.name,
                })
                .collect(),
        ),
    };
    let (tools, tool_choice) = generation::engine_tools(request.tools, request.tool_choice);
    GenerationInput {
        prompt,
        tools,
        tool_choice,
        sampling: SamplingConfig {
            temperature: p.temperature,
            top_k: p.top_k.map_or(0, |k| k as usize),
            top_p: p.top_p.unwrap_or(1.0),
            seed: generation::resolve_seed(p.seed),
            repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
            frequency_penalty: p.frequency_penalty.unwrap_or(0.0),
            presence_penalty: p.presence_penalty.unwrap_or(0.0),
            logprobs: Logprobs::Off,
        },
        stopping: StopCriteria::max_tokens(p.max_tokens as usize),
        format: generation::output_format(&request.response_format),
        policy: generation::queue_policy(request.reject_if_busy),
    }
}

/// `data: {"response":"<text>"}` per delta; `data: {"response":"","usage":{..}}` then
/// `data: [DONE]` at the end; an error event on failure.
struct WorkersAiStream;

impl Framing for WorkersAiStream {
    fn token(&mut self, text: &str, _logprobs: &[TokenLogprob]) -> String {
        // This dialect never asks for log-probabilities, so there is always text.
        if text.is_empty() {
            return String::new();
        }
        sse::token_event(text)
    }

    fn tool_calls(&mut self, calls: &[ToolCall]) -> String {
        sse::tool_calls_event(&calls.iter().map(legacy_call).collect::<Vec<_>>())
    }

    fn finish(&mut self, usage: &Usage, _reason: StopReason) -> String {
        format!(
            "{}{}",
            sse::usage_event(&generation::wire_usage(usage)),
            sse::DONE_EVENT
        )
    }

    fn error(&mut self, error: &ApiError) -> String {
        sse::error_event(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgerun_engine::QueuePolicy;

    fn validated(body: &str) -> ValidatedRequest {
        ValidatedRequest::from_json_bytes(body.as_bytes()).unwrap()
    }

    #[test]
    fn defaults_resolve_to_the_schemas_and_neutral_values() {
        let input = generation_input(validated(r#"{"prompt":"hi"}"#));
        assert_eq!(
            input.prompt,
            PromptInput::Prompt {
                text: "hi".into(),
                raw: false
            }
        );
        let s = input.sampling;
        assert_eq!(
            (s.temperature, s.top_k, s.top_p),
            (edgerun_protocol::DEFAULT_TEMPERATURE, 0, 1.0)
        );
        assert_eq!(
            (
                s.repetition_penalty,
                s.frequency_penalty,
                s.presence_penalty
            ),
            (1.0, 0.0, 0.0)
        );
        assert_eq!(
            input.stopping.max_tokens,
            edgerun_protocol::DEFAULT_MAX_TOKENS as usize
        );
        assert_eq!(input.policy, QueuePolicy::Wait);
        // No seed: a random one per request.
        let other = generation_input(validated(r#"{"prompt":"hi"}"#));
        assert_ne!(s.seed, other.sampling.seed);
    }

    #[test]
    fn every_given_field_reaches_the_engine() {
        let input = generation_input(validated(
            r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}],
                "max_tokens":7,"temperature":1.5,"top_k":5,"top_p":0.9,"seed":42,
                "repetition_penalty":1.1,"frequency_penalty":0.5,"presence_penalty":0.25,
                "options":{"rejectIfBusy":true},"tools":[{"name":"f"}]}"#,
        ));
        let PromptInput::Messages(m) = &input.prompt else {
            panic!("messages expected");
        };
        assert_eq!(
            m,
            &[
                ChatMessage::new("system", "be brief"),
                ChatMessage::new("user", "hi")
            ]
        );
        assert_eq!(
            input.sampling,
            SamplingConfig {
                temperature: 1.5,
                top_k: 5,
                top_p: 0.9,
                seed: 42,
                repetition_penalty: 1.1,
                frequency_penalty: 0.5,
                presence_penalty: 0.25,
                logprobs: Logprobs::Off,
            }
        );
        assert_eq!(input.stopping.max_tokens, 7);
        assert_eq!(input.policy, QueuePolicy::RejectIfBusy);
        assert_eq!(input.tools.len(), 1);
    }
}
