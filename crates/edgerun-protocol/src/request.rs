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
use serde_json::{Map, Number, Value};

use crate::error::ApiError;
use crate::limits::{check_schema, RequestLimits};
use crate::tools::{
    normalize_tool_calls, parse_tool_choice, parse_tools, ToolChoice, ToolDefinition,
};

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
                let raw = get_bool(&body, "raw", "/raw")?.unwrap_or(false);
                PromptInput::Prompt { text, raw }
            }
            (None, Some(messages)) => PromptInput::Messages(validate_messages(messages, limits)?),
        };

        let stream = get_bool(&body, "stream", "/stream")?.unwrap_or(false);

        let mut params = SamplingParams::default();
        if let Some(max_tokens) = get_integer(&body, "max_tokens", 1, None)? {
            params.max_tokens = u32::try_from(max_tokens).unwrap_or(u32::MAX);
        }
        if let Some(t) = get_number(&body, "temperature", MAX_TEMPERATURE)? {
            params.temperature = t;
        }
        params.top_p = get_number(&body, "top_p", MAX_TOP_P)?;
        params.top_k = get_integer(&body, "top_k", 1, Some(MAX_TOP_K))?
            .map(|k| u32::try_from(k).unwrap_or(u32::MAX));
        params.seed = get_integer(&body, "seed", 1, Some(MAX_SEED))?
            .map(|s| u64::try_from(s).unwrap_or(u64::MAX));
        params.repetition_penalty = get_number(&body, "repetition_penalty", MAX_PENALTY)?;
        params.frequency_penalty = get_number(&body, "frequency_penalty", MAX_PENALTY)?;
        params.presence_penalty = get_number(&body, "presence_penalty", MAX_PENALTY)?;

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
                get_bool(options, "rejectIfBusy", "/options/rejectIfBusy")?.unwrap_or(false)
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

/// The JSON type name of a value, as validators print it.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_mismatch(pointer: &str, value: &Value, expected: &str) -> ApiError {
    ApiError::bad_input(format_args!(
        "Type mismatch of '{pointer}', '{}' not in '{expected}'",
        type_name(value)
    ))
}

/// The value under `key`, treating `null` as absent.
fn non_null<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).filter(|v| !v.is_null())
}

/// Remove and return the value under `key`, treating `null` as absent.
fn take_non_null(map: &mut Map<String, Value>, key: &str) -> Option<Value> {
    map.remove(key).filter(|v| !v.is_null())
}

/// A boolean, also accepting the strings `"true"` / `"false"`.
fn get_bool(map: &Map<String, Value>, key: &str, pointer: &str) -> Result<Option<bool>, ApiError> {
    match non_null(map, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if s == "true" => Ok(Some(true)),
        Some(Value::String(s)) if s == "false" => Ok(Some(false)),
        Some(other) => Err(type_mismatch(pointer, other, "boolean")),
    }
}

/// A number in `0..=max`, as `f32`.
fn get_number(map: &Map<String, Value>, key: &str, max: f64) -> Result<Option<f32>, ApiError> {
    let pointer = format!("/{key}");
    let number = match non_null(map, key) {
        None => return Ok(None),
        Some(Value::Number(n)) => n,
        Some(other) => return Err(type_mismatch(&pointer, other, "number")),
    };
    // serde_json numbers are always finite, so `as_f64` only fails for
    // arbitrary-precision builds; treat that as out of range.
    let value = number.as_f64().unwrap_or(f64::INFINITY);
    if value < 0.0 {
        return Err(out_of_range(&pointer, ">=", 0.0, number));
    }
    if value > max {
        return Err(out_of_range(&pointer, "<=", max, number));
    }
    Ok(Some(value as f32))
}

/// An integer (integral floats like `5.0` allowed) in `min..=max`.
fn get_integer(
    map: &Map<String, Value>,
    key: &str,
    min: i128,
    max: Option<i128>,
) -> Result<Option<i128>, ApiError> {
    let pointer = format!("/{key}");
    let number = match non_null(map, key) {
        None => return Ok(None),
        Some(Value::Number(n)) => n,
        Some(other) => return Err(type_mismatch(&pointer, other, "integer")),
    };
    let Some(value) = integral(number) else {
        return Err(ApiError::bad_input(format_args!(
            "Type mismatch of '{pointer}', 'number' not in 'integer'"
        )));
    };
    if value < min {
        return Err(out_of_range(&pointer, ">=", min, number));
    }
    if let Some(max) = max {
        if value > max {
            return Err(out_of_range(&pointer, "<=", max, number));
        }
    }
    Ok(Some(value))
}

/// The exact value of an integral number; huge integral floats saturate.
fn integral(number: &Number) -> Option<i128> {
    if let Some(u) = number.as_u64() {
        return Some(i128::from(u));
    }
    if let Some(i) = number.as_i64() {
        return Some(i128::from(i));
    }
    let f = number.as_f64()?;
    // `as` saturates float-to-int conversions; it never panics.
    (f.is_finite() && f.fract() == 0.0).then_some(f as i128)
}

fn out_of_range(pointer: &str, op: &str, limit: impl fmt::Display, got: &Number) -> ApiError {
    ApiError::bad_input(format_args!("'{pointer}' must be {op} {limit}, got {got}"))
}

