//! Tests of the OpenAI dialect: request validation, answers, error bodies.

use serde_json::{json, Value};

use super::*;
use crate::error::ApiError;
use crate::request::{ChatMessage, ResponseFormat};
use crate::response::Usage;
use crate::tools::ToolChoice;

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
    let format = |f: Value| chat(with(json!({"response_format": f}))).map(|r| r.response_format);
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
    let e =
        OpenAiRequest::from_json_bytes(OpenAiEndpoint::ChatCompletions, b"{not json").unwrap_err();
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
    let body: Value = serde_json::from_str(&error_body(&ApiError::invalid_request("bad"))).unwrap();
    assert_eq!(
        body,
        json!({"error": {"message": "bad", "type": "invalid_request_error", "param": null, "code": null}})
    );
    let body: Value = serde_json::from_str(&error_body(&ApiError::model_not_found("x"))).unwrap();
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
        for endpoint in [
            OpenAiEndpoint::ChatCompletions,
            OpenAiEndpoint::Completions,
            OpenAiEndpoint::Models,
        ] {
            let _ = OpenAiRequest::from_json_bytes(endpoint, body);
        }
    }
}

#[test]
fn lists_and_schemas_are_bounded() {
    let chat = |body: Value| {
        OpenAiRequest::from_json_bytes(OpenAiEndpoint::ChatCompletions, body.to_string().as_bytes())
    };
    let msg = json!({"role": "user", "content": "x"});
    let e = chat(json!({"model": "m", "messages": vec![msg.clone(); 2049]})).unwrap_err();
    assert_eq!(
        e.message,
        "'messages' holds 2049 messages; the message count limit is 2048"
    );
    let parts = vec![json!({"type": "text", "text": "a"}); 257];
    let e =
        chat(json!({"model": "m", "messages": [{"role": "user", "content": parts}]})).unwrap_err();
    assert!(
        e.message.contains("the content part limit is 256"),
        "{}",
        e.message
    );
    let e = chat(json!({"model": "m", "messages": [msg], "stop": "s".repeat(1025)})).unwrap_err();
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
