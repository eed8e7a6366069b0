//! `edgerun-bench --chat`: conversations that grow, the prefix cache's workload.
//!
//! `CONVERSATIONS` conversations run at once, each `TURNS` turns one after another: every turn
//! sends the whole history (a system prompt all conversations share, then the user's questions
//! and the model's own answers so far) plus a new question of about 60 tokens, streams an answer
//! of at most `ANSWER_TOKENS` tokens (greedy), and appends it. The history grows by about 260
//! tokens a turn, to about 2,800 by the tenth. Both servers get the same requests through
//! OpenAI's `/v1/chat/completions` with the model's own chat template, and report prompt and
//! cached tokens in the same usage fields (`prompt_tokens_details.cached_tokens`).
//!
//! Per turn it prints the median time to first token over the conversations and the share of
//! prompt tokens that came from a cache.

use super::median;
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub const CONVERSATIONS: usize = 8;
pub const TURNS: usize = 10;
pub const ANSWER_TOKENS: u32 = 200;

/// A server speaking OpenAI's chat route.
pub struct Server {
    pub name: String,
    pub url: String,
    pub token: Option<String>,
    /// The `model` field to send.
    pub model: String,
}

/// One turn as the client saw it.
#[derive(Debug, Clone, Copy)]
pub struct Turn {
    pub ttft: Duration,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub answer_tokens: u64,
}

const SYSTEM: &str =
    "You are the assistant of a harbour master's office. You answer questions from \
    sailors, fishermen and visitors about the harbour, the tides, the weather, moorings, fuel, \
    repairs and the history of the port. Answer in full sentences, plainly and helpfully, and \
    give practical details where you can. If a question is unclear, say what you would need to \
    know. Never invent prices, names or dates you do not know.";

/// Parts the questions are assembled from, so that every conversation and turn asks something
/// of its own (different tokens, so nothing is shared across conversations but the system
/// prompt).
const TOPICS: [&str; 8] = [
    "the mooring fees for a twelve metre sailing boat",
    "where to buy diesel late in the evening",
    "how strong the current is at the harbour entrance",
    "whether the slipway can take a heavy trailer",
    "which pontoon is reserved for visiting yachts",
    "how to report a broken navigation light",
    "where the nearest sailmaker has a workshop",
    "what the old lighthouse on the breakwater was used for",
];
const ASKS: [&str; 10] = [
    "Could you also tell me",
    "Another thing I wanted to ask about is",
    "My friend is curious about",
    "Before we leave tomorrow I need to know",
    "One more question, please, about",
    "I read something odd about",
    "The skipper asked me to check",
    "We are new to this coast, so what about",
    "Someone at the café mentioned",
    "Lastly, if you have a moment,",
];

fn question(conversation: usize, turn: usize) -> String {
    let topic = TOPICS[(conversation + turn * 3) % TOPICS.len()];
    let ask = ASKS[turn % ASKS.len()];
    format!(
        "This is boat number {} writing, message {}. {ask} {topic}? We arrived from the north \
         this morning with a crew of {} and plan to stay for {} nights, and we would like to \
         understand the rules before we make any mistakes.",
        conversation + 1,
        turn + 1,
        2 + (conversation + turn) % 5,
        1 + (conversation * 7 + turn) % 6
    )
}

/// One streamed turn: the time to the first content, the usage, and the answer's text.
async fn turn(client: &reqwest::Client, server: &Server, messages: &[Value]) -> (Turn, String) {
    let mut req = client
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&json!({
            "model": server.model,
            "messages": messages,
            "max_tokens": ANSWER_TOKENS,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        }));
    if let Some(token) = &server.token {
        req = req.bearer_auth(token);
    }
    let start = Instant::now();
    let resp = req.send().await.expect("request");
    assert!(
        resp.status().is_success(),
        "{}: {}",
        server.name,
        resp.status()
    );
    let mut body = resp.bytes_stream();
    let mut parser = edgerun_protocol::SseParser::new();
    let (mut first, mut text, mut usage) = (None, String::new(), Value::Null);
    while let Some(chunk) = body.next().await {
        for ev in parser.push(&chunk.expect("chunk")) {
            let edgerun_protocol::SseEvent::Data(v) = ev else {
                continue;
            };
            if let Some(delta) = v["choices"][0]["delta"]["content"].as_str() {
                if !delta.is_empty() {
                    first.get_or_insert_with(Instant::now);
                    text.push_str(delta);
                }
            }
            if v["usage"].is_object() {
                usage = v["usage"].clone();
            }
        }
    }
    let first = first.unwrap_or_else(Instant::now);
    let observed = Turn {
        ttft: first - start,
        prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0),
        cached_tokens: usage["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0),
        answer_tokens: usage["completion_tokens"].as_u64().unwrap_or(0),
    };
    (observed, text)
}

