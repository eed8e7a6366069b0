//! The input half of a Workers AI request: `prompt` length and `messages` — roles, `content`
//! as a string or text parts (joined with `"\n"`), the tool calls an assistant message sends
//! back and the `tool_call_id` / `name` of a tool message — plus the shape checks of the
//! object arrays (`tools`, `functions`) the [parent](super) reads. Errors are worded as
//! Workers AI's validator words them ([`crate::fields`]'s Workers AI readers).

use serde_json::{Map, Value};

use super::{ChatMessage, Role, MAX_PROMPT_CHARS};
use crate::error::ApiError;
use crate::fields::take_non_null;
use crate::fields::workers_ai::type_mismatch;
use crate::limits::RequestLimits;
use crate::tools::normalize_tool_calls;

/// Length in characters (Unicode scalar values) must be within
/// `min..=MAX_PROMPT_CHARS`.
pub(super) fn check_length(pointer: &str, text: &str, min: usize) -> Result<(), ApiError> {
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

pub(super) fn check_array_of_objects(pointer: &str, value: &Value) -> Result<(), ApiError> {
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

pub(super) fn validate_messages(
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
