//! End to end through the edge: clients → the Worker (wasm, in workerd) → an Access stand-in per
//! region → two real edgerun nodes on the real model, all on loopback.

use edgerun_e2e::edge::{
    chunks_with_times, AccessGate, EdgeWorker, ACCESS_CLIENT_ID, ACCESS_CLIENT_SECRET,
    CF_BLOB_HEADER,
};
use edgerun_e2e::{read_sse, text_of, Node, MODEL_ALIAS, TOKEN};
use edgerun_protocol::sse::SseEvent;
use edgerun_protocol::ApiError;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const CALLER_TOKEN: &str = "caller-token-2";

/// One region: its Access stand-in and its node (`None` once stopped).
struct Region {
    gate: AccessGate,
    node: Option<Node>,
}

impl Region {
    async fn start(extra: &[&str]) -> Region {
        let gate = AccessGate::start().await;
        let mut flags = gate.node_flags();
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let node = Node::start(&flags).await;
        gate.connect(&node.base);
        Region {
            gate,
            node: Some(node),
        }
    }

    /// A request to the node through its gate with everything the Worker adds.
    fn direct(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .request(method, format!("{}{path}", self.gate.base))
            .header("cf-access-client-id", ACCESS_CLIENT_ID)
            .header("cf-access-client-secret", ACCESS_CLIENT_SECRET)
            .bearer_auth(TOKEN)
    }
}

/// Two regions, `eu` (the default) and `us`, behind one Worker.
struct Deployment {
    worker: EdgeWorker,
    eu: Region,
    us: Region,
    client: reqwest::Client,
}

impl Deployment {
    async fn start() -> Deployment {
        Self::start_with(&[]).await
    }

    /// With extra `edgerun serve` flags for the eu node.
    async fn start_with(eu_flags: &[&str]) -> Deployment {
        let (eu, us) = tokio::join!(Region::start(eu_flags), Region::start(&[]));
        let worker = worker_for(&eu, &us, &[]).await;
        Deployment {
            worker,
            eu,
            us,
            client: reqwest::Client::new(),
        }
    }

    /// A run request to the Worker from a caller on `continent`.
    fn run(&self, continent: &str, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(self.worker.url(&format!("/run/{MODEL_ALIAS}")))
            .bearer_auth(CALLER_TOKEN)
            .header(CF_BLOB_HEADER, json!({"continent": continent}).to_string())
            .body(body.to_string())
    }

    fn forwarded(&self) -> usize {
        self.eu.gate.forwarded() + self.us.gate.forwarded()
    }
}

/// The Worker in front of `eu` and `us`, with every secret set except those in `without`.
async fn worker_for(eu: &Region, us: &Region, without: &[&str]) -> EdgeWorker {
    let nodes = json!({
        "default": "eu",
        "regions": [
            {"name": "eu", "origin": eu.gate.base, "continents": ["EU", "AF"]},
            {"name": "us", "origin": us.gate.base, "continents": ["NA", "SA"]},
        ]
    });
    let secrets: Vec<(&str, String)> = [
        ("API_TOKENS", format!("caller-token-1, {CALLER_TOKEN}")),
        ("NODE_TOKEN", TOKEN.to_string()),
        ("ACCESS_CLIENT_ID", ACCESS_CLIENT_ID.to_string()),
        ("ACCESS_CLIENT_SECRET", ACCESS_CLIENT_SECRET.to_string()),
    ]
    .into_iter()
    .filter(|(name, _)| !without.contains(name))
    .collect();
    // NODES as a JSON binding, as a `[vars.NODES]` table in wrangler.toml gives it.
    EdgeWorker::start(&secrets, &[("NODES", nodes.to_string())]).await
}

fn greedy(prompt: &str, max_tokens: u32, stream: bool) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream})
}

