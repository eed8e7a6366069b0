//! # edgerun-testkit
//!
//! The one place the tests of every crate (the engine's, the server's, the end-to-end ones in
//! `tests/`) find what they share: the workspace's root, the real test model, a free loopback
//! port. A dev-dependency only; it depends on nothing, so it costs no build time.
//!
//! The model is SmolLM2-135M-Instruct Q4_1, fetched once by `models/fetch-default.sh` (run
//! from here when needed, so a test run on a fresh checkout needs no other step), or the file
//! `EDGERUN_TEST_MODEL` names. The embedding model is all-MiniLM-L6-v2
//! (`models/fetch-minilm.sh`), with sentence-transformers' vectors as its reference.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The real test model's path (see the crate docs); the fetch runs once per process.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("EDGERUN_TEST_MODEL") {
            return PathBuf::from(p);
        }
        fetch("models/fetch-default.sh")
    })
    .clone()
}

/// The real embedding test model's directory: all-MiniLM-L6-v2 (safetensors, tokenizer and
/// sentence-transformers' pipeline), fetched once by `models/fetch-minilm.sh`.
pub fn embedding_model_dir() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| fetch("models/fetch-minilm.sh")).clone()
}

/// sentence-transformers' own vectors for the embedding test model
/// (`tests/data/minilm-reference.json`, made by `scripts/make-embedding-reference.py`).
pub fn embedding_reference_path() -> PathBuf {
    workspace_root().join("tests/data/minilm-reference.json")
}

/// Runs a fetch script of the workspace and returns the path it prints.
fn fetch(script: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg(workspace_root().join(script))
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A loopback port nothing listens on (at the time of asking).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The embedding benchmarks' texts (`tests/bench_embed.rs`, the engine's `embed_bench`
/// example): about 60 tokens each, every one different (so no cache of any kind can serve them).
pub fn embedding_bench_texts(n: usize) -> Vec<String> {
    const WORDS: [&str; 24] = [
        "harbour",
        "tide",
        "sailing",
        "mooring",
        "engine",
        "weather",
        "lighthouse",
        "current",
        "pontoon",
        "repair",
        "fuel",
        "anchor",
        "visitor",
        "channel",
        "buoy",
        "storm",
        "crew",
        "ferry",
        "island",
        "chart",
        "signal",
        "winter",
        "cargo",
        "bridge",
    ];
    (0..n)
        .map(|i| {
            let words: Vec<&str> = (0..48)
                .map(|j| WORDS[(i * 7 + j * 13 + j * j) % WORDS.len()])
                .collect();
            format!("Note {i}: {}.", words.join(" "))
        })
        .collect()
}
