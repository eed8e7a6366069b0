//! OpenAI's answer types: `chat.completion` and `text_completion` with their choices, the
//! assistant message and its tool calls, log-probabilities, the stream chunks, and the model
//! list. Serialised by [`super::frame`].

use serde::Serialize;
use std::collections::BTreeMap;

use crate::response::Usage;

/// `"stop"` or `"length"`: why a choice ended, as OpenAI names it.
pub type FinishReason = &'static str;

/// One token's log-probability in a chat completion (`choices[].logprobs.content[]`).
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ChatTokenLogprob {
    /// The token's text (its bytes, lossily decoded when they end inside a character).
    pub token: String,
    /// Its log-probability, `<= 0`.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The step's most likely tokens, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative in `top_logprobs`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability, `<= 0`.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// `choices[].logprobs` of a chat completion (or chunk).
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<ChatTokenLogprob>,
    /// Always `null` (no refusals).
    pub refusal: Option<Vec<ChatTokenLogprob>>,
}

/// `choices[].logprobs` of a legacy completion (or chunk).
#[derive(Serialize, Debug, Clone, PartialEq, Default)]
pub struct CompletionLogprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Each token's log-probability.
    pub token_logprobs: Vec<f32>,
    /// Each step's most likely tokens, text to log-probability.
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    /// Where each token starts in the choice's text, in UTF-8 bytes (as vLLM counts).
    pub text_offset: Vec<usize>,
}

/// The assistant's message in a chat completion.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct AssistantMessage {
    /// Always `"assistant"`.
    pub role: &'static str,
    /// The generated text; `null` when the answer is only tool calls.
    pub content: Option<String>,
    /// Always `null` (no refusals).
    pub refusal: Option<String>,
    /// The tool calls made, when any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// A tool call in an answer: `{"id","type":"function","function":{"name","arguments"}}`; in a
/// stream chunk also its `index`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ToolCallOut {
    /// Position among the answer's calls (stream chunks only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// `call_` and 24 hex digits.
    pub id: String,
    /// Always `"function"`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The function and its arguments.
    pub function: FunctionCallOut,
}

/// The function of a [`ToolCallOut`].
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct FunctionCallOut {
    /// The tool's name.
    pub name: String,
    /// The arguments object as JSON text (OpenAI's shape).
    pub arguments: String,
}

/// One choice of a `chat.completion`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ChatChoice {
    /// Always 0.
    pub index: u32,
    /// The answer.
    pub message: AssistantMessage,
    /// `null` unless asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: FinishReason,
}

/// A `chat.completion` (the whole answer).
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// Always `"chat.completion"`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model as the request named it.
    pub model: String,
    /// Exactly one.
    pub choices: Vec<ChatChoice>,
    /// Token accounting.
    pub usage: Usage,
}

/// The `delta` of a chat chunk: the role in the first, text in the others, empty in the last.
#[derive(Serialize, Debug, Clone, PartialEq, Default)]
pub struct ChatDelta {
    /// `"assistant"`, in the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Tool calls (each sent whole, with its index).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// One choice of a `chat.completion.chunk`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ChatChunkChoice {
    /// Always 0.
    pub index: u32,
    /// What is new.
    pub delta: ChatDelta,
    /// The new tokens' log-probabilities, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// Set in the last chunk of the choice only.
    pub finish_reason: Option<FinishReason>,
}

/// One choice of a legacy completion or of its chunk.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct CompletionChoice {
    /// Always 0.
    pub index: u32,
    /// The (new) text.
    pub text: String,
    /// The (new) tokens' log-probabilities, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// Set at the end of the choice only (always, in a whole answer).
    pub finish_reason: Option<FinishReason>,
}

/// A `chat.completion.chunk` or a streamed `text_completion`, generic over its choice type.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Chunk<C> {
    /// The same in every chunk of a stream.
    pub id: String,
    /// `"chat.completion.chunk"` or `"text_completion"`.
    pub object: &'static str,
    /// Unix seconds, the same in every chunk.
    pub created: u64,
    /// The model as the request named it.
    pub model: String,
    /// One choice; none in the usage chunk.
    pub choices: Vec<C>,
    /// With `include_usage`: `null` in every chunk but the last, which has it. Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// A whole legacy completion (`text_completion`).
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct TextCompletion {
    /// `cmpl-...`.
    pub id: String,
    /// Always `"text_completion"`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model as the request named it.
    pub model: String,
    /// Exactly one.
    pub choices: Vec<CompletionChoice>,
    /// Token accounting.
    pub usage: Usage,
}

/// One entry of `GET /v1/models`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Model {
    /// A name the node answers to.
    pub id: String,
    /// Always `"model"`.
    pub object: &'static str,
    /// Unix seconds (when the node started).
    pub created: u64,
    /// Always `"edgerun"`.
    pub owned_by: &'static str,
}

/// `GET /v1/models`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ModelList {
    /// Always `"list"`.
    pub object: &'static str,
    /// Every name the node answers to.
    pub data: Vec<Model>,
}

impl ModelList {
    /// The list of `names`, all served since `created`.
    pub fn new(names: &[String], created: u64) -> Self {
        Self {
            object: "list",
            data: names
                .iter()
                .map(|id| Model {
                    id: id.clone(),
                    object: "model",
                    created,
                    owned_by: "edgerun",
                })
                .collect(),
        }
    }
}
