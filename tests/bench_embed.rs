//! `edgerun-bench --embed DIR`: embedding throughput and latency, against llama-server's
//! embedding mode on the same model when given (`--llama-server PATH --embed-gguf FILE`, the
//! model converted by llama.cpp's `convert_hf_to_gguf.py`, f32 as the node runs it).
//!
//! * throughput: `TEXTS` texts of about 60 tokens each, sent as `CONCURRENT` concurrent
//!   `/v1/embeddings` requests of `TEXTS / CONCURRENT` inputs; texts per second over the whole
//!   set (median of the runs);
//! * latency: one text of about 60 tokens per request, one request at a time (median of four
//!   per run);
//! * both servers run side by side and are measured in turns, a round of each at a time;
//! * agreement: the cosine of the two servers' vectors for the same texts (both normalise);
//! * the chat model's single-stream decode with the embedder loaded beside it and idle, against
//!   a node without it, alternating (same binary, same run).

use super::{counting_prompt, median, spawn_llama_server_with, wait_healthy, Target};
use edgerun_e2e::{Node, TOKEN};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub const TEXTS: usize = 256;
pub const CONCURRENT: usize = 8;

/// A server speaking OpenAI's `/v1/embeddings`.
pub struct Server {
    pub name: String,
    pub url: String,
    pub token: Option<String>,
    pub model: String,
}

async fn embed(
    client: &reqwest::Client,
    server: &Server,
    input: &[String],
) -> (Vec<Vec<f64>>, u64) {
    let mut req = client
        .post(format!("{}/v1/embeddings", server.url))
        .json(&json!({"model": server.model, "input": input}));
    if let Some(t) = &server.token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("embedding request");
    assert_eq!(resp.status(), 200, "{}", server.name);
    let v: Value = resp.json().await.unwrap();
    let vectors = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    (vectors, v["usage"]["prompt_tokens"].as_u64().unwrap_or(0))
}

/// One timed pass: texts per second and the tokens per text, for `TEXTS` texts in
/// `CONCURRENT` requests.
async fn throughput(client: &reqwest::Client, server: &Server, all: &[String]) -> (f64, f64) {
    let per = TEXTS / CONCURRENT;
    let started = Instant::now();
    let answers =
        futures::future::join_all(all.chunks(per).map(|chunk| embed(client, server, chunk))).await;
    let rate = TEXTS as f64 / started.elapsed().as_secs_f64();
    let tokens = answers.iter().map(|a| a.1).sum::<u64>();
    (rate, tokens as f64 / TEXTS as f64)
}

