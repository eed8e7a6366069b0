//! `edgerun-bench`: drives a node over HTTP and prints prompt throughput, single-stream decode
//! speed, time to first token, and aggregate decode speed with 1, 4 and 8 concurrent streams.
//! With `--llama-server`, runs the same workload against llama.cpp's server in the same run and
//! prints the ratio. A benchmark, not a test: it asserts nothing and prints medians.
//!
//! ```text
//! edgerun-bench [--url http://127.0.0.1:8080 --token T | --spawn] [--llama-server PATH] [--runs 5]
//! edgerun-bench [--url .. | --spawn] --format-cost [--runs 5]   # free text vs a JSON schema
//! edgerun-bench --url .. --streams 1,8,32,64                        # other concurrency levels
//! edgerun-bench --url .. --sampled                 # llama.cpp's default sampling, not greedy
//! edgerun-bench --url .. --long 64:2000,8:7800     # long contexts: streams x prompt tokens each
//! edgerun-bench --spawn --chat [--llama-server PATH] # growing conversations: the prefix cache
//! edgerun-bench --embed DIR [--llama-server PATH --embed-gguf FILE]  # embeddings (bench_embed.rs)
//! ```
//!
//! `--chat` (`bench_chat.rs`) spawns a node with the prefix cache, then one without it, then
//! llama-server (`-np 8`, its default prompt caching), one at a time, and runs the same 8
//! conversations of 10 turns on each.
//!
//! `--long` adds points where attention shows: each of `streams` concurrent requests has a
//! prompt of its own of about `context` tokens and generates 64; it prints the first token's
//! time (median and slowest over the streams) and the aggregate decode rate. With `--only-long`
//! the usual figures are skipped.

use edgerun_e2e::{model_path, Node, MODEL_ALIAS, TOKEN};
use edgerun_protocol::sse::{SseEvent, SseParser};
use futures::StreamExt;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "bench_chat.rs"]
mod chat;
#[path = "bench_embed.rs"]
mod embed;

/// Whether requests sample (`--sampled`) rather than pick the argmax.
static SAMPLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

#[derive(Clone)]
enum Target {
    Edgerun { url: String, token: String },
    LlamaServer { url: String },
}

