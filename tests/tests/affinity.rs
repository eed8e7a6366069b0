//! Several nodes per region behind the Worker: 2 regions x 2 real nodes (each behind its own
//! Access stand-in), one Worker in workerd. A conversation's turns stay on one node, where its
//! prefix is cached; when that node dies the conversation moves to the other node of its
//! region, which serves it from scratch; requests without a session spread over the region.

use edgerun_e2e::edge::{
    AccessGate, EdgeWorker, ACCESS_CLIENT_ID, ACCESS_CLIENT_SECRET, CF_BLOB_HEADER,
};
use edgerun_e2e::{Node, MODEL_ALIAS, TOKEN};
use serde_json::{json, Value};
use std::collections::BTreeMap;

const CALLER_TOKEN: &str = "caller-token";

/// A node with the prefix cache on (paged KV storage on the CPU), behind its own gate.
struct Gated {
    gate: AccessGate,
    node: Option<Node>,
}

impl Gated {
    async fn start() -> Gated {
        let flags = [
            "--kv-storage",
            "paged",
            "--kv-cache-mib",
            "64",
            "--prefill-chunk",
            "32",
        ];
        let (gate, node) = AccessGate::with_node(&flags).await;
        Gated {
            gate,
            node: Some(node),
        }
    }
}

struct Answer {
    status: u16,
    region: String,
    node: String,
    body: Value,
}

async fn ask(
    worker: &EdgeWorker,
    continent: &str,
    session: Option<&str>,
    messages: &Value,
) -> Answer {
    let mut req = reqwest::Client::new()
        .post(worker.url(&format!("/run/{MODEL_ALIAS}")))
        .bearer_auth(CALLER_TOKEN)
        .header(
            CF_BLOB_HEADER,
            json!({ "continent": continent }).to_string(),
        )
        .body(json!({"messages": messages, "max_tokens": 6, "temperature": 0}).to_string());
    if let Some(s) = session {
        req = req.header("x-session-affinity", s);
    }
    let resp = req.send().await.unwrap();
    let h = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    assert!(
        resp.headers().get("x-edgerun-load").is_none(),
        "the nodes' load report stays with the Worker"
    );
    let (region, node) = (h("x-edgerun-region"), h("x-edgerun-node"));
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        region,
        node,
        body,
    }
}

fn cached(a: &Answer) -> u64 {
    a.body["result"]["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens in {}", a.body))
}

