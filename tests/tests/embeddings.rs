//! Embeddings end to end: one node serving SmolLM2 (chat) and all-MiniLM-L6-v2 (embeddings,
//! under a Workers AI name) together; vectors through every route and the official SDKs held
//! to sentence-transformers' own (cosine ≥ 0.9999, `tests/data/minilm-reference.json`), the
//! errors in each route family's shape, the catalogue and `/health` listing both models, and the
//! chat model answering beside it.

use edgerun_e2e::{run_sdk_script, sdk_var, Node, MODEL_ALIAS, TOKEN};
use edgerun_testkit::{embedding_model_dir, embedding_reference_path};
use serde_json::{json, Value};

/// The Workers AI name the test embedder is served under.
pub const EMBEDDER: &str = "@cf/baai/bge-small-en-v1.5";

/// The flags that add the embedding model to a node.
pub fn embedder_flags() -> Vec<String> {
    vec![
        "--model".into(),
        format!("{EMBEDDER}={}", embedding_model_dir().display()),
    ]
}

async fn start() -> Node {
    let flags = embedder_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Node::start(&flags).await
}

/// The reference entries: `(text, tokens, truncated, vector)`.
fn reference() -> Vec<(String, u64, bool, Vec<f64>)> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(embedding_reference_path()).unwrap())
            .unwrap();
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["text"].as_str().unwrap().to_string(),
                e["tokens"].as_u64().unwrap(),
                e["truncated"].as_bool().unwrap(),
                e["embedding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect(),
            )
        })
        .collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

