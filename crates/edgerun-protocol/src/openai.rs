//! The OpenAI-compatible dialect (reference §4): request validation for `chat/completions` and
//! `completions`, the answers (`chat.completion`, `text_completion`, their stream chunks, the
//! model list) and OpenAI's error body.
//!
//! Requests become an [`OpenAiRequest`]: every field either reaches the engine or is refused.
//! What this node cannot do yet is refused with a 400 that says so, never ignored: `n` other
//! than 1, non-empty `tools` / `functions`, a
//! `tool_choice` that asks for a call, `logit_bias`, `echo`, `suffix`, `best_of` above 1,
//! audio, predicted outputs, web search, roles other than `system` / `user` / `assistant`,
//! content parts other than text, token-id prompts and more than one prompt. Unknown top-level
//! fields are ignored, as OpenAI-compatible servers do; `user`, `store`, `metadata`,
//! `service_tier`, `parallel_tool_calls` and `reasoning_effort` change nothing here and are
//! accepted. Extensions other servers accept too: `top_k`, `repetition_penalty`, and Workers
//! AI's `options.rejectIfBusy`.
//!
//! Validation errors are [`ApiError::invalid_request`] (400 / 5006) naming the field; the node
//! renders them with [`error_body`] on `/v1` (OpenAI's `{"error":{"message","type","param",
//! "code"}}`) and as the v4 envelope on Workers AI's own `/ai/v1` routes, as the service does.
//!
//! Lists and schemas are bounded by a [`RequestLimits`] ([`crate::limits`]): messages, content
//! parts, tool calls sent back, tools, `stop` ([`MAX_STOP_STRINGS`] strings of at most
//! [`MAX_STOP_CHARS`] characters), `top_logprobs`, and the `response_format` and tool schemas.
//!
//! Defaults are not applied here (the node resolves them; they differ by endpoint): `None`
//! means "not given".

use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

use crate::error::ApiError;
use crate::limits::{check_schema, RequestLimits, MAX_STOP_CHARS};
use crate::request::{ChatMessage, ResponseFormat};
use crate::response::Usage;
use crate::route::OpenAiEndpoint;
use crate::tools::{
    normalize_tool_calls, parse_tool_choice, parse_tools, ToolChoice, ToolDefinition,
};

/// Most stop strings a request may give (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;
/// Most alternatives `top_logprobs` may ask for in a chat completion (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most alternatives `logprobs` may ask for in a legacy completion (OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum OpenAiInput {
    /// `chat/completions`: the conversation, rendered by the chat template.
    Chat(Vec<ChatMessage>),
    /// `completions`: raw text to continue (no chat template).
    Prompt(String),
}

/// A validated `chat/completions` or `completions` request.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiRequest {
    /// `model`, as sent (the node checks that it serves it).
    pub model: String,
    /// `messages` or `prompt`.
    pub input: OpenAiInput,
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with `usage` and no choices.
    pub include_usage: bool,
    /// `max_completion_tokens`, or `max_tokens` (equal when both are given); at least 1.
    pub max_tokens: Option<u32>,
    /// `temperature`, 0..=2.
    pub temperature: Option<f32>,
    /// `top_p`, 0..=1.
    pub top_p: Option<f32>,
    /// `top_k` (extension), 0 (off) or more.
    pub top_k: Option<u32>,
    /// `seed`, any 64-bit integer, as its two's-complement bits.
    pub seed: Option<u64>,
    /// `stop`: up to [`MAX_STOP_STRINGS`] non-empty strings.
    pub stop: Vec<String>,
    /// `presence_penalty`, -2..=2.
    pub presence_penalty: Option<f32>,
    /// `frequency_penalty`, -2..=2.
    pub frequency_penalty: Option<f32>,
    /// `repetition_penalty` (extension), above 0, at most 2.
    pub repetition_penalty: Option<f32>,
    /// Log-probabilities: `None` when not asked for, else how many alternatives per token
    /// (`top_logprobs` of a chat completion, `logprobs` of a legacy completion).
    pub logprobs: Option<u32>,
    /// `response_format` (JSON mode and structured outputs).
    pub response_format: ResponseFormat,
    /// `tools` (chat completions; empty when none).
    pub tools: Vec<ToolDefinition>,
    /// `tool_choice`; `auto` when not given.
    pub tool_choice: ToolChoice,
    /// `options.rejectIfBusy` (Workers AI): 429 instead of queueing.
    pub reject_if_busy: bool,
}

impl OpenAiRequest {
    /// Parses and validates the body of a request to `endpoint` (`ChatCompletions` or
    /// `Completions`; `Models` has no body and is refused), within the default limits
    /// ([`RequestLimits::DEFAULT`], what the Worker checks).
    pub fn from_json_bytes(endpoint: OpenAiEndpoint, body: &[u8]) -> Result<Self, ApiError> {
        Self::from_json_bytes_with(endpoint, body, &RequestLimits::DEFAULT)
    }

