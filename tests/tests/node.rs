//! End to end: the real binary, the real model, real HTTP.

use edgerun_e2e::{
    assert_refused_at_start_up, ignoring_cached_tokens, read_sse, text_of, Node, Refusal,
    MODEL_ALIAS, TOKEN,
};
use edgerun_protocol::sse::SseEvent;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn greedy(prompt: &str, max_tokens: u32, stream: bool) -> String {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream})
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_token_events_then_usage_then_done() {
    let node = Node::start(&[]).await;
    let start = Instant::now();
    let resp = node
        .post(json!({"messages":[{"role":"user","content":"Write a short poem about rivers."}],"stream":true,"max_tokens":48,"temperature":0}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    assert!(resp.headers().contains_key("cf-ai-req-id"));
    let events = read_sse(resp, start).await;

    let n = events.len();
    assert!(n >= 4, "{events:?}");
    assert!(
        matches!(events[n - 1].event, SseEvent::Done),
        "last event is [DONE]"
    );
    let usage = match &events[n - 2].event {
        SseEvent::Data(v) => {
            assert_eq!(v["response"], "");
            v["usage"].clone()
        }
        other => panic!("expected the usage event, got {other:?}"),
    };
    let tokens = &events[..n - 2];
    for t in tokens {
        match &t.event {
            SseEvent::Data(v) => {
                let obj = v.as_object().unwrap();
                assert_eq!(obj.len(), 1, "token events carry only `response`: {v}");
                assert!(!obj["response"].as_str().unwrap().is_empty());
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    let completion = usage["completion_tokens"].as_u64().unwrap();
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 5);
    assert!((1..=48).contains(&completion));
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
    // Incremental: the first token arrived well before the last one.
    assert!(tokens.len() >= 3, "{tokens:?}");
    let first = tokens[0].at;
    let last = tokens[tokens.len() - 1].at;
    assert!(
        first < last && (last - first) > Duration::from_millis(20),
        "tokens were not streamed incrementally: first {first:?}, last {last:?}"
    );
    // The stream text equals the non-streamed text for the same greedy request.
    let resp = node
        .post(json!({"messages":[{"role":"user","content":"Write a short poem about rivers."}],"max_tokens":48,"temperature":0}).to_string())
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body["result"]["response"].as_str().unwrap(),
        text_of(&events)
    );
    assert_eq!(
        ignoring_cached_tokens(&body["result"]["usage"]),
        ignoring_cached_tokens(&usage)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_envelope_and_greedy_determinism() {
    let node = Node::start(&[]).await;
    let mut texts = Vec::new();
    for path in [
        format!("/run/{MODEL_ALIAS}"),
        "/client/v4/accounts/acct123/ai/run/@cf%2Fmeta%2Fllama-3-8b-instruct".to_string(),
        // The model's own name works too.
        "/run/SmolLM2-135M-Instruct.Q4_1".to_string(),
    ] {
        let resp = node
            .client
            .post(node.url(&path))
            .bearer_auth(TOKEN)
            // No content-type, like the Workers AI docs' curl example.
            .body(greedy("Name three fruits.", 24, false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let raw = resp.text().await.unwrap();
        assert!(raw.starts_with("{\"result\":{\"response\":"), "{raw}");
        let v: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(v["success"], true);
        assert_eq!(v["errors"], json!([]));
        assert_eq!(v["messages"], json!([]));
        assert_eq!(v["result"]["tool_calls"], json!([]));
        let u = &v["result"]["usage"];
        assert_eq!(
            u["total_tokens"].as_u64().unwrap(),
            u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
        );
        assert!(u["completion_tokens"].as_u64().unwrap() <= 24);
        texts.push(v["result"]["response"].as_str().unwrap().to_string());
    }
    assert!(!texts[0].is_empty());
    assert!(
        texts.iter().all(|t| t == &texts[0]),
        "greedy runs differ: {texts:?}"
    );

    // Seeded sampling is reproducible over HTTP; a different seed changes the text.
    let seeded = |seed: u64| {
        json!({"prompt":"Invent a name for a cat.","max_tokens":16,"temperature":1.0,"seed":seed})
            .to_string()
    };
    let mut outs = Vec::new();
    for seed in [7, 7, 8] {
        let v: Value = node.run_json(seeded(seed)).await;
        outs.push(v["result"]["response"].as_str().unwrap().to_string());
    }
    assert_eq!(outs[0], outs[1]);
    assert_ne!(outs[0], outs[2], "the seed is ignored");
}

/// Every kind of bad input gets its error, while a stream on the same node carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_errors_and_a_concurrent_stream_is_undisturbed() {
    let node = Node::start(&["--max-body-bytes", "4096"]).await;
    let long = greedy("Tell me a long story about a lighthouse keeper.", 120, true);
    let expected = {
        let start = Instant::now();
        let resp = node.post(long.clone()).send().await.unwrap();
        text_of(&read_sse(resp, start).await)
    };

    let start = Instant::now();
    let stream = node.post(long.clone()).send().await.unwrap();
    assert_eq!(stream.status(), 200);
    let reader = tokio::spawn(read_sse(stream, start));

    let url = node.run_url();
    let c = &node.client;
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, u64, &str)> = vec![
        (
            "not json",
            c.post(&url).bearer_auth(TOKEN).body("{nope"),
            400,
            5006,
            "not valid JSON",
        ),
        (
            "both",
            c.post(&url)
                .bearer_auth(TOKEN)
                .body(r#"{"prompt":"a","messages":[{"role":"user","content":"b"}]}"#),
            400,
            5006,
            "mutually exclusive",
        ),
        (
            "neither",
            c.post(&url).bearer_auth(TOKEN).body(r#"{"stream":true}"#),
            400,
            5006,
            "prompt",
        ),
        (
            "temperature",
            c.post(&url)
                .bearer_auth(TOKEN)
                .body(r#"{"prompt":"a","temperature":7}"#),
            400,
            5006,
            "/temperature",
        ),
        (
            "top_k",
            c.post(&url)
                .bearer_auth(TOKEN)
                .body(r#"{"prompt":"a","top_k":0}"#),
            400,
            5006,
            "/top_k",
        ),
        (
            "max_tokens type",
            c.post(&url)
                .bearer_auth(TOKEN)
                .body(r#"{"prompt":"a","max_tokens":"many"}"#),
            400,
            5006,
            "/max_tokens",
        ),
        (
            "role",
            c.post(&url)
                .bearer_auth(TOKEN)
                .body(r#"{"messages":[{"role":"wizard","content":"x"}]}"#),
            400,
            5006,
            "/messages/0/role",
        ),
        (
            "empty prompt",
            c.post(&url).bearer_auth(TOKEN).body(r#"{"prompt":""}"#),
            400,
            5006,
            "/prompt",
        ),
        (
            "context",
            c.post(&url)
                .bearer_auth(TOKEN)
                .body(r#"{"prompt":"hello","max_tokens":9000}"#),
            400,
            5006,
            "context window",
        ),
        (
            "json mode without its schema",
            c.post(&url)
                .bearer_auth(TOKEN)
                .body(r#"{"prompt":"a","response_format":{"type":"json_schema"}}"#),
            400,
            5006,
            "response_format",
        ),
        (
            "too large",
            c.post(&url)
                .bearer_auth(TOKEN)
                .body(format!(r#"{{"prompt":"{}"}}"#, "x".repeat(10_000))),
            413,
            3006,
            "too large",
        ),
        (
            "unknown model",
            c.post(node.url("/run/@cf/meta/llama-9-instruct"))
                .bearer_auth(TOKEN)
                .body(r#"{"prompt":"a"}"#),
            400,
            5007,
            "No such model",
        ),
        (
            "wrong token",
            c.post(&url).bearer_auth("nope").body(r#"{"prompt":"a"}"#),
            401,
            10000,
            "Authentication error",
        ),
        (
            "no token",
            c.post(&url).body(r#"{"prompt":"a"}"#),
            401,
            10000,
            "Authentication error",
        ),
        (
            "get",
            c.get(&url).bearer_auth(TOKEN),
            405,
            7001,
            "not supported",
        ),
        (
            "no route",
            c.post(node.url("/v2/whatever"))
                .bearer_auth(TOKEN)
                .body("{}"),
            400,
            7000,
            "No route",
        ),
    ];
    for (name, req, status, code, needle) in cases {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{name}");
        assert_eq!(resp.headers()["content-type"], "application/json", "{name}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["success"], false, "{name}: {v}");
        assert_eq!(v["errors"][0]["code"].as_u64(), Some(code), "{name}: {v}");
        let msg = v["errors"][0]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{name}: {msg:?} lacks {needle:?}");
    }

    let events = reader.await.unwrap();
    assert!(matches!(events.last().unwrap().event, SseEvent::Done));
    assert_eq!(
        text_of(&events),
        expected,
        "the concurrent stream was disturbed"
    );
    let h = node.health().await;
    assert_eq!(h["stats"]["active_sequences"], 0);
}

/// A client that goes away mid-stream frees its sequence at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_mid_stream_frees_the_sequence() {
    let node = Node::start(&[]).await;
    // Decode speed with the node to itself, to compare with after the disconnect.
    let speed = || async {
        let start = Instant::now();
        let v: Value = node.run_json(greedy("Describe a forest.", 48, false)).await;
        v["result"]["usage"]["completion_tokens"].as_u64().unwrap() as f64
            / start.elapsed().as_secs_f64()
    };
    let speed_before = speed().await;
    // A raw continuation that goes on for a long time.
    let body = json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "raw": true, "stream": true, "max_tokens": 2000, "temperature": 0});
    let resp = node.post(body.to_string()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    use futures::StreamExt;
    let mut parser = edgerun_protocol::sse::SseParser::new();
    let mut events = 0;
    while events < 5 {
        let chunk = body.next().await.expect("stream ended early").unwrap();
        for ev in parser.push(&chunk) {
            assert!(matches!(ev, SseEvent::Data(_)), "{ev:?}");
            events += 1;
        }
    }
    assert_eq!(node.health().await["stats"]["active_sequences"], 1);
    drop(body);

    let h = node
        .wait_for_stat("active_sequences", 0, Duration::from_secs(5))
        .await;
    assert!(
        h["stats"]["requests_cancelled_total"].as_u64().unwrap() >= 1,
        "{h}"
    );
    // Nothing decodes in the background any more.
    let before = node.health().await["stats"]["generated_tokens_total"].clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        node.health().await["stats"]["generated_tokens_total"],
        before
    );
    // And the node serves the next request at full speed: nothing is left sharing its steps.
    // (Loose bound: this guards against a leaked sequence, not against a noisy machine.)
    let after = speed().await;
    assert!(
        after > 0.6 * speed_before,
        "slower after the disconnect: {after:.1} vs {speed_before:.1} tok/s"
    );
}

/// Queued requests get SSE keep-alive comments; a full node answers 429 with code 3040.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queueing_heartbeats_and_capacity() {
    let node = Node::start(&[
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--heartbeat-secs",
        "1",
    ])
    .await;
    let start = Instant::now();
    // A raw counting continuation: long enough that the second request waits well past its
    // first heartbeat, which comes FIRST_EVENT_GRACE (1 s, the headers' wait) plus one 1 s
    // interval after it is queued. 1000 tokens: ~5 s at the ~190 tok/s SmolLM2 decodes at on
    // 2 cores (300 tokens, ~1.6 s, stopped being enough once decode got faster).
    let counting = json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "raw": true, "stream": true, "max_tokens": 1000, "temperature": 0});
    let first = node.post(counting.to_string()).send().await.unwrap();
    let first = tokio::spawn(read_sse(first, start));
    // Wait until the first one is running.
    node.wait_for_stat("active_sequences", 1, Duration::from_secs(10))
        .await;
    let second = node
        .post(greedy("Say hello.", 4, true))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    let second = tokio::spawn(read_sse(second, start));
    node.wait_for_stat("queued_requests", 1, Duration::from_secs(10))
        .await;
    // Batch and queue are full: the third is refused, as is a rejectIfBusy request.
    for body in [
        greedy("x", 4, false),
        json!({"prompt":"x","options":{"rejectIfBusy":true}}).to_string(),
    ] {
        let resp = node.post(body).send().await.unwrap();
        assert_eq!(resp.status(), 429);
        assert!(resp.headers().contains_key("retry-after"));
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["errors"][0]["code"], 3040, "{v}");
    }
    let first = first.await.unwrap();
    let second = second.await.unwrap();
    assert!(matches!(first.last().unwrap().event, SseEvent::Done));
    assert!(matches!(second.last().unwrap().event, SseEvent::Done));
    // The waiting request saw at least one keep-alive comment before its first token.
    let first_data = second
        .iter()
        .position(|r| matches!(r.event, SseEvent::Data(_)))
        .unwrap();
    assert!(
        second[..first_data]
            .iter()
            .any(|r| matches!(r.event, SseEvent::Comment(_))),
        "no heartbeat while queued: {second:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_public_and_reports_readiness() {
    let node = Node::start(&[]).await;
    let resp = node.client.get(node.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["stats"]["ready"], true);
    assert!(v["models"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m == MODEL_ALIAS));
    // `edgerun health` (the container HEALTHCHECK) agrees, and fails where nothing listens.
    let addr = node.base.trim_start_matches("http://").to_string();
    let ok = std::process::Command::new(edgerun_e2e::binary())
        .args(["health", "--addr", &addr])
        .status()
        .unwrap();
    assert!(ok.success());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = std::process::Command::new(edgerun_e2e::binary())
        .args(["health", "--addr", &port.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!down.success());
}

/// SIGTERM drains: the stream in flight finishes with [DONE] and the process exits 0 (see
/// reliability.rs for what happens to new requests and at the deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_stream_in_flight_finish() {
    let mut node = Node::start(&["--shutdown-timeout-secs", "30"]).await;
    let start = Instant::now();
    let resp = node
        .post(greedy("Tell me about the moon.", 60, true))
        .send()
        .await
        .unwrap();
    let reader = tokio::spawn(read_sse(resp, start));
    // Wait for the sequence to start, then ask the node to stop.
    node.wait_for_stat("active_sequences", 1, Duration::from_secs(10))
        .await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let events = reader.await.unwrap();
    assert!(
        matches!(events.last().unwrap().event, SseEvent::Done),
        "stream cut by shutdown: {events:?}"
    );
    let code = tokio::task::spawn_blocking(move || node.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "node did not exit cleanly after draining");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_metrics_count_requests_and_tokens() {
    let node = Node::start(&[]).await;
    let v: Value = node.run_json(greedy("Say hi.", 8, false)).await;
    let completion = v["result"]["usage"]["completion_tokens"].as_u64().unwrap();
    let start = Instant::now();
    let resp = node.post(greedy("Say hi.", 8, true)).send().await.unwrap();
    read_sse(resp, start).await;
    let _ = node.post("{bad").send().await.unwrap();
    let resp = node.client.get(node.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let value = |needle: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("{needle} missing from:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        value("edgerun_requests_total{route=\"/run/{model}\",status=\"200\"} "),
        2.0
    );
    assert_eq!(
        value("edgerun_requests_total{route=\"/run/{model}\",status=\"400\"} "),
        1.0
    );
    assert_eq!(value("edgerun_time_to_first_token_seconds_count"), 2.0);
    assert_eq!(value("edgerun_active_sequences "), 0.0);
    assert_eq!(value("edgerun_ready "), 1.0);
    // Warm-up tokens count too.
    assert!(value("edgerun_generated_tokens_total ") >= 2.0 * completion as f64);
}

#[test]
fn bad_settings_are_refused_at_start_up_never_clamped() {
    let comments =
        std::env::temp_dir().join(format!("edgerun-comments-{}.tokens", std::process::id()));
    std::fs::write(&comments, "# no token here\n\n   \n").unwrap();
    let comments = comments.display().to_string();
    let cases: [Refusal; 12] = [
        (&["--max-batch", "0"], &[], "max_batch_size"),
        (&["--prefill-chunk", "0"], &[], "prefill_chunk"),
        (&["--max-step-tokens", "0"], &[], "max_step_tokens"),
        (&["--kv-cache-mib", "0"], &[], "kv_cache_budget"),
        (
            &["--kv-cache-mib", "18446744073709551615"],
            &[],
            "too large",
        ),
        (&["--heartbeat-secs", "0"], &[], "--heartbeat-secs"),
        (&["--context-window", "0"], &[], "--context-window"),
        // A token file of comments would leave the node open: refused.
        (&["--api-token-file", &comments], &[], "holds no token"),
        // The environment variable is held to the same rule as its flag.
        (&[], &[("EDGERUN_THREADS", "0")], "--threads"),
        (&["--kv-storage", "pages"], &[], "unknown KV storage"),
        (
            &["--gpu-memory-fraction", "0"],
            &[],
            "--gpu-memory-fraction",
        ),
        (
            &["--gpu-memory-fraction", "1.5"],
            &[],
            "--gpu-memory-fraction",
        ),
    ];
    assert_refused_at_start_up(&cases);
}

/// `--device cuda` on a build without CUDA is refused by the preflight: one line saying so,
/// exit status 2, before the model is looked for (the path given does not exist).
#[test]
fn cuda_on_a_cpu_build_is_refused_in_one_line_before_loading() {
    for args in [
        &[
            "serve",
            "--device",
            "cuda:0",
            "--model",
            "/nonexistent/model.gguf",
        ][..],
        &[
            "check-device",
            "/nonexistent/model.gguf",
            "--device",
            "cuda",
        ][..],
        &["preflight", "--device", "cuda:0"][..],
    ] {
        let out = std::process::Command::new(edgerun_e2e::binary())
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("edgerun: this binary was built without CUDA"),
            "{args:?}: {stderr}"
        );
    }
    // The CPU needs no preflight.
    let out = std::process::Command::new(edgerun_e2e::binary())
        .args(["preflight", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

/// A node on a paged KV pool (GPUs' storage, here on the CPU): concurrent requests decode in
/// one batch, a client that goes away mid-stream gives its blocks back, /metrics shows the
/// pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paged_pool_serves_concurrent_streams_and_gets_its_blocks_back() {
    let node = Node::start(&["--kv-storage", "paged", "--kv-cache-mib", "64"]).await;
    let stats = node.health().await["stats"].clone();
    let total = stats["kv_pool_total_blocks"].as_u64().unwrap();
    assert!(total > 0, "{stats}");
    assert_eq!(stats["kv_pool_free_blocks"], total);

    let prompts = [
        "Write a haiku about the sea.",
        "What is 17 times 3?",
        "Name three colours.",
        "Tell me about robots.",
    ];
    let answers =
        futures::future::join_all(prompts.iter().map(|p| node.run_json(greedy(p, 24, false))))
            .await;
    for (p, v) in prompts.iter().zip(&answers) {
        let text = v["result"]["response"].as_str().unwrap_or_default();
        assert!(!text.is_empty(), "{p}: {v}");
        assert!(v["result"]["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    }
    assert!(
        node.health().await["stats"]["peak_batch_size"]
            .as_u64()
            .unwrap()
            >= 2,
        "the requests never shared a step"
    );

    // A stream dropped after a few events: its blocks come back.
    let body = json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "raw": true, "stream": true, "max_tokens": 500, "temperature": 0});
    let resp = node.post(body.to_string()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    use futures::StreamExt;
    let mut parser = edgerun_protocol::sse::SseParser::new();
    let mut events = 0;
    while events < 3 {
        let chunk = stream.next().await.expect("stream ended early").unwrap();
        events += parser.push(&chunk).len();
    }
    let during = node.health().await["stats"]["kv_pool_free_blocks"]
        .as_u64()
        .unwrap();
    assert!(during < total, "a running stream holds no blocks");
    drop(stream);
    let h = node
        .wait_for_stat("active_sequences", 0, Duration::from_secs(5))
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.health().await["stats"]["kv_pool_free_blocks"] != total {
        assert!(Instant::now() < deadline, "blocks not given back: {h}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = node.metrics().await;
    assert!(
        text.lines()
            .any(|l| l == format!("edgerun_kv_pool_blocks {total}")),
        "{text}"
    );

    // Seeded sampling is sampled on the device (only ids come back) and picks what the host
    // sampler picks: a node told to sample on the host answers the same.
    let sampled = json!({"prompt": "Tell me about robots.", "max_tokens": 24, "temperature": 0.8,
                         "top_p": 0.9, "top_k": 40, "seed": 11, "repetition_penalty": 1.1});
    let on_device = node.run_json(sampled.to_string()).await;
    let stats = node.health().await["stats"].clone();
    assert!(
        stats["device_sampled_tokens_total"].as_u64().unwrap() >= 24,
        "{stats}"
    );
    let text = node.metrics().await;
    for name in [
        "edgerun_device_sampled_tokens_total",
        "edgerun_device_sampling_host_rows_total",
        "edgerun_steps_total",
        "edgerun_step_forward_seconds_total",
        "edgerun_step_host_seconds_total",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name}: {text}"
        );
    }
    let host = Node::start(&[
        "--kv-storage",
        "paged",
        "--kv-cache-mib",
        "64",
        "--host-sampling",
    ])
    .await;
    let on_host = host.run_json(sampled.to_string()).await;
    assert_eq!(
        ignoring_cached_tokens(&on_device["result"]),
        ignoring_cached_tokens(&on_host["result"])
    );
    let stats = host.health().await["stats"].clone();
    assert_eq!(stats["device_sampled_tokens_total"], 0, "{stats}");
}

/// The prefix cache end to end, as a chat client sees it: a conversation's second turn resends
/// the first, and the node computes only what is new. Usage says how much was cached, in
/// Workers AI's and OpenAI's shapes and in a stream's usage event, and the answer is the one a
/// node without the cache gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversations_next_turn_reuses_its_history() {
    // Prompts read 32 tokens at a time: on the CPU a hit reuses whole chunks.
    let paged = [
        "--kv-storage",
        "paged",
        "--kv-cache-mib",
        "64",
        "--prefill-chunk",
        "32",
    ];
    let node = Node::start(&paged).await;
    let cold = Node::start(&[&paged[..], &["--no-prefix-cache"]].concat()).await;
    let system = "You are a patient guide at a museum of maritime history. Answer in one short \
                  paragraph, plainly and without lists. Visitors are often children: keep your \
                  words simple and explain any word a child may not know. Never invent dates, \
                  names or numbers, and say so when you do not know.";
    let turn1 = json!([
        {"role": "system", "content": system},
        {"role": "user", "content": "What is a lighthouse for?"},
    ]);
    let mut turn2 = turn1.as_array().unwrap().clone();
    turn2.push(json!({"role": "assistant", "content": "It warns ships of rocks at night."}));
    turn2.push(json!({"role": "user", "content": "And who looked after one?"}));

    let cached = |usage: &Value| {
        usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    let run = |messages: &Value, stream: bool| {
        json!({"messages": messages, "max_tokens": 16, "temperature": 0, "stream": stream})
            .to_string()
    };
    let first = node.run_json(run(&turn1, false)).await;
    assert_eq!(cached(&first["result"]["usage"]), 0, "{first}");

    // Workers AI's route: the second turn's prompt begins with the first's.
    let second = node
        .run_json(run(&Value::Array(turn2.clone()), false))
        .await;
    let usage = &second["result"]["usage"];
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    assert!(cached(usage) >= 64 && cached(usage) < prompt, "{usage}");
    assert_eq!(cached(usage) % 32, 0, "{usage}");
    let reference = cold
        .run_json(run(&Value::Array(turn2.clone()), false))
        .await;
    assert_eq!(cached(&reference["result"]["usage"]), 0);
    assert_eq!(
        second["result"]["response"],
        reference["result"]["response"]
    );

    // Streamed: the usage event says the same.
    let resp = node
        .post(run(&Value::Array(turn2.clone()), true))
        .send()
        .await
        .unwrap();
    let events = read_sse(resp, Instant::now()).await;
    assert_eq!(
        text_of(&events),
        reference["result"]["response"].as_str().unwrap()
    );
    let streamed = events
        .iter()
        .find_map(|r| match &r.event {
            SseEvent::Data(v) => v.get("usage").cloned(),
            _ => None,
        })
        .expect("a usage event");
    assert!(cached(&streamed) >= 64, "{streamed}");

    // OpenAI's route reports it where the SDKs read it.
    let body = json!({"model": MODEL_ALIAS, "messages": turn2, "max_tokens": 16, "temperature": 0});
    let v: Value = node
        .post_json_to("/v1/chat/completions", &body)
        .await
        .json()
        .await
        .unwrap();
    assert!(cached(&v["usage"]) >= 64, "{v}");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        reference["result"]["response"]
    );

    let metrics = node.metrics().await;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name}: {metrics}"))
            .parse()
            .unwrap()
    };
    assert!(value("edgerun_prompt_tokens_cached_total") >= 3.0 * 64.0);
    assert!(value("edgerun_prefix_cache_blocks") > 0.0);
    assert!(value("edgerun_prompt_tokens_computed_total") > 0.0);
}