/// Length in characters (Unicode scalar values) must be within
/// `min..=MAX_PROMPT_CHARS`.
fn check_length(pointer: &str, text: &str, min: usize) -> Result<(), ApiError> {
    let chars = text.chars().count();
    if chars < min {
        return Err(ApiError::bad_input(format_args!(
            "'{pointer}' length must be >= {min}, got {chars}"
        )));
    }
    if chars > MAX_PROMPT_CHARS {
        return Err(ApiError::bad_input(format_args!(
            "'{pointer}' length must be <= {MAX_PROMPT_CHARS}, got {chars}"
        )));
    }
    Ok(())
}

fn check_array_of_objects(pointer: &str, value: &Value) -> Result<(), ApiError> {
    let Value::Array(items) = value else {
        return Err(type_mismatch(pointer, value, "array"));
    };
    for (i, item) in items.iter().enumerate() {
        if !item.is_object() {
            return Err(type_mismatch(&format!("{pointer}/{i}"), item, "object"));
        }
    }
    Ok(())
}

fn validate_messages(
    messages: Value,
    limits: &RequestLimits,
) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match messages {
        Value::Array(items) => items,
        other => return Err(type_mismatch("/messages", &other, "array")),
    };
    if items.is_empty() {
        return Err(ApiError::bad_input(
            "'/messages' must contain at least 1 item, got 0",
        ));
    }
    if items.len() > limits.max_messages {
        return Err(ApiError::bad_input(format_args!(
            "'/messages' must contain at most {} items (the message count limit), got {}",
            limits.max_messages,
            items.len()
        )));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| validate_message(i, item, limits))
        .collect()
}

fn validate_message(
    index: usize,
    item: Value,
    limits: &RequestLimits,
) -> Result<ChatMessage, ApiError> {
    let base = format!("/messages/{index}");
    let mut msg = match item {
        Value::Object(map) => map,
        other => return Err(type_mismatch(&base, &other, "object")),
    };
    let required = || {
        ApiError::bad_input(format_args!(
            "required properties at '{base}' are 'role' and 'content'"
        ))
    };

    let role = match take_non_null(&mut msg, "role") {
        None => return Err(required()),
        Some(Value::String(role)) => role,
        Some(other) => return Err(type_mismatch(&format!("{base}/role"), &other, "string")),
    };
    let Some(role_kind) = Role::parse(&role) else {
        return Err(ApiError::bad_input(format_args!(
            "'{base}/role' must be one of 'system', 'user', 'assistant', 'tool', got '{role}'"
        )));
    };

    let tool_calls = match take_non_null(&mut msg, "tool_calls") {
        Some(calls) if !calls.is_array() => {
            return Err(type_mismatch(
                &format!("{base}/tool_calls"),
                &calls,
                "array",
            ))
        }
        Some(calls) => Some(
            normalize_tool_calls(&calls, &format!("{base}/tool_calls"), limits.max_tool_calls)
                .map_err(ApiError::bad_input)?,
        ),
        None => None,
    };
    let tool_call_id = take_string(&mut msg, "tool_call_id", &base)?;
    let name = take_string(&mut msg, "name", &base)?;

    let content_pointer = format!("{base}/content");
    let content = match msg.remove("content") {
        Some(Value::String(text)) => text,
        Some(Value::Array(parts)) if parts.len() > limits.max_content_parts => {
            return Err(ApiError::bad_input(format_args!(
                "'{content_pointer}' must contain at most {} parts (the content part limit), got {}",
                limits.max_content_parts,
                parts.len()
            )))
        }
        Some(Value::Array(parts)) => join_parts(&content_pointer, parts)?,
        None | Some(Value::Null) if role_kind == Role::Assistant && tool_calls.is_some() => {
            String::new()
        }
        None => return Err(required()),
        Some(other) => return Err(type_mismatch(&content_pointer, &other, "string")),
    };
    check_length(&content_pointer, &content, 0)?;

    Ok(ChatMessage {
        role,
        content,
        tool_call_id,
        tool_calls,
        name,
    })
}

/// An optional string field of a message.
fn take_string(
    msg: &mut Map<String, Value>,
    key: &str,
    base: &str,
) -> Result<Option<String>, ApiError> {
    match take_non_null(msg, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(type_mismatch(&format!("{base}/{key}"), &other, "string")),
    }
}

/// Join `[{"type":"text","text":"..."}, ...]` with newlines.
fn join_parts(pointer: &str, parts: Vec<Value>) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (i, part) in parts.into_iter().enumerate() {
        let part_pointer = format!("{pointer}/{i}");
        let mut part = match part {
            Value::Object(map) => map,
            other => return Err(type_mismatch(&part_pointer, &other, "object")),
        };
        match take_non_null(&mut part, "type") {
            None => {}
            Some(Value::String(t)) if t == "text" => {}
            Some(Value::String(t)) => {
                return Err(ApiError::bad_input(format_args!(
                    "'{part_pointer}/type' must be 'text', got '{t}'"
                )))
            }
            Some(other) => {
                return Err(type_mismatch(
                    &format!("{part_pointer}/type"),
                    &other,
                    "string",
                ))
            }
        }
        match take_non_null(&mut part, "text") {
            Some(Value::String(text)) => texts.push(text),
            Some(other) => {
                return Err(type_mismatch(
                    &format!("{part_pointer}/text"),
                    &other,
                    "string",
                ))
            }
            None => {
                return Err(ApiError::bad_input(format_args!(
                    "required properties at '{part_pointer}' are 'type' and 'text'"
                )))
            }
        }
    }
    Ok(texts.join("\n"))
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
mod tests {
    use super::*;
    use serde_json::json;