    /// [`OpenAiRequest::from_json_bytes`] within `limits` (the node's configured ones).
    pub fn from_json_bytes_with(
        endpoint: OpenAiEndpoint,
        body: &[u8],
        limits: &RequestLimits,
    ) -> Result<Self, ApiError> {
        let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::invalid_request(format_args!(
                "We could not parse the JSON body of your request: {e}"
            ))
        })?;
        let Value::Object(body) = value else {
            return Err(ApiError::invalid_request(
                "the request body must be a JSON object",
            ));
        };
        Self::from_map(endpoint, &body, limits)
    }

    fn from_map(
        endpoint: OpenAiEndpoint,
        body: &Map<String, Value>,
        limits: &RequestLimits,
    ) -> Result<Self, ApiError> {
        let model = match field(body, "model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(Value::String(_)) | None => {
                return Err(ApiError::invalid_request("'model' is required"))
            }
            Some(other) => return Err(type_error("model", other, "a string")),
        };
        let input = match endpoint {
            OpenAiEndpoint::ChatCompletions => OpenAiInput::Chat(messages(body, limits)?),
            OpenAiEndpoint::Completions => {
                completion_only_fields(body)?;
                OpenAiInput::Prompt(prompt(body)?)
            }
            OpenAiEndpoint::Models | OpenAiEndpoint::Model => {
                return Err(ApiError::invalid_request("models takes no request body"))
            }
        };
        unsupported_fields(body)?;

        match field(body, "n") {
            None => {}
            Some(Value::Number(n)) if n.as_u64() == Some(1) || n.as_f64() == Some(1.0) => {}
            Some(other) => {
                return Err(ApiError::invalid_request(format_args!(
                    "'n' must be 1: this node generates one choice per request (got {other})"
                )))
            }
        }

        let stream = boolean(body, "stream")?.unwrap_or(false);
        let include_usage = match field(body, "stream_options") {
            None => false,
            Some(Value::Object(options)) => {
                if !stream {
                    return Err(ApiError::invalid_request(
                        "'stream_options' is only allowed when 'stream' is true",
                    ));
                }
                boolean(options, "include_usage")?.unwrap_or(false)
            }
            Some(other) => return Err(type_error("stream_options", other, "an object")),
        };

        let max_tokens = integer(body, "max_tokens", 1, i128::from(u32::MAX))?;
        let max_completion_tokens =
            integer(body, "max_completion_tokens", 1, i128::from(u32::MAX))?;
        let max_tokens = match (max_completion_tokens, max_tokens) {
            (Some(a), Some(b)) if a != b => {
                return Err(ApiError::invalid_request(format_args!(
                    "'max_tokens' ({b}) and 'max_completion_tokens' ({a}) disagree; give one"
                )))
            }
            (a, b) => a.or(b).map(|n| n as u32),
        };

        let logprobs = match endpoint {
            OpenAiEndpoint::Completions => {
                integer(body, "logprobs", 0, i128::from(MAX_COMPLETION_LOGPROBS))?.map(|n| n as u32)
            }
            _ => {
                let on = boolean(body, "logprobs")?.unwrap_or(false);
                let top = integer(body, "top_logprobs", 0, i128::from(MAX_TOP_LOGPROBS))?;
                match (on, top) {
                    (false, Some(_)) => {
                        return Err(ApiError::invalid_request(
                            "'top_logprobs' needs 'logprobs' set to true",
                        ))
                    }
                    (false, None) => None,
                    (true, top) => Some(top.unwrap_or(0) as u32),
                }
            }
        };

        let tools = match field(body, "tools") {
            None => Vec::new(),
            Some(_) if endpoint == OpenAiEndpoint::Completions => {
                return Err(ApiError::invalid_request(
                    "'tools' are for chat completions, not completions",
                ))
            }
            Some(tools) => {
                parse_tools(tools, "tools", limits).map_err(ApiError::invalid_request)?
            }
        };
        let tool_choice = parse_tool_choice(field(body, "tool_choice"), &tools)
            .map_err(ApiError::invalid_request)?;
        if tool_choice != ToolChoice::Auto
            && tool_choice != ToolChoice::None
            && response_format(body, limits)?.is_json()
        {
            return Err(ApiError::invalid_request(
                "'tool_choice' that forces a call and 'response_format' cannot be combined",
            ));
        }

        let reject_if_busy = match field(body, "options") {
            None => false,
            Some(Value::Object(options)) => boolean(options, "rejectIfBusy")?.unwrap_or(false),
            Some(other) => return Err(type_error("options", other, "an object")),
        };

        Ok(Self {
            model,
            input,
            stream,
            include_usage,
            max_tokens,
            temperature: number(body, "temperature", 0.0, 2.0)?,
            top_p: number(body, "top_p", 0.0, 1.0)?,
            top_k: integer(body, "top_k", 0, i128::from(u32::MAX))?.map(|k| k as u32),
            seed: integer(body, "seed", i128::from(i64::MIN), i128::from(u64::MAX))?
                .map(|s| s as u64),
            stop: stop(body)?,
            presence_penalty: number(body, "presence_penalty", -2.0, 2.0)?,
            frequency_penalty: number(body, "frequency_penalty", -2.0, 2.0)?,
            repetition_penalty: match number(body, "repetition_penalty", 0.0, 2.0)? {
                Some(p) if p <= 0.0 => {
                    return Err(ApiError::invalid_request(
                        "'repetition_penalty' must be above 0",
                    ))
                }
                p => p,
            },
            logprobs,
            response_format: response_format(body, limits)?,
            tools,
            tool_choice,
            reject_if_busy,
        })
    }
}

