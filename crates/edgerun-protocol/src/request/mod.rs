//! Request bodies: JSON bytes in, [`ValidatedRequest`] or an [`ApiError`] out.
//!
//! This follows the published input schema of `@cf/meta/llama-3-8b-instruct`
//! (reference §1.4): exactly one of `prompt` / `messages`, the sampling fields
//! with their ranges, `stream`, `raw`, `tools`, `functions`,
//! `response_format`, plus the REST-level `options` object. Every violation is
//! an [`ApiError::bad_input`] (400 / 5006) whose detail names the JSON pointer
//! of the offending field, worded like Cloudflare's validator, e.g.
//! `Type mismatch of '/temperature', 'string' not in 'number'` or
//! `'/temperature' must be <= 5, got 7`. The exceptions are `lora`
//! ([`ApiError::lora_unsupported`], 405 / 5005) and a `json_schema`
//! `response_format` together with `stream: true` ([`ApiError::json_mode_with_stream`],
//! 400 / 5023, as Workers AI answers it; `json_object` streams).
//!
//! Leniency choices (the real validator's behaviour is unverified):
//!
//! * unknown top-level keys, unknown keys inside messages and inside
//!   `options` are accepted and ignored, so clients that send extra fields
//!   (OpenAI-style `model`, `user`, ...) keep working;
//! * `null` for any optional field means "absent" (also for `prompt` /
//!   `messages`, which then count as not given);
//! * `raw`, `stream` and `options.rejectIfBusy` accept the strings `"true"` /
//!   `"false"` (Cloudflare's own LoRA example sends `"raw": "true"`);
//! * `raw` is ignored entirely (not even type-checked) with `messages`, whose
//!   schema variant has no `raw`;
//! * integer fields accept integral floats (`5.0`); `max_tokens` has no upper
//!   bound here (values above `u32::MAX` saturate) because the server checks
//!   the context window with the real token count;
//! * a message's `content` may be an array of `{"type":"text","text":..}`
//!   parts, joined with `"\n"` (as vLLM does); a missing or `null` `content` is
//!   accepted only on an assistant message that carries `tool_calls`, and
//!   becomes `""`;
//! * a leading UTF-8 byte order mark in the body is skipped.
//!
//! Every list and schema is bounded by a [`RequestLimits`] ([`crate::limits`]): messages,
//! content parts, tool calls sent back, tools, and the `response_format` and tool schemas
//! (size, nodes, depth following `$ref`s); over a limit is a 400 naming it.
//!
//! Validation checks fields in a fixed order (`lora`, the prompt/messages
//! choice, the input, `raw`, `stream`, the sampling fields in declaration
//! order, `tools`, `functions`, `response_format`, `options`) and reports the
//! first violation only.

use std::fmt;

use serde::Serialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::fields::workers_ai::{boolean, integer, number, type_mismatch};
use crate::fields::{non_null, take_non_null};
use crate::limits::{check_schema, RequestLimits};
mod messages;

use crate::tools::{parse_tool_choice, parse_tools, ToolChoice, ToolDefinition};
use messages::{check_array_of_objects, check_length, validate_messages};

/// `max_tokens` when the request does not say.
pub const DEFAULT_MAX_TOKENS: u32 = 256;
/// `temperature` when the request does not say.
pub const DEFAULT_TEMPERATURE: f32 = 0.6;
/// Longest `prompt` / message `content`, in characters (Unicode scalar values).
pub const MAX_PROMPT_CHARS: usize = 131_072;

pub(crate) const MAX_TEMPERATURE: f64 = 5.0;
pub(crate) const MAX_TOP_P: f64 = 2.0;
pub(crate) const MAX_PENALTY: f64 = 2.0;
pub(crate) const MAX_TOP_K: i128 = 50;
pub(crate) const MAX_SEED: i128 = 9_999_999_999;

/// The role of a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `"system"`
    System,
    /// `"user"`
    User,
    /// `"assistant"`
    Assistant,
    /// `"tool"`
    Tool,
}

impl Role {
    /// All roles, in the order used by error messages.
    pub const ALL: [Role; 4] = [Role::System, Role::User, Role::Assistant, Role::Tool];