    fn ok(value: Value) -> ValidatedRequest {
        match ValidatedRequest::from_value(value.clone()) {
            Ok(req) => req,
            Err(e) => panic!("{value} rejected: {e}"),
        }
    }

    fn err(value: Value) -> ApiError {
        match ValidatedRequest::from_value(value.clone()) {
            Ok(req) => panic!("{value} accepted: {req:?}"),
            Err(e) => e,
        }
    }

    /// The detail of a bad-input error (message without the prefix).
    fn bad(value: Value) -> String {
        let e = err(value);
        assert_eq!((e.status, e.code), (400, 5006), "{e}");
        e.message
            .strip_prefix("AiError: Bad input: ")
            .unwrap_or_else(|| panic!("no prefix: {}", e.message))
            .to_string()
    }

    fn prompt_with(key: &str, value: Value) -> Value {
        let mut body = json!({"prompt": "hi"});
        body[key] = value;
        body
    }

    #[test]
    fn minimal_prompt_gets_defaults() {
        let req = ok(json!({"prompt": "Hello"}));
        assert_eq!(
            req,
            ValidatedRequest {
                input: PromptInput::Prompt {
                    text: "Hello".into(),
                    raw: false
                },
                stream: false,
                params: SamplingParams::default(),
                reject_if_busy: false,
                tools: Vec::new(),
                tool_choice: ToolChoice::Auto,
                response_format: ResponseFormat::Text,
            }
        );
        assert_eq!(req.params.max_tokens, 256);
        assert_eq!(req.params.temperature, 0.6);
    }