/// `response_format`: `{"type":"text"}`, `{"type":"json_object"}` or `{"type":"json_schema",
/// "json_schema":{"name","schema","strict","description"}}` (the schema is always enforced, so
/// `strict` changes nothing; a missing `schema` means any JSON object).
fn response_format(
    body: &Map<String, Value>,
    limits: &RequestLimits,
) -> Result<ResponseFormat, ApiError> {
    let format = match field(body, "response_format") {
        None => return Ok(ResponseFormat::Text),
        Some(Value::Object(f)) => f,
        Some(other) => return Err(type_error("response_format", other, "an object")),
    };
    match field(format, "type") {
        Some(Value::String(t)) if t == "text" => Ok(ResponseFormat::Text),
        Some(Value::String(t)) if t == "json_object" => Ok(ResponseFormat::JsonObject),
        Some(Value::String(t)) if t == "json_schema" => {
            let spec =
                match field(format, "json_schema") {
                    Some(Value::Object(spec)) => spec,
                    Some(other) => {
                        return Err(type_error(
                            "response_format.json_schema",
                            other,
                            "an object",
                        ))
                    }
                    None => return Err(ApiError::invalid_request(
                        "'response_format.json_schema' is required when its type is 'json_schema'",
                    )),
                };
            match field(spec, "name") {
                Some(Value::String(name))
                    if !name.is_empty()
                        && name.len() <= 64
                        && name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => {}
                Some(Value::String(_)) | None => {
                    return Err(ApiError::invalid_request(
                        "'response_format.json_schema.name' is required: 1 to 64 of a-z, A-Z, 0-9, '_' and '-'",
                    ))
                }
                Some(other) => {
                    return Err(type_error("response_format.json_schema.name", other, "a string"))
                }
            }
            boolean(spec, "strict")?;
            match field(spec, "schema") {
                None => Ok(ResponseFormat::JsonObject),
                Some(schema @ (Value::Object(_) | Value::Bool(_))) => {
                    check_schema(
                        schema,
                        "'response_format.json_schema.schema'",
                        &limits.schema,
                    )
                    .map_err(ApiError::invalid_request)?;
                    Ok(ResponseFormat::JsonSchema(schema.clone()))
                }
                Some(other) => Err(type_error(
                    "response_format.json_schema.schema",
                    other,
                    "an object",
                )),
            }
        }
        Some(Value::String(t)) => Err(ApiError::invalid_request(format_args!(
            "'response_format.type' must be 'text', 'json_object' or 'json_schema', got '{t}'"
        ))),
        Some(other) => Err(type_error("response_format.type", other, "a string")),
        None => Err(ApiError::invalid_request(
            "'response_format.type' is required",
        )),
    }
}

/// The value under `key`; `null` counts as absent.
fn field<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).filter(|v| !v.is_null())
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn type_error(name: &str, got: &Value, expected: &str) -> ApiError {
    ApiError::invalid_request(format_args!(
        "'{name}' must be {expected}, got {}",
        type_name(got)
    ))
}

fn not_supported(what: impl std::fmt::Display) -> ApiError {
    ApiError::invalid_request(format_args!("{what} is not supported by this node yet"))
}

fn boolean(map: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match field(map, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(type_error(key, other, "a boolean")),
    }
}

fn number(
    map: &Map<String, Value>,
    key: &str,
    min: f64,
    max: f64,
) -> Result<Option<f32>, ApiError> {
    let value = match field(map, key) {
        None => return Ok(None),
        Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::INFINITY),
        Some(other) => return Err(type_error(key, other, "a number")),
    };
    if !(min..=max).contains(&value) {
        return Err(ApiError::invalid_request(format_args!(
            "'{key}' must be between {min} and {max}, got {value}"
        )));
    }
    Ok(Some(value as f32))
}

/// An integer (integral floats such as `5.0` too) in `min..=max`.
fn integer(
    map: &Map<String, Value>,
    key: &str,
    min: i128,
    max: i128,
) -> Result<Option<i128>, ApiError> {
    let value = match field(map, key) {
        None => return Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(i128::from)
            .or_else(|| n.as_i64().map(i128::from))
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite() && f.fract() == 0.0)
                    .map(|f| f as i128)
            }),
        Some(other) => return Err(type_error(key, other, "an integer")),
    };
    match value {
        Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
        Some(v) => Err(ApiError::invalid_request(format_args!(
            "'{key}' must be between {min} and {max}, got {v}"
        ))),
        None => Err(ApiError::invalid_request(format_args!(
            "'{key}' must be an integer"
        ))),
    }
}

