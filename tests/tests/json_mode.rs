//! JSON mode end to end: the real binary, the real model, Workers AI's and OpenAI's
//! `response_format`. Every answer must parse and validate against its schema, checked by an
//! independent validator (the `jsonschema` crate, formats asserted), never by the grammar
//! engine that produced it.

use edgerun_e2e::{read_sse, text_of, Node, MODEL_ALIAS, TOKEN};
use serde_json::{json, Value};
use std::time::Instant;

/// (what to ask for, the schema) — nested objects, arrays with bounds, enums, numbers with
/// ranges, strings with patterns and formats, `required`, `additionalProperties: false`,
/// `$ref`, `anyOf`, `const`, top-level non-objects.
fn cases() -> Vec<(&'static str, Value)> {
    vec![
        (
            "Describe a person.",
            json!({"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 30},
                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": false}),
        ),
        (
            "Give the address of a company.",
            json!({"type": "object", "properties": {
                "company": {"type": "string", "maxLength": 40},
                "address": {"type": "object", "properties": {
                    "street": {"type": "string", "maxLength": 40},
                    "city": {"type": "string", "maxLength": 30},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                  "required": ["street", "city", "zip"], "additionalProperties": false}},
              "required": ["company", "address"], "additionalProperties": false}),
        ),
        (
            "List some fruits.",
            json!({"type": "object", "properties": {
                "fruits": {"type": "array", "items": {"type": "string", "maxLength": 20},
                           "minItems": 2, "maxItems": 4}},
              "required": ["fruits"], "additionalProperties": false}),
        ),
        (
            "What colour is the sky?",
            json!({"type": "object", "properties": {
                "color": {"enum": ["red", "green", "blue", "grey"]}},
              "required": ["color"], "additionalProperties": false}),
        ),
        (
            "What is the temperature in Paris today, in Celsius?",
            json!({"type": "object", "properties": {
                "celsius": {"type": "number", "minimum": -50, "maximum": 60}},
              "required": ["celsius"], "additionalProperties": false}),
        ),
        (
            "Give the email address of a support desk.",
            json!({"type": "object", "properties": {
                "email": {"type": "string", "format": "email"}},
              "required": ["email"], "additionalProperties": false}),
        ),
        (
            "When did the first moon landing happen?",
            json!({"type": "object", "properties": {
                "date": {"type": "string", "format": "date"}},
              "required": ["date"], "additionalProperties": false}),
        ),
        (
            "Schedule a meeting for tomorrow morning.",
            json!({"type": "object", "properties": {
                "title": {"type": "string", "maxLength": 40},
                "starts": {"type": "string", "format": "date-time"}},
              "required": ["title", "starts"], "additionalProperties": false}),
        ),
        (
            "Create a new order record.",
            json!({"type": "object", "properties": {
                "id": {"type": "string", "format": "uuid"},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 99}},
              "required": ["id", "quantity"], "additionalProperties": false}),
        ),
        (
            "Give a phone number for a pizza place.",
            json!({"type": "object", "properties": {
                "phone": {"type": "string", "pattern": "^\\+?[0-9]{7,12}$"}},
              "required": ["phone"], "additionalProperties": false}),
        ),
        (
            "Name some famous films and their years.",
            json!({"type": "object", "properties": {
                "films": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                    "type": "object", "properties": {
                        "title": {"type": "string", "maxLength": 30},
                        "year": {"type": "integer", "minimum": 1900, "maximum": 2030}},
                    "required": ["title", "year"], "additionalProperties": false}}},
              "required": ["films"], "additionalProperties": false}),
        ),
        (
            "Pick some lucky numbers.",
            json!({"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 10},
                   "minItems": 3, "maxItems": 5}),
        ),
        (
            "Is this review positive or negative: 'I loved it'?",
            json!({"enum": ["positive", "negative", "neutral"]}),
        ),
        (
            "Describe a book; the subtitle is optional.",
            json!({"type": "object", "properties": {
                "title": {"type": "string", "maxLength": 40},
                "subtitle": {"type": "string", "maxLength": 40},
                "pages": {"type": "integer", "minimum": 1, "maximum": 2000}},
              "required": ["title", "pages"], "additionalProperties": false}),
        ),
        (
            "Describe a company and its chief executive.",
            json!({"type": "object", "properties": {
                "company": {"type": "object", "properties": {
                    "name": {"type": "string", "maxLength": 30},
                    "ceo": {"type": "object", "properties": {
                        "name": {"type": "string", "maxLength": 30},
                        "age": {"type": "integer", "minimum": 18, "maximum": 99}},
                      "required": ["name", "age"], "additionalProperties": false}},
                  "required": ["name", "ceo"], "additionalProperties": false}},
              "required": ["company"], "additionalProperties": false}),
        ),
        (
            "Report the status of the service.",
            json!({"type": "object", "properties": {
                "version": {"const": 2},
                "ok": {"type": "boolean"}},
              "required": ["version", "ok"], "additionalProperties": false}),
        ),
        (
            "What is six times seven?",
            json!({"type": "object", "properties": {
                "answer": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 10}]}},
              "required": ["answer"], "additionalProperties": false}),
        ),
        (
            "Invent a short product code.",
            json!({"type": "object", "properties": {
                "code": {"type": "string", "minLength": 3, "maxLength": 6, "pattern": "^[A-Z0-9]+$"}},
              "required": ["code"], "additionalProperties": false}),
        ),
        (
            "How much of the battery is left?",
            json!({"type": "object", "properties": {
                "percent": {"type": "integer", "minimum": 0, "exclusiveMaximum": 100}},
              "required": ["percent"], "additionalProperties": false}),
        ),
        (
            "Draw a line between two points.",
            json!({"$defs": {"point": {"type": "object", "properties": {
                    "x": {"type": "number", "minimum": -100, "maximum": 100},
                    "y": {"type": "number", "minimum": -100, "maximum": 100}},
                  "required": ["x", "y"], "additionalProperties": false}},
              "type": "object", "properties": {
                "from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
              "required": ["from", "to"], "additionalProperties": false}),
        ),
        (
            "Rate this restaurant.",
            json!({"type": "object", "properties": {
                "stars": {"enum": [1, 2, 3, 4, 5]},
                "comment": {"type": "string", "maxLength": 60}},
              "required": ["stars", "comment"], "additionalProperties": false}),
        ),
        (
            "List the contact emails of a small team.",
            json!({"type": "object", "properties": {
                "emails": {"type": "array", "items": {"type": "string", "format": "email"},
                           "minItems": 1, "maxItems": 3}},
              "required": ["emails"], "additionalProperties": false}),
        ),
        (
            "Give the address of a web server.",
            json!({"type": "object", "properties": {
                "host": {"type": "string", "format": "ipv4"},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535}},
              "required": ["host", "port"], "additionalProperties": false}),
        ),
    ]
}