    #[test]
    fn from_json_bytes_parses_and_validates() {
        let req = ValidatedRequest::from_json_bytes(br#"{"prompt":"x","stream":true}"#).unwrap();
        assert!(req.stream);
        let req = ValidatedRequest::from_json_bytes(b"\xEF\xBB\xBF{\"prompt\":\"x\"}").unwrap();
        assert!(!req.stream);
    }

    #[test]
    fn invalid_json_is_bad_input() {
        let e = ValidatedRequest::from_json_bytes(b"{").unwrap_err();
        assert_eq!((e.status, e.code), (400, 5006));
        assert_eq!(
            e.message,
            "AiError: Bad input: body is not valid JSON: EOF while parsing an object at line 1 column 1"
        );
        let e = ValidatedRequest::from_json_bytes(b"").unwrap_err();
        assert!(e
            .message
            .starts_with("AiError: Bad input: body is not valid JSON: "));
        let e = ValidatedRequest::from_json_bytes(b"{\"prompt\":\"\xff\"}").unwrap_err();
        assert!(e
            .message
            .starts_with("AiError: Bad input: body is not valid JSON: "));
        let e = ValidatedRequest::from_json_bytes(b"{\"prompt\":\"x\"} trailing").unwrap_err();
        assert!(e
            .message
            .starts_with("AiError: Bad input: body is not valid JSON: "));
    }

    #[test]
    fn non_object_body_is_type_mismatch_at_root() {
        assert_eq!(
            bad(json!([1, 2])),
            "Type mismatch of '/', 'array' not in 'object'"
        );
        assert_eq!(
            bad(json!("prompt")),
            "Type mismatch of '/', 'string' not in 'object'"
        );
        assert_eq!(
            bad(json!(null)),
            "Type mismatch of '/', 'null' not in 'object'"
        );
        assert_eq!(
            bad(json!(3)),
            "Type mismatch of '/', 'number' not in 'object'"
        );
    }

    #[test]
    fn prompt_or_messages_required_and_exclusive() {
        assert_eq!(
            bad(json!({})),
            "required properties at '/' are 'prompt' or 'messages'"
        );
        assert_eq!(
            bad(json!({"prompt": null, "messages": null})),
            "required properties at '/' are 'prompt' or 'messages'"
        );
        assert_eq!(
            bad(json!({"prompt": "a", "messages": [{"role": "user", "content": "b"}]})),
            "'prompt' and 'messages' are mutually exclusive"
        );
        // null counts as absent
        ok(json!({"prompt": "a", "messages": null}));
        ok(json!({"prompt": null, "messages": [{"role": "user", "content": "b"}]}));
    }

    #[test]
    fn prompt_type_and_length() {
        assert_eq!(
            bad(json!({"prompt": 5})),
            "Type mismatch of '/prompt', 'number' not in 'string'"
        );
        assert_eq!(
            bad(json!({"prompt": ""})),
            "'/prompt' length must be >= 1, got 0"
        );
        let max = "é".repeat(MAX_PROMPT_CHARS);
        ok(json!({ "prompt": max }));
        let too_long = "a".repeat(MAX_PROMPT_CHARS + 1);
        assert_eq!(
            bad(json!({ "prompt": too_long })),
            "'/prompt' length must be <= 131072, got 131073"
        );
        ok(json!({"prompt": "🦀"}));
    }

    #[test]
    fn raw_is_boolean_or_boolean_string() {
        for (value, expected) in [
            (json!(true), true),
            (json!(false), false),
            (json!("true"), true),
            (json!("false"), false),
            (json!(null), false),
        ] {
            let req = ok(prompt_with("raw", value));
            assert_eq!(
                req.input,
                PromptInput::Prompt {
                    text: "hi".into(),
                    raw: expected
                }
            );
        }
        assert_eq!(
            bad(prompt_with("raw", json!("yes"))),
            "Type mismatch of '/raw', 'string' not in 'boolean'"
        );
        assert_eq!(
            bad(prompt_with("raw", json!(1))),
            "Type mismatch of '/raw', 'number' not in 'boolean'"
        );
        // ignored with messages
        ok(json!({"messages": [{"role": "user", "content": "x"}], "raw": "whatever"}));
    }

    #[test]
    fn stream_is_boolean_or_boolean_string() {
        assert!(ok(prompt_with("stream", json!(true))).stream);
        assert!(ok(prompt_with("stream", json!("true"))).stream);
        assert!(!ok(prompt_with("stream", json!("false"))).stream);
        assert!(!ok(prompt_with("stream", json!(null))).stream);
        assert_eq!(
            bad(prompt_with("stream", json!("TRUE"))),
            "Type mismatch of '/stream', 'string' not in 'boolean'"
        );
        assert_eq!(
            bad(prompt_with("stream", json!([]))),
            "Type mismatch of '/stream', 'array' not in 'boolean'"
        );
    }

    #[test]
    fn max_tokens_rules() {
        assert_eq!(ok(prompt_with("max_tokens", json!(1))).params.max_tokens, 1);
        assert_eq!(
            ok(prompt_with("max_tokens", json!(5.0))).params.max_tokens,
            5
        );
        assert_eq!(
            ok(prompt_with("max_tokens", json!(100_000)))
                .params
                .max_tokens,
            100_000
        );
        assert_eq!(
            ok(prompt_with("max_tokens", json!(10_000_000_000u64)))
                .params
                .max_tokens,
            u32::MAX
        );
        assert_eq!(
            ok(prompt_with("max_tokens", json!(1e30))).params.max_tokens,
            u32::MAX
        );
        assert_eq!(
            ok(prompt_with("max_tokens", json!(null))).params.max_tokens,
            256
        );
        assert_eq!(
            bad(prompt_with("max_tokens", json!(5.5))),
            "Type mismatch of '/max_tokens', 'number' not in 'integer'"
        );
        assert_eq!(
            bad(prompt_with("max_tokens", json!(0))),
            "'/max_tokens' must be >= 1, got 0"
        );
        assert_eq!(
            bad(prompt_with("max_tokens", json!(-3))),
            "'/max_tokens' must be >= 1, got -3"
        );
        assert_eq!(
            bad(prompt_with("max_tokens", json!(-1e30))),
            "'/max_tokens' must be >= 1, got -1e+30"
        );
        assert_eq!(
            bad(prompt_with("max_tokens", json!("256"))),
            "Type mismatch of '/max_tokens', 'string' not in 'integer'"
        );
    }

    #[test]
    fn temperature_rules() {
        assert_eq!(
            ok(prompt_with("temperature", json!(0))).params.temperature,
            0.0
        );
        assert_eq!(
            ok(prompt_with("temperature", json!(5))).params.temperature,
            5.0
        );
        assert_eq!(
            ok(prompt_with("temperature", json!(1.25)))
                .params
                .temperature,
            1.25
        );
        assert_eq!(
            ok(prompt_with("temperature", json!(null)))
                .params
                .temperature,
            0.6
        );
        assert_eq!(
            bad(prompt_with("temperature", json!("0.5"))),
            "Type mismatch of '/temperature', 'string' not in 'number'"
        );
        assert_eq!(
            bad(prompt_with("temperature", json!(7))),
            "'/temperature' must be <= 5, got 7"
        );
        assert_eq!(
            bad(prompt_with("temperature", json!(5.01))),
            "'/temperature' must be <= 5, got 5.01"
        );
        assert_eq!(
            bad(prompt_with("temperature", json!(-0.1))),
            "'/temperature' must be >= 0, got -0.1"
        );
    }

    #[test]
    fn top_p_rules() {
        assert_eq!(ok(prompt_with("top_p", json!(0))).params.top_p, Some(0.0));
        assert_eq!(ok(prompt_with("top_p", json!(0.9))).params.top_p, Some(0.9));
        assert_eq!(ok(prompt_with("top_p", json!(2))).params.top_p, Some(2.0));
        assert_eq!(ok(prompt_with("top_p", json!(null))).params.top_p, None);
        assert_eq!(
            bad(prompt_with("top_p", json!(2.5))),
            "'/top_p' must be <= 2, got 2.5"
        );
        assert_eq!(
            bad(prompt_with("top_p", json!(-1))),
            "'/top_p' must be >= 0, got -1"
        );
        assert_eq!(
            bad(prompt_with("top_p", json!(true))),
            "Type mismatch of '/top_p', 'boolean' not in 'number'"
        );
    }

    #[test]
    fn top_k_rules() {
        assert_eq!(ok(prompt_with("top_k", json!(1))).params.top_k, Some(1));
        assert_eq!(ok(prompt_with("top_k", json!(50))).params.top_k, Some(50));
        assert_eq!(ok(prompt_with("top_k", json!(40.0))).params.top_k, Some(40));
        assert_eq!(
            bad(prompt_with("top_k", json!(0))),
            "'/top_k' must be >= 1, got 0"
        );
        assert_eq!(
            bad(prompt_with("top_k", json!(51))),
            "'/top_k' must be <= 50, got 51"
        );
        assert_eq!(
            bad(prompt_with("top_k", json!(1.5))),
            "Type mismatch of '/top_k', 'number' not in 'integer'"
        );
        assert_eq!(
            bad(prompt_with("top_k", json!({}))),
            "Type mismatch of '/top_k', 'object' not in 'integer'"
        );
    }

    #[test]
    fn seed_rules() {
        assert_eq!(ok(prompt_with("seed", json!(1))).params.seed, Some(1));
        assert_eq!(
            ok(prompt_with("seed", json!(9_999_999_999u64))).params.seed,
            Some(9_999_999_999)
        );
        assert_eq!(
            bad(prompt_with("seed", json!(0))),
            "'/seed' must be >= 1, got 0"
        );
        assert_eq!(
            bad(prompt_with("seed", json!(10_000_000_000u64))),
            "'/seed' must be <= 9999999999, got 10000000000"
        );
        assert_eq!(
            bad(prompt_with("seed", json!(u64::MAX))),
            "'/seed' must be <= 9999999999, got 18446744073709551615"
        );
        assert_eq!(
            bad(prompt_with("seed", json!(4.2))),
            "Type mismatch of '/seed', 'number' not in 'integer'"
        );
    }

    #[test]
    fn penalty_rules() {
        for key in [
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
        ] {
            let params = ok(prompt_with(key, json!(1.5))).params;
            let got = match key {
                "repetition_penalty" => params.repetition_penalty,
                "frequency_penalty" => params.frequency_penalty,
                _ => params.presence_penalty,
            };
            assert_eq!(got, Some(1.5), "{key}");
            ok(prompt_with(key, json!(0)));
            ok(prompt_with(key, json!(2)));
            ok(prompt_with(key, json!(null)));
            assert_eq!(
                bad(prompt_with(key, json!(2.1))),
                format!("'/{key}' must be <= 2, got 2.1")
            );
            assert_eq!(
                bad(prompt_with(key, json!(-0.5))),
                format!("'/{key}' must be >= 0, got -0.5")
            );
            assert_eq!(
                bad(prompt_with(key, json!("1"))),
                format!("Type mismatch of '/{key}', 'string' not in 'number'")
            );
        }
    }

    #[test]
    fn all_params_together() {
        let req = ok(json!({
            "prompt": "x", "max_tokens": 10, "temperature": 0.2, "top_p": 0.5, "top_k": 7,
            "seed": 42, "repetition_penalty": 1.1, "frequency_penalty": 0.3,
            "presence_penalty": 0.4
        }));
        assert_eq!(
            req.params,
            SamplingParams {
                max_tokens: 10,
                temperature: 0.2,
                top_p: Some(0.5),
                top_k: Some(7),
                seed: Some(42),
                repetition_penalty: Some(1.1),
                frequency_penalty: Some(0.3),
                presence_penalty: Some(0.4),
            }
        );
    }

    #[test]
    fn messages_accepted() {
        let req = ok(json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather?", "name": "bob"},
            {"role": "assistant", "content": null,
             "tool_calls": [{"id": "call1", "type": "function",
                             "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call1"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
             "extra": 1}
        ]}));
        let PromptInput::Messages(msgs) = req.input else {
            panic!("not messages")
        };
        assert_eq!(msgs.len(), 5);
        assert_eq!(msgs[0].role_kind(), Some(Role::System));
        assert_eq!(msgs[1].name.as_deref(), Some("bob"));
        assert_eq!(msgs[2].content, "");
        assert!(msgs[2].tool_calls.as_ref().is_some_and(Value::is_array));
        assert_eq!(msgs[3].tool_call_id.as_deref(), Some("call1"));
        assert_eq!(msgs[4].content, "a\nb");
        assert_eq!(
            serde_json::to_string(&msgs[3]).unwrap(),
            r#"{"role":"tool","content":"sunny","tool_call_id":"call1"}"#
        );
        assert_eq!(
            serde_json::to_string(&msgs[0]).unwrap(),
            r#"{"role":"system","content":"Be brief."}"#
        );
    }

