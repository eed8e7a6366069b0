//! Validation of `chat/completions` and `completions` bodies into an [`OpenAiRequest`]: the
//! conversation or prompt, sampling fields with OpenAI's ranges, `stop`, log-probabilities,
//! `response_format`, tools and `tool_choice`, and the fields this node refuses (see the
//! [module docs](super)). Fields are read with `crate::fields`, in OpenAI's wording.

use serde_json::{Map, Value};

use super::OpenAiEndpoint;
use crate::error::ApiError;
use crate::fields::non_null;
use crate::fields::openai::{boolean, integer, number, type_error};
use crate::limits::{check_schema, RequestLimits, MAX_STOP_CHARS};
use crate::request::{ChatMessage, ResponseFormat};
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
        let model = match non_null(body, "model") {
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
            OpenAiEndpoint::Embeddings => {
                return Err(ApiError::invalid_request(
                    "embeddings is not a generation endpoint",
                ))
            }
        };
        unsupported_fields(body)?;

        match non_null(body, "n") {
            None => {}
            Some(Value::Number(n)) if n.as_u64() == Some(1) || n.as_f64() == Some(1.0) => {}
            Some(other) => {
                return Err(ApiError::invalid_request(format_args!(
                    "'n' must be 1: this node generates one choice per request (got {other})"
                )))
            }
        }

        let stream = boolean(body, "stream")?.unwrap_or(false);
        let include_usage = match non_null(body, "stream_options") {
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

        let tools = match non_null(body, "tools") {
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
        let tool_choice = parse_tool_choice(non_null(body, "tool_choice"), &tools)
            .map_err(ApiError::invalid_request)?;
        if tool_choice != ToolChoice::Auto
            && tool_choice != ToolChoice::None
            && response_format(body, limits)?.is_json()
        {
            return Err(ApiError::invalid_request(
                "'tool_choice' that forces a call and 'response_format' cannot be combined",
            ));
        }

        let reject_if_busy = match non_null(body, "options") {
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
    let format = match non_null(body, "response_format") {
        None => return Ok(ResponseFormat::Text),
        Some(Value::Object(f)) => f,
        Some(other) => return Err(type_error("response_format", other, "an object")),
    };
    match non_null(format, "type") {
        Some(Value::String(t)) if t == "text" => Ok(ResponseFormat::Text),
        Some(Value::String(t)) if t == "json_object" => Ok(ResponseFormat::JsonObject),
        Some(Value::String(t)) if t == "json_schema" => {
            let spec =
                match non_null(format, "json_schema") {
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
            match non_null(spec, "name") {
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
            match non_null(spec, "schema") {
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

fn not_supported(what: impl std::fmt::Display) -> ApiError {
    ApiError::invalid_request(format_args!("{what} is not supported by this node yet"))
}

/// `stop`: a string or an array of up to four strings, none empty or longer than
/// [`MAX_STOP_CHARS`].
fn stop(body: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    let stops = match non_null(body, "stop") {
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
    let items = match non_null(body, "messages") {
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
    let role = match non_null(m, "role") {
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
    if non_null(m, "function_call").is_some() {
        return Err(not_supported(format_args!(
            "'{at}.function_call' (deprecated): use 'tool_calls'"
        )));
    }
    let tool_calls = match non_null(m, "tool_calls") {
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
    let tool_call_id = match non_null(m, "tool_call_id") {
        None if role == "tool" => {
            return Err(ApiError::invalid_request(format_args!(
                "'{at}.tool_call_id' is required on a tool message"
            )))
        }
        None => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(other) => return Err(type_error(&format!("{at}.tool_call_id"), other, "a string")),
    };
    let content = match non_null(m, "content") {
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
                match non_null(part, "type") {
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
                match non_null(part, "text") {
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
    let name = match non_null(m, "name") {
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
    match non_null(body, "prompt") {
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
    match non_null(body, "suffix") {
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
    if non_null(body, "functions").is_some_and(|v| !empty(v)) {
        return Err(not_supported("'functions' (deprecated): use 'tools'"));
    }
    match non_null(body, "function_call") {
        None => {}
        Some(Value::String(c)) if c == "none" || c == "auto" => {}
        Some(_) => {
            return Err(not_supported(
                "'function_call' (deprecated): use 'tool_choice'",
            ))
        }
    }
    if non_null(body, "logit_bias").is_some_and(|v| !empty(v)) {
        return Err(not_supported("'logit_bias'"));
    }
    match non_null(body, "modalities") {
        None => {}
        Some(Value::Array(m)) if m.iter().all(|v| v == "text") => {}
        Some(_) => return Err(not_supported("'modalities' other than text")),
    }
    for key in ["audio", "prediction", "web_search_options"] {
        if non_null(body, key).is_some() {
            return Err(not_supported(format_args!("'{key}'")));
        }
    }
    if non_null(body, "chat_template_kwargs").is_some_and(|v| !empty(v)) {
        return Err(not_supported("'chat_template_kwargs'"));
    }
    Ok(())
}
