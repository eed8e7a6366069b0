//! The reliability suite, short form (CI runs it; `scripts/soak.sh` is the long form): the real
//! binary and model under fuzzed bodies, random disconnects, overload, slowloris, stalled
//! readers, SIGTERM with long streams and auth probes. Each test asserts that nothing is lost
//! (every admitted request completes or ends with an error event or envelope), that the
//! engine's active and queued counts return to zero, and, where it loads the node, that its
//! resident memory afterwards is within 10% of before.

use edgerun_e2e::{read_sse, rss_bytes, Node, MODEL_ALIAS, TOKEN};
use edgerun_protocol::sse::SseEvent;
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A small deterministic generator (xorshift64*), so every run fuzzes the same bodies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Each test loads a node to its limits and measures its memory and timing, so they run one
/// at a time even under a plain `cargo test` (`scripts/test.sh` passes `--test-threads=1`):
/// two of them sharing 2 cores made each other's figures meaningless (a 3 s drain deadline met
/// tokens 600 ms apart while the overload test ran).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until the node has no active or queued sequence.
async fn settled(node: &Node) -> Value {
    node.wait_for_stat("active_sequences", 0, Duration::from_secs(30))
        .await;
    node.wait_for_stat("queued_requests", 0, Duration::from_secs(30))
        .await
}

/// The node's RSS once a first round of the same load has run (and settled), so that what
/// the allocator keeps for reuse counts as "before" and only growth beyond it as a leak.
async fn rss_after_warm_up(node: &Node) -> u64 {
    settled(node).await;
    rss_bytes(node.pid())
}

/// Asserts the node's RSS is back within 10% of `before`. The engine hands freed memory back
/// to the OS when it goes idle, just after it reports no active sequence: allow it a moment.
async fn assert_rss_within(node: &Node, before: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut after = rss_bytes(node.pid());
    while after as f64 / before as f64 > 1.10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = rss_bytes(node.pid());
    }
    let ratio = after as f64 / before as f64;
    println!("{what}: RSS {} MiB -> {} MiB", before >> 20, after >> 20);
    assert!(
        ratio <= 1.10,
        "{what}: RSS grew from {before} to {after} bytes ({ratio:.2}x)"
    );
}