/// `stop`: a string or an array of up to four strings, none empty or longer than
/// [`MAX_STOP_CHARS`].
fn stop(body: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let stops = match field(body, "stop") {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP_STRINGS {
                return Err(ApiError::invalid_request(format_args!(
                    "'stop' may hold at most {MAX_STOP_STRINGS} strings, got {}",
                    items.len()
                )));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(type_error(&format!("stop[{i}]"), other, "a string")),
                })
                .collect::<Result<_, _>>()?
        }
        Some(other) => return Err(type_error("stop", other, "a string or an array of strings")),
    };
    if stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid_request(
            "'stop' strings must not be empty",
        ));
    }
    if stops.iter().any(|s| s.chars().count() > MAX_STOP_CHARS) {
        return Err(ApiError::invalid_request(format_args!(
            "'stop' strings must be at most {MAX_STOP_CHARS} characters"
        )));
    }
    Ok(stops)
}

/// `messages`: a non-empty array of `system` / `user` / `assistant` messages with text content.
fn messages(
    body: &Map<String, Value>,
    limits: &RequestLimits,
) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match field(body, "messages") {
        None => return Err(ApiError::invalid_request("'messages' is required")),
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid_request(
                "'messages' must hold at least one message",
            ))
        }
        Some(Value::Array(items)) if items.len() > limits.max_messages => {
            return Err(ApiError::invalid_request(format_args!(
                "'messages' holds {} messages; the message count limit is {}",
                items.len(),
                limits.max_messages
            )))
        }
        Some(Value::Array(items)) => items,
        Some(other) => return Err(type_error("messages", other, "an array")),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| message(i, item, limits))
        .collect()
}

fn message(i: usize, item: &Value, limits: &RequestLimits) -> Result<ChatMessage, ApiError> {
    let at = format!("messages[{i}]");
    let Value::Object(m) = item else {
        return Err(type_error(&at, item, "an object"));
    };
    let role = match field(m, "role") {
        Some(Value::String(role)) => role.as_str(),
        Some(other) => return Err(type_error(&format!("{at}.role"), other, "a string")),
        None => {
            return Err(ApiError::invalid_request(format_args!(
                "'{at}.role' is required"
            )))
        }
    };
    match role {
        "system" | "user" | "assistant" | "tool" => {}
        "function" => {
            return Err(not_supported(format_args!(
                "'{at}.role' is 'function' (deprecated): use 'tool'"
            )))
        }
        other => {
            return Err(ApiError::invalid_request(format_args!(
                "'{at}.role' must be 'system', 'user', 'assistant' or 'tool', got '{other}'"
            )))
        }
    }
    if field(m, "function_call").is_some() {
        return Err(not_supported(format_args!(
            "'{at}.function_call' (deprecated): use 'tool_calls'"
        )));
    }
    let tool_calls = match field(m, "tool_calls") {
        None => None,
        Some(_) if role != "assistant" => {
            return Err(ApiError::invalid_request(format_args!(
                "'{at}.tool_calls' is only allowed on an assistant message"
            )))
        }
        Some(calls) => Some(
            normalize_tool_calls(calls, &format!("{at}.tool_calls"), limits.max_tool_calls)
                .map_err(ApiError::invalid_request)?,
        ),
    };
    let tool_call_id = match field(m, "tool_call_id") {
        None if role == "tool" => {
            return Err(ApiError::invalid_request(format_args!(
                "'{at}.tool_call_id' is required on a tool message"
            )))
        }
        None => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(other) => return Err(type_error(&format!("{at}.tool_call_id"), other, "a string")),
    };
    let content = match field(m, "content") {
        // An assistant message that only calls tools has no content.
        None if tool_calls.is_some() => String::new(),
        None => {
            return Err(ApiError::invalid_request(format_args!(
                "'{at}.content' is required"
            )))
        }
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) if parts.len() > limits.max_content_parts => {
            return Err(ApiError::invalid_request(format_args!(
                "'{at}.content' holds {} parts; the content part limit is {}",
                parts.len(),
                limits.max_content_parts
            )))
        }
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let at = format!("{at}.content[{j}]");
                let Value::Object(part) = part else {
                    return Err(type_error(&at, part, "an object"));
                };
                match field(part, "type") {
                    Some(Value::String(t)) if t == "text" => {}
                    Some(Value::String(t)) => {
                        return Err(not_supported(format_args!(
                            "'{at}.type' is '{t}': only text content"
                        )))
                    }
                    Some(other) => {
                        return Err(type_error(&format!("{at}.type"), other, "a string"))
                    }
                    None => {
                        return Err(ApiError::invalid_request(format_args!(
                            "'{at}.type' is required"
                        )))
                    }
                }
                match field(part, "text") {
                    Some(Value::String(text)) => texts.push(text.as_str()),
                    Some(other) => {
                        return Err(type_error(&format!("{at}.text"), other, "a string"))
                    }
                    None => {
                        return Err(ApiError::invalid_request(format_args!(
                            "'{at}.text' is required"
                        )))
                    }
                }
            }
            texts.join("\n")
        }
        Some(other) => {
            return Err(type_error(
                &format!("{at}.content"),
                other,
                "a string or an array of text parts",
            ))
        }
    };
    let name = match field(m, "name") {
        None => None,
        Some(Value::String(name)) => Some(name.clone()),
        Some(other) => return Err(type_error(&format!("{at}.name"), other, "a string")),
    };
    Ok(ChatMessage {
        role: role.to_string(),
        content,
        tool_call_id,
        tool_calls,
        name,
    })
}