    #[test]
    fn assistant_without_content_but_with_tool_calls() {
        let req = ok(json!({"messages": [
            {"role": "assistant", "tool_calls": []}
        ]}));
        let PromptInput::Messages(msgs) = req.input else {
            panic!()
        };
        assert_eq!(msgs[0].content, "");
    }

    #[test]
    fn messages_rejected() {
        assert_eq!(
            bad(json!({"messages": "hi"})),
            "Type mismatch of '/messages', 'string' not in 'array'"
        );
        assert_eq!(
            bad(json!({"messages": []})),
            "'/messages' must contain at least 1 item, got 0"
        );
        assert_eq!(
            bad(json!({"messages": ["hi"]})),
            "Type mismatch of '/messages/0', 'string' not in 'object'"
        );
        assert_eq!(
            bad(json!({"messages": [{"content": "x"}]})),
            "required properties at '/messages/0' are 'role' and 'content'"
        );
        assert_eq!(
            bad(json!({"messages": [{"role": "user", "content": "a"}, {"role": "user"}]})),
            "required properties at '/messages/1' are 'role' and 'content'"
        );
        assert_eq!(
            bad(json!({"messages": [{"role": 1, "content": "x"}]})),
            "Type mismatch of '/messages/0/role', 'number' not in 'string'"
        );
        assert_eq!(
            bad(json!({"messages": [{"role": "bot", "content": "x"}]})),
            "'/messages/0/role' must be one of 'system', 'user', 'assistant', 'tool', got 'bot'"
        );
        assert_eq!(
            bad(json!({"messages": [{"role": "User", "content": "x"}]})),
            "'/messages/0/role' must be one of 'system', 'user', 'assistant', 'tool', got 'User'"
        );
        assert_eq!(
            bad(json!({"messages": [{"role": "user", "content": null}]})),
            "Type mismatch of '/messages/0/content', 'null' not in 'string'"
        );
        assert_eq!(
            bad(json!({"messages": [{"role": "assistant", "content": null}]})),
            "Type mismatch of '/messages/0/content', 'null' not in 'string'"
        );
        assert_eq!(
            bad(json!({"messages": [{"role": "user", "content": null, "tool_calls": []}]})),
            "Type mismatch of '/messages/0/content', 'null' not in 'string'"
        );
        assert_eq!(
            bad(json!({"messages": [{"role": "user", "content": 5}]})),
            "Type mismatch of '/messages/0/content', 'number' not in 'string'"
        );
        assert_eq!(
            bad(json!({"messages": [{"role": "user", "content": "x", "tool_call_id": 3}]})),
            "Type mismatch of '/messages/0/tool_call_id', 'number' not in 'string'"
        );
        assert_eq!(
            bad(json!({"messages": [{"role": "user", "content": "x", "name": []}]})),
            "Type mismatch of '/messages/0/name', 'array' not in 'string'"
        );
        assert_eq!(
            bad(json!({"messages": [{"role": "assistant", "content": "x", "tool_calls": {}}]})),
            "Type mismatch of '/messages/0/tool_calls', 'object' not in 'array'"
        );
        let too_long = "a".repeat(MAX_PROMPT_CHARS + 1);
        assert_eq!(
            bad(json!({"messages": [{"role": "user", "content": too_long}]})),
            "'/messages/0/content' length must be <= 131072, got 131073"
        );
        // empty content is fine
        ok(json!({"messages": [{"role": "user", "content": ""}]}));
        ok(json!({"messages": [{"role": "user", "content": "a".repeat(MAX_PROMPT_CHARS)}]}));
    }