/// What one streamed generation looked like from the client.
struct Observed {
    ttft: Duration,
    first_token_at: Instant,
    last_token_at: Instant,
    completion_tokens: u64,
    prompt_tokens: u64,
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Edgerun { .. } => "edgerun",
            Target::LlamaServer { .. } => "llama-server",
        }
    }

    async fn generate(&self, client: &reqwest::Client, prompt: &str, max_tokens: u32) -> Observed {
        // Greedy unless --sampled: then llama.cpp's default sampling (temperature 0.8, top-k
        // 40, top-p 0.95), the same on both servers. (A top-k keeps the draw on the device even
        // for a random-weight model, whose flat distributions put nuclei of a top-p alone
        // beyond the device sampler's 256 candidates.)
        let (temperature, top_k, top_p) = match SAMPLED.get() {
            Some(true) => (0.8, 40, 0.95),
            _ => (0.0, 0, 1.0),
        };
        let req = match self {
            Target::Edgerun { url, token } => client
                .post(format!("{url}/run/{MODEL_ALIAS}"))
                .bearer_auth(token)
                .body(
                    json!({"prompt": prompt, "raw": true, "stream": true, "max_tokens": max_tokens,
                           "temperature": temperature, "top_k": top_k.max(1), "top_p": top_p})
                    .to_string(),
                ),
            Target::LlamaServer { url } => client.post(format!("{url}/completion")).body(
                json!({"prompt": prompt, "stream": true, "n_predict": max_tokens,
                       "temperature": temperature, "top_p": top_p, "top_k": top_k,
                       "cache_prompt": false, "ignore_eos": false})
                .to_string(),
            ),
        };
        let start = Instant::now();
        let resp = req.send().await.expect("request");
        assert!(
            resp.status().is_success(),
            "{}: {}",
            self.name(),
            resp.status()
        );
        let mut body = resp.bytes_stream();
        let mut parser = SseParser::new();
        let (mut first, mut last, mut events) = (None, None, 0u64);
        let (mut completion, mut prompt_tokens) = (None, 0);
        while let Some(chunk) = body.next().await {
            let now = Instant::now();
            for ev in parser.push(&chunk.expect("chunk")) {
                let SseEvent::Data(v) = ev else { continue };
                let is_token = match self {
                    Target::Edgerun { .. } => {
                        if let Some(u) = v.get("usage") {
                            completion = u["completion_tokens"].as_u64();
                            prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                            false
                        } else {
                            true
                        }
                    }
                    Target::LlamaServer { .. } => {
                        if v["stop"] == Value::Bool(true) {
                            completion = v["tokens_predicted"].as_u64();
                            prompt_tokens = v["tokens_evaluated"].as_u64().unwrap_or(0);
                            false
                        } else {
                            true
                        }
                    }
                };
                if is_token {
                    events += 1;
                    first.get_or_insert(now);
                    last = Some(now);
                }
            }
        }
        let first = first.expect("no token arrived");
        Observed {
            ttft: first - start,
            first_token_at: first,
            last_token_at: last.unwrap(),
            completion_tokens: completion.unwrap_or(events),
            prompt_tokens,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A raw prompt that makes the model keep going (counting), so decode runs are full length.
fn counting_prompt() -> String {
    (1..=8)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
        + ","
}

/// Tokens per second over concurrent generations, from the first token of any to the last of
/// any (each one's first token is its prompt's, not decode's).
fn aggregate_rate(all: &[Observed]) -> f64 {
    let start = all.iter().map(|o| o.first_token_at).min().unwrap();
    let end = all.iter().map(|o| o.last_token_at).max().unwrap();
    let tokens: u64 = all
        .iter()
        .map(|o| o.completion_tokens.saturating_sub(1))
        .sum();
    tokens as f64 / (end - start).as_secs_f64().max(1e-9)
}

/// Prompt text of about `tokens` tokens (17 per sentence with Llama-3's tokenizer: 600 asked
/// for gave 805 at 13), different for each `stream` so that no two requests share more than a
/// word.
fn long_prompt(stream: usize, tokens: usize) -> String {
    let mut text = format!("Stream {stream}. ");
    for i in 0..tokens.div_ceil(17) {
        text += &format!("Record {i} of stream {stream}: the harbour was calm and the tide low. ");
    }
    text
}

/// One `--long` point: `streams` concurrent requests of about `context` prompt tokens each.
struct LongPoint {
    streams: usize,
    context: usize,
    prompt_tokens: u64,
    ttft_median_ms: f64,
    ttft_max_ms: f64,
    decode_tps: f64,
}

async fn long_context(target: &Target, points: &[(usize, usize)]) -> Vec<LongPoint> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut out = Vec::new();
    for &(streams, context) in points {
        eprintln!("long context: {streams} streams x ~{context} tokens...");
        let futs = (0..streams).map(|i| {
            let prompt = long_prompt(i, context);
            let client = &client;
            async move { target.generate(client, &prompt, 64).await }
        });
        let all = futures::future::join_all(futs).await;
        let ttfts: Vec<f64> = all.iter().map(|o| o.ttft.as_secs_f64() * 1e3).collect();
        out.push(LongPoint {
            streams,
            context,
            prompt_tokens: all.iter().map(|o| o.prompt_tokens).max().unwrap_or(0),
            ttft_max_ms: ttfts.iter().cloned().fold(0.0, f64::max),
            ttft_median_ms: median(ttfts),
            decode_tps: aggregate_rate(&all),
        });
    }
    out
}

fn print_long(points: &[LongPoint]) {
    println!(
        "\n| long context | prompt tokens (each) | first token, median | first token, slowest | aggregate decode |"
    );
    println!("|---|---:|---:|---:|---:|");
    for p in points {
        println!(
            "| {} streams x ~{} | {} | {:.0} ms | {:.0} ms | {:.1} tok/s |",
            p.streams, p.context, p.prompt_tokens, p.ttft_median_ms, p.ttft_max_ms, p.decode_tps
        );
    }
}

struct Figures {
    prompt_tps: f64,
    prompt_tokens: u64,
    /// Time to first token of the long prompt (the prompt-processing requests).
    ttft_long_ms: f64,
    decode_tps: f64,
    ttft_30_ms: f64,
    ttft_30_tokens: u64,
    aggregate: Vec<(usize, f64)>,
}

async fn measure(target: &Target, runs: usize, stream_counts: &[usize]) -> Figures {
    // A fresh connection per request for both systems: llama-server closes idle keep-alive
    // connections, which a pooled client would trip over.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let long_prompt = "The history of the city is long and full of surprising turns. ".repeat(40);
    // About 30 prompt tokens.
    let short_prompt = "Write a short paragraph about the sea, the wind, the gulls and the old lighthouse keeper who lived alone on the rocky island far from the coast of Brittany";
    let count = counting_prompt();
    // Warm-up.
    target.generate(&client, &count, 8).await;

    // Every prompt-processing request begins with text of its own, so that no prefix cache
    // (edgerun's, llama-server's) serves any of it: these figures are for computing prompts.
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id();
    let fresh = |i: usize, text: &str| format!("Note {nonce:08x}-{i}. {text}");
    let mut prompt_tps = Vec::new();
    let mut prompt_tokens = 0;
    let mut ttft_long = Vec::new();
    for i in 0..runs {
        let o = target.generate(&client, &fresh(i, &long_prompt), 1).await;
        prompt_tokens = o.prompt_tokens;
        prompt_tps.push(o.prompt_tokens as f64 / o.ttft.as_secs_f64());
        ttft_long.push(o.ttft.as_secs_f64() * 1e3);
    }
    let mut ttft = Vec::new();
    let mut ttft_tokens = 0;
    for i in 0..runs {
        let o = target
            .generate(&client, &fresh(runs + i, short_prompt), 1)
            .await;
        ttft_tokens = o.prompt_tokens;
        ttft.push(o.ttft.as_secs_f64() * 1e3);
    }
    let mut decode = Vec::new();
    for _ in 0..runs {
        let o = target.generate(&client, &count, 128).await;
        let span = (o.last_token_at - o.first_token_at).as_secs_f64();
        decode.push((o.completion_tokens.saturating_sub(1)) as f64 / span);
    }
    let mut aggregate = Vec::new();
    for &streams in stream_counts {
        let mut rates = Vec::new();
        for _ in 0..runs {
            let futs = (0..streams).map(|_| target.generate(&client, &count, 96));
            let all = futures::future::join_all(futs).await;
            rates.push(aggregate_rate(&all));
        }
        aggregate.push((streams, median(rates)));
    }
    Figures {
        prompt_tps: median(prompt_tps),
        prompt_tokens,
        ttft_long_ms: median(ttft_long),
        decode_tps: median(decode),
        ttft_30_ms: median(ttft),
        ttft_30_tokens: ttft_tokens,
        aggregate,
    }
}

fn spawn_llama_server(bin: &str, threads: usize, context: usize) -> (Child, String) {
    spawn_llama_server_with(
        bin,
        &[
            "-m",
            &model_path().display().to_string(),
            "-t",
            &threads.to_string(),
            "-np",
            "8",
            "-c",
            &context.to_string(),
        ],
    )
}

/// llama-server on a free loopback port with `args` (model, threads, slots ...).
fn spawn_llama_server_with(bin: &str, args: &[&str]) -> (Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args(args)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--no-webui",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn llama-server");
    (child, format!("http://127.0.0.1:{port}"))
}

