//! Tool calling end to end on the real model (SmolLM2's template does not render tools, so the
//! node describes them in the system message and reads calls in the Hermes format): calls in
//! Workers AI's and OpenAI's shapes, whole and streamed, forced calls whose arguments always
//! validate against the function's parameters, and tool results sent back.

use edgerun_e2e::{read_sse, Node, MODEL_ALIAS};
use edgerun_protocol::sse::SseEvent;
use serde_json::{json, Value};
use std::time::Instant;

fn weather_parameters() -> Value {
    json!({"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 40},
                          "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": false})
}

fn valid_arguments(arguments: &Value) {
    let validator = jsonschema::validator_for(&weather_parameters()).unwrap();
    assert!(validator.is_valid(arguments), "{arguments}");
}

const QUESTION: &str = "What is the weather like in Paris right now?";

async fn post(node: &Node, path: &str, body: &Value) -> reqwest::Response {
    node.post_json_to(path, body).await
}

fn data(events: Vec<edgerun_e2e::Received>) -> Vec<Value> {
    events
        .into_iter()
        .filter_map(|r| match r.event {
            SseEvent::Data(v) => Some(v),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_ai_forced_call_whole_and_streamed() {
    let node = Node::start(&[]).await;
    // Workers AI's legacy tool shape.
    let body = json!({
        "messages": [{"role": "user", "content": QUESTION}],
        "tools": [{"name": "get_weather", "description": "Current weather in a city",
                   "parameters": weather_parameters()}],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 100,
    });
    let v: Value = node
        .post(body.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let calls = v["result"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"));
    assert_eq!(calls.len(), 1, "{v}");
    assert_eq!(calls[0]["name"], "get_weather");
    valid_arguments(&calls[0]["arguments"]);
    assert_eq!(v["result"]["response"], "", "{v}");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let resp = node.post(streamed.to_string()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let events = data(read_sse(resp, Instant::now()).await);
    let with_calls: Vec<&Value> = events
        .iter()
        .filter(|e| e.get("tool_calls").is_some())
        .collect();
    assert_eq!(with_calls.len(), 1, "{events:?}");
    assert_eq!(with_calls[0]["tool_calls"], v["result"]["tool_calls"]);
    // No text of the call leaks into the response deltas.
    let text: String = events
        .iter()
        .filter_map(|e| e["response"].as_str())
        .collect();
    assert_eq!(text, "");
    assert!(events.last().unwrap().get("usage").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_named_call_whole_and_streamed_on_both_route_families() {
    let node = Node::start(&[]).await;
    for path in [
        "/v1/chat/completions",
        "/client/v4/accounts/acct123/ai/v1/chat/completions",
    ] {
        let body = json!({
            "model": MODEL_ALIAS,
            "messages": [{"role": "user", "content": QUESTION}],
            "tools": [
                {"type": "function", "function": {"name": "get_time", "description": "The time",
                 "parameters": {"type": "object", "properties": {}}}},
                {"type": "function", "function": {"name": "get_weather",
                 "description": "Current weather in a city", "parameters": weather_parameters()}}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "temperature": 0, "max_tokens": 100,
        });
        let resp = post(&node, path, &body).await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
        assert_eq!(choice["message"]["content"], Value::Null, "{v}");
        let call = &choice["message"]["tool_calls"][0];
        assert!(call["id"].as_str().unwrap().starts_with("call_"), "{v}");
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "get_weather");
        let arguments: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        valid_arguments(&arguments);

        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let resp = post(&node, path, &streamed).await;
        assert_eq!(resp.status(), 200);
        let chunks = data(read_sse(resp, Instant::now()).await);
        let deltas: Vec<&Value> = chunks
            .iter()
            .filter(|c| !c["choices"][0]["delta"]["tool_calls"].is_null())
            .collect();
        assert_eq!(deltas.len(), 1, "{chunks:?}");
        let d = &deltas[0]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(d["index"], 0);
        assert_eq!(d["function"]["name"], "get_weather");
        assert_eq!(d["function"]["arguments"], call["function"]["arguments"]);
        let finish: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["finish_reason"].as_str().map(|_| c))
            .collect();
        assert_eq!(finish.len(), 1);
        assert_eq!(finish[0]["choices"][0]["finish_reason"], "tool_calls");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_results_go_back_and_tool_choice_none_answers_in_text() {
    let node = Node::start(&[]).await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
                        "description": "Current weather in a city", "parameters": weather_parameters()}}]);
    // The call and its result, sent back in OpenAI's shape: the model answers in text.
    let body = json!({
        "model": MODEL_ALIAS,
        "messages": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21, \"sky\": \"sunny\"}"}],
        "tools": tools, "tool_choice": "none", "temperature": 0, "max_tokens": 40,
    });
    let resp = post(&node, "/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty(),
        "{v}"
    );
    assert!(
        v["choices"][0]["message"].get("tool_calls").is_none(),
        "{v}"
    );
    assert_ne!(v["choices"][0]["finish_reason"], "tool_calls");

    // The same in Workers AI's legacy shape on the run route.
    let body = json!({
        "messages": [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": null,
             "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]},
            {"role": "tool", "content": "{\"temperature\": 21}"}],
        "tools": [{"name": "get_weather", "description": "d", "parameters": weather_parameters()}],
        "temperature": 0, "max_tokens": 40,
    });
    let v: Value = node
        .post(body.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["success"], true, "{v}");

    // Bad tool definitions and choices are refused in each dialect's shape.
    let v: Value = node
        .post(json!({"prompt": "x", "tools": [{"description": "no name"}]}).to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["errors"][0]["code"], 5006, "{v}");
    let resp = post(
        &node,
        "/v1/chat/completions",
        &json!({"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "x"}],
                "tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("nope"),
        "{v}"
    );
}
