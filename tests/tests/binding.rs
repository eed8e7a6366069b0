//! The Workers binding protocol end to end: a Worker written for Workers AI
//! (`tests/workers/binding-client.js`) runs in the real Workers runtime (`workerd` from npm),
//! its `AI` binding wired to a real node on the real model as the README shows, and calls
//! `env.AI.run` (whole and streamed), `env.AI.models()` and `new Ai(env.AI)` of the npm
//! `@cloudflare/ai` package. What it gets must be what the node's REST route answers.

use edgerun_e2e::edge::EdgeWorker;
use edgerun_e2e::{ignoring_cached_tokens, read_sse, sdk_var, text_of, Node, MODEL_ALIAS, TOKEN};
use edgerun_protocol::sse::SseEvent;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

async fn client_for(node: &Node, token: &str) -> EdgeWorker {
    let modules = PathBuf::from(sdk_var("EDGERUN_SDK_CF_AI"));
    EdgeWorker::binding_client(&node.base, token, MODEL_ALIAS, &modules).await
}

async fn post(worker: &EdgeWorker, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(worker.url(path))
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

async fn post_json(worker: &EdgeWorker, path: &str, body: &Value) -> (u16, Value) {
    let resp = post(worker, path, body).await;
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

/// The node's own answer on the REST route (the envelope's `result`).
async fn rest_result(node: &Node, body: &Value) -> Value {
    let v = node.run_json(body.to_string()).await;
    assert_eq!(v["success"], true, "{v}");
    v["result"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_ai_run_answers_like_the_rest_route_whole_and_streamed() {
    let node = Node::start(&[]).await;
    let worker = client_for(&node, TOKEN).await;
    let prompt = json!({"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0});
    let chat = json!({"messages": [{"role": "user", "content": "Name three fruits."}],
                      "max_tokens": 24, "temperature": 0});

    // env.AI.run: the bare output object, parsed by the runtime (content-type exactly JSON).
    for body in [&prompt, &chat] {
        let expected = rest_result(&node, body).await;
        for path in ["/run", "/legacy"] {
            let (status, got) = post_json(&worker, path, body).await;
            assert_eq!(status, 200, "{path}: {got}");
            assert_eq!(
                ignoring_cached_tokens(&got["out"]),
                ignoring_cached_tokens(&expected),
                "{path} {body}"
            );
            let id = got["lastRequestId"].as_str().unwrap_or_default();
            assert_eq!(id.len(), 36, "{path}: the node's cf-ai-req-id: {got}");
        }
    }
    let expected = rest_result(&node, &chat).await;
    assert!(
        !expected["response"].as_str().unwrap().is_empty(),
        "{expected}"
    );

    // stream: true: the runtime hands back the node's event stream as it streams.
    for path in ["/stream", "/legacy-stream"] {
        let start = Instant::now();
        let resp = post(&worker, path, &chat).await;
        assert_eq!(resp.status(), 200, "{path}");
        let events = read_sse(resp, start).await;
        let n = events.len();
        assert!(n >= 4, "{path}: {events:?}");
        assert!(matches!(events[n - 1].event, SseEvent::Done), "{events:?}");
        let SseEvent::Data(usage) = &events[n - 2].event else {
            panic!("{path}: the usage event comes before [DONE]: {events:?}");
        };
        assert_eq!(usage["usage"], expected["usage"], "{path}");
        assert_eq!(text_of(&events), expected["response"], "{path}");
    }

    // env.AI.models(): every name the node answers to, Workers AI's entry shape.
    let models = reqwest::get(worker.url("/models")).await.unwrap();
    assert_eq!(models.status(), 200);
    let models: Value = models.json().await.unwrap();
    let names: Vec<&str> = models
        .as_array()
        .unwrap_or_else(|| panic!("{models}"))
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert!(names.contains(&MODEL_ALIAS), "{models}");
    assert_eq!(
        names.len(),
        2,
        "the file's own name and the alias: {models}"
    );
    let entry = &models[names.iter().position(|n| *n == MODEL_ALIAS).unwrap()];
    assert_eq!(entry["task"]["name"], "Text Generation");
    let context = node.health().await["context_window"].to_string();
    assert!(
        entry["properties"]
            .as_array()
            .unwrap()
            .contains(&json!({"property_id": "context_window", "value": context})),
        "{entry}"
    );
    let found: Value = reqwest::get(worker.url("/models?search=llama-3"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found.as_array().map(Vec::len), Some(1), "{found}");
    assert_eq!(found[0]["name"], MODEL_ALIAS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_errors_are_thrown_naming_the_code_and_the_cause() {
    let node = Node::start(&[]).await;
    let worker = client_for(&node, TOKEN).await;
    let thrown = |v: &Value| (v["thrown"]["name"].clone(), v["thrown"]["message"].clone());

    let (status, v) = post_json(
        &worker,
        "/run",
        &json!({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 500);
    assert_eq!(
        thrown(&v),
        (
            json!("InvalidInput"),
            json!("5006: AiError: Bad input: 'prompt' and 'messages' are mutually exclusive")
        )
    );
    let (_, v) = post_json(
        &worker,
        "/run?model=@cf/meta/nope",
        &json!({"prompt": "hi"}),
    )
    .await;
    assert_eq!(
        thrown(&v),
        (
            json!("NoSuchModel"),
            json!("5007: No such model @cf/meta/nope or task")
        )
    );
    // A stream that cannot start is thrown too, not handed back as a stream of an error.
    let (status, v) = post_json(
        &worker,
        "/stream",
        &json!({"prompt": "hi", "temperature": 9}),
    )
    .await;
    assert_eq!(status, 500, "{v}");
    assert_eq!(thrown(&v).0, "InvalidInput");
    let message = thrown(&v).1;
    assert!(
        message
            .as_str()
            .unwrap()
            .starts_with("5006: AiError: Bad input: "),
        "{v}"
    );
    // The same through @cloudflare/ai.
    let (_, v) = post_json(&worker, "/legacy", &json!({"prompt": ""})).await;
    assert_eq!(thrown(&v).0, "InvalidInput", "{v}");

    // A wrong token: the node's 401, thrown as an authentication error.
    let wrong = client_for(&node, "not-the-token").await;
    let (_, v) = post_json(&wrong, "/run", &json!({"prompt": "hi"})).await;
    assert_eq!(
        thrown(&v),
        (
            json!("AuthenticationError"),
            json!("10000: Authentication error")
        )
    );
    let resp = reqwest::get(wrong.url("/models")).await.unwrap();
    assert_eq!(resp.status(), 500);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["thrown"]["message"], "Authentication error", "{v}");

    // What the runtime never sends, straight to the node: each refused with what is wrong.
    let client = reqwest::Client::new();
    let binding = |query: &str, model: Option<&str>| {
        let mut req = client
            .post(node.url(&format!("/run{query}")))
            .bearer_auth(TOKEN)
            .body(json!({"inputs": {"prompt": "hi", "max_tokens": 1}}).to_string());
        if let Some(model) = model {
            req = req.header("cf-consn-model-id", model);
        }
        req
    };
    for (query, model, status, code) in [
        ("?version=2", Some(MODEL_ALIAS), 400, 7000),
        ("", Some(MODEL_ALIAS), 400, 7000),
        ("?version=3", None, 400, 3003),
        ("?version=3", Some("nope"), 400, 5007),
    ] {
        let resp = binding(query, model).send().await.unwrap();
        assert_eq!(resp.status(), status, "{query} {model:?}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["internalCode"], code, "{v}");
        assert_eq!(v["errors"][0]["code"], code, "{v}");
        assert_eq!(v["description"], v["errors"][0]["message"], "{v}");
    }
    let ok = binding("?version=3", Some(MODEL_ALIAS))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["content-type"], "application/json");
    let v: Value = ok.json().await.unwrap();
    assert!(
        v["response"].is_string() && v.get("result").is_none(),
        "{v}"
    );
    let resp = client
        .get(node.url("/run?version=3"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "POST");
}