async fn wait_healthy(url: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = client.get(format!("{url}/health")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{url} never became healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One streamed `/v1/completions` request (`extra` fields added to the body).
async fn openai_stream(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    extra: &Value,
) -> Observed {
    let mut body = json!({"model": MODEL_ALIAS, "prompt": counting_prompt(), "stream": true,
                          "stream_options": {"include_usage": true}, "max_tokens": 128,
                          "temperature": 0});
    for (k, v) in extra.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    let start = Instant::now();
    let resp = client
        .post(format!("{url}/v1/completions"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("request");
    assert!(resp.status().is_success(), "{}", resp.status());
    let mut stream = resp.bytes_stream();
    let mut parser = SseParser::new();
    let (mut first, mut last, mut completion, mut prompt_tokens) = (None, None, 0, 0);
    while let Some(chunk) = stream.next().await {
        let now = Instant::now();
        for ev in parser.push(&chunk.expect("chunk")) {
            let SseEvent::Data(v) = ev else { continue };
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                completion = u["completion_tokens"].as_u64().unwrap_or(0);
                prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
            } else if v["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                first.get_or_insert(now);
                last = Some(now);
            }
        }
    }
    let first = first.expect("no token arrived");
    Observed {
        ttft: first - start,
        first_token_at: first,
        last_token_at: last.unwrap(),
        completion_tokens: completion,
        prompt_tokens,
    }
}

/// `--format-cost`: what a JSON schema costs per token. Single-stream decode speed and the
/// aggregate of 4 concurrent streams, free text against the same prompt constrained by a
/// schema (128 tokens each; the schema cannot end sooner).
async fn format_cost(url: &str, token: &str, runs: usize) {
    let client = reqwest::Client::new();
    let schema = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "numbers",
        "schema": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100000},
                   "minItems": 500}}}});
    let variants = [("free text", json!({})), ("JSON schema", schema)];
    // Warm up both paths (the first schema also builds the grammar engine's token trie).
    for (_, extra) in &variants {
        openai_stream(&client, url, token, extra).await;
    }
    println!("\n| decode | free text | JSON schema | ratio |\n|---|---:|---:|---:|");
    let mut rows: Vec<(String, Vec<f64>)> = vec![
        ("1 stream, tok/s".into(), vec![]),
        ("4 streams, tok/s".into(), vec![]),
    ];
    for (_, extra) in &variants {
        let mut single = Vec::new();
        let mut aggregate = Vec::new();
        for _ in 0..runs {
            let o = openai_stream(&client, url, token, extra).await;
            let secs = (o.last_token_at - o.first_token_at).as_secs_f64();
            single.push(o.completion_tokens.saturating_sub(1) as f64 / secs);
            let start = Instant::now();
            let all = futures::future::join_all(
                (0..4).map(|_| openai_stream(&client, url, token, extra)),
            )
            .await;
            let tokens: u64 = all.iter().map(|o| o.completion_tokens).sum();
            aggregate.push(tokens as f64 / start.elapsed().as_secs_f64());
        }
        rows[0].1.push(median(single));
        rows[1].1.push(median(aggregate));
    }
    for (name, v) in rows {
        println!(
            "| {name} | {:.1} | {:.1} | {:.2}x |",
            v[0],
            v[1],
            v[1] / v[0]
        );
    }
}