fn validator(schema: &Value) -> jsonschema::Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .build(schema)
        .unwrap_or_else(|e| panic!("{schema}: {e}"))
}

fn messages(task: &str) -> Value {
    json!([
        {"role": "system", "content": "You answer only with JSON."},
        {"role": "user", "content": task}
    ])
}

/// Posts to the Workers AI run route; status and JSON body.
async fn run(node: &Node, body: &Value) -> (u16, Value) {
    let resp = node.post(body.to_string()).send().await.unwrap();
    let status = resp.status().as_u16();
    assert_eq!(resp.headers()["content-type"], "application/json");
    (status, resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_schema_is_met_on_the_real_model() {
    let node = Node::start(&[]).await;
    let cases = cases();
    assert!(cases.len() >= 20);
    // All at once: the masks are computed inside batched steps.
    let answers = futures::future::join_all(cases.iter().map(|(task, schema)| {
        let body = json!({
            "messages": messages(task),
            "response_format": {"type": "json_schema", "json_schema": schema},
            "max_tokens": 256,
            "temperature": 0,
        });
        let node = &node;
        async move { run(node, &body).await }
    }))
    .await;
    for ((task, schema), (status, v)) in cases.iter().zip(answers) {
        assert_eq!(status, 200, "{task}: {v}");
        let response = &v["result"]["response"];
        let errors: Vec<String> = validator(schema)
            .iter_errors(response)
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "{task}: {response} breaks {schema}: {errors:?}"
        );
        assert_eq!(v["result"]["tool_calls"], json!([]));
    }
    // They ran batched.
    let metrics = node.metrics().await;
    let peak: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("edgerun_peak_batch_size "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak batch size in {metrics}"));
    assert!(peak >= 2.0, "peak batch {peak}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_object_answers_an_object_whole_and_streamed() {
    let node = Node::start(&[]).await;
    let body = json!({
        "messages": messages("Describe the weather in London."),
        "response_format": {"type": "json_object"},
        "max_tokens": 200,
        "temperature": 0,
    });
    let (status, v) = run(&node, &body).await;
    assert_eq!(status, 200, "{v}");
    let response = &v["result"]["response"];
    assert!(response.is_object(), "{v}");

    // Workers AI streams json_object: the deltas join into the same JSON text.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let resp = node.post(streamed.to_string()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = text_of(&read_sse(resp, Instant::now()).await);
    let parsed: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert_eq!(&parsed, response);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_come_in_each_dialects_shape() {
    let node = Node::start(&[]).await;
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    // A schema with stream: Workers AI's 5023.
    let (status, v) = run(
        &node,
        &json!({"prompt": "x", "stream": true,
                "response_format": {"type": "json_schema", "json_schema": schema}}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["errors"][0]["code"], 5023, "{v}");

    // A schema the grammar engine cannot compile: 400 before any work, in the envelope...
    let impossible = json!({"type": "integer", "minimum": 5, "maximum": 1});
    let (status, v) = run(
        &node,
        &json!({"prompt": "x",
                "response_format": {"type": "json_schema", "json_schema": impossible}}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["errors"][0]["code"], 5006, "{v}");
    assert!(
        v["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("response_format"),
        "{v}"
    );
    // ... and in OpenAI's shape on /v1.
    let resp = node
        .client
        .post(node.url("/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .json(
            &json!({"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "x"}],
                      "response_format": {"type": "json_schema",
                                          "json_schema": {"name": "n", "schema": impossible}}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");

    // Cut at max_tokens before the JSON is complete: an error that says so, never a string.
    let long = json!({"type": "array", "items": {"type": "string"}, "minItems": 30});
    let (status, v) = run(
        &node,
        &json!({"prompt": "List thirty words.", "max_tokens": 8,
                "response_format": {"type": "json_schema", "json_schema": long}}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    let message = v["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.starts_with("AiError: Bad input: JSON Mode couldn't be met")
            && message.contains("max_tokens"),
        "{v}"
    );

    // The node keeps serving.
    let (status, _) = run(&node, &json!({"prompt": "hi", "max_tokens": 4})).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_structured_outputs_whole_and_streamed() {
    let node = Node::start(&[]).await;
    let schema = json!({"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "population": {"type": "integer", "minimum": 0}},
      "required": ["city", "population"], "additionalProperties": false});
    let validator = validator(&schema);
    for path in [
        "/v1/chat/completions",
        "/client/v4/accounts/acct123/ai/v1/chat/completions",
    ] {
        let body = json!({
            "model": MODEL_ALIAS,
            "messages": [{"role": "user", "content": "Name a big city and its population."}],
            "max_tokens": 120, "temperature": 0,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "city", "schema": schema, "strict": true}},
        });
        let resp = node
            .client
            .post(node.url(path))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        let value: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{v}: {e}"));
        assert!(validator.is_valid(&value), "{value}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");

        // OpenAI streams structured outputs: the deltas join into the same text.
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let resp = node
            .client
            .post(node.url(path))
            .bearer_auth(TOKEN)
            .json(&streamed)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut text = String::new();
        for event in read_sse(resp, Instant::now()).await {
            if let edgerun_protocol::sse::SseEvent::Data(d) = event.event {
                if let Some(delta) = d["choices"][0]["delta"]["content"].as_str() {
                    text.push_str(delta);
                }
            }
        }
        assert_eq!(text, content);
    }
}
