//! The OpenAI-compatible dialect (reference §4): request validation for `chat/completions` and
//! `completions` ([`request`]), the answers — `chat.completion`, `text_completion`, their stream
//! chunks, the model list ([`response`]) — and how they go on the wire: JSON bodies, stream
//! events and OpenAI's error body ([`frame`]).
//!
//! Requests become an [`OpenAiRequest`]: every field either reaches the engine or is refused.
//! Tools are supported: `tools` in OpenAI's shape (or Workers AI's legacy one; [`crate::tools`]
//! reads both, each schema measured against the [`RequestLimits`](crate::limits::RequestLimits)), `tool_choice` (`auto`,
//! `none`, `required` or one function by name), assistant messages that carry `tool_calls`
//! and `tool` messages answering them by `tool_call_id`; answers carry the calls the model made
//! as `tool_calls` with ids ([`ToolCallOut`]), streamed as deltas. A `tool_choice` that forces a
//! call cannot be combined with a JSON `response_format`, and `tools` belong to chat
//! completions only. What this node cannot do is refused with a 400 that says so, never
//! ignored: `n` other than 1, the deprecated `functions` / `function_call` (use `tools` /
//! `tool_choice`) and the `function` role, `logit_bias`, `echo`, `suffix`, `best_of` above 1,
//! audio, predicted outputs, web search, `chat_template_kwargs`, content parts other than
//! text, token-id prompts and more than one prompt. Unknown top-level fields are ignored, as
//! OpenAI-compatible servers do; `user`, `store`, `metadata`, `service_tier`,
//! `parallel_tool_calls` and `reasoning_effort` change nothing here and are accepted.
//! Extensions other servers accept too: `top_k`, `repetition_penalty`, and Workers AI's
//! `options.rejectIfBusy`.
//!
//! Validation errors are [`ApiError::invalid_request`](crate::error::ApiError::invalid_request) (400 / 5006) naming the field
//! (`crate::fields::openai` words them); the node renders them with [`error_body`] on `/v1`
//! (OpenAI's `{"error":{"message","type","param","code"}}`) and as the v4 envelope on Workers
//! AI's own `/ai/v1` routes, as the service does.
//!
//! Lists and schemas are bounded by a [`RequestLimits`](crate::limits::RequestLimits) ([`crate::limits`]): messages, content
//! parts, tool calls sent back, tools, `stop` ([`MAX_STOP_STRINGS`] strings of at most
//! [`MAX_STOP_CHARS`](crate::limits::MAX_STOP_CHARS) characters), `top_logprobs`, and the
//! `response_format` and tool schemas.
//!
//! Defaults are not applied here (the node resolves them; they differ by endpoint): `None`
//! means "not given".
//!
//! This module depends on [`crate::request`], [`crate::tools`], [`crate::limits`] and
//! [`crate::response`], never on [`crate::route`]: the route table names [`OpenAiEndpoint`] by
//! re-export and picks [`error_body`] for its routes.

pub mod frame;
pub mod request;
pub mod response;

pub use frame::{data_event, error_body, error_event, to_json, ErrorBody, ErrorDetail};
pub use request::{
    OpenAiInput, OpenAiRequest, MAX_COMPLETION_LOGPROBS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS,
};
pub use response::*;

/// An OpenAI-compatible endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenAiEndpoint {
    /// `POST chat/completions`.
    ChatCompletions,
    /// `POST completions` (legacy text completions; `/v1` only).
    Completions,
    /// `GET models` (`/v1` only).
    Models,
    /// `GET models/{id}` (`/v1` only; the id is [`crate::route::openai_model_id`]).
    Model,
    /// `POST embeddings` (its body is [`crate::embeddings::OpenAiEmbeddingRequest`]).
    Embeddings,
}

#[cfg(test)]
mod tests;