async fn conversation(server: &Server, c: usize) -> Vec<Turn> {
    // A fresh connection per request: llama-server closes idle keep-alive connections, which
    // a pooled client trips over.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut messages = vec![json!({"role": "system", "content": SYSTEM})];
    let mut turns = Vec::with_capacity(TURNS);
    for t in 0..TURNS {
        messages.push(json!({"role": "user", "content": question(c, t)}));
        let (observed, answer) = turn(&client, server, &messages).await;
        messages.push(json!({"role": "assistant", "content": answer}));
        turns.push(observed);
    }
    turns
}

/// Every conversation's turns: `[conversation][turn]`.
pub async fn run(server: &Server) -> Vec<Vec<Turn>> {
    let all = (0..CONVERSATIONS).map(|c| conversation(server, c));
    futures::future::join_all(all).await
}

/// Median time to first token of turn `t` (0-based), in ms.
pub fn ttft_ms(runs: &[Vec<Turn>], t: usize) -> f64 {
    median(runs.iter().map(|c| c[t].ttft.as_secs_f64() * 1e3).collect())
}

/// Cached share of the prompt tokens of turns `from..` (0-based), over every conversation.
pub fn cached_share(runs: &[Vec<Turn>], from: usize) -> f64 {
    let (mut cached, mut prompt) = (0u64, 0u64);
    for c in runs {
        for t in &c[from..] {
            cached += t.cached_tokens;
            prompt += t.prompt_tokens;
        }
    }
    cached as f64 / prompt.max(1) as f64
}

/// The per-turn table and the summary lines, for servers measured in the same run.
pub fn print(results: &[(String, Vec<Vec<Turn>>)]) {
    println!(
        "\nchat: {CONVERSATIONS} conversations x {TURNS} turns at once, answers of at most \
         {ANSWER_TOKENS} tokens (greedy); median time to first token per turn, and the share of \
         prompt tokens served from a cache\n"
    );
    let mut header = "| turn | prompt tokens (median) |".to_string();
    let mut rule = "|---:|---:|".to_string();
    for (name, _) in results {
        header += &format!(" {name}: TTFT | {name}: cached |");
        rule += "---:|---:|";
    }
    println!("{header}\n{rule}");
    for t in 0..TURNS {
        let prompt = median(
            results[0]
                .1
                .iter()
                .map(|c| c[t].prompt_tokens as f64)
                .collect(),
        );
        let mut line = format!("| {} | {prompt:.0} |", t + 1);
        for (_, runs) in results {
            let share = cached_share(&runs.iter().map(|c| vec![c[t]]).collect::<Vec<_>>(), 0);
            line += &format!(" {:.0} ms | {:.0}% |", ttft_ms(runs, t), share * 100.0);
        }
        println!("{line}");
    }
    println!();
    for (name, runs) in results {
        let answers: u64 = runs.iter().flatten().map(|t| t.answer_tokens).sum();
        println!(
            "{name}: cached share from turn 2: {:.1}%; turn 10 / turn 1 TTFT: {:.2}x; \
             {:.0} answer tokens per turn on average",
            cached_share(runs, 1) * 100.0,
            ttft_ms(runs, TURNS - 1) / ttft_ms(runs, 0),
            answers as f64 / (CONVERSATIONS * TURNS) as f64
        );
    }
    if results.len() >= 2 {
        let last = TURNS - 1;
        for (name, runs) in &results[1..] {
            println!(
                "{} turn 10 TTFT / {name}'s: {:.2}x",
                results[0].0,
                ttft_ms(&results[0].1, last) / ttft_ms(runs, last)
            );
        }
    }
}
