#!/usr/bin/env bash
# Runs every test: formatting and lints, unit tests, the engine's tests on the real model, and
# the end-to-end tests against the real binary and model over loopback HTTP.
# Idempotent: the model is fetched once (models/cache/), builds are incremental.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

models/fetch-default.sh >/dev/null
cargo fmt --all -- --check
cargo clippy --release --locked --workspace --all-targets -- -D warnings
# The e2e tests run target/release/edgerun: build it (and everything else) first.
cargo build --release --locked --workspace --all-targets
# One test at a time: tests that run the model each use both cores, and timing-sensitive
# checks (streaming, heartbeats) stay meaningful without six model servers competing.
cargo test --release --locked --workspace -- --test-threads=1
