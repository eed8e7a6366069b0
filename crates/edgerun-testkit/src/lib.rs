//! # edgerun-testkit
//!
//! The one place the tests of every crate (the engine's, the server's, the end-to-end ones in
//! `tests/`) find what they share: the workspace's root, the real test model, a free loopback
//! port. A dev-dependency only; it depends on nothing, so it costs no build time.
//!
//! The model is SmolLM2-135M-Instruct Q4_1, fetched once by `models/fetch-default.sh` (run
//! from here when needed, so a test run on a fresh checkout needs no other step), or the file
//! `EDGERUN_TEST_MODEL` names.

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
        let out = Command::new("bash")
            .arg(workspace_root().join("models/fetch-default.sh"))
            .output()
            .expect("run models/fetch-default.sh");
        assert!(
            out.status.success(),
            "models/fetch-default.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// A loopback port nothing listens on (at the time of asking).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
