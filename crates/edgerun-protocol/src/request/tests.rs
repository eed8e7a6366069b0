//! Tests of Workers AI request validation: every field's rules, messages, content parts,
//! `lora`, `response_format` and its interplay with `stream`.

use super::*;
use serde_json::json;
use serde_json::Map;

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
    let req = ok(json!({"messages": [{"role": "user", "content": "x"}], "tools": tools.clone()}));
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
    let lenient = json!({"type": "array", "uniqueItems": true, "x-guidance": {"lenient": true}});
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