/// `--chat`: the same conversations on a node with the prefix cache, one without, and
/// llama-server when given, one at a time.
async fn chat_scenario(llama_server: Option<String>, threads: usize) {
    let mut results = Vec::new();
    for (name, flags) in [
        ("edgerun", &[][..]),
        ("edgerun, cache off", &["--no-prefix-cache"][..]),
    ] {
        let node = Node::start(flags).await;
        eprintln!("chat: {name}...");
        let server = chat::Server {
            name: name.into(),
            url: node.base.clone(),
            token: Some(TOKEN.into()),
            model: MODEL_ALIAS.into(),
        };
        results.push((name.to_string(), chat::run(&server).await));
        // Printed as each finishes, so that a later failure loses nothing.
        chat::print(&results[results.len() - 1..]);
    }
    if let Some(bin) = llama_server {
        // 8 slots of 4,096 positions: room for a conversation's 10 turns.
        let (mut child, url) = spawn_llama_server(&bin, threads, 8 * 4096);
        wait_healthy(&url).await;
        eprintln!("chat: llama-server...");
        let server = chat::Server {
            name: "llama-server".into(),
            url,
            token: None,
            model: "default".into(),
        };
        results.push(("llama-server".into(), chat::run(&server).await));
        chat::print(&results[results.len() - 1..]);
        let _ = child.kill();
        let _ = child.wait();
    }
    chat::print(&results);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let runs: usize = flag("--runs").map_or(5, |r| r.parse().unwrap());
    let stream_counts: Vec<usize> = flag("--streams").map_or(vec![1, 4, 8], |s| {
        s.split(',')
            .map(|n| n.trim().parse().expect("--streams: a list like 1,8,32,64"))
            .collect()
    });
    assert!(
        !stream_counts.is_empty() && !stream_counts.contains(&0),
        "--streams: counts of at least 1"
    );
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    SAMPLED.get_or_init(|| args.iter().any(|a| a == "--sampled"));

    if args.iter().any(|a| a == "--chat") {
        chat_scenario(flag("--llama-server"), threads).await;
        return;
    }
    if let Some(dir) = flag("--embed") {
        let peer = flag("--llama-server").map(|bin| {
            let gguf =
                flag("--embed-gguf").expect("--llama-server with --embed needs --embed-gguf");
            (bin, gguf)
        });
        embed::run(&dir, peer, threads, runs).await;
        return;
    }
    let mut node = None;
    let edgerun = if args.iter().any(|a| a == "--spawn") {
        let n = Node::start(&[]).await;
        let url = n.base.clone();
        node = Some(n);
        Target::Edgerun {
            url,
            token: TOKEN.into(),
        }
    } else {
        Target::Edgerun {
            url: flag("--url").unwrap_or_else(|| "http://127.0.0.1:8080".into()),
            token: flag("--token")
                .or_else(|| std::env::var("EDGERUN_API_TOKENS").ok())
                .unwrap_or_default(),
        }
    };
    let long_points: Vec<(usize, usize)> = flag("--long").map_or(vec![], |s| {
        s.split(',')
            .map(|p| {
                let (n, c) = p
                    .split_once(':')
                    .expect("--long: a list like 64:2000,8:7800 (streams:prompt tokens)");
                let n: usize = n.trim().parse().expect("--long: streams");
                let c: usize = c.trim().parse().expect("--long: prompt tokens");
                assert!(n >= 1 && c >= 1, "--long: streams and tokens of at least 1");
                (n, c)
            })
            .collect()
    });
    if args.iter().any(|a| a == "--only-long") {
        assert!(!long_points.is_empty(), "--only-long needs --long");
        print_long(&long_context(&edgerun, &long_points).await);
        drop(node);
        return;
    }
    if args.iter().any(|a| a == "--format-cost") {
        let Target::Edgerun { url, token } = &edgerun else {
            unreachable!()
        };
        eprintln!("measuring the cost of a JSON schema ({runs} runs per figure)...");
        format_cost(url, token, runs).await;
        drop(node);
        return;
    }
    let mut targets = vec![edgerun];
    let mut peer = None;
    if let Some(bin) = flag("--llama-server") {
        let (child, url) = spawn_llama_server(&bin, threads, 16384);
        wait_healthy(&url).await;
        peer = Some(child);
        targets.push(Target::LlamaServer { url });
    }

    let mut results = Vec::new();
    for t in &targets {
        eprintln!("measuring {} ({runs} runs per figure)...", t.name());
        // Measure one system at a time: each uses every core.
        results.push((t.name(), measure(t, runs, &stream_counts).await));
    }
    let long = if long_points.is_empty() {
        vec![]
    } else {
        long_context(&targets[0], &long_points).await
    };
    drop(node);
    if let Some(mut c) = peer {
        let _ = c.kill();
        let _ = c.wait();
    }

    let model = model_path();
    let model_name = model.file_name().map_or_else(
        || model.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    println!("\n{model_name}, {threads} threads, medians of {runs} runs\n");
    let mut header = "| metric |".to_string();
    let mut rule = "|---|".to_string();
    for (name, _) in &results {
        header += &format!(" {name} |");
        rule += "---:|";
    }
    if results.len() == 2 {
        header += " edgerun / llama-server |";
        rule += "---:|";
    }
    println!("{header}\n{rule}");
    let row = |label: String, f: &dyn Fn(&Figures) -> f64, fmt: &dyn Fn(f64) -> String| {
        let mut line = format!("| {label} |");
        for (_, fig) in &results {
            line += &format!(" {} |", fmt(f(fig)));
        }
        if results.len() == 2 {
            line += &format!(" {:.2}x |", f(&results[0].1) / f(&results[1].1));
        }
        println!("{line}");
    };
    let tps = |x: f64| format!("{x:.1} tok/s");
    row(
        format!("prompt processing ({} tokens)", results[0].1.prompt_tokens),
        &|f| f.prompt_tps,
        &tps,
    );
    row(
        format!(
            "time to first token ({}-token prompt)",
            results[0].1.prompt_tokens
        ),
        &|f| f.ttft_long_ms,
        &|x| format!("{x:.0} ms"),
    );
    row("decode, 1 stream".into(), &|f| f.decode_tps, &tps);
    row(
        format!(
            "time to first token ({}-token prompt)",
            results[0].1.ttft_30_tokens
        ),
        &|f| f.ttft_30_ms,
        &|x| format!("{x:.0} ms"),
    );
    for (i, streams) in stream_counts.iter().enumerate() {
        row(
            format!("aggregate decode, {streams} streams"),
            &move |f| f.aggregate[i].1,
            &tps,
        );
    }
    for (name, fig) in &results {
        let scaling: Vec<String> = fig
            .aggregate
            .iter()
            .skip(1)
            .map(|(n, tps)| {
                let (base_n, base) = fig.aggregate[0];
                format!("{n} streams = {:.2}x {base_n}", tps / base)
            })
            .collect();
        if !scaling.is_empty() {
            println!("\n{name}: {}", scaling.join(", "));
        }
    }
    if !long.is_empty() {
        print_long(&long);
    }
}
