#!/usr/bin/env bash
# Builds the Worker (deploy/worker) to deploy/worker/build/{index.js,index_bg.wasm} with
# worker-build, Debian's rustc-web and a from-source std (see install-wasm-toolchain.sh).
# Incremental builds take seconds; a clean one ~5 minutes.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# Captured first: `eval "$(failing command)"` would succeed and hide the failure.
TOOL_ENV="$("$ROOT/scripts/install-wasm-toolchain.sh" --print-env)"
eval "$TOOL_ENV"
cd "$ROOT/deploy/worker"
# The root's host-only flags (target-cpu) and any RUSTFLAGS meant for the node stay out. Warnings
# fail the build: the wasm-only glue is not covered by the host's clippy run.
env -u RUSTFLAGS -u CARGO_BUILD_RUSTFLAGS -u RUSTUP_TOOLCHAIN -u CARGO \
    RUSTC_BOOTSTRAP=1 \
    RUSTC="$(command -v rustc)" \
    CARGO_UNSTABLE_BUILD_STD="std,panic_abort" \
    CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=wasm-ld-22 \
    CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS="-D warnings" \
    worker-build --release "$@"
ls -l build/index.js build/index_bg.wasm >&2