/// `prompt`: a string, or an array holding one string.
fn prompt(body: &Map<String, Value>) -> Result<String, ApiError> {
    match field(body, "prompt") {
        None => Err(ApiError::invalid_request("'prompt' is required")),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(text)] => Ok(text.clone()),
            [] => Err(ApiError::invalid_request("'prompt' must not be empty")),
            items if items.iter().all(Value::is_string) => Err(not_supported(format_args!(
                "more than one prompt per request ({} given)",
                items.len()
            ))),
            _ => Err(not_supported("a prompt of token ids")),
        },
        Some(other) => Err(type_error("prompt", other, "a string")),
    }
}

/// Legacy-completion fields this node does not implement.
fn completion_only_fields(body: &Map<String, Value>) -> Result<(), ApiError> {
    if boolean(body, "echo")?.unwrap_or(false) {
        return Err(not_supported("'echo'"));
    }
    match field(body, "suffix") {
        None => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(_)) => return Err(not_supported("'suffix' (insertion)")),
        Some(other) => return Err(type_error("suffix", other, "a string")),
    }
    if integer(body, "best_of", 1, i128::from(u32::MAX))?.is_some_and(|n| n > 1) {
        return Err(not_supported("'best_of' above 1"));
    }
    Ok(())
}

/// Fields that would change the answer in ways this node cannot honour: refused, never ignored.
fn unsupported_fields(body: &Map<String, Value>) -> Result<(), ApiError> {
    let empty = |v: &Value| match v {
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    };
    if field(body, "functions").is_some_and(|v| !empty(v)) {
        return Err(not_supported("'functions' (deprecated): use 'tools'"));
    }
    match field(body, "function_call") {
        None => {}
        Some(Value::String(c)) if c == "none" || c == "auto" => {}
        Some(_) => {
            return Err(not_supported(
                "'function_call' (deprecated): use 'tool_choice'",
            ))
        }
    }
    if field(body, "logit_bias").is_some_and(|v| !empty(v)) {
        return Err(not_supported("'logit_bias'"));
    }
    match field(body, "modalities") {
        None => {}
        Some(Value::Array(m)) if m.iter().all(|v| v == "text") => {}
        Some(_) => return Err(not_supported("'modalities' other than text")),
    }
    for key in ["audio", "prediction", "web_search_options"] {
        if field(body, key).is_some() {
            return Err(not_supported(format_args!("'{key}'")));
        }
    }
    if field(body, "chat_template_kwargs").is_some_and(|v| !empty(v)) {
        return Err(not_supported("'chat_template_kwargs'"));
    }
    Ok(())
}

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

/// OpenAI's error body: `{"error":{"message","type","param","code"}}`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The `error` of an [`ErrorBody`].
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ErrorDetail {
    /// What went wrong.
    pub message: String,
    /// The error's class, from the HTTP status (`invalid_request_error`, ...).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Always `null` (the message names the field).
    pub param: Option<String>,
    /// `model_not_found`, `invalid_api_key` or `rate_limit_exceeded` where they apply,
    /// else `null`.
    pub code: Option<&'static str>,
}

impl From<&ApiError> for ErrorBody {
    fn from(e: &ApiError) -> Self {
        let kind = match e.status {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            408 => "timeout_error",
            429 => "rate_limit_error",
            503 => "service_unavailable_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        let code = match (e.status, e.code) {
            (_, crate::error::CODE_NO_SUCH_MODEL) => Some("model_not_found"),
            (401, _) => Some("invalid_api_key"),
            (429, _) => Some("rate_limit_exceeded"),
            _ => None,
        };
        Self {
            error: ErrorDetail {
                message: e.message.clone(),
                kind,
                param: None,
                code,
            },
        }
    }
}

const FALLBACK_ERROR: &str = r#"{"error":{"message":"failed to serialize the answer","type":"server_error","param":null,"code":null}}"#;

/// Serialises an answer, or (it cannot happen for these types) an error body.
pub fn to_json(payload: &impl Serialize) -> String {
    serde_json::to_string(payload).unwrap_or_else(|_| FALLBACK_ERROR.to_owned())
}

/// OpenAI's error body for `error`, ready to send with [`ApiError::status`].
pub fn error_body(error: &ApiError) -> String {
    to_json(&ErrorBody::from(error))
}

/// `data: <json>\n\n`: one event of an OpenAI stream.
pub fn data_event(payload: &impl Serialize) -> String {
    format!("data: {}\n\n", to_json(payload))
}

