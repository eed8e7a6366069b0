//! Tool calling on the wire, shared by both dialects (and the Worker's edge validation).
//!
//! * Tool definitions come in Workers AI's legacy shape `{name, description, parameters}` or
//!   OpenAI's `{type: "function", function: {name, description, parameters}}` (Workers AI takes
//!   both, reference §1.4); both become a [`ToolDefinition`].
//! * `tool_choice`: `"auto"` (the default with tools), `"none"`, `"required"`, or
//!   `{type: "function", function: {name}}` ([`ToolChoice`]); a named tool must exist.
//! * Assistant messages sent back with `tool_calls` (OpenAI's `{id, type, function: {name,
//!   arguments: "<json>"}}` or Workers AI's `{name, arguments: {..}}`) are normalised by
//!   [`normalize_tool_calls`] into the shape chat templates read: `{id, type: "function",
//!   function: {name, arguments: {..}}}`, arguments as an object (templates `tojson` them).
//!
//! Every list is bounded ([`RequestLimits`]): at most `max_tools` tools, names unique (a hash
//! set: O(n)), descriptions of at most `max_tool_description_chars`, each `parameters` schema
//! measured by [`check_schema`]; at most `max_tool_calls` calls per assistant message.
//!
//! Errors are plain strings naming the field; each dialect wraps them in its own error.

use std::collections::HashSet;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::fields::{a_type_name, non_null};
use crate::limits::{check_schema, RequestLimits};

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolDefinition {
    /// What the model calls it (1 to 64 of `a-z A-Z 0-9 _ - .`, unique among the tools).
    pub name: String,
    /// What it does, for the model (empty when not given).
    pub description: String,
    /// A JSON Schema for the arguments object (`{"type":"object"}` when not given).
    pub parameters: Value,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// The model decides (text or calls).
    #[default]
    Auto,
    /// No calls: the tools are not shown and the answer is text.
    None,
    /// At least one call, to any of the tools.
    Required,
    /// A call to this tool.
    Function(String),
}

/// Reads a `tools` array (`at` names it in errors, e.g. `tools`) within `limits`.
pub fn parse_tools(
    value: &Value,
    at: &str,
    limits: &RequestLimits,
) -> Result<Vec<ToolDefinition>, String> {
    let Value::Array(items) = value else {
        return Err(format!(
            "'{at}' must be an array, got {}",
            a_type_name(value)
        ));
    };
    if items.len() > limits.max_tools {
        return Err(format!(
            "'{at}' holds {} tools; the tool count limit is {}",
            items.len(),
            limits.max_tools
        ));
    }
    let mut tools: Vec<ToolDefinition> = Vec::with_capacity(items.len());
    let mut names: HashSet<&str> = HashSet::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let Value::Object(tool) = item else {
            return Err(format!(
                "'{at}' must be an object, got {}",
                a_type_name(item)
            ));
        };
        // OpenAI's shape nests the definition under `function`.
        let check_type = || match non_null(tool, "type") {
            None => Ok(()),
            Some(Value::String(t)) if t == "function" => Ok(()),
            Some(Value::String(t)) => Err(format!("'{at}.type' must be 'function', got '{t}'")),
            Some(other) => Err(format!(
                "'{at}.type' must be a string, got {}",
                a_type_name(other)
            )),
        };
        let (def, at) = match non_null(tool, "function") {
            Some(Value::Object(f)) => {
                check_type()?;
                (f, format!("{at}.function"))
            }
            Some(other) => {
                return Err(format!(
                    "'{at}.function' must be an object, got {}",
                    a_type_name(other)
                ))
            }
            None if non_null(tool, "type").is_some() => {
                check_type()?;
                return Err(format!("'{at}.function' is required"));
            }
            None => (tool, at),
        };
        let name = match non_null(def, "name") {
            Some(Value::String(n))
                if !n.is_empty()
                    && n.len() <= 64
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') =>
            {
                n
            }
            Some(Value::String(n)) => {
                return Err(format!(
                    "'{at}.name' must be 1 to 64 of a-z, A-Z, 0-9, '_', '-' and '.', got '{n}'"
                ))
            }
            Some(other) => {
                return Err(format!(
                    "'{at}.name' must be a string, got {}",
                    a_type_name(other)
                ))
            }
            None => return Err(format!("'{at}.name' is required")),
        };
        if !names.insert(name.as_str()) {
            return Err(format!("'{at}.name': two tools are named '{name}'"));
        }
        let description = match non_null(def, "description") {
            None => String::new(),
            Some(Value::String(d)) if d.chars().count() > limits.max_tool_description_chars => {
                return Err(format!(
                    "'{at}.description' is longer than {} characters (the tool description \
                     limit)",
                    limits.max_tool_description_chars
                ))
            }
            Some(Value::String(d)) => d.clone(),
            Some(other) => {
                return Err(format!(
                    "'{at}.description' must be a string, got {}",
                    a_type_name(other)
                ))
            }
        };
        let parameters = match non_null(def, "parameters") {
            None => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => {
                check_schema(p, &format!("'{at}.parameters'"), &limits.schema)
                    .map_err(|e| e.to_string())?;
                p.clone()
            }
            Some(other) => {
                return Err(format!(
                    "'{at}.parameters' must be an object (a JSON Schema), got {}",
                    a_type_name(other)
                ))
            }
        };
        tools.push(ToolDefinition {
            name: name.clone(),
            description,
            parameters,
        });
    }
    Ok(tools)
}