async fn json_of(req: reqwest::RequestBuilder) -> Value {
    req.send().await.unwrap().json().await.unwrap()
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_stream_through_the_worker_from_the_callers_region() {
    let d = Deployment::start().await;
    let poem = json!({"messages":[{"role":"user","content":"Write a short poem about rivers."}],
                      "stream": true, "max_tokens": 48, "temperature": 0});

    // Streaming, from Europe: the eu node answers, event by event.
    let start = Instant::now();
    let resp = d
        .run("EU", &poem)
        .header("cf-ai-req-id", "caller-chosen-id-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), "text/event-stream");
    assert_eq!(header(&resp, "x-edgerun-region"), "eu");
    assert_eq!(header(&resp, "cf-ai-req-id"), "caller-chosen-id-1");
    assert!(
        resp.headers().get("set-cookie").is_none(),
        "Access's CF_Authorization cookie must not reach the caller"
    );
    assert_eq!(
        d.eu.gate.last_request_id().as_deref(),
        Some("caller-chosen-id-1"),
        "the node gets the caller's request id"
    );
    let events = read_sse(resp, start).await;
    let n = events.len();
    assert!(matches!(events[n - 1].event, SseEvent::Done), "{events:?}");
    let tokens = &events[..n - 2];
    assert!(tokens.len() >= 10, "{events:?}");
    let (first, last) = (tokens[0].at, tokens[tokens.len() - 1].at);
    assert!(
        last > first + Duration::from_millis(100),
        "the first event ({first:?}) must reach the caller well before the last ({last:?})"
    );
    let via_eu = text_of(&events);

    // The same request from North America goes to the us node, over the REST route, and
    // arrives in many chunks (the Worker does not buffer or re-chunk).
    let start = Instant::now();
    let resp = d
        .client
        .post(
            d.worker
                .url("/client/v4/accounts/acc123/ai/run/@cf%2Fmeta%2Fllama-3-8b-instruct"),
        )
        .bearer_auth(CALLER_TOKEN)
        .header(
            CF_BLOB_HEADER,
            json!({"continent": "NA", "colo": "IAD"}).to_string(),
        )
        .body(poem.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-edgerun-region"), "us");
    let id = header(&resp, "cf-ai-req-id").to_string();
    assert_eq!(
        id.len(),
        36,
        "a fresh UUID when the caller sent no id: {id:?}"
    );
    assert_eq!(d.us.gate.last_request_id(), Some(id.clone()));
    let chunks = chunks_with_times(resp, start).await;
    assert!(chunks.len() >= 10, "streamed in {} chunks", chunks.len());

    // Greedy text is the same whichever region answered, and the same as the node's own answer.
    let france = greedy("The capital of France is", 12, false);
    let via_worker = json_of(d.run("EU", &france)).await;
    let direct = json_of(
        d.us.direct(reqwest::Method::POST, &format!("/run/{MODEL_ALIAS}"))
            .body(france.to_string()),
    )
    .await;
    assert_eq!(via_worker["success"], true, "{via_worker}");
    assert_eq!(via_worker, direct);
    assert!(!via_eu.is_empty());

    // Any other node route passes through, query string and all (here /health, from the
    // default region).
    let resp = d
        .client
        .get(d.worker.url("/health?probe=edge&x=%2F"))
        .bearer_auth(CALLER_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-edgerun-region"), "eu");
    assert!(resp.headers().get("set-cookie").is_none());
    let health: Value = resp.json().await.unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(
        d.eu.gate.last_uri().as_deref(),
        Some("/health?probe=edge&x=%2F")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_need_the_workers_token_and_nodes_need_the_workers_headers() {
    let d = Deployment::start().await;
    let body = greedy("Hello", 4, false);
    let before = d.forwarded();
    let unauthorized = ApiError::authentication().to_json();
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("caller-token-1"),
        Some(&*format!("Bearer {TOKEN}")),
    ] {
        let mut req = d
            .client
            .post(d.worker.url(&format!("/run/{MODEL_ALIAS}")))
            .body(body.to_string());
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        assert_eq!(header(&resp, "content-type"), "application/json");
        assert!(!header(&resp, "cf-ai-req-id").is_empty());
        assert_eq!(resp.text().await.unwrap(), unauthorized, "{auth:?}");
    }
    let resp = d.client.get(d.worker.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), 401, "pass-through routes need the token too");
    assert_eq!(
        d.forwarded(),
        before,
        "no unauthenticated request reached a region"
    );

    // The other token in API_TOKENS works.
    let resp = d
        .client
        .post(d.worker.url(&format!("/run/{MODEL_ALIAS}")))
        .bearer_auth("caller-token-1")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // A node refuses what lacks the Worker's headers. Without the Access service token the
    // request never passes Access; with it but without the node's token, the node says 401;
    // around Access (no JWT), the node says 403.
    let run_path = format!("/run/{MODEL_ALIAS}");
    let resp = reqwest::Client::new()
        .post(format!("{}{run_path}", d.eu.gate.base))
        .bearer_auth(TOKEN)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "Access without the service token");
    let resp = reqwest::Client::new()
        .post(format!("{}{run_path}", d.eu.gate.base))
        .header("cf-access-client-id", ACCESS_CLIENT_ID)
        .header("cf-access-client-secret", ACCESS_CLIENT_SECRET)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.text().await.unwrap(), unauthorized);
    let node = d.eu.node.as_ref().unwrap();
    let resp = node.post(body.to_string()).send().await.unwrap();
    assert_eq!(resp.status(), 403, "the node itself without an Access JWT");
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["errors"][0]["code"], 10000, "{err}");
    // ... and with everything, it answers.
    let resp =
        d.eu.direct(reqwest::Method::POST, &run_path)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        header(&resp, "set-cookie").starts_with("CF_Authorization="),
        "the Access stand-in sets its cookie (which the Worker must strip)"
    );

    // A Worker missing a node credential says so (500 naming the secret) instead of passing the
    // node's 401 off as the caller's fault; unauthenticated callers still only get 401.
    let broken = worker_for(&d.eu, &d.us, &["NODE_TOKEN"]).await;
    let before = d.forwarded();
    let resp = d
        .client
        .post(broken.url(&run_path))
        .bearer_auth(CALLER_TOKEN)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(
        err["errors"][0]["message"],
        "AiError: Internal error: the Worker is misconfigured: the secret NODE_TOKEN is not set"
    );
    let resp = d
        .client
        .post(broken.url(&run_path))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(d.forwarded(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_get_the_nodes_answer_from_the_worker_without_reaching_a_node() {
    let d = Deployment::start().await;
    let too_large = json!({"prompt": "x".repeat((1 << 20) + 1)}).to_string();
    let bodies: Vec<String> = vec![
        "not json".into(),
        "".into(),
        r#"{"prompt":"a","messages":[{"role":"user","content":"b"}]}"#.into(),
        r#"{"prompt":"hi","temperature":7}"#.into(),
        r#"{"prompt":"hi","max_tokens":0}"#.into(),
        r#"{"prompt":"hi","top_k":"many"}"#.into(),
        r#"{"messages":[{"role":"wizard","content":"hi"}]}"#.into(),
        r#"{"prompt":"hi","lora":"x"}"#.into(),
        "{}".into(),
        too_large,
    ];
    let run_path = format!("/run/{MODEL_ALIAS}");
    let worker_post = || {
        d.client
            .post(d.worker.url(&run_path))
            .bearer_auth(CALLER_TOKEN)
    };
    for body in &bodies {
        let status = edge_answers_like_the_node(
            &d,
            d.eu.direct(reqwest::Method::POST, &run_path)
                .body(body.clone()),
            worker_post().body(body.clone()),
            &format!("{body:.80}"),
        )
        .await;
        assert!(status.is_client_error(), "{status} for {body:.80}");
    }
    // An oversized body sent without content-length (chunked) is refused as it streams in.
    let chunked = || {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..17)
            .map(|i| {
                Ok(if i == 0 {
                    b"{\"prompt\":\"".to_vec()
                } else {
                    vec![b'y'; 64 * 1024]
                })
            })
            .collect();
        reqwest::Body::wrap_stream(futures::stream::iter(chunks))
    };
    let status = edge_answers_like_the_node(
        &d,
        d.eu.direct(reqwest::Method::POST, &run_path)
            .body(chunked()),
        worker_post().body(chunked()),
        "a chunked body over the limit",
    )
    .await;
    assert_eq!(status, 413);
    // The wrong method on a run route, too.
    let status = edge_answers_like_the_node(
        &d,
        d.eu.direct(reqwest::Method::GET, &run_path),
        d.client
            .get(d.worker.url(&run_path))
            .bearer_auth(CALLER_TOKEN),
        "GET on a run route",
    )
    .await;
    assert_eq!(status, 405);
}

/// Sends `direct` to a node (through its Access stand-in) and `edge` to the Worker: the Worker
/// must answer exactly as the node did — status, content type, body bytes — without passing the
/// request to any region. Returns the status.
async fn edge_answers_like_the_node(
    d: &Deployment,
    direct: reqwest::RequestBuilder,
    edge: reqwest::RequestBuilder,
    what: &str,
) -> reqwest::StatusCode {
    let node = direct.send().await.unwrap();
    let (node_status, node_body) = (node.status(), node.text().await.unwrap());
    let before = d.forwarded();
    let edge = edge.send().await.unwrap();
    assert_eq!(
        d.forwarded(),
        before,
        "the Worker asked a node about {what}"
    );
    assert!(edge.headers().get("x-edgerun-region").is_none(), "{what}");
    assert_eq!(edge.status(), node_status, "{what}");
    assert_eq!(header(&edge, "content-type"), "application/json", "{what}");
    assert_eq!(edge.text().await.unwrap(), node_body, "{what}");
    node_status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_over_to_the_next_region_and_get_503_when_none_is_left() {
    // The eu node serves one sequence at a time, so it can be made busy.
    let mut d = Deployment::start_with(&["--max-batch", "1", "--max-queue", "0"]).await;
    let body = greedy("Once upon a time", 8, false);
    let ok = |resp: &reqwest::Response| {
        (
            resp.status().as_u16(),
            header(resp, "x-edgerun-region").to_string(),
        )
    };

    let resp = d.run("EU", &body).send().await.unwrap();
    assert_eq!(ok(&resp), (200, "eu".into()));

    // Busy: while a long stream holds eu's only slot, eu answers 429/3040 and the Worker moves on.
    let counting = json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "raw": true, "stream": true,
                          "max_tokens": 2000, "temperature": 0});
    let long = d.run("EU", &counting).send().await.unwrap();
    assert_eq!(ok(&long), (200, "eu".into()));
    let eu_node = d.eu.node.as_ref().unwrap();
    eu_node
        .wait_for_stat("active_sequences", 1, Duration::from_secs(10))
        .await;
    let busy = json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0,
                      "options": {"rejectIfBusy": true}});
    let direct =
        d.eu.direct(reqwest::Method::POST, &format!("/run/{MODEL_ALIAS}"))
            .body(busy.to_string())
            .send()
            .await
            .unwrap();
    assert_eq!(direct.status(), 429, "the eu node itself is busy");
    let resp = d.run("EU", &busy).send().await.unwrap();
    assert_eq!(ok(&resp), (200, "us".into()));
    // The caller hanging up ends the generation on the node (through the Worker and Access):
    // 2000 tokens would take ~20 s; the slot must be free within a few.
    let hung_up = Instant::now();
    drop(long);
    eu_node
        .wait_for_stat("active_sequences", 0, Duration::from_secs(5))
        .await;
    eprintln!(
        "eu freed its sequence {:?} after the caller hung up",
        hung_up.elapsed()
    );

    // The eu node stops: its Access stand-in answers 502, and the Worker moves on to us.
    d.eu.node = None;
    let resp = d.run("EU", &body).send().await.unwrap();
    assert_eq!(ok(&resp), (200, "us".into()));
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer["success"], true);
    // Streaming fails over the same way (nothing was sent before the switch).
    let start = Instant::now();
    let resp = d
        .run("EU", &greedy("Once upon a time", 16, true))
        .send()
        .await
        .unwrap();
    assert_eq!(ok(&resp), (200, "us".into()));
    let events = read_sse(resp, start).await;
    assert!(matches!(events.last().unwrap().event, SseEvent::Done));

    // The whole eu region goes away (connection refused): still us.
    d.eu.gate.stop().await;
    let resp = d.run("EU", &body).send().await.unwrap();
    assert_eq!(ok(&resp), (200, "us".into()));

    // Both down: 503 in the envelope, naming each region.
    d.us.node = None;
    let resp = d.run("NA", &body).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(header(&resp, "retry-after"), "1");
    assert!(resp.headers().get("x-edgerun-region").is_none());
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["success"], false);
    assert_eq!(err["errors"][0]["code"], 3040);
    let message = err["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.starts_with("No edgerun node is available: us: answered 502; eu: unreachable"),
        "{message}"
    );
}