/// `data: {"error":{..}}\n\n`: how an OpenAI stream that already started reports a failure
/// (the SDKs raise it); the stream ends after it, without `[DONE]`.
pub fn error_event(error: &ApiError) -> String {
    data_event(&ErrorBody::from(error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(body: Value) -> Result<OpenAiRequest, ApiError> {
        OpenAiRequest::from_json_bytes(OpenAiEndpoint::ChatCompletions, body.to_string().as_bytes())
    }

    fn completion(body: Value) -> Result<OpenAiRequest, ApiError> {
        OpenAiRequest::from_json_bytes(OpenAiEndpoint::Completions, body.to_string().as_bytes())
    }

    fn with(extra: Value) -> Value {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    }

    fn refused(body: Value) -> String {
        let e = chat(body).unwrap_err();
        assert_eq!((e.status, e.code), (400, crate::error::CODE_BAD_INPUT));
        e.message
    }

    #[test]
    fn a_minimal_chat_request() {
        let r = chat(with(json!({}))).unwrap();
        assert_eq!(r.model, "m");
        assert_eq!(
            r.input,
            OpenAiInput::Chat(vec![ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                tool_call_id: None,
                tool_calls: None,
                name: None,
            }])
        );
        assert!(!r.stream && !r.include_usage && !r.reject_if_busy);
        assert_eq!(
            (r.max_tokens, r.temperature, r.seed, r.logprobs),
            (None, None, None, None)
        );
        assert!(r.stop.is_empty());
    }

    #[test]
    fn every_field_is_read() {
        let r = chat(with(json!({
            "stream": true, "stream_options": {"include_usage": true},
            "max_completion_tokens": 7, "temperature": 1.5, "top_p": 0.5, "top_k": 3,
            "seed": -1, "stop": ["a", "bc"], "presence_penalty": -1.5,
            "frequency_penalty": 0.5, "repetition_penalty": 1.1, "logprobs": true,
            "top_logprobs": 4, "n": 1, "user": "u", "options": {"rejectIfBusy": true},
            "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
            "logit_bias": {}, "unknown_field": {"x": 1}, "store": false
        })))
        .unwrap();
        assert!(r.stream && r.include_usage && r.reject_if_busy);
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(
            (r.temperature, r.top_p, r.top_k),
            (Some(1.5), Some(0.5), Some(3))
        );
        assert_eq!(r.seed, Some(u64::MAX));
        assert_eq!(r.stop, ["a", "bc"]);
        assert_eq!(
            (r.presence_penalty, r.frequency_penalty),
            (Some(-1.5), Some(0.5))
        );
        assert_eq!(r.repetition_penalty, Some(1.1));
        assert_eq!(r.logprobs, Some(4));
        assert_eq!(chat(with(json!({"stop": "x"}))).unwrap().stop, ["x"]);
        assert_eq!(
            chat(with(json!({"logprobs": true}))).unwrap().logprobs,
            Some(0)
        );
        assert_eq!(
            chat(with(json!({"max_tokens": 9}))).unwrap().max_tokens,
            Some(9)
        );
        assert_eq!(
            chat(with(json!({"max_tokens": 9, "max_completion_tokens": 9})))
                .unwrap()
                .max_tokens,
            Some(9)
        );
    }

    #[test]
    fn response_formats() {
        let format =
            |f: Value| chat(with(json!({"response_format": f}))).map(|r| r.response_format);
        assert_eq!(
            format(json!({"type": "text"})).unwrap(),
            ResponseFormat::Text
        );
        assert_eq!(
            format(json!({"type": "json_object"})).unwrap(),
            ResponseFormat::JsonObject
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            format(json!({"type": "json_schema", "json_schema": {"name": "a_b-1", "schema": schema, "strict": true}}))
                .unwrap(),
            ResponseFormat::JsonSchema(schema)
        );
        assert_eq!(
            format(json!({"type": "json_schema", "json_schema": {"name": "n"}})).unwrap(),
            ResponseFormat::JsonObject
        );
        assert_eq!(
            chat(with(json!({}))).unwrap().response_format,
            ResponseFormat::Text
        );
        for (bad, needle) in [
            (json!("json"), "'response_format' must be an object"),
            (json!({}), "'response_format.type' is required"),
            (json!({"type": "xml"}), "got 'xml'"),
            (
                json!({"type": "json_schema"}),
                "'response_format.json_schema' is required",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": {}}}),
                "name' is required",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "a b"}}),
                "name' is required",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "n", "schema": 3}}),
                "must be an object",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "n", "strict": "yes"}}),
                "strict",
            ),
        ] {
            let e = format(bad.clone()).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(needle), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn content_parts_are_joined() {
        let r = chat(json!({"model": "m", "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "n"},
            {"role": "assistant", "content": "x"}
        ]}))
        .unwrap();
        let OpenAiInput::Chat(m) = r.input else {
            panic!()
        };
        assert_eq!(m[1].content, "a\nb");
        assert_eq!(m[1].name.as_deref(), Some("n"));
        assert_eq!(m[2].role, "assistant");
    }

    #[test]
    fn what_is_not_supported_is_refused_not_ignored() {
        for (extra, needle) in [
            (json!({"n": 2}), "'n' must be 1"),
            (json!({"functions": [{"name": "f"}]}), "use 'tools'"),
            (json!({"function_call": {"name": "f"}}), "use 'tool_choice'"),
            (json!({"logit_bias": {"1": 5}}), "logit_bias"),
            (json!({"audio": {"voice": "x"}}), "audio"),
            (json!({"modalities": ["text", "audio"]}), "modalities"),
        ] {
            let message = refused(with(extra.clone()));
            assert!(message.contains(needle), "{extra}: {message}");
        }
        let message = refused(json!({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}));
        assert!(
            message.contains("not supported by this node yet"),
            "{message}"
        );
    }

    #[test]
    fn tools_tool_choice_and_tool_messages() {
        let tools = json!([{"type": "function", "function": {"name": "f", "description": "d",
                            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]);
        let r = chat(with(json!({"tools": tools, "tool_choice": "required"}))).unwrap();
        assert_eq!(r.tools.len(), 1);
        assert_eq!(r.tools[0].name, "f");
        assert_eq!(r.tool_choice, ToolChoice::Required);
        let r = chat(json!({"model": "m", "tools": tools, "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "call_1"}
        ]}))
        .unwrap();
        let OpenAiInput::Chat(m) = r.input else {
            panic!()
        };
        assert_eq!(m[1].content, "");
        assert_eq!(
            m[1].tool_calls.as_ref().unwrap()[0]["function"]["arguments"],
            json!({"a": 1})
        );
        assert_eq!(m[2].tool_call_id.as_deref(), Some("call_1"));
        for (body, needle) in [
            (with(json!({"tool_choice": "required"})), "no 'tools'"),
            (
                with(
                    json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "g"}}}),
                ),
                "not one of",
            ),
            (
                with(json!({"tools": [{"type": "function"}]})),
                "'tools[0].function' is required",
            ),
            (
                with(
                    json!({"tools": tools, "tool_choice": "required", "response_format": {"type": "json_object"}}),
                ),
                "cannot be combined",
            ),
            (
                json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
                "tool_call_id' is required",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x", "tool_calls": []}]}),
                "only allowed on an assistant",
            ),
        ] {
            let message = refused(body.clone());
            assert!(message.contains(needle), "{body}: {message}");
        }
        assert!(completion(json!({"model": "m", "prompt": "x", "tools": tools})).is_err());
    }

    #[test]
    fn bad_values_name_the_field() {
        for (body, needle) in [
            (json!({"messages": []}), "'model' is required"),
            (json!({"model": "m"}), "'messages' is required"),
            (json!({"model": "m", "messages": []}), "at least one"),
            (
                json!({"model": 1, "messages": []}),
                "'model' must be a string",
            ),
            (
                json!({"model": "m", "messages": [{"role": "bot", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user"}]}),
                "messages[0].content' is required",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": 1}]}),
                "messages[0].content",
            ),
            (
                json!({"model": "m", "messages": ["x"]}),
                "'messages[0]' must be an object",
            ),
            (
                with(json!({"temperature": 3})),
                "'temperature' must be between 0 and 2",
            ),
            (
                with(json!({"temperature": "1"})),
                "'temperature' must be a number",
            ),
            (with(json!({"top_p": 1.5})), "'top_p'"),
            (with(json!({"presence_penalty": -3})), "'presence_penalty'"),
            (
                with(json!({"max_tokens": 0})),
                "'max_tokens' must be between 1",
            ),
            (
                with(json!({"max_tokens": 1.5})),
                "'max_tokens' must be an integer",
            ),
            (
                with(json!({"max_tokens": 5, "max_completion_tokens": 6})),
                "disagree",
            ),
            (
                with(json!({"stop": ["a", "b", "c", "d", "e"]})),
                "at most 4",
            ),
            (with(json!({"stop": ""})), "must not be empty"),
            (with(json!({"stop": [1]})), "'stop[0]' must be a string"),
            (with(json!({"top_logprobs": 2})), "needs 'logprobs'"),
            (
                with(json!({"logprobs": true, "top_logprobs": 21})),
                "'top_logprobs' must be between 0 and 20",
            ),
            (with(json!({"logprobs": 1})), "'logprobs' must be a boolean"),
            (
                with(json!({"stream_options": {"include_usage": true}})),
                "only allowed when 'stream' is true",
            ),
            (with(json!({"stream": "yes"})), "'stream' must be a boolean"),
            (
                with(json!({"options": {"rejectIfBusy": 1}})),
                "'rejectIfBusy' must be a boolean",
            ),
            (with(json!({"repetition_penalty": 0})), "above 0"),
            (with(json!({"seed": 1e30})), "'seed' must be between"),
        ] {
            let message = refused(body.clone());
            assert!(message.contains(needle), "{body}: {message}");
        }
        let e = OpenAiRequest::from_json_bytes(OpenAiEndpoint::ChatCompletions, b"{not json")
            .unwrap_err();
        assert_eq!(e.status, 400);
        let e = OpenAiRequest::from_json_bytes(OpenAiEndpoint::ChatCompletions, b"[]").unwrap_err();
        assert!(e.message.contains("JSON object"));
    }

    #[test]
    fn completions_take_a_prompt() {
        let r = completion(json!({"model": "m", "prompt": "Once", "logprobs": 2, "echo": false, "suffix": null, "best_of": 1})).unwrap();
        assert_eq!(r.input, OpenAiInput::Prompt("Once".into()));
        assert_eq!(r.logprobs, Some(2));
        assert_eq!(
            completion(json!({"model": "m", "prompt": ["one"]}))
                .unwrap()
                .input,
            OpenAiInput::Prompt("one".into())
        );
        assert_eq!(
            completion(json!({"model": "m", "prompt": "x", "logprobs": 0}))
                .unwrap()
                .logprobs,
            Some(0)
        );
        for (body, needle) in [
            (json!({"model": "m"}), "'prompt' is required"),
            (
                json!({"model": "m", "prompt": ["a", "b"]}),
                "more than one prompt",
            ),
            (json!({"model": "m", "prompt": [1, 2]}), "token ids"),
            (json!({"model": "m", "prompt": "x", "echo": true}), "'echo'"),
            (
                json!({"model": "m", "prompt": "x", "suffix": "y"}),
                "'suffix'",
            ),
            (
                json!({"model": "m", "prompt": "x", "best_of": 2}),
                "'best_of'",
            ),
            (
                json!({"model": "m", "prompt": "x", "logprobs": 6}),
                "'logprobs' must be between 0 and 5",
            ),
            (
                json!({"model": "m", "prompt": "x", "logprobs": true}),
                "'logprobs' must be an integer",
            ),
            (
                json!({"model": "m", "prompt": "x", "n": 3}),
                "'n' must be 1",
            ),
        ] {
            let e = completion(body.clone()).unwrap_err();
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
    }

    #[test]
    fn error_bodies_are_openais_shape() {
        let body: Value =
            serde_json::from_str(&error_body(&ApiError::invalid_request("bad"))).unwrap();
        assert_eq!(
            body,
            json!({"error": {"message": "bad", "type": "invalid_request_error", "param": null, "code": null}})
        );
        let body: Value =
            serde_json::from_str(&error_body(&ApiError::model_not_found("x"))).unwrap();
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["type"], "not_found_error");
        let body: Value = serde_json::from_str(&error_body(&ApiError::authentication())).unwrap();
        assert_eq!(body["error"]["type"], "authentication_error");
        assert_eq!(body["error"]["code"], "invalid_api_key");
        let body: Value = serde_json::from_str(&error_body(&ApiError::capacity())).unwrap();
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(
            error_event(&ApiError::unavailable("going")),
            "data: {\"error\":{\"message\":\"going\",\"type\":\"service_unavailable_error\",\"param\":null,\"code\":null}}\n\n"
        );
    }

    #[test]
    fn chunks_carry_usage_only_when_asked() {
        let chunk = |usage| Chunk::<ChatChunkChoice> {
            id: "c".into(),
            object: "chat.completion.chunk",
            created: 1,
            model: "m".into(),
            choices: vec![],
            usage,
        };
        assert!(!to_json(&chunk(None)).contains("usage"));
        assert!(to_json(&chunk(Some(None))).contains("\"usage\":null"));
        assert!(to_json(&chunk(Some(Some(Usage::new(1, 2))))).contains("\"total_tokens\":3"));
    }

    #[test]
    fn never_panics_on_odd_input() {
        for body in [
            &b""[..],
            b"null",
            b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":[[[]]]}]}",
            b"{\"model\":\"m\",\"messages\":[null]}",
            b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"seed\":1e400}",
            b"{\"model\":\"m\",\"prompt\":[[1]]}",
            b"\xEF\xBB\xBF{}",
        ] {
            for endpoint in [OpenAiEndpoint::ChatCompletions, OpenAiEndpoint::Completions, OpenAiEndpoint::Models] {
                let _ = OpenAiRequest::from_json_bytes(endpoint, body);
            }
        }
    }

    #[test]
    fn lists_and_schemas_are_bounded() {
        let chat = |body: Value| {
            OpenAiRequest::from_json_bytes(
                OpenAiEndpoint::ChatCompletions,
                body.to_string().as_bytes(),
            )
        };
        let msg = json!({"role": "user", "content": "x"});
        let e = chat(json!({"model": "m", "messages": vec![msg.clone(); 2049]})).unwrap_err();
        assert_eq!(
            e.message,
            "'messages' holds 2049 messages; the message count limit is 2048"
        );
        let parts = vec![json!({"type": "text", "text": "a"}); 257];
        let e = chat(json!({"model": "m", "messages": [{"role": "user", "content": parts}]}))
            .unwrap_err();
        assert!(
            e.message.contains("the content part limit is 256"),
            "{}",
            e.message
        );
        let e =
            chat(json!({"model": "m", "messages": [msg], "stop": "s".repeat(1025)})).unwrap_err();
        assert!(
            e.message.contains("at most 1024 characters"),
            "{}",
            e.message
        );
        let tools: Vec<Value> = (0..129)
            .map(|i| json!({"type": "function", "function": {"name": format!("f{i}")}}))
            .collect();
        let e = chat(json!({"model": "m", "messages": [msg], "tools": tools})).unwrap_err();
        assert!(
            e.message.contains("the tool count limit is 128"),
            "{}",
            e.message
        );
        let mut defs = serde_json::Map::new();
        for i in 0..600 {
            defs.insert(
                format!("d{i}"),
                json!({"$ref": format!("#/$defs/d{}", i + 1)}),
            );
        }
        let e = chat(json!({"model": "m", "messages": [msg], "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema":
                {"$ref": "#/$defs/d0", "$defs": defs}}}}))
        .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message
                .starts_with("'response_format.json_schema.schema': "),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("$ref depth limit is 32"),
            "{}",
            e.message
        );
    }
}
