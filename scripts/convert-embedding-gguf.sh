#!/usr/bin/env bash
# Converts a Hugging Face encoder directory (all-MiniLM-L6-v2 from models/fetch-minilm.sh) to an
# f32 GGUF with llama.cpp's own converter, convert_hf_to_gguf.py from the pinned
# llama-cpp-python==0.3.36 sdist (scripts/fetch-llama-cpp-sdist.sh), for llama-server's embedding
# mode in scripts/bench.sh --embed --with-llama-cpp. Prints the GGUF's path. The converter
# imports PyTorch: it runs in a virtualenv of its own (~/.cache/edgerun/convert-venv: torch,
# transformers, numpy, sentencepiece from PyPI; ~3 GB once). Idempotent: a finished GGUF is
# reused.
#   scripts/convert-embedding-gguf.sh DIR
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir="${1:?usage: scripts/convert-embedding-gguf.sh MODEL_DIR}"
out="$dir.f32.gguf"
if [ -s "$out" ]; then
  echo "$out"
  exit 0
fi
cache="${EDGERUN_CACHE_DIR:-$HOME/.cache/edgerun}"
venv="$cache/convert-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, transformers' 2>/dev/null; then
  echo "convert-embedding-gguf: installing torch and transformers into $venv (once)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    torch==2.5.1 transformers==4.46.3 "numpy<2.3" sentencepiece==0.2.0 >&2
fi
sdist="$(scripts/fetch-llama-cpp-sdist.sh)"
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
tar -xzf "$sdist" -C "$src" --wildcards '*/vendor/llama.cpp/convert_hf_to_gguf.py' \
  '*/vendor/llama.cpp/gguf-py/*' '*/vendor/llama.cpp/conversion/*'
root="$(dirname "$(find "$src" -name convert_hf_to_gguf.py | head -1)")"
PYTHONPATH="$root/gguf-py:$root" "$venv/bin/python" "$root/convert_hf_to_gguf.py" "$dir" \
  --outfile "$out.partial" --outtype f32 >&2
mv "$out.partial" "$out"
echo "$out"
