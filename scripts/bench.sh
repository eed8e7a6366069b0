#!/usr/bin/env bash
# Benchmarks a node over HTTP and prints a table of medians.
#   scripts/bench.sh [MODEL.gguf] [--with-llama-cpp] [--chat | --embed]
# MODEL defaults to the default model (models/fetch-default.sh). --with-llama-cpp also runs
# llama.cpp's llama-server on the same file, in the same run: the pinned peer build from
# scripts/build-llama-cpp.sh (llama.cpp 0c1e570 from the llama-cpp-python==0.3.36 sdist,
# GGML_NATIVE=ON). EDGERUN_BIN=path benchmarks another edgerun binary (say, a build of an earlier
# commit, for a before/after comparison in one run). RUNS=N sets the runs per figure (5).
# --chat runs the growing-conversation scenario instead (8 conversations x 10 turns at once, the
# history resent every turn): a node with the prefix cache, one without, and with
# --with-llama-cpp llama-server -np 8 with its default prompt caching (tests/bench_chat.rs).
# --embed runs the embedding scenario instead (tests/bench_embed.rs): all-MiniLM-L6-v2
# (models/fetch-minilm.sh) beside the chat model, 256 texts as 8 concurrent requests and one text
# at a time, and the chat model's decode with and without the idle embedder; with
# --with-llama-cpp also llama-server --embeddings on the same model converted to an f32 GGUF by
# the sdist's convert_hf_to_gguf.py (scripts/convert-embedding-gguf.sh, which needs PyTorch: a
# virtualenv of its own, cached, ~3 GB once).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

model=""
peer=0
chat=0
embed=0
for arg in "$@"; do
  case "$arg" in
    --with-llama-cpp) peer=1 ;;
    --chat) chat=1 ;;
    --embed) embed=1 ;;
    -*) echo "unknown flag $arg" >&2; exit 2 ;;
    *) model="$arg" ;;
  esac
done
if [ -z "$model" ]; then
  model="$(models/fetch-default.sh)"
fi
[ -f "$model" ] || { echo "no such model file: $model" >&2; exit 1; }
export EDGERUN_TEST_MODEL="$(cd "$(dirname "$model")" && pwd)/$(basename "$model")"

cargo build --release --locked -p edgerun-server --bin edgerun -p edgerun-e2e --bin edgerun-bench
echo "model:   $EDGERUN_TEST_MODEL ($(du -h "$EDGERUN_TEST_MODEL" | cut -f1))"
if [ -n "${EDGERUN_BIN:-}" ]; then
  echo "edgerun: $EDGERUN_BIN"
else
  echo "edgerun: target/release/edgerun (this tree: $(git describe --always --dirty 2>/dev/null || echo '?'))"
fi
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(date -u +%F)"

args=(--spawn --runs "${RUNS:-5}")
if [ "$chat" = 1 ]; then args+=(--chat); fi
if [ "$embed" = 1 ]; then
  dir="$(models/fetch-minilm.sh)"
  args+=(--embed "$dir")
  echo "embedder: $dir"
  if [ "$peer" = 1 ]; then
    gguf="$(scripts/convert-embedding-gguf.sh "$dir")"
    echo "peer model: $gguf"
    args+=(--embed-gguf "$gguf")
  fi
fi
if [ "$peer" = 1 ]; then
  bin="$(scripts/build-llama-cpp.sh)"
  echo "peer:    $(cat "$bin/BUILD")"
  args+=(--llama-server "$bin/llama-server")
fi
exec target/release/edgerun-bench "${args[@]}"