/// Reads `tool_choice` against the tools given (`None`: not given).
pub fn parse_tool_choice(
    value: Option<&Value>,
    tools: &[ToolDefinition],
) -> Result<ToolChoice, String> {
    let choice = match value {
        None => return Ok(ToolChoice::Auto),
        Some(Value::String(c)) => match c.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" | "any" => ToolChoice::Required,
            other => {
                return Err(format!(
                    "'tool_choice' must be 'auto', 'none', 'required' or a function, got '{other}'"
                ))
            }
        },
        Some(Value::Object(c)) => {
            let name = c
                .get("function")
                .and_then(|f| f.get("name"))
                .or_else(|| c.get("name"))
                .and_then(Value::as_str);
            match name {
                Some(name) => ToolChoice::Function(name.to_string()),
                None => return Err("'tool_choice.function.name' is required".into()),
            }
        }
        Some(other) => {
            return Err(format!(
                "'tool_choice' must be a string or an object, got {}",
                a_type_name(other)
            ))
        }
    };
    match &choice {
        ToolChoice::Required if tools.is_empty() => {
            Err("'tool_choice' is 'required' but no 'tools' are given".into())
        }
        ToolChoice::Function(name) if !tools.iter().any(|t| &t.name == name) => Err(format!(
            "'tool_choice' names '{name}', which is not one of the 'tools'"
        )),
        _ => Ok(choice),
    }
}

