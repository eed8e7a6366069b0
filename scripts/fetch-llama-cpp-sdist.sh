#!/usr/bin/env bash
# Fetches the PyPI sdist llama-cpp-python==0.3.36 (llama.cpp 0c1e570 and its test data: the
# ggml-vocab-*.gguf vocabularies, 71 real chat templates under models/templates, gguf-py) into
# the cache (~/.cache/edgerun, or $EDGERUN_CACHE_DIR), sha256-checked, and prints its path. With
# --templates, also extracts the chat templates and prints their folder instead; with --vocab, the
# ggml-vocab-*.gguf vocabularies and their .inp/.out test vectors. Idempotent; the
# sdist is never committed.
set -euo pipefail

VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CACHE="${EDGERUN_CACHE_DIR:-$HOME/.cache/edgerun}"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
TEMPLATES="$CACHE/llama-cpp-templates-$VERSION"
VOCAB="$CACHE/llama-cpp-vocab-$VERSION"

log() { echo "fetch-llama-cpp-sdist: $*" >&2; }
verify() { [ -f "$SDIST" ] && echo "$SHA256  $SDIST" | sha256sum --check --status; }

mkdir -p "$CACHE"
exec 8>"$CACHE/.llama-cpp-sdist-$VERSION.lock"
flock 8

if ! verify; then
    # `pip download` of an sdist would try to build it; take the file the simple index lists.
    log "fetching llama-cpp-python==$VERSION (sdist, 77 MB) from PyPI"
    python3 - "$VERSION" "$SDIST.partial" <<'PY'
import re, sys, urllib.request
version, dest = sys.argv[1], sys.argv[2]
index = urllib.request.Request("https://pypi.org/simple/llama-cpp-python/", headers={"Accept": "text/html"})
with urllib.request.urlopen(index, timeout=120) as r:
    page = r.read().decode()
name = re.escape(f"llama_cpp_python-{version}.tar.gz")
url = re.search(r'href="([^"#]*' + name + r')[^"]*"', page).group(1)
with urllib.request.urlopen(url, timeout=600) as r, open(dest, "wb") as out:
    while chunk := r.read(1 << 20):
        out.write(chunk)
PY
    mv "$SDIST.partial" "$SDIST"
    verify || { log "sha256 mismatch for $SDIST"; rm -f "$SDIST"; exit 1; }
fi

if [ "${1:-}" = --vocab ]; then
    if [ ! -f "$VOCAB/.complete" ]; then
        rm -rf "$VOCAB"
        mkdir -p "$VOCAB"
        tar xzf "$SDIST" -C "$VOCAB" --strip-components=4 --wildcards \
            "llama_cpp_python-$VERSION/vendor/llama.cpp/models/ggml-vocab-*"
        touch "$VOCAB/.complete"
    fi
    echo "$VOCAB"
    exit 0
fi
if [ "${1:-}" != "--templates" ]; then
    echo "$SDIST"
    exit 0
fi
if [ ! -f "$TEMPLATES/.complete" ]; then
    rm -rf "$TEMPLATES"
    mkdir -p "$TEMPLATES"
    tar xzf "$SDIST" -C "$TEMPLATES" --strip-components=5 --wildcards \
        "llama_cpp_python-$VERSION/vendor/llama.cpp/models/templates/*.jinja"
    touch "$TEMPLATES/.complete"
fi
echo "$TEMPLATES"