/// Not a test but a measurement: what the Worker (in workerd) adds to a stream, against the same
/// request sent straight to the Access stand-in. Prints medians; asserts nothing about speed.
/// `cargo test --release -p edgerun-e2e --test edge -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints figures"]
async fn edge_overhead_figures() {
    let d = Deployment::start().await;
    let body = greedy("Write a haiku about the sea.", 32, true);
    let run_path = format!("/run/{MODEL_ALIAS}");
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mut direct_first, mut direct_total, mut edge_first, mut edge_total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..11 {
        for via_worker in [false, true] {
            let req = if via_worker {
                d.run("EU", &body)
            } else {
                d.eu.direct(reqwest::Method::POST, &run_path)
                    .body(body.to_string())
            };
            let start = Instant::now();
            let events = read_sse(req.send().await.unwrap(), start).await;
            let first = events[0].at.as_secs_f64() * 1e3;
            let total = events[events.len() - 1].at.as_secs_f64() * 1e3;
            if via_worker {
                edge_first.push(first);
                edge_total.push(total);
            } else {
                direct_first.push(first);
                direct_total.push(total);
            }
        }
    }
    let (df, dt, ef, et) = (
        median(direct_first),
        median(direct_total),
        median(edge_first),
        median(edge_total),
    );
    println!(
        "first event: direct {df:.1} ms, through the Worker {ef:.1} ms (+{:.1} ms)",
        ef - df
    );
    println!(
        "whole stream (32 tokens): direct {dt:.1} ms, through the Worker {et:.1} ms (+{:.1} ms)",
        et - dt
    );
}
