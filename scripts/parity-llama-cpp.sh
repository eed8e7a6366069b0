#!/usr/bin/env bash
# Greedy parity with llama.cpp (the pinned build, scripts/build-llama-cpp.sh) on a GGUF: starts
# llama-server and edgerun on the same file and runs scripts/parity-llama-cpp.py (12 prompts,
# 32 greedy steps, divergence allowed only where llama.cpp's own top-2 margin is under 0.5).
# Not part of the test command (building llama.cpp takes 15-25 min on 2 cores); run it when an
# architecture or a kernel changes, and quote its summary.
#
#   scripts/parity-llama-cpp.sh MODEL.gguf
#   scripts/parity-llama-cpp.sh --qwen2   # SmolLM2 rewritten as qwen2 with random q/k/v biases
#   scripts/parity-llama-cpp.sh --qwen3   # SmolLM2 rewritten as qwen3 with random q/k head norms
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

model="${1:?usage: scripts/parity-llama-cpp.sh MODEL.gguf | --qwen2 | --qwen3}"
bin_dir="$(scripts/build-llama-cpp.sh)"
[ -x target/release/edgerun ] || cargo build --release --locked -p edgerun-server >&2
if [ "$model" = --qwen2 ]; then
    models/fetch-default.sh >/dev/null
    model=target/parity/smollm2-qwen2-bias7.gguf
    mkdir -p target/parity
    [ -f "$model" ] || target/release/edgerun as-qwen2 models/cache/SmolLM2-135M-Instruct.Q4_1.gguf "$model" --bias-seed 7
elif [ "$model" = --qwen3 ]; then
    models/fetch-default.sh >/dev/null
    model=target/parity/smollm2-qwen3-norm5.gguf
    mkdir -p target/parity
    [ -f "$model" ] || target/release/edgerun as-qwen3 models/cache/SmolLM2-135M-Instruct.Q4_1.gguf "$model" --norm-seed 5
fi

threads="$(nproc)"
edge_port=18631 peer_port=18632 token=parity-token
log_dir=target/parity
mkdir -p "$log_dir"
"$bin_dir/llama-server" -m "$model" --port "$peer_port" -t "$threads" -c 4096 -np 1 \
    >"$log_dir/llama-server.log" 2>&1 &
peer=$!
target/release/edgerun serve --model "parity=$model" --listen "127.0.0.1:$edge_port" \
    --api-token "$token" >"$log_dir/edgerun.log" 2>&1 &
edge=$!
trap 'kill $peer $edge 2>/dev/null || true' EXIT
for url in "http://127.0.0.1:$peer_port/health" "http://127.0.0.1:$edge_port/health"; do
    for _ in $(seq 600); do
        curl -sf "$url" >/dev/null && break
        sleep 0.2
    done
    curl -sf "$url" >/dev/null || { echo "parity: $url never became ready (logs in $log_dir)" >&2; exit 1; }
done
echo "model: $model"
echo "peer: $(cat "$bin_dir/BUILD")"
echo "edgerun: $(git rev-parse --short HEAD)$(git diff --quiet || echo +changes)"
python3 scripts/parity-llama-cpp.py "http://127.0.0.1:$edge_port" "$token" "http://127.0.0.1:$peer_port"