/// An assistant message's `tool_calls`, in the shape chat templates read (see the module docs),
/// at most `max_calls` of them.
pub fn normalize_tool_calls(value: &Value, at: &str, max_calls: usize) -> Result<Value, String> {
    let Value::Array(calls) = value else {
        return Err(format!(
            "'{at}' must be an array, got {}",
            a_type_name(value)
        ));
    };
    if calls.len() > max_calls {
        return Err(format!(
            "'{at}' holds {} calls; the limit is {max_calls} per message",
            calls.len()
        ));
    }
    let mut out = Vec::with_capacity(calls.len());
    for (i, call) in calls.iter().enumerate() {
        let at = format!("{at}[{i}]");
        let Value::Object(call) = call else {
            return Err(format!(
                "'{at}' must be an object, got {}",
                a_type_name(call)
            ));
        };
        let (function, at_fn) = match non_null(call, "function") {
            Some(Value::Object(f)) => (f, format!("{at}.function")),
            Some(other) => {
                return Err(format!(
                    "'{at}.function' must be an object, got {}",
                    a_type_name(other)
                ))
            }
            None => (call, at.clone()),
        };
        let name = match non_null(function, "name") {
            Some(Value::String(n)) => n.clone(),
            _ => return Err(format!("'{at_fn}.name' is required (a string)")),
        };
        let arguments = match non_null(function, "arguments") {
            None => json!({}),
            Some(Value::String(s)) => serde_json::from_str::<Value>(s)
                .map_err(|e| format!("'{at_fn}.arguments' is not JSON: {e}"))?,
            Some(v) => v.clone(),
        };
        let mut normal = Map::new();
        if let Some(id) = non_null(call, "id") {
            normal.insert("id".into(), id.clone());
        }
        normal.insert("type".into(), json!("function"));
        normal.insert(
            "function".into(),
            json!({"name": name, "arguments": arguments}),
        );
        out.push(Value::Object(normal));
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_tool_shapes_become_one() {
        let params = json!({"type": "object", "properties": {"city": {"type": "string"}}});
        let tools = parse_tools(
            &json!([
                {"name": "weather", "description": "d", "parameters": params},
                {"type": "function", "function": {"name": "time", "parameters": params}},
                {"name": "noop"}
            ]),
            "tools",
            &RequestLimits::DEFAULT,
        )
        .unwrap();
        assert_eq!(tools[0].name, "weather");
        assert_eq!(tools[0].description, "d");
        assert_eq!(tools[1].name, "time");
        assert_eq!(tools[1].parameters, params);
        assert_eq!(tools[2].parameters["type"], "object");
    }

    #[test]
    fn bad_tools_name_the_field() {
        for (tools, needle) in [
            (json!({}), "'tools' must be an array"),
            (json!([1]), "'tools[0]' must be an object"),
            (json!([{"description": "x"}]), "'tools[0].name' is required"),
            (json!([{"name": "a b"}]), "'tools[0].name' must be"),
            (
                json!([{"type": "function"}]),
                "'tools[0].function' is required",
            ),
            (
                json!([{"type": "retrieval", "function": {}}]),
                "must be 'function'",
            ),
            (
                json!([{"name": "f", "parameters": "x"}]),
                "'tools[0].parameters' must be an object",
            ),
            (
                json!([{"name": "f"}, {"name": "f"}]),
                "two tools are named 'f'",
            ),
        ] {
            let e = parse_tools(&tools, "tools", &RequestLimits::DEFAULT).unwrap_err();
            assert!(e.contains(needle), "{tools}: {e}");
        }
    }

    #[test]
    fn tool_choice_is_checked_against_the_tools() {
        let tools = parse_tools(&json!([{"name": "f"}]), "tools", &RequestLimits::DEFAULT).unwrap();
        let choice = |v: Value| parse_tool_choice(Some(&v), &tools);
        assert_eq!(parse_tool_choice(None, &tools), Ok(ToolChoice::Auto));
        assert_eq!(choice(json!("none")), Ok(ToolChoice::None));
        assert_eq!(choice(json!("required")), Ok(ToolChoice::Required));
        assert_eq!(
            choice(json!({"type": "function", "function": {"name": "f"}})),
            Ok(ToolChoice::Function("f".into()))
        );
        assert!(
            choice(json!({"type": "function", "function": {"name": "g"}}))
                .unwrap_err()
                .contains("not one of the 'tools'")
        );
        assert!(parse_tool_choice(Some(&json!("required")), &[])
            .unwrap_err()
            .contains("no 'tools'"));
        assert!(choice(json!("sometimes")).is_err());
    }

    #[test]
    fn calls_sent_back_are_normalised() {
        let openai = json!([{"id": "call_1", "type": "function",
                             "function": {"name": "f", "arguments": "{\"a\":1}"}}]);
        assert_eq!(
            normalize_tool_calls(&openai, "m", 8).unwrap(),
            json!([{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}])
        );
        let legacy = json!([{"name": "f", "arguments": {"a": 1}}]);
        assert_eq!(
            normalize_tool_calls(&legacy, "m", 8).unwrap(),
            json!([{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}])
        );
        assert!(normalize_tool_calls(
            &json!([{"function": {"name": "f", "arguments": "{"}}]),
            "m",
            8
        )
        .unwrap_err()
        .contains("not JSON"));
    }

    #[test]
    fn tool_lists_are_bounded_and_checked_in_linear_time() {
        let limits = RequestLimits::DEFAULT;
        let many = |n: usize, same: bool| {
            Value::Array(
                (0..n)
                    .map(|i| {
                        let name = if same {
                            "f".to_string()
                        } else {
                            format!("f{i}")
                        };
                        json!({"type": "function", "function": {"name": name}})
                    })
                    .collect(),
            )
        };
        assert_eq!(
            parse_tools(&many(128, false), "tools", &limits)
                .unwrap()
                .len(),
            128
        );
        let e = parse_tools(&many(129, false), "tools", &limits).unwrap_err();
        assert_eq!(e, "'tools' holds 129 tools; the tool count limit is 128");
        // The finding's 50,000 tools, distinct or all named alike, with the count limit lifted:
        // the duplicate check is a hash set, so this takes milliseconds, not seconds.
        let unbounded = RequestLimits {
            max_tools: usize::MAX,
            ..limits
        };
        let started = std::time::Instant::now();
        assert_eq!(
            parse_tools(&many(50_000, false), "tools", &unbounded)
                .unwrap()
                .len(),
            50_000
        );
        let e = parse_tools(&many(50_000, true), "tools", &unbounded).unwrap_err();
        assert!(e.contains("two tools are named 'f'"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // Descriptions and schemas are bounded too.
        let long = json!([{"name": "f", "description": "d".repeat(8193)}]);
        assert!(parse_tools(&long, "tools", &limits)
            .unwrap_err()
            .contains("tool description limit"));
        let mut chain = Map::new();
        for i in 0..40 {
            chain.insert(
                format!("d{i}"),
                json!({"$ref": format!("#/$defs/d{}", i + 1)}),
            );
        }
        let deep = json!([{"name": "f", "parameters": {"type": "object", "properties":
            {"x": {"$ref": "#/$defs/d0"}}, "$defs": chain}}]);
        let e = parse_tools(&deep, "tools", &limits).unwrap_err();
        assert!(e.starts_with("'tools[0].parameters': "), "{e}");
        assert!(e.contains("$ref depth limit is 32"), "{e}");
        let calls = Value::Array(vec![json!({"name": "f"}); 9]);
        assert!(normalize_tool_calls(&calls, "m", 8)
            .unwrap_err()
            .contains("the limit is 8 per message"));
    }
}
