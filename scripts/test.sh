#!/usr/bin/env bash
# Runs every test: formatting and lints, unit tests, the engine's tests on the real model, the
# end-to-end tests against the real binary and model over loopback HTTP (the OpenAI-compatible
# routes also through the official Python and Node `openai` SDKs, the model catalogue through the
# official `cloudflare` SDKs, the Workers binding from a Worker in workerd calling env.AI and
# @cloudflare/ai), and the edge tests (the Worker built to wasm, in workerd, in front of two nodes).
# Also builds the CUDA binary (--features cuda, with a toolkit from PyPI wheels; nothing runs it
# here). Idempotent: the model is fetched once (models/cache/), the wasm toolchain is installed
# once per machine (~25 min the first time, then skipped), the CUDA toolkit once (~1 min), the
# SDKs once (~/.cache/edgerun/sdk), builds are incremental (the CUDA one: ~10 min from scratch).
# Also runs the engine's model-free tests for aarch64 under qemu-user (scripts/test-aarch64.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WORKER=(--manifest-path deploy/worker/Cargo.toml)

models/fetch-default.sh >/dev/null
# llama.cpp's real chat templates (from the pinned llama-cpp-python sdist, cached, sha256-checked):
# the tool-calling tests render each family's (crates/edgerun-engine/tests/tool_templates.rs).
scripts/fetch-llama-cpp-sdist.sh --templates >/dev/null
scripts/install-wasm-toolchain.sh
# The official client packages (Python and npm `openai` and `cloudflare`, npm `@cloudflare/ai`,
# pinned) the compatibility tests drive the node with; the tests fail, not skip, without them.
scripts/install-sdk-clients.sh
cargo fmt --all -- --check
cargo fmt "${WORKER[@]}" -- --check
cargo clippy --release --locked --workspace --all-targets -- -D warnings
cargo clippy --locked "${WORKER[@]}" --all-targets -- -D warnings
# The e2e tests run target/release/edgerun and the Worker's wasm build: build them first.
cargo build --release --locked --workspace --all-targets
scripts/build-worker.sh --locked
# The CUDA build, every run, so the GPU path cannot rot: a CUDA 13.4 toolkit assembled from
# NVIDIA's PyPI wheels (cached, ~600 MB once), no GPU needed. Its own target dir: the features
# differ. Nothing here runs it (scripts/gpu-check.sh does, on a GPU machine).
( . "$(scripts/install-cuda-toolkit.sh)" \
    && cargo build --release --locked -p edgerun-server --features cuda --target-dir target/cuda )
# The Worker's routing, failover, header and validation logic, on the host.
cargo test --locked "${WORKER[@]}"
# The engine's model-free tests built for aarch64 and run under qemu-user: the NEON kernels
# (installs the target's std, a cross linker and qemu once; ~8 min from scratch, then incremental).
scripts/test-aarch64.sh
# One test at a time: tests that run the model each use both cores, and timing-sensitive
# checks (streaming, heartbeats) stay meaningful without six model servers competing.
cargo test --release --locked --workspace -- --test-threads=1
