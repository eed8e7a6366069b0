//! # edgerun-e2e
//!
//! End-to-end harness: starts the real `edgerun` binary on the real default model on a free
//! loopback port, and talks to it over HTTP like a Workers AI client would. The tests live in
//! `tests/tests/`; the benchmark (`src/bin/edgerun-bench.rs`) uses the same client helpers.
//!
//! The binary is `target/release/edgerun` (the test command builds it first), or `EDGERUN_BIN`.
//! The model is fetched by `models/fetch-default.sh`, or taken from `EDGERUN_TEST_MODEL`.

pub mod edge;

use edgerun_protocol::sse::{SseEvent, SseParser};
use futures::StreamExt;
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MODEL_ALIAS: &str = "@cf/meta/llama-3-8b-instruct";
pub const TOKEN: &str = "e2e-secret-token";

pub use edgerun_testkit::{free_port, model_path, workspace_root};

pub fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("EDGERUN_BIN") {
        return PathBuf::from(p);
    }
    let p = workspace_root().join("target/release/edgerun");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --release -p edgerun-server` (scripts/test.sh does)",
        p.display()
    );
    p
}

/// A start-up refusal to check: flags, environment, and what the refusal must mention.
pub type Refusal<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

/// Starts `edgerun serve` on the test model once per case, with the case's flags and
/// environment, and asserts that it exits non-zero, names the case's needle, and never got as
/// far as listening: bad settings are refused at start-up, never clamped.
pub fn assert_refused_at_start_up(cases: &[Refusal]) {
    let model = model_path().display().to_string();
    for (flags, env, needle) in cases {
        let out = Command::new(binary())
            .args(["serve", "--model", &model, "--listen", "127.0.0.1:0"])
            .args(*flags)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} {env:?} started");
        assert!(
            stderr.contains(needle),
            "{flags:?} {env:?}: no mention of {needle}: {stderr}"
        );
        assert!(
            !stderr.contains("listening"),
            "{flags:?} {env:?}: refused only after listening: {stderr}"
        );
    }
}

/// A running node. Killed on drop.
pub struct Node {
    child: Child,
    pub base: String,
    pub client: reqwest::Client,
}

impl Node {
    /// Starts the node with a bearer token and the Workers AI alias, plus `extra` flags, and
    /// waits until `/health` says ready.
    pub async fn start(extra: &[&str]) -> Node {
        Self::start_with_env(extra, &[]).await
    }

    /// [`Node::start`] with extra environment variables for the process.
    pub async fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Node {
        let port = free_port();
        let mut args = vec![
            "serve".to_string(),
            "--model".into(),
            model_path().display().to_string(),
            "--served-as".into(),
            MODEL_ALIAS.into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--api-token".into(),
            TOKEN.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(binary())
            .args(&args)
            .env("EDGERUN_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn edgerun");
        let node = Node {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = node.client.get(node.url("/health")).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "node did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        node
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn run_url(&self) -> String {
        self.url(&format!("/run/{MODEL_ALIAS}"))
    }

    /// POST to the run route with the right token.
    pub fn post(&self, body: impl Into<reqwest::Body>) -> reqwest::RequestBuilder {
        self.client
            .post(self.run_url())
            .bearer_auth(TOKEN)
            .body(body)
    }

    /// POSTs JSON to any `path` with the right token.
    pub async fn post_json_to(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(TOKEN)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// GETs `path` with the right token and parses the JSON answer.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.client
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// POSTs a body to the run route and parses the JSON answer (success or error envelope).
    pub async fn run_json(&self, body: impl Into<reqwest::Body>) -> serde_json::Value {
        self.post(body).send().await.unwrap().json().await.unwrap()
    }

    /// The node's `/metrics` page (Prometheus text).
    pub async fn metrics(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn health(&self) -> serde_json::Value {
        self.client
            .get(self.url("/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Polls `/health` until `stats.<key>` equals `value`; panics after `timeout`.
    pub async fn wait_for_stat(
        &self,
        key: &str,
        value: u64,
        timeout: Duration,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let h = self.health().await;
            if h["stats"][key] == value {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "stats.{key} never became {value}: {h}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the process to exit; its exit code, if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One SSE event as received, with when it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    pub event: SseEvent,
    pub at: Duration,
}

/// Reads a whole SSE response, timestamping each event from `start`.
pub async fn read_sse(resp: reqwest::Response, start: Instant) -> Vec<Received> {
    let mut parser = SseParser::new();
    let mut out = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("stream chunk");
        for event in parser.push(&chunk) {
            out.push(Received {
                event,
                at: start.elapsed(),
            });
        }
    }
    out
}

/// `v` with every `cached_tokens` count set to 0: for comparing two answers to the same
/// request when the prefix cache served part of one of them (the answers themselves are equal:
/// a hit changes nothing but the work).
pub fn ignoring_cached_tokens(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, x)| {
                    let x = if k == "cached_tokens" && x.is_u64() {
                        Value::from(0)
                    } else {
                        ignoring_cached_tokens(x)
                    };
                    (k.clone(), x)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(ignoring_cached_tokens).collect()),
        other => other.clone(),
    }
}

/// The concatenated `response` text of token events.
pub fn text_of(events: &[Received]) -> String {
    events
        .iter()
        .filter_map(|r| match &r.event {
            SseEvent::Data(v) if v.get("usage").is_none() => v
                .get("response")
                .and_then(|s| s.as_str())
                .map(str::to_string),
            _ => None,
        })
        .collect()
}

/// Resident memory of process `pid` (Linux: `VmRSS` of `/proc/<pid>/status`), in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Runs an SDK client script from `tests/sdk/` with `program` (a Python or Node from the SDK
/// cache) and `env`, and fails, with its output, unless it exits 0 having printed `all ok`.
pub async fn run_sdk_script(program: &str, script: &str, env: &[(&str, String)]) {
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg(workspace_root().join("tests/sdk").join(script));
    for (key, value) in env {
        cmd.env(key, value);
    }
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("the SDK client timed out")
        .expect("run the SDK client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all ok"),
        "{script} with {env:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `scripts/install-sdk-clients.sh --check` (which installs nothing) and returns the
/// variables it prints (`EDGERUN_SDK_*`); a missing SDK fails the test, it is never skipped.
pub fn sdk_env() -> Vec<(String, String)> {
    let out = Command::new("bash")
        .arg(workspace_root().join("scripts/install-sdk-clients.sh"))
        .arg("--check")
        .output()
        .expect("run scripts/install-sdk-clients.sh");
    assert!(
        out.status.success(),
        "the client SDKs are missing (scripts/test.sh installs them): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One variable of [`sdk_env`].
pub fn sdk_var(name: &str) -> String {
    sdk_env()
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("install-sdk-clients.sh printed no {name}"))
}