/// The conversation so far plus the next user turn.
fn turn(history: &mut Vec<Value>, i: usize) -> Value {
    history.push(json!({"role": "user", "content": format!("Question {i}: name one thing that floats in the sea, in a word.")}));
    Value::Array(history.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_stay_on_their_node_and_move_when_it_dies() {
    let (eu0, eu1, us0, us1) = tokio::join!(
        Gated::start(),
        Gated::start(),
        Gated::start(),
        Gated::start()
    );
    let mut eu = [eu0, eu1];
    let us = [us0, us1];
    let nodes = json!({
        "default": "eu",
        "regions": [
            {"name": "eu", "origins": [eu[0].gate.base, eu[1].gate.base], "continents": ["EU"]},
            {"name": "us", "origins": [us[0].gate.base, us[1].gate.base], "continents": ["NA"]},
        ]
    });
    let secrets = [
        ("API_TOKENS", CALLER_TOKEN.to_string()),
        ("NODE_TOKEN", TOKEN.to_string()),
        ("ACCESS_CLIENT_ID", ACCESS_CLIENT_ID.to_string()),
        ("ACCESS_CLIENT_SECRET", ACCESS_CLIENT_SECRET.to_string()),
    ];
    let worker = EdgeWorker::start(&secrets, &[("NODES", nodes.to_string())]).await;

    // Requests without a session spread over the region's nodes: 8 at once, 8 after another.
    let solo = json!([{"role": "user", "content": "Say hello."}]);
    let mut by_node: BTreeMap<String, usize> = BTreeMap::new();
    let at_once: Vec<_> = (0..8).map(|_| ask(&worker, "EU", None, &solo)).collect();
    for a in futures::future::join_all(at_once).await {
        assert_eq!((a.status, a.region.as_str()), (200, "eu"), "{}", a.body);
        *by_node.entry(a.node).or_default() += 1;
    }
    for (node, n) in &by_node {
        assert!(["eu/0", "eu/1"].contains(&node.as_str()), "{by_node:?}");
        assert!(
            *n >= 3,
            "8 concurrent requests, unevenly spread: {by_node:?}"
        );
    }
    assert_eq!(by_node.len(), 2, "{by_node:?}");
    let mut one_by_one: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..8 {
        let a = ask(&worker, "EU", None, &solo).await;
        assert_eq!(a.status, 200, "{}", a.body);
        *one_by_one.entry(a.node).or_default() += 1;
    }
    assert_eq!(one_by_one.len(), 2, "{one_by_one:?}: {}", worker.output());

    // One conversation, 20 turns: always the same node, which reuses its history.
    let session = "conversation-7f3a";
    let mut history = vec![
        json!({"role": "system", "content": "You are a terse assistant for sailors. Answer every question in one word, never more."}),
    ];
    let mut home = String::new();
    for i in 0..20 {
        let messages = turn(&mut history, i);
        let a = ask(&worker, "EU", Some(session), &messages).await;
        assert_eq!(
            (a.status, a.region.as_str()),
            (200, "eu"),
            "turn {i}: {}",
            a.body
        );
        if i == 0 {
            home = a.node.clone();
        }
        assert_eq!(a.node, home, "turn {i} left the session's node");
        if i >= 2 {
            assert!(cached(&a) > 0, "turn {i} reused nothing: {}", a.body);
        }
        let reply = a.body["result"]["response"].as_str().unwrap().to_string();
        history.push(json!({"role": "assistant", "content": reply}));
    }
    // The same session from America stays in America, on one node there.
    let mut us_home = None;
    for i in 0..3 {
        let a = ask(
            &worker,
            "NA",
            Some(session),
            &turn(&mut history.clone(), 100 + i),
        )
        .await;
        assert_eq!((a.status, a.region.as_str()), (200, "us"), "{}", a.body);
        assert_eq!(us_home.get_or_insert(a.node.clone()), &a.node);
    }

    // The session's node dies (its Tunnel stays up: the gate answers 502, as cloudflared does).
    let dead = if home == "eu/0" { 0 } else { 1 };
    let other = format!("eu/{}", 1 - dead);
    drop(eu[dead].node.take());
    let messages = turn(&mut history, 20);
    let first = ask(&worker, "EU", Some(session), &messages).await;
    if first.status != 200 {
        // The request that found the node dead is not sent again (it may have started there).
        assert_eq!(first.status, 502, "{}", first.body);
        assert_eq!(first.region, "eu");
    }
    let moved = if first.status == 200 {
        first
    } else {
        ask(&worker, "EU", Some(session), &messages).await
    };
    assert_eq!(
        (moved.status, moved.region.as_str()),
        (200, "eu"),
        "{}",
        moved.body
    );
    assert_eq!(moved.node, other);
    assert_eq!(cached(&moved), 0, "the new node starts cold");
    // And it serves the conversation correctly: what a node that never saw it answers.
    let reference: Value = reqwest::Client::new()
        .post(format!("{}/run/{MODEL_ALIAS}", us[1].gate.base))
        .bearer_auth(TOKEN)
        .header("cf-access-client-id", ACCESS_CLIENT_ID)
        .header("cf-access-client-secret", ACCESS_CLIENT_SECRET)
        .json(&json!({"messages": messages, "max_tokens": 6, "temperature": 0}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(reference["result"]["response"].is_string(), "{reference}");
    assert_eq!(
        moved.body["result"]["response"],
        reference["result"]["response"]
    );
    let reply = moved.body["result"]["response"]
        .as_str()
        .unwrap()
        .to_string();
    history.push(json!({"role": "assistant", "content": reply}));
    // The session's later turns stay on its new node, which now reuses the history.
    for i in 21..24 {
        let a = ask(&worker, "EU", Some(session), &turn(&mut history, i)).await;
        assert_eq!(
            (a.status, a.node.as_str()),
            (200, other.as_str()),
            "{}",
            a.body
        );
        assert!(cached(&a) > 0, "turn {i}: {}", a.body);
        let reply = a.body["result"]["response"].as_str().unwrap().to_string();
        history.push(json!({"role": "assistant", "content": reply}));
    }
    // Sessionless traffic avoids the dead node too.
    for _ in 0..4 {
        let a = ask(&worker, "EU", None, &solo).await;
        assert_eq!((a.status, a.node.as_str()), (200, other.as_str()));
    }
}
