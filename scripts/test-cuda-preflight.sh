#!/usr/bin/env bash
# Runs the CUDA build of `edgerun` against a stub NVIDIA driver and checks that the preflight
# (crates/edgerun-engine/src/device/preflight.rs) refuses a machine it cannot run on in one line
# and exit status 2, before it reads anything, and passes one it can. No GPU is needed: the stub
# is a libcuda.so.1 with every entry point cudarc binds (from scripts/install-cuda-toolkit.sh's
# link stub), whose version, device count and compute capability come from environment
# variables. Run by scripts/test.sh after the CUDA build; prints "N passed, N failed".
#
#   scripts/test-cuda-preflight.sh [path/to/cuda/edgerun]   # default target/cuda/release/edgerun
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN="${1:-target/cuda/release/edgerun}"
[ -x "$BIN" ] || { echo "test-cuda-preflight: no $BIN: build it with --features cuda first (scripts/test.sh does)" >&2; exit 1; }
. "$(scripts/install-cuda-toolkit.sh)"
STUB_DIR=$(mktemp -d)
trap 'rm -rf "$STUB_DIR"' EXIT

# The link stub's entry points, less the ones the preflight calls, which answer from the
# environment here.
OWN='cuInit|cuDriverGetVersion|cuDeviceGetCount|cuDeviceGet|cuDeviceGetName|cuDeviceGetAttribute|cuGetErrorName'
{
    grep -vE "^int ($OWN)\(" "$CUDA_ROOT/lib/stubs/libcuda_stub.c"
    cat <<'EOF'
#include <stdlib.h>
#include <string.h>
static int env_int(const char *name, int fallback) {
    const char *v = getenv(name);
    return v ? atoi(v) : fallback;
}
int cuInit(unsigned flags) { (void)flags; return 0; }
int cuDriverGetVersion(int *v) { *v = env_int("STUB_CUDA_DRIVER_VERSION", 13000); return 0; }
int cuDeviceGetCount(int *n) { *n = env_int("STUB_CUDA_DEVICES", 1); return 0; }
int cuDeviceGet(int *dev, int ordinal) { *dev = ordinal; return 0; }
int cuDeviceGetName(char *name, int len, int dev) {
    (void)dev;
    strncpy(name, "Stub GPU", (size_t)len);
    return 0;
}
/* CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76 */
int cuDeviceGetAttribute(int *v, int attribute, int dev) {
    int cc = env_int("STUB_CUDA_CC", 90);
    (void)dev;
    *v = attribute == 75 ? cc / 10 : attribute == 76 ? cc % 10 : 0;
    return 0;
}
int cuGetErrorName(int error, const char **name) {
    (void)error;
    *name = "CUDA_ERROR_STUB_LIBRARY";
    return 0;
}
EOF
} > "$STUB_DIR/stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB_DIR/libcuda.so.1" "$STUB_DIR/stub.c"
export LD_LIBRARY_PATH="$STUB_DIR:$CUDA_ROOT/lib"

passed=0
failed=0
# `expect NAME STATUS PATTERN ENV... -- ARGS...`: runs the binary with ENV and ARGS; its exit
# status must be STATUS and its stderr (for status 2: exactly one line) must match PATTERN.
expect() {
    local name=$1 want=$2 pattern=$3
    shift 3
    local envs=()
    while [ "$1" != -- ]; do envs+=("$1"); shift; done
    shift
    local out err rc=0
    out=$(env "${envs[@]}" timeout 60 "$BIN" "$@" 2> "$STUB_DIR/err") || rc=$?
    err=$(cat "$STUB_DIR/err")
    local lines
    lines=$(grep -c . <<< "$err" || true)
    if [ "$rc" = "$want" ] && grep -qE "$pattern" <<< "$err$out" && { [ "$want" != 2 ] || [ "$lines" = 1 ]; }; then
        passed=$((passed + 1))
        echo "ok: $name"
    else
        failed=$((failed + 1))
        echo "FAILED: $name: exit $rc (wanted $want), stderr ($lines lines): $err; stdout: $out"
    fi
}

# A 12.8 driver (the 570 branch) under this CUDA 13.0 build: refused before the model is even
# looked for (the path does not exist).
expect "serve refuses an older driver" 2 'supports CUDA 12\.8, but this build needs CUDA 13\.0: install NVIDIA driver 580 or newer' \
    STUB_CUDA_DRIVER_VERSION=12080 -- serve --device cuda --model /nonexistent/model.gguf
expect "serve refuses a GPU older than the kernels" 2 'compute capability 8\.0.*CUDA_COMPUTE_CAP=80' \
    STUB_CUDA_CC=80 -- serve --device cuda:0 --model /nonexistent/model.gguf
expect "serve refuses a GPU that is not there" 2 'cuda:1 does not exist: the driver sees 1 GPU' \
    STUB_CUDA_DEVICES=1 -- serve --device cuda:1 --model /nonexistent/model.gguf
expect "check-device refuses an older driver before loading" 2 'needs CUDA 13\.0' \
    STUB_CUDA_DRIVER_VERSION=12040 -- check-device /nonexistent/model.gguf --device cuda:0
expect "preflight passes a matching machine" 0 'preflight passed: cuda:0 is Stub GPU \(compute capability 9\.0\), the driver supports CUDA 13\.0; built for CUDA 13\.0, compute capability 9\.0' \
    STUB_CUDA_DRIVER_VERSION=13000 -- preflight --device cuda:0
expect "preflight passes a newer driver and GPU, warning of the JIT" 0 'newer than the build.*JIT' \
    STUB_CUDA_DRIVER_VERSION=13040 STUB_CUDA_CC=100 -- preflight --device cuda
echo "cuda preflight: $passed passed, $failed failed"
[ "$failed" = 0 ]
