//! The OpenAI-compatible routes end to end: the real binary, the real model, real HTTP, and
//! the official SDKs (Python `openai`, npm `openai`) driving it (`tests/sdk/`).

use edgerun_e2e::{
    ignoring_cached_tokens, read_sse, run_sdk_script, sdk_env, Node, Received, MODEL_ALIAS, TOKEN,
};
use edgerun_protocol::sse::SseEvent;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The two route families' chat completions URLs.
const CHAT_PATHS: [&str; 2] = [
    "/v1/chat/completions",
    "/client/v4/accounts/acct123/ai/v1/chat/completions",
];

/// A greedy chat request; `extra` fields are added to it.
fn chat(content: &str, max_tokens: u32, extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL_ALIAS,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// What SmolLM2 answers greedily to [`FRUITS`]: `1. Grapes\n2. Oranges\n3. Orbs` (checked
/// below, so a model change shows up here first). The first fruit is a near tie (" Gra" over
/// " Ban" by 0.015 logits): over contiguous KV caches, whose attention rounds differently, the
/// answer begins with Bananas.
const FRUITS: &str = "Name three fruits.";

async fn post(node: &Node, path: &str, body: &Value) -> reqwest::Response {
    node.post_json_to(path, body).await
}

/// POSTs and returns the status, the `content-type` and the JSON body.
async fn post_json(node: &Node, path: &str, body: &Value) -> (u16, String, Value) {
    let resp = post(node, path, body).await;
    let status = resp.status().as_u16();
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    (status, content_type, resp.json().await.unwrap())
}

/// POSTs a streamed request; its `data:` JSON events, and whether `[DONE]` ended it.
async fn post_stream(node: &Node, path: &str, body: &Value) -> (Vec<Value>, bool) {
    let resp = post(node, path, body).await;
    assert_eq!(resp.status(), 200, "{path} {body}");
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    data_events(read_sse(resp, Instant::now()).await)
}

fn data_events(events: Vec<Received>) -> (Vec<Value>, bool) {
    let mut data = Vec::new();
    let mut done = false;
    for r in events {
        match r.event {
            SseEvent::Data(v) => {
                assert!(!done, "data after [DONE]: {v}");
                data.push(v)
            }
            SseEvent::Done => done = true,
            SseEvent::Comment(_) => {}
        }
    }
    (data, done)
}

fn usage_is_consistent(u: &Value) {
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap(),
        "{u}"
    );
}