    #[test]
    fn content_parts_rejected() {
        assert_eq!(
            bad(json!({"messages": [{"role": "user", "content": ["x"]}]})),
            "Type mismatch of '/messages/0/content/0', 'string' not in 'object'"
        );
        assert_eq!(
            bad(json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "a"},
                {"type": "image_url", "image_url": {"url": "x"}}
            ]}]})),
            "'/messages/0/content/1/type' must be 'text', got 'image_url'"
        );
        assert_eq!(
            bad(json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]})),
            "required properties at '/messages/0/content/0' are 'type' and 'text'"
        );
        assert_eq!(
            bad(json!({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]})),
            "Type mismatch of '/messages/0/content/0/text', 'number' not in 'string'"
        );
        assert_eq!(
            bad(json!({"messages": [{"role": "user", "content": [{"type": 1, "text": "a"}]}]})),
            "Type mismatch of '/messages/0/content/0/type', 'number' not in 'string'"
        );
        let half = "a".repeat(MAX_PROMPT_CHARS / 2);
        assert_eq!(
            bad(json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": half}, {"type": "text", "text": half}
            ]}]})),
            "'/messages/0/content' length must be <= 131072, got 131073"
        );
        // a part without type is read as text
        let req = ok(json!({"messages": [{"role": "user", "content": [{"text": "t"}]}]}));
        assert_eq!(
            req.input,
            PromptInput::Messages(vec![ChatMessage {
                role: "user".into(),
                content: "t".into(),
                tool_call_id: None,
                tool_calls: None,
                name: None,
            }])
        );
    }

    #[test]
    fn lora_is_unsupported() {
        let e = err(prompt_with("lora", json!("my-finetune")));
        assert_eq!((e.status, e.code), (405, 5005));
        assert_eq!(e.message, "This model does not support LoRa inference");
        let e = err(json!({"messages": [{"role": "user", "content": "x"}], "lora": "x"}));
        assert_eq!(e, ApiError::lora_unsupported());
        ok(prompt_with("lora", json!(null)));
    }

    #[test]
    fn response_format_rules() {
        let req = ok(prompt_with(
            "response_format",
            json!({"type": "json_object"}),
        ));
        assert_eq!(req.response_format, ResponseFormat::JsonObject);
        assert_eq!(
            req.response_format.schema(),
            Some(json!({"type": "object"}))
        );
        let fmt = json!({"type": "json_schema", "json_schema": {"type": "array"}});
        assert_eq!(
            ok(prompt_with("response_format", fmt)).response_format,
            ResponseFormat::JsonSchema(json!({"type": "array"}))
        );
        assert_eq!(
            ok(prompt_with("response_format", json!(null))).response_format,
            ResponseFormat::Text
        );
        assert_eq!(
            bad(prompt_with("response_format", json!("json"))),
            "Type mismatch of '/response_format', 'string' not in 'object'"
        );
        assert_eq!(
            bad(prompt_with("response_format", json!({}))),
            "required properties at '/response_format' are 'type'"
        );
        assert_eq!(
            bad(prompt_with("response_format", json!({"type": "text"}))),
            "'/response_format/type' must be one of 'json_object', 'json_schema', got 'text'"
        );
        assert_eq!(
            bad(prompt_with("response_format", json!({"type": 1}))),
            "Type mismatch of '/response_format/type', 'number' not in 'string'"
        );
        assert_eq!(
            bad(prompt_with(
                "response_format",
                json!({"type": "json_schema", "json_schema": "x"})
            )),
            "Type mismatch of '/response_format/json_schema', 'string' not in 'object'"
        );
        assert_eq!(
            bad(prompt_with("response_format", json!({"type": "json_schema"}))),
            "required properties at '/response_format' are 'type' and 'json_schema' when type is 'json_schema'"
        );
        assert_eq!(
            bad(prompt_with(
                "response_format",
                json!({"type": "json_object", "json_schema": {"type": "object"}})
            )),
            "'/response_format/json_schema' is read only with type 'json_schema'"
        );
    }

    #[test]
    fn a_schema_does_not_stream_but_json_object_does() {
        let schema = json!({"type": "json_schema", "json_schema": {"type": "object"}});
        let e = err(json!({"prompt": "x", "stream": true, "response_format": schema}));
        assert_eq!(e, ApiError::json_mode_with_stream());
        assert_eq!((e.status, e.code), (400, 5023));
        ok(json!({"prompt": "x", "stream": false, "response_format": schema}));
        let streamed =
            ok(json!({"prompt": "x", "stream": true, "response_format": {"type": "json_object"}}));
        assert_eq!(streamed.response_format, ResponseFormat::JsonObject);
        ok(json!({"prompt": "x", "stream": true, "response_format": null}));
    }

    #[test]
    fn tools_and_functions() {
        let tools = json!([{"name": "w", "description": "d", "parameters": {"type": "object"}},
                           {"type": "function", "function": {"name": "x"}}]);
        let req =
            ok(json!({"messages": [{"role": "user", "content": "x"}], "tools": tools.clone()}));
        assert_eq!(req.tools.len(), 2);
        assert_eq!(
            (req.tools[0].name.as_str(), req.tools[1].name.as_str()),
            ("w", "x")
        );
        assert_eq!(req.tool_choice, ToolChoice::Auto);
        assert!(bad(json!({"prompt": "x", "tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}))
            .contains("not one of the 'tools'"));
        assert!(
            bad(prompt_with("tools", json!([{"description": "no name"}])))
                .contains("'tools[0].name' is required")
        );
        ok(json!({"messages": [{"role": "user", "content": "x"}],
                  "functions": [{"name": "f", "code": "return 1"}]}));
        ok(prompt_with("tools", json!(null)));
        ok(prompt_with("tools", json!([])));
        assert_eq!(
            bad(prompt_with("tools", json!({}))),
            "Type mismatch of '/tools', 'object' not in 'array'"
        );
        assert_eq!(
            bad(prompt_with("tools", json!([{}, "x"]))),
            "Type mismatch of '/tools/1', 'string' not in 'object'"
        );
        assert_eq!(
            bad(prompt_with("functions", json!("f"))),
            "Type mismatch of '/functions', 'string' not in 'array'"
        );
        assert_eq!(
            bad(prompt_with("functions", json!([1]))),
            "Type mismatch of '/functions/0', 'number' not in 'object'"
        );
    }

    #[test]
    fn options_reject_if_busy() {
        assert!(ok(prompt_with("options", json!({"rejectIfBusy": true}))).reject_if_busy);
        assert!(ok(prompt_with("options", json!({"rejectIfBusy": "true"}))).reject_if_busy);
        assert!(!ok(prompt_with("options", json!({"rejectIfBusy": false}))).reject_if_busy);
        assert!(!ok(prompt_with("options", json!({}))).reject_if_busy);
        assert!(!ok(prompt_with("options", json!({"other": 1}))).reject_if_busy);
        assert!(!ok(prompt_with("options", json!(null))).reject_if_busy);
        assert_eq!(
            bad(prompt_with("options", json!(true))),
            "Type mismatch of '/options', 'boolean' not in 'object'"
        );
        assert_eq!(
            bad(prompt_with("options", json!({"rejectIfBusy": 1}))),
            "Type mismatch of '/options/rejectIfBusy', 'number' not in 'boolean'"
        );
    }

    #[test]
    fn unknown_top_level_keys_are_ignored() {
        let req = ok(json!({"prompt": "x", "model": "gpt-4", "user": "u", "n": 3}));
        assert_eq!(req.params, SamplingParams::default());
    }

    #[test]
    fn role_names() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.as_str()), Some(role));
            assert_eq!(role.to_string(), role.as_str());
        }
        assert_eq!(Role::parse("bot"), None);
        assert_eq!(Role::Tool.as_str(), "tool");
    }

    #[test]
    fn never_panics_on_odd_input() {
        let deep_array = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let deep_object = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
        let deep_in_prompt = format!(
            "{{\"prompt\":\"x\",\"tools\":{}{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        let bodies: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b" ".to_vec(),
            b"{}".to_vec(),
            b"[]".to_vec(),
            b"null".to_vec(),
            b"true".to_vec(),
            b"\"str\"".to_vec(),
            b"1e400".to_vec(),
            br#"{"prompt":"x","max_tokens":1e400}"#.to_vec(),
            br#"{"prompt":"x","temperature":-1e400}"#.to_vec(),
            br#"{"prompt":"x","max_tokens":123456789012345678901234567890}"#.to_vec(),
            br#"{"prompt":"x","seed":-123456789012345678901234567890}"#.to_vec(),
            br#"{"prompt":"x","temperature":NaN}"#.to_vec(),
            br#"{"prompt":"x","top_k":Infinity}"#.to_vec(),
            br#"{"prompt":"x","seed":1.7976931348623157e308}"#.to_vec(),
            br#"{"prompt":"x","seed":-0.0}"#.to_vec(),
            br#"{"prompt":"x","top_k":5e-324}"#.to_vec(),
            br#"{"prompt":"\ud800"}"#.to_vec(),
            "{\"prompt\":\"\u{0}\u{202e}🦀 ǅ ﷽\"}".as_bytes().to_vec(),
            br#"{"messages":[{"role":"user","content":[[[]]]}]}"#.to_vec(),
            br#"{"messages":[{"role":"assistant","content":null,"tool_calls":null}]}"#.to_vec(),
            br#"{"messages":[null]}"#.to_vec(),
            br#"{"messages":{"0":{"role":"user"}}}"#.to_vec(),
            br#"{"prompt":"a","prompt":"b"}"#.to_vec(),
            br#"{"options":{"rejectIfBusy":true}}"#.to_vec(),
            b"\xff\xfe{}".to_vec(),
            b"\xEF\xBB\xBF".to_vec(),
            deep_array.into_bytes(),
            deep_object.into_bytes(),
            deep_in_prompt.into_bytes(),
        ];
        for body in bodies {
            // Only the absence of a panic matters; errors must be well-formed.
            if let Err(e) = ValidatedRequest::from_json_bytes(&body) {
                assert!(!e.message.is_empty());
                assert!(e.to_json().starts_with("{\"errors\":[{\"code\":"));
            }
        }

        // Deeply nested values that never went through the parser.
        let mut deep = json!("leaf");
        for _ in 0..1_000 {
            deep = json!([deep]);
        }
        for body in [
            json!({"prompt": "x", "tools": [{"a": deep.clone()}]}),
            json!({"prompt": deep.clone()}),
            json!({"messages": [{"role": "user", "content": deep.clone()}]}),
            json!({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"d": deep}}}),
        ] {
            let _ = ValidatedRequest::from_value(body);
        }
    }

    #[test]
    fn lists_and_schemas_are_bounded() {
        let limits = RequestLimits::DEFAULT;
        let msg = json!({"role": "user", "content": "x"});
        let msgs = |n: usize| json!({"messages": vec![msg.clone(); n]});
        ok(msgs(limits.max_messages));
        assert_eq!(
            bad(msgs(limits.max_messages + 1)),
            "'/messages' must contain at most 2048 items (the message count limit), got 2049"
        );
        let parts = vec![json!({"type": "text", "text": "a"}); 257];
        assert_eq!(
            bad(json!({"messages": [{"role": "user", "content": parts}]})),
            "'/messages/0/content' must contain at most 256 parts (the content part limit), got 257"
        );
        // The chain of finding 1, through response_format: refused before anything compiles.
        let mut defs = Map::new();
        for i in 0..250 {
            defs.insert(
                format!("d{i}"),
                json!({"type": "object",
                "properties": {"x": {"$ref": format!("#/$defs/d{}", i + 1)}}, "required": ["x"]}),
            );
        }
        let chain = json!({"$ref": "#/$defs/d0", "$defs": defs});
        let e = bad(prompt_with(
            "response_format",
            json!({"type": "json_schema", "json_schema": chain}),
        ));
        assert!(
            e.starts_with("'/response_format/json_schema': the schema follows 251 '$ref's"),
            "{e}"
        );
        assert!(e.ends_with("the schema $ref depth limit is 32"), "{e}");
        // ... and through a tool.
        let e = bad(json!({"prompt": "x", "tools": [{"name": "f", "parameters": chain}]}));
        assert!(e.starts_with("'tools[0].parameters': "), "{e}");
        // x-guidance would relax what must be refused.
        let lenient =
            json!({"type": "array", "uniqueItems": true, "x-guidance": {"lenient": true}});
        assert!(bad(prompt_with(
            "response_format",
            json!({"type": "json_schema", "json_schema": lenient})
        ))
        .contains("'x-guidance'"));
        // Limits of the node's choosing.
        let tight = RequestLimits {
            max_tools: 1,
            ..limits
        };
        let two = json!({"prompt": "x", "tools": [{"name": "a"}, {"name": "b"}]});
        ValidatedRequest::from_value(two.clone()).unwrap();
        let e = ValidatedRequest::from_value_with(two, &tight).unwrap_err();
        assert!(
            e.message.contains("the tool count limit is 1"),
            "{}",
            e.message
        );
    }
}