/// Latencies (ms) of one-text requests, one at a time.
async fn latencies(client: &reqwest::Client, server: &Server, texts: &[String]) -> Vec<f64> {
    let mut times = Vec::new();
    for text in texts {
        let started = Instant::now();
        let _ = embed(client, server, std::slice::from_ref(text)).await;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

/// The whole `--embed` scenario; prints its tables.
pub async fn run(
    model_dir: &str,
    llama_server: Option<(String, String)>,
    threads: usize,
    runs: usize,
) {
    let flags = ["--model", model_dir];
    let model = std::path::Path::new(model_dir)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let node = Node::start(&flags).await;
    let mut servers = vec![Server {
        name: "edgerun".into(),
        url: node.base.clone(),
        token: Some(TOKEN.into()),
        model: model.clone(),
    }];
    let mut peer = None;
    if let Some((bin, gguf)) = &llama_server {
        let (child, url) = spawn_llama_server_with(
            bin,
            &[
                "-m",
                gguf,
                "--embeddings",
                "--pooling",
                "mean",
                "-t",
                &threads.to_string(),
                "-np",
                &CONCURRENT.to_string(),
                "-c",
                &(CONCURRENT * 512).to_string(),
                "-b",
                "4096",
                "-ub",
                "4096",
            ],
        );
        wait_healthy(&url).await;
        peer = Some(child);
        servers.push(Server {
            name: "llama-server".into(),
            url,
            token: None,
            model: "default".into(),
        });
    }
    // Both servers up (the idle one costs nothing), measured in turns: each round times one
    // throughput pass and four one-text requests of each, so drift of the machine reaches both.
    let client = reqwest::Client::new();
    let all = edgerun_testkit::embedding_bench_texts(TEXTS);
    let singles = edgerun_testkit::embedding_bench_texts(runs * 4);
    let (mut rates, mut times, mut tokens) = (
        vec![Vec::new(); servers.len()],
        vec![Vec::new(); servers.len()],
        vec![0.0; servers.len()],
    );
    for server in &servers {
        eprintln!("embed: warming up {}", server.name);
        let _ = embed(&client, server, &all[..TEXTS / CONCURRENT]).await;
    }
    for round in 0..runs {
        for (i, server) in servers.iter().enumerate() {
            let (rate, per_text) = throughput(&client, server, &all).await;
            rates[i].push(rate);
            tokens[i] = per_text;
            times[i].extend(latencies(&client, server, &singles[round * 4..round * 4 + 4]).await);
            eprintln!("embed: round {round}, {}: {rate:.1} texts/s", server.name);
        }
    }
    let rows: Vec<(String, f64, f64, f64)> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                s.name.clone(),
                median(rates[i].clone()),
                median(times[i].clone()),
                tokens[i],
            )
        })
        .collect();
    if servers.len() == 2 {
        let sample = edgerun_testkit::embedding_bench_texts(8);
        let (ours, _) = embed(&client, &servers[0], &sample).await;
        let (theirs, _) = embed(&client, &servers[1], &sample).await;
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| cosine(a, b))
            .fold(1.0f64, f64::min);
        println!(
            "agreement: worst cosine between the two servers' vectors over 8 texts: {worst:.6}"
        );
    }
    if let Some(mut child) = peer {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(node);
    println!(
        "\n| server | texts/s ({TEXTS} texts, {CONCURRENT} requests at once) | one text, ms | tokens per text |"
    );
    println!("|---|---:|---:|---:|");
    for (name, tps, lat, tokens) in &rows {
        println!("| {name} | {tps:.1} | {lat:.1} | {tokens:.0} |");
    }
    if rows.len() == 2 {
        println!(
            "| edgerun / llama-server | {:.2}x | {:.2}x | |",
            rows[0].1 / rows[1].1,
            rows[0].2 / rows[1].2
        );
    }
    decode_beside_an_idle_embedder(&flags, runs).await;
}

/// Single-stream decode of the chat model with and without the embedder loaded, alternating.
async fn decode_beside_an_idle_embedder(embed_flags: &[&str], runs: usize) {
    let client = reqwest::Client::new();
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..runs.max(3) {
        for (i, flags) in [&[][..], embed_flags].iter().enumerate() {
            let node = Node::start(flags).await;
            let target = Target::Edgerun {
                url: node.base.clone(),
                token: TOKEN.into(),
            };
            let count = counting_prompt();
            let _ = target.generate(&client, &count, 8).await;
            let o = target.generate(&client, &count, 128).await;
            let span = (o.last_token_at - o.first_token_at).as_secs_f64();
            rates[i].push(o.completion_tokens.saturating_sub(1) as f64 / span);
            eprintln!(
                "decode round {round}, embedder {}: {:.1} tok/s",
                i == 1,
                rates[i].last().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let (alone, beside) = (median(rates[0].clone()), median(rates[1].clone()));
    println!(
        "\n| chat node | single-stream decode, tok/s (median of {}) |",
        rates[0].len()
    );
    println!("|---|---:|");
    println!("| SmolLM2 alone | {alone:.1} |");
    println!(
        "| SmolLM2 + an idle all-MiniLM-L6-v2 | {beside:.1} ({:.2}x) |",
        beside / alone
    );
}