fn vectors(data: &Value) -> Vec<Vec<f64>> {
    data.as_array()
        .unwrap()
        .iter()
        .map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_ai_run_matches_sentence_transformers_beside_the_chat_model() {
    let node = start().await;
    let refs = reference();
    let path = format!("/run/{EMBEDDER}");
    // Every reference text, with truncation asked for (the long ones need it), in one request.
    let texts: Vec<&str> = refs.iter().map(|r| r.0.as_str()).collect();
    let resp = node
        .post_json_to(&path, &json!({"text": texts, "truncate_inputs": true}))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["result"]["shape"], json!([refs.len(), 384]));
    assert_eq!(v["result"]["pooling"], "mean");
    let got = vectors(&v["result"]["data"]);
    let mut worst = 1.0f64;
    for (r, g) in refs.iter().zip(&got) {
        let c = cosine(&r.3, g);
        worst = worst.min(c);
        assert!(c >= 0.9999, "{:?}: cosine {c}", r.0);
    }
    eprintln!("worst cosine through /run: {worst:.7}");
    // One string: one vector; the account path answers the same.
    let one = node
        .post_json_to(
            &format!("/client/v4/accounts/acct123/ai/run/{EMBEDDER}"),
            &json!({"text": refs[0].0}),
        )
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(one["result"]["shape"], json!([1, 384]));
    assert!(cosine(&vectors(&one["result"]["data"])[0], &refs[0].3) >= 0.9999);
    // CLS pooling on request: another vector, said so.
    let cls = node
        .post_json_to(&path, &json!({"text": refs[0].0, "pooling": "cls"}))
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(cls["result"]["pooling"], "cls");
    assert!(cosine(&vectors(&cls["result"]["data"])[0], &refs[0].3) < 0.999);
    // The chat model answers on the same node, the same as ever.
    let chat = node
        .run_json(r#"{"prompt":"Say hi","max_tokens":4,"temperature":0}"#)
        .await;
    assert_eq!(chat["success"], true, "{chat}");
    assert!(!chat["result"]["response"].as_str().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_embedding_requests_get_each_families_errors() {
    let node = start().await;
    let long = reference().into_iter().find(|r| r.2).unwrap().0;
    let path = format!("/run/{EMBEDDER}");
    for (body, needle) in [
        (json!({"text": long}), "at most 256"),
        (json!({"text": ""}), "'/text'"),
        (json!({"text": []}), "at least 1"),
        (json!({"prompt": "x"}), "'text'"),
        (json!({"text": "x", "pooling": "max"}), "'/pooling'"),
    ] {
        let resp = node.post_json_to(&path, &body).await;
        assert_eq!(resp.status(), 400, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["success"], false, "{v}");
        assert_eq!(v["errors"][0]["code"], 5006, "{v}");
        assert!(
            v["errors"][0]["message"].as_str().unwrap().contains(needle),
            "{body}: {v}"
        );
    }
    // OpenAI's shape under /v1: a too-long input, a dimension the model has not, the chat
    // model asked for embeddings, an unknown model.
    for (body, status, needle) in [
        (
            json!({"model": EMBEDDER, "input": long}),
            400,
            "at most 256",
        ),
        (
            json!({"model": EMBEDDER, "input": "x", "dimensions": 128}),
            400,
            "'dimensions'",
        ),
        (
            json!({"model": MODEL_ALIAS, "input": "x"}),
            400,
            "text-generation model",
        ),
        (json!({"model": "nope", "input": "x"}), 404, "nope"),
        (json!({"model": EMBEDDER, "input": [[]]}), 400, "input[0]"),
        // More tokens in one request than the node embeds per request (65,536 by default).
        (
            json!({"model": EMBEDDER, "input": vec![vec![7; 256]; 257], "truncate_inputs": true}),
            400,
            "at most 65536",
        ),
    ] {
        let resp = node.post_json_to("/v1/embeddings", &body).await;
        assert_eq!(resp.status(), status, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{body}: {v}"
        );
    }
    // Token ids are read as they are; the ids of "[CLS] hello [SEP]" embed like the text.
    let by_text: Value = node
        .post_json_to(
            "/v1/embeddings",
            &json!({"model": EMBEDDER, "input": "hello"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let by_ids: Value = node
        .post_json_to(
            "/v1/embeddings",
            &json!({"model": EMBEDDER, "input": [101, 7592, 102]}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(by_text["usage"]["prompt_tokens"], 3, "{by_text}");
    assert_eq!(
        by_text["data"][0]["embedding"],
        by_ids["data"][0]["embedding"]
    );
    // The chat route does not run the embedder, and the run route names it unknown no more.
    let resp = node
        .post_json_to(
            "/v1/chat/completions",
            &json!({"model": EMBEDDER, "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(resp.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_base64_is_the_float_vector_and_usage_counts_tokens() {
    let node = start().await;
    let refs = reference();
    let short: Vec<&(String, u64, bool, Vec<f64>)> = refs.iter().filter(|r| !r.2).take(8).collect();
    let texts: Vec<&str> = short.iter().map(|r| r.0.as_str()).collect();
    for path in [
        "/v1/embeddings",
        "/client/v4/accounts/acct123/ai/v1/embeddings",
    ] {
        let float: Value = node
            .post_json_to(path, &json!({"model": EMBEDDER, "input": texts}))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(float["object"], "list", "{float}");
        assert_eq!(float["model"], EMBEDDER);
        let tokens: u64 = short.iter().map(|r| r.1).sum();
        assert_eq!(float["usage"]["prompt_tokens"], tokens);
        assert_eq!(float["usage"]["total_tokens"], tokens);
        let b64: Value = node
            .post_json_to(
                path,
                &json!({"model": EMBEDDER, "input": texts, "encoding_format": "base64", "dimensions": 384}),
            )
            .await
            .json()
            .await
            .unwrap();
        for (i, r) in short.iter().enumerate() {
            let f: Vec<f64> = float["data"][i]["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert!(cosine(&f, &r.3) >= 0.9999, "{:?}", r.0);
            assert_eq!(float["data"][i]["index"], i);
            // The JSON numbers are each f32's shortest form: read back as f32, they are the
            // very numbers base64 carries.
            let bytes = decode_base64(b64["data"][i]["embedding"].as_str().unwrap());
            let decoded: Vec<f32> = bytes
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let f32s: Vec<f32> = f.iter().map(|&x| x as f32).collect();
            assert_eq!(decoded, f32s, "base64 and float disagree");
        }
    }
}

fn decode_base64(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|&c| c != b'=') {
        acc = (acc << 6) | ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalogue_health_metrics_and_the_binding_know_both_models() {
    let node = start().await;
    let models: Value = node.get_json("/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&MODEL_ALIAS) && ids.contains(&EMBEDDER),
        "{ids:?}"
    );
    let search: Value = node
        .get_json("/client/v4/accounts/a/ai/models/search?task=Text%20Embeddings")
        .await;
    let entries = search["result"].as_array().unwrap();
    assert!(!entries.is_empty(), "{search}");
    assert!(entries
        .iter()
        .all(|m| m["task"]["name"] == "Text Embeddings"));
    let bge = entries.iter().find(|m| m["name"] == EMBEDDER).unwrap();
    assert!(bge["properties"]
        .as_array()
        .unwrap()
        .contains(&json!({"property_id": "output_dimensions", "value": "384"})));
    let schema: Value = node
        .get_json(&format!(
            "/client/v4/accounts/a/ai/models/schema?model={EMBEDDER}"
        ))
        .await;
    assert_eq!(schema["result"]["input"]["required"], json!(["text"]));
    let health = node.health().await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["embeddings"][0]["dimensions"], 384, "{health}");
    assert!(health["models"]
        .as_array()
        .unwrap()
        .contains(&json!(EMBEDDER)));
    // The binding: env.AI.run(EMBEDDER, {text}) answers the output bare.
    let resp = node
        .client
        .post(node.url("/run?version=3"))
        .bearer_auth(TOKEN)
        .header("cf-consn-model-id", EMBEDDER)
        .json(&json!({"inputs": {"text": ["a", "b"]}, "options": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let bare: Value = resp.json().await.unwrap();
    assert_eq!(bare["shape"], json!([2, 384]), "{bare}");
    let metrics = node.metrics().await;
    assert!(
        metrics.contains(&format!(
            "edgerun_embedding_batches_total{{model=\"{}\"}}",
            embedding_model_dir().file_name().unwrap().to_string_lossy()
        )),
        "{metrics}"
    );
    assert!(metrics.contains("edgerun_embedding_inputs_total"));
}

/// Writes the SDK scripts' expectations: the first `n` short reference texts and vectors.
fn expectations(n: usize) -> tempfile_path::Path {
    let entries: Vec<Value> = reference()
        .into_iter()
        .filter(|r| !r.2)
        .take(n)
        .map(|r| json!({"text": r.0, "embedding": r.3}))
        .collect();
    tempfile_path::write(&serde_json::to_string(&entries).unwrap())
}

/// A file in the temp dir removed on drop.
mod tempfile_path {
    pub struct Path(pub std::path::PathBuf);
    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    pub fn write(text: &str) -> Path {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "edgerun-embed-expect-{}-{}.json",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&p, text).unwrap();
        Path(p)
    }
}

/// Runs `embeddings.py` / `embeddings.cjs` against `origin` with each SDK; `listing`: whether
/// the catalogue there lists the embedder.
pub async fn run_embedding_sdks(origin: &str, key: &str, listing: bool) {
    let expect = expectations(12);
    for (program, script, sdk) in [
        (sdk_var("EDGERUN_SDK_PYTHON"), "embeddings.py", "openai"),
        (
            sdk_var("EDGERUN_SDK_CF_PYTHON"),
            "embeddings.py",
            "cloudflare",
        ),
        ("node".to_string(), "embeddings.cjs", "openai"),
        ("node".to_string(), "embeddings.cjs", "cloudflare"),
    ] {
        let env = [
            ("NODE_PATH", sdk_var("EDGERUN_SDK_NODE_PATH")),
            ("EDGERUN_NODE", origin.to_string()),
            ("EDGERUN_API_KEY", key.to_string()),
            ("EDGERUN_MODEL", EMBEDDER.to_string()),
            ("EDGERUN_SDK", sdk.to_string()),
            ("EDGERUN_EXPECT", expect.0.display().to_string()),
            (
                "EDGERUN_CHECK_LISTING",
                if listing { "1" } else { "0" }.to_string(),
            ),
        ];
        run_sdk_script(&program, script, &env).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdks_embed_through_the_node() {
    let node = start().await;
    run_embedding_sdks(&node.base, TOKEN, true).await;
}

/// Through the Worker (wasm, in workerd): region `eu` serves the chat model only, region `us`
/// the chat model and the embedder (`NODES`' per-region `models`). A caller in Europe gets its
/// chat answers from `eu` and its embeddings from `us`, through every route and both SDKs; an
/// embedding body's errors come from the Worker itself, without reaching a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regions_serve_their_own_models_through_the_worker() {
    use edgerun_e2e::edge::{
        AccessGate, EdgeWorker, ACCESS_CLIENT_ID, ACCESS_CLIENT_SECRET, CF_BLOB_HEADER,
    };
    const CALLER: &str = "caller-token-embed";
    let flags = embedder_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let ((eu_gate, _eu), (us_gate, _us)) =
        tokio::join!(AccessGate::with_node(&[]), AccessGate::with_node(&flags));
    let nodes = json!({
        "default": "eu",
        "models": [MODEL_ALIAS],
        "regions": [
            {"name": "eu", "origin": eu_gate.base, "continents": ["EU"]},
            {"name": "us", "origin": us_gate.base, "continents": ["NA"],
             "models": [MODEL_ALIAS, EMBEDDER]},
        ]
    });
    let secrets = [
        ("API_TOKENS", CALLER.to_string()),
        ("NODE_TOKEN", TOKEN.to_string()),
        ("ACCESS_CLIENT_ID", ACCESS_CLIENT_ID.to_string()),
        ("ACCESS_CLIENT_SECRET", ACCESS_CLIENT_SECRET.to_string()),
    ];
    let worker = EdgeWorker::start(&secrets, &[("NODES", nodes.to_string())]).await;
    let client = reqwest::Client::new();
    let post = |path: &str, body: &Value| {
        client
            .post(worker.url(path))
            .bearer_auth(CALLER)
            .header(CF_BLOB_HEADER, json!({"continent": "EU"}).to_string())
            .body(body.to_string())
    };
    // Chat from Europe: eu.
    let resp = post(
        &format!("/run/{MODEL_ALIAS}"),
        &json!({"prompt": "Say hi", "max_tokens": 2}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-edgerun-region"], "eu");
    // Embeddings from Europe: us, the one region that serves the embedder.
    let refs = reference();
    let resp = post(
        &format!("/run/{EMBEDDER}"),
        &json!({"text": [refs[0].0, refs[1].0]}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-edgerun-region"], "us");
    let v: Value = resp.json().await.unwrap();
    let got = vectors(&v["result"]["data"]);
    assert!(cosine(&got[0], &refs[0].3) >= 0.9999 && cosine(&got[1], &refs[1].3) >= 0.9999);
    let resp = post(
        "/v1/embeddings",
        &json!({"model": EMBEDDER, "input": refs[2].0}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-edgerun-region"], "us");
    // A bad embedding body: the node's error, from the Worker, no node asked.
    let before = eu_gate.forwarded() + us_gate.forwarded();
    let resp = post(&format!("/run/{EMBEDDER}"), &json!({"text": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], 5006, "{v}");
    let resp = post("/v1/embeddings", &json!({"model": "unknown", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(eu_gate.forwarded() + us_gate.forwarded(), before);
    // The official SDKs, through the Worker (its listings go to the default region, eu, whose
    // node does not serve the embedder).
    run_embedding_sdks(&worker.base, CALLER, false).await;
}