    /// The wire name: `"system"`, `"user"`, `"assistant"` or `"tool"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    /// The role with this exact wire name, if any.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == name)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One validated chat message (the node hands the engine its own copy, which chat templates
/// see). Serialises as `role`, `content`, and the optional fields only when present.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    /// One of `system`, `user`, `assistant`, `tool` (see [`Role`]).
    pub role: String,
    /// The text; content-part arrays are already joined, `null` is `""`.
    pub content: String,
    /// For `tool` messages: the id of the call this answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For `assistant` messages: the calls it made (an array, kept verbatim).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Value>,
    /// Optional participant / tool name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// The parsed role; `None` only for a hand-built message with a bad role.
    pub fn role_kind(&self) -> Option<Role> {
        Role::parse(&self.role)
    }
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// A bare prompt. `raw: true` means "do not apply the chat template".
    Prompt {
        /// The prompt text (1..=131072 characters).
        text: String,
        /// Skip the chat template.
        raw: bool,
    },
    /// A conversation (at least one message).
    Messages(Vec<ChatMessage>),
}

/// Sampling parameters, with the schema defaults applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// At least 1; default 256.
    pub max_tokens: u32,
    /// 0..=5; default 0.6.
    pub temperature: f32,
    /// 0..=2.
    pub top_p: Option<f32>,
    /// 1..=50.
    pub top_k: Option<u32>,
    /// 1..=9999999999.
    pub seed: Option<u64>,
    /// 0..=2.
    pub repetition_penalty: Option<f32>,
    /// 0..=2.
    pub frequency_penalty: Option<f32>,
    /// 0..=2.
    pub presence_penalty: Option<f32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: DEFAULT_MAX_TOKENS,
            temperature: DEFAULT_TEMPERATURE,
            top_p: None,
            top_k: None,
            seed: None,
            repetition_penalty: None,
            frequency_penalty: None,
            presence_penalty: None,
        }
    }
}

/// A request body that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedRequest {
    /// Prompt or messages.
    pub input: PromptInput,
    /// Answer as server-sent events.
    pub stream: bool,
    /// Sampling parameters with defaults applied.
    pub params: SamplingParams,
    /// `options.rejectIfBusy`: fail with 429 / 3040 instead of queueing.
    pub reject_if_busy: bool,
    /// `tools`, in either shape (empty when none).
    pub tools: Vec<ToolDefinition>,
    /// `tool_choice` (an extension here: OpenAI's values), `auto` when not given.
    pub tool_choice: ToolChoice,
    /// `response_format` (JSON mode); [`ResponseFormat::Text`] when absent.
    pub response_format: ResponseFormat,
}

/// What the answer must be (JSON mode), in either dialect: Workers AI's
/// `{"type":"json_object"}` / `{"type":"json_schema","json_schema":<bare schema>}`, OpenAI's
/// `{"type":"json_object"}` / `{"type":"json_schema","json_schema":{"name","schema","strict"}}`.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum ResponseFormat {
    /// Free text.
    #[default]
    Text,
    /// Any JSON object.
    JsonObject,
    /// A JSON value valid against this schema.
    JsonSchema(Value),
}

impl ResponseFormat {
    /// The JSON schema the output must satisfy, or `None` for free text.
    pub fn schema(&self) -> Option<Value> {
        match self {
            Self::Text => None,
            Self::JsonObject => Some(serde_json::json!({"type": "object"})),
            Self::JsonSchema(schema) => Some(schema.clone()),
        }
    }

    /// Whether the answer is JSON.
    pub fn is_json(&self) -> bool {
        !matches!(self, Self::Text)
    }
}

impl ValidatedRequest {
    /// Parse `body` as JSON (whatever the `Content-Type` said) and validate it within the
    /// default limits ([`RequestLimits::DEFAULT`], what the Worker checks).
    pub fn from_json_bytes(body: &[u8]) -> Result<Self, ApiError> {
        Self::from_json_bytes_with(body, &RequestLimits::DEFAULT)
    }

