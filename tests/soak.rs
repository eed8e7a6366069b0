//! `edgerun-soak`: the long form of the reliability suite (`scripts/soak.sh`). Starts the real
//! binary on the real model and runs mixed traffic for a while: streaming and JSON requests,
//! short and long prompts, random disconnects, malformed bodies and `rejectIfBusy`. Every
//! minute it prints the node's RSS, open files, first-token latency (p50/p99, client side) and
//! the counts of each outcome; at the end it fails if memory grew more than 10% after the
//! first minute, a 5xx appeared, or a sequence was left running.
//!
//! Usage: `edgerun-soak [MINUTES] [CONCURRENCY]` (30 and 8 by default).

use edgerun_e2e::{rss_bytes, Node};
use futures::StreamExt;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Tally {
    outcomes: BTreeMap<String, u64>,
    ttft_ms: Vec<u64>,
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let minutes: u64 = args.get(1).map_or(30, |s| s.parse().expect("MINUTES"));
    let concurrency: usize = args.get(2).map_or(8, |s| s.parse().expect("CONCURRENCY"));
    let node = Arc::new(Node::start(&["--max-queue", "16", "--stalled-stream-secs", "5"]).await);
    let pid = node.pid();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let end = Instant::now() + Duration::from_secs(minutes * 60);
    println!("soak: {minutes} min, {concurrency} clients, node pid {pid}");
    println!(
        "{:>5} {:>8} {:>6} {:>9} {:>9} {:>7}  outcomes",
        "min", "RSS MiB", "files", "ttft p50", "ttft p99", "active"
    );

    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let node = node.clone();
            let tally = tally.clone();
            tokio::spawn(async move {
                let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (w as u64 + 1);
                let mut rand = move |n: u64| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed % n
                };
                while Instant::now() < end {
                    let outcome = one_request(&node, &mut rand, &tally).await;
                    *tally.lock().unwrap().outcomes.entry(outcome).or_default() += 1;
                }
            })
        })
        .collect();

    let mut first_rss = None;
    let mut peak_rss = 0;
    let mut minute = 0;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(60).min(end - Instant::now())).await;
        minute += 1;
        let rss = rss_bytes(pid);
        peak_rss = peak_rss.max(rss);
        if minute == 1 {
            first_rss = Some(rss);
        }
        let health = node.health().await;
        let mut t = tally.lock().unwrap();
        t.ttft_ms.sort_unstable();
        println!(
            "{minute:>5} {:>8} {:>6} {:>7}ms {:>7}ms {:>7}  {:?}",
            rss >> 20,
            open_files(pid),
            percentile(&t.ttft_ms, 0.5),
            percentile(&t.ttft_ms, 0.99),
            health["stats"]["active_sequences"],
            t.outcomes
        );
        t.ttft_ms.clear();
    }
    for w in workers {
        w.await.unwrap();
    }
    let h = node
        .wait_for_stat("active_sequences", 0, Duration::from_secs(30))
        .await;
    let t = tally.lock().unwrap();
    let errors: u64 = t
        .outcomes
        .iter()
        .filter(|(k, _)| k.starts_with('5'))
        .map(|(_, v)| v)
        .sum();
    let first = first_rss.unwrap_or(peak_rss);
    let last = rss_bytes(pid);
    println!(
        "done: RSS first minute {} MiB, end {} MiB, peak {} MiB; open files {}; 5xx {errors}; queued {}; outcomes {:?}",
        first >> 20,
        last >> 20,
        peak_rss >> 20,
        open_files(pid),
        h["stats"]["queued_requests"],
        t.outcomes
    );
    let grew = last as f64 / first as f64;
    if errors > 0 || grew > 1.10 || h["stats"]["queued_requests"] != 0 {
        eprintln!("soak FAILED (5xx {errors}, RSS x{grew:.2})");
        std::process::exit(1);
    }
}

/// One request of the mix; its outcome's name.
async fn one_request(
    node: &Node,
    rand: &mut impl FnMut(u64) -> u64,
    tally: &Mutex<Tally>,
) -> String {
    let kind = rand(100);
    if kind < 5 {
        let resp = node.post("{\"prompt\": 12").send().await;
        return match resp {
            Ok(r) => format!("{} bad body", r.status().as_u16()),
            Err(_) => "transport error".into(),
        };
    }
    let prompt = if rand(4) == 0 {
        "Tell me about lighthouses and the people who kept them. ".repeat(40)
    } else {
        "Write a short poem about the sea.".to_string()
    };
    let stream = rand(2) == 0;
    let body = json!({
        "prompt": prompt,
        "max_tokens": 16 + rand(96),
        "stream": stream,
        "temperature": 0.7,
        "options": {"rejectIfBusy": rand(10) == 0},
    });
    let disconnect_after = (kind < 25).then(|| Duration::from_millis(rand(1500)));
    let start = Instant::now();
    let run = async {
        let resp = node.post(body.to_string()).send().await?;
        let status = resp.status().as_u16();
        if status != 200 || !stream {
            let _ = resp.bytes().await?;
            return Ok::<_, reqwest::Error>(format!("{status}"));
        }
        let mut body = resp.bytes_stream();
        let mut first = true;
        let mut last = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            if first && chunk.starts_with(b"data: {\"response\"") {
                tally
                    .lock()
                    .unwrap()
                    .ttft_ms
                    .push(start.elapsed().as_millis() as u64);
                first = false;
            }
            last = chunk.to_vec();
        }
        Ok(if last.ends_with(b"data: [DONE]\n\n") {
            "200 stream".to_string()
        } else {
            "200 stream ended with an error".to_string()
        })
    };
    match disconnect_after {
        Some(after) => match tokio::time::timeout(after, run).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => "transport error".into(),
            Err(_) => "client disconnected".into(),
        },
        None => run.await.unwrap_or_else(|_| "transport error".into()),
    }
}