/// An envelope error's code, asserting the envelope's shape.
fn envelope_code(body: &str) -> u64 {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert_eq!(v["success"], false, "{body}");
    assert!(v["messages"].is_array(), "{body}");
    v["errors"][0]["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("{body}"))
}

/// One fuzzed body: random bytes, broken JSON, or a valid request with one field mutated.
fn fuzzed_body(rng: &mut Rng) -> Vec<u8> {
    let values = [
        json!(null),
        json!(true),
        json!(-1),
        json!(0),
        json!(3),
        json!(1e308),
        json!(-1e308),
        json!(0.5),
        json!(u64::MAX),
        json!(""),
        json!("x"),
        json!("\u{0}\u{ffff}"),
        json!([]),
        json!([1, "a", null]),
        json!({}),
        json!({"role": "user", "content": 1}),
        json!([{"role": "nobody", "content": "hi"}]),
        json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]),
        json!({"type": "json_object"}),
        json!("a".repeat(3000)),
    ];
    let fields = [
        "prompt",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stream",
        "raw",
        "repetition_penalty",
        "frequency_penalty",
        "presence_penalty",
        "tools",
        "response_format",
        "lora",
        "options",
        "functions",
        "unknown",
    ];
    match rng.below(4) {
        0 => (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
        1 => {
            let valid = json!({"prompt": "Say hi.", "max_tokens": 2}).to_string();
            let cut = rng.below(valid.len());
            let mut bytes = valid.into_bytes();
            bytes.truncate(cut);
            if rng.below(2) == 0 {
                bytes.push(rng.next() as u8);
            }
            bytes
        }
        _ => {
            let mut body = if rng.below(2) == 0 {
                json!({"prompt": "Say hi.", "max_tokens": 2})
            } else {
                json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            };
            for _ in 0..1 + rng.below(3) {
                let field = *rng.pick(&fields);
                let value = rng.pick(&values).clone();
                body[field] = value;
            }
            // Whatever else changed, never ask for a long generation.
            if body["max_tokens"].as_u64().is_some_and(|n| n > 4) {
                body["max_tokens"] = json!(4);
            }
            body.to_string().into_bytes()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_bodies_all_get_an_answer_in_the_envelope() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let node = Node::start(&["--max-queue", "64", "--max-batch", "16"]).await;
    let mut rng = Rng(0x5eed_0001);
    let bodies: Vec<Vec<u8>> = (0..600).map(|_| fuzzed_body(&mut rng)).collect();
    let fire = |bodies: Vec<Vec<u8>>| {
        futures::stream::iter(bodies)
            .map(|body| {
                let req = node.post(body);
                async move {
                    let resp = req.send().await.expect("an HTTP answer");
                    let status = resp.status().as_u16();
                    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
                    (status, ct, resp.text().await.expect("a whole body"))
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<(u16, String, String)>>()
    };
    let mut results = fire(bodies[..200].to_vec()).await;
    // JSON mode builds the vocabulary's token trie on first use (a one-time cost that stays):
    // make sure the warm-up has used it, whatever the fuzzer drew.
    let json_mode = json!({"prompt": "Say hi.", "max_tokens": 16,
        "response_format": {"type": "json_object"}});
    let resp = node.post(json_mode.to_string()).send().await.unwrap();
    let status = resp.status().as_u16();
    assert!(
        status == 200 || status == 400,
        "{status}: {}",
        resp.text().await.unwrap()
    );
    let before = rss_after_warm_up(&node).await;
    results.extend(fire(bodies[200..].to_vec()).await);
    let mut by_status = std::collections::BTreeMap::new();
    for (status, ct, body) in &results {
        *by_status.entry(*status).or_insert(0) += 1;
        match status {
            200 if ct == "text/event-stream" => {
                assert!(body.ends_with("data: [DONE]\n\n"), "{body}")
            }
            200 => {
                assert_eq!(ct, "application/json");
                let v: Value = serde_json::from_str(body).unwrap();
                assert_eq!(v["success"], true, "{body}");
            }
            400 | 405 | 413 => {
                assert_eq!(ct, "application/json", "{status}: {body}");
                envelope_code(body);
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    println!("600 fuzzed bodies: {by_status:?}");
    assert!(by_status.get(&400).copied().unwrap_or(0) > 100);
    settled(&node).await;
    assert_rss_within(&node, before, "fuzzed bodies").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_disconnects_free_every_sequence() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let node = Node::start(&["--max-queue", "64"]).await;
    let cancelled_before = node.health().await["stats"]["requests_cancelled_total"]
        .as_u64()
        .unwrap();
    let mut rng = Rng(0x5eed_0002);
    let plans: Vec<(bool, u64)> = (0..320)
        .map(|_| (rng.below(2) == 0, rng.below(400) as u64))
        .collect();
    // The warm-up first fills the batch (16 sequences alive at once, each with its whole KV
    // cache), then runs the same 320 disconnects: how many sequences a disconnect round keeps
    // alive at once, and so the allocator's high-water mark, depends on timing, which differs
    // on a loaded machine (CI measured 179 -> 216 MiB after a 100-request warm-up; 16 caches of
    // this request are ~56 MiB). A leak grows with every request, so the measured round still
    // shows one.
    let full = json!({
        "prompt": "Tell me a long story about a lighthouse keeper.",
        "max_tokens": 64,
        "stream": true,
    })
    .to_string();
    futures::stream::iter(0..16)
        .map(|_| async {
            read_sse(
                node.post(full.clone()).send().await.unwrap(),
                Instant::now(),
            )
            .await
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    disconnect_round(&node, plans.clone()).await;
    let before = rss_after_warm_up(&node).await;
    disconnect_round(&node, plans).await;
    let h = settled(&node).await;
    let cancelled = h["stats"]["requests_cancelled_total"].as_u64().unwrap() - cancelled_before;
    println!("640 random disconnects: {cancelled} sequences cancelled by their clients");
    assert!(cancelled > 0);
    // The node still answers, exactly as before.
    let v = node
        .run_json(json!({"prompt": "Say hi.", "max_tokens": 4}).to_string())
        .await;
    assert_eq!(v["success"], true, "{v}");
    assert_rss_within(&node, before, "random disconnects").await;
}

/// Requests that their clients abandon after the given milliseconds (streaming or not).
async fn disconnect_round(node: &Node, plans: Vec<(bool, u64)>) {
    futures::stream::iter(plans)
        .map(|(stream, after_ms)| {
            let body = json!({
                "prompt": "Tell me a long story about a lighthouse keeper.",
                "max_tokens": 64,
                "stream": stream,
            });
            let req = node.post(body.to_string());
            async move {
                // Dropping the future mid-request or mid-body closes the connection.
                let _ = tokio::time::timeout(Duration::from_millis(after_ms), async move {
                    let resp = req.send().await?;
                    resp.bytes().await
                })
                .await;
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_at_ten_times_capacity_is_shed_cheaply_and_nothing_admitted_is_lost() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // Capacity 4 (2 running + 2 queued); 40 at once.
    let node = Node::start(&["--max-batch", "2", "--max-queue", "2"]).await;
    let long_prompt = "Tell me about lighthouses. ".repeat(600); // ~16 KiB, ~4,200 tokens
    let bodies: Vec<(bool, String)> = (0..40)
        .map(|i| {
            let prompt = if i % 2 == 0 {
                long_prompt.as_str()
            } else {
                "Say hi."
            };
            let body = json!({"prompt": prompt, "max_tokens": 8, "stream": i % 4 < 2});
            (i % 2 == 0, body.to_string())
        })
        .collect();
    let burst = |bodies: Vec<(bool, String)>| {
        futures::stream::iter(bodies)
            .map(|(long, body)| {
                let req = node.post(body);
                async move {
                    let start = Instant::now();
                    let resp = req.send().await.unwrap();
                    let status = resp.status().as_u16();
                    let not_started = resp.headers().contains_key("edgerun-not-started");
                    let latency = start.elapsed();
                    if status == 429 {
                        assert_eq!(resp.headers()["retry-after"], "1");
                    }
                    let text = resp.text().await.unwrap();
                    (long, status, latency, not_started, text)
                }
            })
            .buffer_unordered(40)
            .collect::<Vec<(bool, u16, Duration, bool, String)>>()
    };
    let mut results = burst(bodies.clone()).await;
    let before = rss_after_warm_up(&node).await;
    results.extend(burst(bodies).await);
    let mut ok = 0;
    let mut shed = Vec::new();
    for (long, status, latency, not_started, text) in &results {
        match status {
            200 => {
                ok += 1;
                if text.contains("data: ") {
                    assert!(text.ends_with("data: [DONE]\n\n"), "lost stream: {text}");
                } else {
                    assert_eq!(
                        serde_json::from_str::<Value>(text).unwrap()["success"],
                        true
                    );
                }
            }
            429 => {
                assert_eq!(envelope_code(text), 3040);
                assert!(not_started, "a 429 must say the request never started");
                shed.push((*long, *latency));
            }
            other => panic!("unexpected {other}: {text}"),
        }
    }
    let ms = |long: bool| -> Vec<u128> {
        let mut v: Vec<u128> = shed
            .iter()
            .filter(|(l, _)| *l == long)
            .map(|(_, d)| d.as_millis())
            .collect();
        v.sort_unstable();
        v
    };
    println!(
        "2 x 40 requests at capacity 4: {ok} answered, {} shed; 429 latency ms for 16 KiB prompts {:?}, short prompts {:?}",
        shed.len(),
        ms(true),
        ms(false)
    );
    assert!(ok >= 8, "{ok} answered");
    assert!(shed.len() >= 40, "{} shed", shed.len());
    settled(&node).await;
    assert_rss_within(&node, before, "overload").await;
}

/// Reads from `conn` until it is closed (EOF or reset); how long that took, or `None` if it
/// was still open after `limit`.
async fn closed_within(conn: &mut TcpStream, limit: Duration) -> Option<(Duration, Vec<u8>)> {
    let start = Instant::now();
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()?;
    Some((start.elapsed(), got))
}

fn status_and_body(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_slow_bodies_and_idle_connections_are_closed() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let node = Node::start(&[
        "--header-read-timeout-secs",
        "1",
        "--idle-timeout-secs",
        "2",
        "--body-timeout-secs",
        "3",
        "--max-connections",
        "64",
    ])
    .await;
    let addr = node.base.trim_start_matches("http://").to_string();
    let path = format!("/run/{MODEL_ALIAS}");

    // Slowloris: 30 connections sending a request head one byte every 200 ms.
    let head =
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nX-Pad: ");
    let trickles: Vec<_> = (0..30)
        .map(|_| {
            let addr = addr.clone();
            let head = head.clone();
            tokio::spawn(async move {
                let mut conn = TcpStream::connect(&addr).await.unwrap();
                let start = Instant::now();
                for b in head.bytes().chain(std::iter::repeat(b'a')) {
                    if conn.write_all(&[b]).await.is_err() {
                        return start.elapsed();
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if start.elapsed() > Duration::from_secs(20) {
                        panic!("a slowloris connection was still open after 20 s");
                    }
                }
                unreachable!()
            })
        })
        .collect();
    for t in trickles {
        let held = t.await.unwrap();
        assert!(held < Duration::from_secs(5), "held {held:?}");
    }

    // A body shorter than its Content-Length: 408 in the envelope within the body timeout.
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    conn.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Length: 100\r\n\r\n{{\"prompt\":"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (took, raw) = closed_within(&mut conn, Duration::from_secs(10))
        .await
        .expect("a short body was waited on forever");
    let (status, body) = status_and_body(&raw);
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(envelope_code(&body), 3007);
    assert!(took < Duration::from_secs(6), "{took:?}");

    // A chunked body that never ends: the same.
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    conn.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Transfer-Encoding: chunked\r\n\r\n2\r\n{{\"\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (_, raw) = closed_within(&mut conn, Duration::from_secs(10))
        .await
        .expect("an endless chunked body was waited on forever");
    assert_eq!(status_and_body(&raw).0, 408);

    // A malformed request head: hyper's own 400, in the envelope like every answer.
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let (_, raw) = closed_within(&mut conn, Duration::from_secs(5))
        .await
        .expect("a malformed request was not answered");
    let (status, body) = status_and_body(&raw);
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&raw));
    assert_eq!(envelope_code(&body), 5006);

    // An idle kept-alive connection is closed after the idle timeout.
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (took, raw) = closed_within(&mut conn, Duration::from_secs(10))
        .await
        .expect("an idle connection was kept forever");
    assert_eq!(status_and_body(&raw).0, 200);
    assert!(
        took >= Duration::from_millis(1500),
        "closed too early: {took:?}"
    );

    // The node still serves.
    let v = node
        .run_json(json!({"prompt": "Say hi.", "max_tokens": 4}).to_string())
        .await;
    assert_eq!(v["success"], true, "{v}");
    settled(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_get_503_in_the_envelope() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let node = Node::start(&["--max-connections", "4", "--header-read-timeout-secs", "30"]).await;
    let addr = node.base.trim_start_matches("http://").to_string();
    // Let the readiness poll's connection close first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (_, raw) = closed_within(&mut conn, Duration::from_secs(5))
        .await
        .expect("the refused connection was not closed");
    let text = String::from_utf8_lossy(&raw).to_lowercase();
    let (status, body) = status_and_body(&raw);
    assert_eq!(status, 503, "{text}");
    assert_eq!(envelope_code(&body), 3040);
    assert!(text.contains("edgerun-not-started: 1"), "{text}");
    assert!(text.contains("retry-after: 1"), "{text}");
    assert!(text.contains("cf-ai-req-id:"), "{text}");
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(node.health().await["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_is_dropped_and_its_slot_freed() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let node = Node::start(&["--stalled-stream-secs", "2"]).await;
    let addr: std::net::SocketAddr = node.base.trim_start_matches("http://").parse().unwrap();
    // A client with a tiny receive window that never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let mut conn = socket.connect(addr).await.unwrap();
    let body = json!({
        "prompt": "Count from 1 to 3000, separated by commas.",
        "max_tokens": 4000,
        "stream": true,
        "temperature": 0,
    })
    .to_string();
    conn.write_all(
        format!(
            "POST /run/{MODEL_ALIAS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    node.wait_for_stat("active_sequences", 1, Duration::from_secs(10))
        .await;
    // Meanwhile another client is served normally.
    let v = node
        .run_json(json!({"prompt": "Say hi.", "max_tokens": 4}).to_string())
        .await;
    assert_eq!(v["success"], true, "{v}");
    // The engine frees it: it drops the paused sequence about the stalled-stream time after
    // the buffers filled, counted as stalled. The connection's write-stall timeout does not
    // close the connection under it first (that would count a cancellation and cut the stream
    // without its error event; streams.rs checks what the client then reads).
    let h = node
        .wait_for_stat("active_sequences", 0, Duration::from_secs(90))
        .await;
    let stats = &h["stats"];
    assert_eq!(stats["sequences_stalled_total"], 1, "{h}");
    assert_eq!(stats["requests_cancelled_total"], 0, "{h}");
    let generated = stats["generated_tokens_total"].as_u64().unwrap();
    assert!(generated < 4000, "a stalled stream was computed to the end");
    // What the client gets if it reads now: never a clean end.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest)).await;
    let text = String::from_utf8_lossy(&rest);
    assert!(!text.contains("[DONE]"), "a stalled stream ended cleanly");
    settled(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_honestly_then_cuts_at_the_deadline_and_exits_non_zero() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut node = Node::start(&["--shutdown-timeout-secs", "3", "--max-batch", "4"]).await;
    let long = |stream: bool| {
        json!({
            "prompt": "Count from 1 to 3000, separated by commas.",
            "max_tokens": 4000,
            "stream": stream,
            "temperature": 0,
        })
        .to_string()
    };
    let start = Instant::now();
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let req = node.post(long(true));
            tokio::spawn(async move { read_sse(req.send().await.unwrap(), start).await })
        })
        .collect();
    let json_req = node.post(long(false));
    let json_answer = tokio::spawn(async move {
        let resp = json_req.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    });
    let short_req =
        node.post(json!({"prompt": "Say hi.", "max_tokens": 12, "stream": true}).to_string());
    node.wait_for_stat("active_sequences", 3, Duration::from_secs(10))
        .await;
    let short = tokio::spawn(async move { read_sse(short_req.send().await.unwrap(), start).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &node.pid().to_string()])
        .status()
        .unwrap()
        .success());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Draining: /health says so, new work gets 503 with the not-started mark, on new
    // connections and on kept-alive ones alike.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let resp = fresh.get(node.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "draining");
    for client in [&fresh, &node.client] {
        let resp = client
            .post(node.run_url())
            .bearer_auth(TOKEN)
            .body(json!({"prompt": "Say hi.", "max_tokens": 4}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["edgerun-not-started"], "1");
        assert_eq!(resp.headers()["connection"], "close");
        envelope_code(&resp.text().await.unwrap());
    }

    // What could finish, finished.
    let short = short.await.unwrap();
    assert!(
        matches!(short.last().unwrap().event, SseEvent::Done),
        "{short:?}"
    );
    // At the deadline the long ones end with an error, never silently.
    for s in streams {
        let events = s.await.unwrap();
        match &events.last().unwrap().event {
            SseEvent::Data(v) => {
                assert!(v["error"].is_string() || v["errors"].is_array(), "{v}");
            }
            other => panic!("a cut stream ended with {other:?}"),
        }
        assert!(events.len() > 5, "the stream never ran");
    }
    let (status, body) = json_answer.await.unwrap();
    assert_eq!(status, 503, "{body}");
    envelope_code(&body);
    let code = tokio::task::spawn_blocking(move || node.wait_exit(Duration::from_secs(15)))
        .await
        .unwrap();
    assert_eq!(code, Some(1), "cutting generations must exit non-zero");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_probes_over_every_route_and_method_never_generate() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let node = Node::start(&[]).await;
    let generated_before = node.health().await["stats"]["generated_tokens_total"]
        .as_u64()
        .unwrap();
    let paths = [
        format!("/run/{MODEL_ALIAS}"),
        format!("/client/v4/accounts/acc/ai/run/{MODEL_ALIAS}"),
        "/client/v4/accounts//ai/run/x".to_string(),
        "/run/".to_string(),
        "/health".to_string(),
        "/metrics".to_string(),
        "/".to_string(),
        "/v1/chat/completions".to_string(),
        "/does/not/exist".to_string(),
    ];
    let methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"];
    let tokens = [None, Some("wrong"), Some(""), Some(TOKEN)];
    let body = json!({"prompt": "Say hi.", "max_tokens": 4}).to_string();
    let mut probes = 0;
    for path in &paths {
        for method in methods {
            for token in tokens {
                let mut req = node
                    .client
                    .request(method.parse().unwrap(), node.url(path))
                    .body(body.clone());
                if let Some(t) = token {
                    req = req.header("authorization", format!("Bearer {t}"));
                }
                let resp = req.send().await.unwrap();
                probes += 1;
                let status = resp.status().as_u16();
                let ct = resp
                    .headers()
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_string());
                let text = resp.text().await.unwrap();
                let open = path == "/health" || path == "/metrics";
                let run = path.starts_with("/run/@") || path.contains("/ai/run/@");
                // OpenAI-compatible paths answer errors in OpenAI's shape.
                let openai = path.starts_with("/v1/");
                if run && method == "POST" && token == Some(TOKEN) {
                    assert_eq!(status, 200, "{method} {path}: {text}");
                    continue;
                }
                if open && (method == "GET" || method == "HEAD") {
                    assert_eq!(status, 200, "{method} {path}");
                    continue;
                }
                assert!(status >= 400, "{method} {path} {token:?}: {status}");
                if (run || openai) && token != Some(TOKEN) && method == "POST" {
                    assert_eq!(status, 401, "{method} {path} {token:?}");
                }
                if method != "HEAD" {
                    assert_eq!(ct.as_deref(), Some("application/json"), "{method} {path}");
                    if openai {
                        let v: Value = serde_json::from_str(&text).unwrap();
                        assert!(v["error"]["message"].is_string(), "{method} {path}: {text}");
                        assert!(v["error"]["type"].is_string(), "{method} {path}: {text}");
                    } else {
                        envelope_code(&text);
                    }
                }
            }
        }
    }
    // Only the right token's POSTs generated: 2 run routes x 4 tokens each at most (the
    // OpenAI route refuses this body: it names no model).
    let generated = node.health().await["stats"]["generated_tokens_total"]
        .as_u64()
        .unwrap()
        - generated_before;
    println!("{probes} auth probes; {generated} tokens generated (only by the 2 authorised POSTs)");
    assert!(generated <= 2 * 4, "{generated}");
    settled(&node).await;
}
