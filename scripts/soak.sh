#!/usr/bin/env bash
# The long reliability run: `scripts/soak.sh [MINUTES] [CONCURRENCY]` (30 min, 8 clients by
# default) builds the release binary and the soak driver, then runs mixed traffic with random
# disconnects against the real default model, printing RSS, open files, p50/p99 first-token
# latency and outcome counts every minute. Exits non-zero if memory grew more than 10% after the
# first minute, a 5xx appeared, or a request was left queued. Figures go in docs/reliability.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
models/fetch-default.sh >/dev/null
cargo build --release --locked -p edgerun-server -p edgerun-e2e --bins
exec target/release/edgerun-soak "${1:-30}" "${2:-8}"