/// The OpenAI error shape, with its status, type and (part of its) message.
fn openai_error(v: &Value, kind: &str, needle: &str) {
    let e = &v["error"];
    let mut keys: Vec<&String> = e.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["code", "message", "param", "type"], "{v}");
    assert_eq!(e["type"], kind, "{v}");
    assert!(e["message"].as_str().unwrap().contains(needle), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_whole_and_streamed_on_both_route_families() {
    let node = Node::start(&[]).await;
    for path in CHAT_PATHS {
        let (status, content_type, v) = post_json(&node, path, &chat(FRUITS, 40, json!({}))).await;
        assert_eq!(
            (status, content_type.as_str()),
            (200, "application/json"),
            "{v}"
        );
        assert_eq!(v["object"], "chat.completion");
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
        assert_eq!(v["model"], MODEL_ALIAS);
        let choice = &v["choices"][0];
        assert_eq!(v["choices"].as_array().unwrap().len(), 1);
        assert_eq!(choice["index"], 0);
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["logprobs"], Value::Null);
        // Greedy SmolLM2 lists three fruits and ends its turn.
        let text = choice["message"]["content"].as_str().unwrap();
        assert_eq!(text, "1. Grapes\n2. Oranges\n3. Orbs", "{v}");
        assert_eq!(choice["finish_reason"], "stop");
        usage_is_consistent(&v["usage"]);

        // Streamed, with the usage chunk: role chunk, deltas, finish, usage, [DONE].
        let body = chat(
            FRUITS,
            40,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        );
        let (chunks, done) = post_stream(&node, path, &body).await;
        assert!(done, "{chunks:?}");
        let n = chunks.len();
        assert!(n >= 5, "{chunks:?}");
        for c in &chunks {
            assert_eq!(c["object"], "chat.completion.chunk");
            assert_eq!(c["id"], chunks[0]["id"]);
            assert_eq!(c["model"], MODEL_ALIAS);
        }
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let deltas = &chunks[1..n - 2];
        let streamed: String = deltas
            .iter()
            .map(|c| {
                assert_eq!(c["choices"][0]["finish_reason"], Value::Null, "{c}");
                assert_eq!(c["usage"], Value::Null, "{c}");
                c["choices"][0]["delta"]["content"].as_str().unwrap()
            })
            .collect();
        assert_eq!(streamed, text);
        assert!(deltas.len() >= 3, "not streamed token by token: {deltas:?}");
        let finish = &chunks[n - 2]["choices"][0];
        assert_eq!(finish["delta"], json!({}));
        assert_eq!(finish["finish_reason"], "stop");
        assert_eq!(chunks[n - 1]["choices"], json!([]));
        // The same usage, but that the repeated prompt came from the prefix cache.
        let usage = &chunks[n - 1]["usage"];
        assert_eq!(
            ignoring_cached_tokens(usage),
            ignoring_cached_tokens(&v["usage"])
        );
        assert!(
            usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap()
                > 0
        );

        // Without include_usage: no usage anywhere.
        let (chunks, done) =
            post_stream(&node, path, &chat(FRUITS, 40, json!({"stream": true}))).await;
        assert!(done);
        assert!(
            chunks.iter().all(|c| c.get("usage").is_none()),
            "{chunks:?}"
        );
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_ends_with_length_and_completions_continue_raw_text() {
    let node = Node::start(&[]).await;
    for (field, path) in [
        ("max_tokens", CHAT_PATHS[0]),
        ("max_completion_tokens", CHAT_PATHS[1]),
    ] {
        let mut body = chat(FRUITS, 0, json!({}));
        body.as_object_mut().unwrap().remove("max_tokens");
        body[field] = json!(3);
        let (status, _, v) = post_json(&node, path, &body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["choices"][0]["message"]["content"], "1. Gra");
        assert_eq!(v["usage"]["completion_tokens"], 3);
    }

    // Legacy completions: the prompt is continued as it is (no chat template).
    let body = json!({"model": MODEL_ALIAS, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0});
    let (status, _, v) = post_json(&node, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with(" Paris"), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 5, "raw text, no template: {v}");
    assert_eq!(v["usage"]["completion_tokens"], 6);
    usage_is_consistent(&v["usage"]);
    // OpenAI's default for completions is 16 tokens.
    let mut short = body.clone();
    short.as_object_mut().unwrap().remove("max_tokens");
    let (_, _, d) = post_json(&node, "/v1/completions", &short).await;
    assert_eq!(d["usage"]["completion_tokens"], 16, "{d}");

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (chunks, done) = post_stream(&node, "/v1/completions", &streamed).await;
    assert!(done);
    let n = chunks.len();
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let joined: String = chunks[..n - 1]
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(joined, text);
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "length");
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(chunks[n - 1]["usage"], v["usage"]);
}

/// Stop strings the model really produces at temperature 0: generation stops there, the stop
/// string is never sent (not even the part of it that arrived in an earlier token), and the
/// finish reason is `stop`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_the_answer_before_them() {
    let node = Node::start(&[]).await;
    // "Oranges" is the tokens " Or" + "anges": " " goes out, "Or" is held, then cut.
    // "s\n2" spans "pes", "\n" and "2": "pe" goes out, "s" and "s\n" are held, then cut.
    for (stop, expected, tokens) in [
        (json!("Oranges"), "1. Grapes\n2. ", 9),
        (json!(["zzz", "s\n2"]), "1. Grape", 6),
        (json!(["\n"]), "1. Grapes", 5),
    ] {
        for path in CHAT_PATHS {
            let body = chat(FRUITS, 40, json!({"stop": stop}));
            let (status, _, v) = post_json(&node, path, &body).await;
            assert_eq!(status, 200, "{v}");
            assert_eq!(v["choices"][0]["message"]["content"], expected, "{stop}");
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
            // The tokens of the stop string were generated (and counted), not shown.
            assert_eq!(v["usage"]["completion_tokens"], tokens, "{stop}: {v}");

            let mut body = body.clone();
            body["stream"] = json!(true);
            let (chunks, done) = post_stream(&node, path, &body).await;
            assert!(done);
            let deltas: Vec<&str> = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                .collect();
            assert_eq!(deltas.concat(), expected, "{stop}: {deltas:?}");
            assert_eq!(
                chunks.last().unwrap()["choices"][0]["finish_reason"],
                "stop"
            );
        }
    }
    // Legacy completions too.
    let body = json!({"model": MODEL_ALIAS, "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, "stop": "."});
    let (_, _, v) = post_json(&node, "/v1/completions", &body).await;
    assert_eq!(v["choices"][0]["text"], " Paris", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

fn check_chat_logprobs(content: &Value, top: usize) -> String {
    let mut text = String::new();
    for t in content.as_array().unwrap() {
        let lp = t["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0, "{t}");
        let bytes: Vec<u8> = t["bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            t["token"].as_str().unwrap()
        );
        text.push_str(t["token"].as_str().unwrap());
        let alternatives = t["top_logprobs"].as_array().unwrap();
        assert_eq!(alternatives.len(), top, "{t}");
        let values: Vec<f64> = alternatives
            .iter()
            .map(|a| a["logprob"].as_f64().unwrap())
            .collect();
        assert!(values.iter().all(|&v| v <= 0.0), "{t}");
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "not sorted: {t}");
        if top > 0 {
            // Greedy: the chosen token is the most likely one.
            assert_eq!(alternatives[0]["token"], t["token"], "{t}");
            assert_eq!(alternatives[0]["logprob"], t["logprob"], "{t}");
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_report_each_token_with_sorted_alternatives() {
    let node = Node::start(&[]).await;
    for top in [0usize, 5] {
        let body = chat(FRUITS, 12, json!({"logprobs": true, "top_logprobs": top}));
        let (status, _, v) = post_json(&node, CHAT_PATHS[0], &body).await;
        assert_eq!(status, 200, "{v}");
        let content = &v["choices"][0]["logprobs"]["content"];
        assert_eq!(content.as_array().unwrap().len(), 12, "{v}");
        assert_eq!(
            check_chat_logprobs(content, top),
            v["choices"][0]["message"]["content"].as_str().unwrap()
        );
        // Streamed: the same tokens, spread over the chunks.
        let mut body = body.clone();
        body["stream"] = json!(true);
        let (chunks, _) = post_stream(&node, CHAT_PATHS[1], &body).await;
        let streamed: Vec<Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
            .flatten()
            .cloned()
            .collect();
        assert_eq!(&Value::Array(streamed), content);
    }
    // Ended by the model: the end-of-turn token is neither shown nor reported.
    let body = chat(FRUITS, 40, json!({"logprobs": true}));
    let (_, _, v) = post_json(&node, CHAT_PATHS[0], &body).await;
    let content = &v["choices"][0]["logprobs"]["content"];
    assert_eq!(
        check_chat_logprobs(content, 0),
        "1. Grapes\n2. Oranges\n3. Orbs"
    );
    assert_eq!(
        content.as_array().unwrap().len() as u64 + 1,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );

    // Legacy completions: tokens, token_logprobs, top_logprobs, text_offset.
    let body = json!({"model": MODEL_ALIAS, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 3});
    let (_, _, v) = post_json(&node, "/v1/completions", &body).await;
    let lp = &v["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), v["choices"][0]["text"].as_str().unwrap());
    let mut offset = 0;
    for (i, token) in tokens.iter().enumerate() {
        assert_eq!(lp["text_offset"][i], offset);
        offset += token.len();
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(chosen <= 0.0);
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert_eq!(top.len(), 3, "{lp}");
        assert_eq!(top[*token].as_f64().unwrap(), chosen);
        assert!(top.values().all(|v| v.as_f64().unwrap() <= chosen));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_each_familys_shape_and_status() {
    let node = Node::start(&[]).await;
    let ok = chat("hi", 4, json!({}));
    let v1 = CHAT_PATHS[0];
    let cf = CHAT_PATHS[1];

    // Bad credentials: 401, OpenAI's shape on /v1, the v4 envelope on Workers AI's route.
    for (path, token) in [(v1, Some("wrong")), (v1, None), (cf, Some("wrong"))] {
        let mut req = node.client.post(node.url(path)).json(&ok);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401);
        let v: Value = resp.json().await.unwrap();
        if path == v1 {
            openai_error(&v, "authentication_error", "Authentication error");
            assert_eq!(v["error"]["code"], "invalid_api_key");
        } else {
            assert_eq!(v["errors"][0]["code"], 10000, "{v}");
        }
    }
    let resp = node
        .client
        .get(node.url("/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // Unknown model: OpenAI's 404 model_not_found; Workers AI's 400 / 5007.
    let mut unknown = ok.clone();
    unknown["model"] = json!("gpt-4o");
    let (status, content_type, v) = post_json(&node, v1, &unknown).await;
    assert_eq!((status, content_type.as_str()), (404, "application/json"));
    openai_error(&v, "not_found_error", "gpt-4o");
    assert_eq!(v["error"]["code"], "model_not_found");
    let (status, _, v) = post_json(
        &node,
        "/v1/completions",
        &json!({"model": "x", "prompt": "a"}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    let (status, _, v) = post_json(&node, cf, &unknown).await;
    assert_eq!(status, 400);
    assert_eq!(v["errors"][0]["code"], 5007, "{v}");
    // Every name the node answers to works.
    for name in ["SmolLM2-135M-Instruct.Q4_1", MODEL_ALIAS] {
        let mut named = ok.clone();
        named["model"] = json!(name);
        let (status, _, v) = post_json(&node, v1, &named).await;
        assert_eq!(status, 200, "{name}: {v}");
        assert_eq!(v["model"], name);
    }

    // What the node cannot do is refused with a 400 that says so, on both families.
    let unsupported = [
        (json!({"n": 2}), "'n' must be 1"),
        (json!({"stream": true, "n": 3}), "'n' must be 1"),
        (json!({"functions": [{"name": "f"}]}), "not supported"),
        (json!({"tool_choice": "required"}), "no 'tools'"),
        (json!({"logit_bias": {"42": 10}}), "not supported"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "n",
                   "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}}),
            "response_format",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "not supported",
        ),
        (
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "must be 'system', 'user', 'assistant' or 'tool'",
        ),
        (json!({"temperature": 2.5}), "'temperature'"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "at most 4"),
        (json!({"top_logprobs": 3}), "needs 'logprobs'"),
        (json!({"max_tokens": 0}), "'max_tokens'"),
        (
            json!({"stream_options": {"include_usage": true}}),
            "only allowed when 'stream' is true",
        ),
    ];
    for (extra, needle) in unsupported {
        let mut body = ok.clone();
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, _, v) = post_json(&node, v1, &body).await;
        assert_eq!(status, 400, "{extra}: {v}");
        openai_error(&v, "invalid_request_error", needle);
        let (status, _, v) = post_json(&node, cf, &body).await;
        assert_eq!(status, 400, "{extra}: {v}");
        assert_eq!(v["errors"][0]["code"], 5006, "{v}");
        assert!(v["errors"][0]["message"].as_str().unwrap().contains(needle));
    }
    // Not JSON at all.
    let resp = node
        .client
        .post(node.url(v1))
        .bearer_auth(TOKEN)
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    openai_error(&resp.json().await.unwrap(), "invalid_request_error", "JSON");
    // Text parts and a system message are fine; unknown top-level fields are ignored.
    let body = json!({"model": MODEL_ALIAS, "max_tokens": 2, "user": "u", "some_extension": 1,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}]});
    let (status, _, v) = post_json(&node, v1, &body).await;
    assert_eq!(status, 200, "{v}");

    // Wrong methods: 405 with Allow, in the family's shape.
    for (method, path, allow) in [
        (reqwest::Method::GET, v1, "POST"),
        (reqwest::Method::GET, "/v1/completions", "POST"),
        (reqwest::Method::POST, "/v1/models", "GET, HEAD"),
        (reqwest::Method::DELETE, cf, "POST"),
    ] {
        let resp = node
            .client
            .request(method.clone(), node.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "{method} {path}");
        assert_eq!(resp.headers()["allow"], allow);
        let v: Value = resp.json().await.unwrap();
        if path.starts_with("/v1/") {
            openai_error(&v, "invalid_request_error", "not supported");
        } else {
            assert_eq!(v["errors"][0]["code"], 7001);
        }
    }
    // Workers AI has no completions or models under /ai/v1 (reference §4): no route.
    for (method, path) in [
        (
            reqwest::Method::POST,
            "/client/v4/accounts/a/ai/v1/completions",
        ),
        (reqwest::Method::GET, "/client/v4/accounts/a/ai/v1/models"),
    ] {
        let resp = node
            .client
            .request(method, node.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], 7000, "{v}");
    }

    // The model list.
    let resp = node
        .client
        .get(node.url("/v1/models"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["object"], "model");
            assert_eq!(m["owned_by"], "edgerun");
            m["id"].as_str().unwrap()
        })
        .collect();
    assert_eq!(ids, ["SmolLM2-135M-Instruct.Q4_1", MODEL_ALIAS]);
}

/// A busy node answers `rejectIfBusy` with 429 and Retry-After in OpenAI's shape; a stream cut
/// by the drain deadline ends with an OpenAI error event, never silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_and_cut_streams_are_reported() {
    let node = Node::start(&["--max-batch", "1", "--shutdown-timeout-secs", "1"]).await;
    let long = json!({"model": MODEL_ALIAS, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 2000,
        "temperature": 0, "stream": true});
    let resp = post(&node, "/v1/completions", &long).await;
    assert_eq!(resp.status(), 200);
    let reader = tokio::spawn(read_sse(resp, Instant::now()));
    node.wait_for_stat("active_sequences", 1, Duration::from_secs(10))
        .await;
    let busy = chat("hi", 4, json!({"options": {"rejectIfBusy": true}}));
    let resp = post(&node, CHAT_PATHS[0], &busy).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    openai_error(&resp.json().await.unwrap(), "rate_limit_error", "Capacity");
    let resp = post(&node, CHAT_PATHS[1], &busy).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["edgerun-not-started"], "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], 3040);

    // SIGTERM: the 1 s drain deadline cuts the 2000-token stream.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (chunks, done) = data_events(reader.await.unwrap());
    assert!(!done, "a cut stream must not end with [DONE]");
    let last = chunks.last().unwrap();
    openai_error(last, "service_unavailable_error", "shut down");
    assert!(chunks.len() > 2, "{chunks:?}");
}

/// Runs an SDK client script against `node` through both base URLs; fails with its output.
async fn run_sdk_client(node: &Node, program: &str, script: &str) {
    let env = sdk_env();
    let get = |k: &str| {
        env.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("install-sdk-clients.sh printed no {k}"))
    };
    let program = if program == "python" {
        get("EDGERUN_SDK_PYTHON")
    } else {
        program.to_string()
    };
    for (family, base) in [
        ("v1", node.url("/v1")),
        ("workers-ai", node.url("/client/v4/accounts/acct123/ai/v1")),
    ] {
        let env = [
            ("NODE_PATH", get("EDGERUN_SDK_NODE_PATH")),
            ("EDGERUN_BASE_URL", base),
            ("EDGERUN_API_KEY", TOKEN.to_string()),
            ("EDGERUN_MODEL", MODEL_ALIAS.to_string()),
            ("EDGERUN_FAMILY", family.to_string()),
        ];
        run_sdk_script(&program, script, &env).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_works_through_both_base_urls() {
    let node = Node::start(&[]).await;
    run_sdk_client(&node, "python", "client.py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_node_sdk_works_through_both_base_urls() {
    let node = Node::start(&[]).await;
    run_sdk_client(&node, "node", "client.cjs").await;
}