    /// [`ValidatedRequest::from_json_bytes`] within `limits` (the node's configured ones).
    pub fn from_json_bytes_with(body: &[u8], limits: &RequestLimits) -> Result<Self, ApiError> {
        let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_input(format_args!("body is not valid JSON: {e}")))?;
        Self::from_value_with(value, limits)
    }

    /// Validate an already parsed body within the default limits.
    pub fn from_value(value: Value) -> Result<Self, ApiError> {
        Self::from_value_with(value, &RequestLimits::DEFAULT)
    }

    /// Validate an already parsed body within `limits`.
    pub fn from_value_with(value: Value, limits: &RequestLimits) -> Result<Self, ApiError> {
        let mut body = match value {
            Value::Object(map) => map,
            other => return Err(type_mismatch("/", &other, "object")),
        };

        if non_null(&body, "lora").is_some() {
            return Err(ApiError::lora_unsupported());
        }

        let prompt = take_non_null(&mut body, "prompt");
        let messages = take_non_null(&mut body, "messages");
        let input = match (prompt, messages) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_input(
                    "'prompt' and 'messages' are mutually exclusive",
                ))
            }
            (None, None) => {
                return Err(ApiError::bad_input(
                    "required properties at '/' are 'prompt' or 'messages'",
                ))
            }
            (Some(prompt), None) => {
                let text = match prompt {
                    Value::String(text) => text,
                    other => return Err(type_mismatch("/prompt", &other, "string")),
                };
                check_length("/prompt", &text, 1)?;
                let raw = boolean(&body, "raw", "/raw")?.unwrap_or(false);
                PromptInput::Prompt { text, raw }
            }
            (None, Some(messages)) => PromptInput::Messages(validate_messages(messages, limits)?),
        };

        let stream = boolean(&body, "stream", "/stream")?.unwrap_or(false);

        let mut params = SamplingParams::default();
        if let Some(max_tokens) = integer(&body, "max_tokens", 1, None)? {
            params.max_tokens = u32::try_from(max_tokens).unwrap_or(u32::MAX);
        }
        if let Some(t) = number(&body, "temperature", MAX_TEMPERATURE)? {
            params.temperature = t;
        }
        params.top_p = number(&body, "top_p", MAX_TOP_P)?;
        params.top_k = integer(&body, "top_k", 1, Some(MAX_TOP_K))?
            .map(|k| u32::try_from(k).unwrap_or(u32::MAX));
        params.seed = integer(&body, "seed", 1, Some(MAX_SEED))?
            .map(|s| u64::try_from(s).unwrap_or(u64::MAX));
        params.repetition_penalty = number(&body, "repetition_penalty", MAX_PENALTY)?;
        params.frequency_penalty = number(&body, "frequency_penalty", MAX_PENALTY)?;
        params.presence_penalty = number(&body, "presence_penalty", MAX_PENALTY)?;

        let tools = match take_non_null(&mut body, "tools") {
            Some(tools) => {
                check_array_of_objects("/tools", &tools)?;
                parse_tools(&tools, "tools", limits).map_err(ApiError::bad_input)?
            }
            None => Vec::new(),
        };
        let tool_choice = parse_tool_choice(non_null(&body, "tool_choice"), &tools)
            .map_err(ApiError::bad_input)?;
        if let Some(functions) = non_null(&body, "functions") {
            check_array_of_objects("/functions", functions)?;
        }

        let response_format = match take_non_null(&mut body, "response_format") {
            Some(format) => response_format(format, limits)?,
            None => ResponseFormat::Text,
        };
        // Workers AI streams `json_object` but not a schema (reference §3.3).
        if stream && matches!(response_format, ResponseFormat::JsonSchema(_)) {
            return Err(ApiError::json_mode_with_stream());
        }

        let reject_if_busy = match non_null(&body, "options") {
            None => false,
            Some(Value::Object(options)) => {
                boolean(options, "rejectIfBusy", "/options/rejectIfBusy")?.unwrap_or(false)
            }
            Some(other) => return Err(type_mismatch("/options", other, "object")),
        };

        Ok(Self {
            input,
            stream,
            params,
            reject_if_busy,
            tools,
            tool_choice,
            response_format,
        })
    }
}

fn response_format(format: Value, limits: &RequestLimits) -> Result<ResponseFormat, ApiError> {
    let Value::Object(map) = format else {
        return Err(type_mismatch("/response_format", &format, "object"));
    };
    let kind = match non_null(&map, "type") {
        None => {
            return Err(ApiError::bad_input(
                "required properties at '/response_format' are 'type'",
            ))
        }
        Some(Value::String(kind)) => kind,
        Some(other) => return Err(type_mismatch("/response_format/type", other, "string")),
    };
    if kind != "json_object" && kind != "json_schema" {
        return Err(ApiError::bad_input(format_args!(
            "'/response_format/type' must be one of 'json_object', 'json_schema', got '{kind}'"
        )));
    }
    match (kind.as_str(), non_null(&map, "json_schema")) {
        (_, Some(schema)) if !schema.is_object() => Err(type_mismatch(
            "/response_format/json_schema",
            schema,
            "object",
        )),
        ("json_object", None) => Ok(ResponseFormat::JsonObject),
        // A schema sent with `json_object` would be silently ignored: refused instead.
        ("json_object", Some(_)) => Err(ApiError::bad_input(
            "'/response_format/json_schema' is read only with type 'json_schema'",
        )),
        (_, None) => Err(ApiError::bad_input(
            "required properties at '/response_format' are 'type' and 'json_schema' when type is 'json_schema'",
        )),
        (_, Some(schema)) => {
            check_schema(schema, "'/response_format/json_schema'", &limits.schema)
                .map_err(ApiError::bad_input)?;
            Ok(ResponseFormat::JsonSchema(schema.clone()))
        }
    }
}

#[cfg(test)]
mod tests;
