//! Several text-generation models in one node, beside an embedding model: SmolLM2 as shipped
//! (llama, Q4_1, under the Workers AI alias), the same weights rewritten as a qwen2 GGUF by
//! `edgerun as-qwen2` (the Hugging Face row order, rotary embeddings over halves, zero q/k/v
//! biases: another architecture's code path computing the same function), and
//! all-MiniLM-L6-v2. Each request reaches the engine its model names (each model's own counters
//! say so), the qwen2 engine answers greedily as the llama one does, both run at once, each
//! gets the KV pool it was given, the node's figures are every model's together, and settings
//! that do not fit the models are refused at start.

use crate::embeddings::{embedder_flags, EMBEDDER};
use edgerun_e2e::{
    assert_refused_at_start_up, binary, model_path, workspace_root, Node, MODEL_ALIAS, TOKEN,
};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;

/// The second model's name (an alias given as `NAME=SPEC`).
const SECOND: &str = "smollm2-as-qwen2";

/// SmolLM2 as a qwen2 GGUF, made once per build tree.
fn second_model() -> PathBuf {
    let dir = workspace_root().join("target/e2e-models");
    let path = dir.join("SmolLM2-135M-Instruct.qwen2.gguf");
    if !path.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let partial = dir.join(format!("qwen2.{}.partial", std::process::id()));
        let out = Command::new(binary())
            .arg("as-qwen2")
            .arg(model_path())
            .arg(&partial)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "edgerun as-qwen2: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&partial, &path).unwrap();
    }
    path
}

async fn start(extra: &[&str]) -> Node {
    let second = format!("{SECOND}={}", second_model().display());
    let mut flags: Vec<String> = vec!["--model".into(), second];
    flags.extend(embedder_flags());
    flags.extend(extra.iter().map(|s| s.to_string()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Node::start(&flags).await
}

/// `edgerun_model_generated_tokens_total{model="<first name>"}` for each text-generation model.
async fn generated_by_model(node: &Node) -> Vec<(String, f64)> {
    node.metrics()
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("edgerun_model_generated_tokens_total{model=\""))
        .map(|rest| {
            let (model, value) = rest.split_once("\"} ").unwrap();
            (model.to_string(), value.parse().unwrap())
        })
        .collect()
}

async fn chat(node: &Node, model: &str, stream: bool) -> reqwest::Response {
    node.client
        .post(node.url("/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .json(
            &json!({"model": model, "temperature": 0, "max_tokens": 24, "stream": stream,
                      "messages": [{"role": "user", "content": "Name a colour."}]}),
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_model_answers_on_its_own_engine_beside_an_embedder() {
    let node = start(&["--kv-cache-mib", "64,32"]).await;

    // Every model listed; each text-generation model in /health with its window and figures.
    let listed: Vec<Value> = node.get_json("/v1/models").await["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    for name in [MODEL_ALIAS, SECOND, EMBEDDER] {
        assert!(listed.contains(&json!(name)), "{name} not in {listed:?}");
    }
    let health = node.health().await;
    let generation = health["generation"].as_array().unwrap().clone();
    assert_eq!(generation.len(), 2, "{health}");
    assert!(generation[1]["models"]
        .as_array()
        .unwrap()
        .contains(&json!(SECOND)));
    // The pools as given: 64 and 32 MiB of the same layout, so twice the blocks (give or take
    // the rounding down of each).
    let blocks = |i: usize| {
        generation[i]["stats"]["kv_pool_total_blocks"]
            .as_i64()
            .unwrap()
    };
    assert!(
        blocks(1) > 0 && (blocks(0) - 2 * blocks(1)).abs() <= 1,
        "{health}"
    );
    assert_eq!(
        health["stats"]["kv_pool_total_blocks"].as_i64().unwrap(),
        blocks(0) + blocks(1),
        "the node's figures are both models' together: {health}"
    );
    let names: Vec<String> = generated_by_model(&node)
        .await
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // Each model's answer is counted on its own engine only, and the qwen2 engine answers as
    // the llama one does (the same function; greedy).
    let mut answers = Vec::new();
    for (i, model) in [MODEL_ALIAS, SECOND].into_iter().enumerate() {
        let before = generated_by_model(&node).await;
        let resp = chat(&node, model, false).await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!text.trim().is_empty(), "{v}");
        let completion = v["usage"]["completion_tokens"].as_f64().unwrap();
        let after = generated_by_model(&node).await;
        assert_eq!(
            after[i].1 - before[i].1,
            completion,
            "{model}: {before:?} → {after:?}"
        );
        assert_eq!(
            after[1 - i].1,
            before[1 - i].1,
            "{model} counted on the other engine"
        );
        answers.push(text.to_string());
    }
    assert_eq!(
        answers[0], answers[1],
        "llama and its qwen2 rewrite answer differently"
    );
    // JSON mode and log-probabilities on the qwen2 model.
    let v: Value = node
        .post_json_to(
            "/v1/chat/completions",
            &json!({"model": SECOND, "temperature": 0, "max_tokens": 40, "logprobs": true,
                    "response_format": {"type": "json_object"},
                    "messages": [{"role": "user", "content": "Give me a JSON object with a name."}]}),
        )
        .await
        .json()
        .await
        .unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.trim_start().starts_with('{'), "{v}");
    let logprobs = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        logprobs.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        "{v}"
    );
    // Workers AI's route and an unknown name.
    let v = node
        .post_json_to(
            &format!("/run/{SECOND}"),
            &json!({"prompt": "Hello", "max_tokens": 8}),
        )
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(v["success"], true, "{v}");
    let resp = node
        .post_json_to("/run/@cf/nobody/none", &json!({"prompt": "Hello"}))
        .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["errors"][0]["code"], 5007, "{v}");

    // Both models stream at once, with an embedding request between: every one completes.
    let (embed_path, texts) = (
        format!("/run/{EMBEDDER}"),
        json!({"text": ["a cat", "a dog"]}),
    );
    let (a, b, e) = tokio::join!(
        chat(&node, MODEL_ALIAS, true),
        chat(&node, SECOND, true),
        node.post_json_to(&embed_path, &texts),
    );
    for resp in [a, b] {
        assert_eq!(resp.status(), 200);
        let body = resp.text().await.unwrap();
        assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    }
    let v: Value = e.json().await.unwrap();
    assert_eq!(v["result"]["shape"], json!([2, 384]), "{v}");
    let health = node.health().await;
    assert_eq!(health["stats"]["active_sequences"], 0, "{health}");
}

#[test]
fn settings_that_do_not_fit_the_models_are_refused_at_start() {
    let second = format!("{SECOND}={}", second_model().display());
    let tokenizer = workspace_root().join("Cargo.toml").display().to_string();
    assert_refused_at_start_up(&[
        (
            &["--model", &second, "--kv-cache-mib", "32,32,32"],
            &[],
            "--kv-cache-mib (EDGERUN_KV_CACHE_MIB) gives 3 sizes for 2",
        ),
        (
            &["--model", &second],
            &[("EDGERUN_KV_CACHE_MIB", "32,0")],
            "EDGERUN_KV_CACHE_MIB",
        ),
        (
            &["--model", &second, "--tokenizer", &tokenizer],
            &[],
            "--tokenizer (EDGERUN_TOKENIZER) is for a node with one text-generation model",
        ),
    ]);
}
