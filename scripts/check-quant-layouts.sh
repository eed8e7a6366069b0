#!/usr/bin/env bash
# Checks that `edgerun generate` / `edgerun quantize` give every tensor the block type llama.cpp's
# llama-quantize gives it: the pinned build (scripts/build-llama-cpp.sh) requantizes the same inputs
# and the two files' tensor types are compared one by one. Inputs: a Llama-3-shaped model (8 layers,
# Llama-3 vocabulary from the sdist's ggml-vocab-llama-bpe.gguf) in Q4_K_M, Q5_K_M, Q6_K and Q4_0, and
# the default model (SmolLM2, rows of 576: the K-quant fallbacks) in Q4_K_M. Takes ~2 minutes once the
# peer is built. Not part of scripts/test.sh: building llama.cpp takes ~20 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bin="$(scripts/build-llama-cpp.sh)"
cargo build --release --locked -p edgerun-server --bin edgerun >&2
edgerun=target/release/edgerun
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sdist="${EDGERUN_CACHE_DIR:-$HOME/.cache/edgerun}/llama_cpp_python-0.3.36.tar.gz"
tar xzf "$sdist" -C "$work" --wildcards '*/models/ggml-vocab-llama-bpe.gguf'
vocab="$(find "$work" -name ggml-vocab-llama-bpe.gguf)"
smollm2="$(models/fetch-default.sh)"

compare() { # ours theirs
  python3 - "$1" "$2" <<'PY'
import struct, sys

def tensor_types(path):
    f = open(path, "rb")
    _, _, n_tensors, n_kv = struct.unpack("<IIQQ", f.read(24))
    def string():
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)
    sizes = {0: 1, 1: 1, 7: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 10: 8, 11: 8, 12: 8}
    def skip(t):
        if t == 8:
            string()
        elif t == 9:
            et, n = struct.unpack("<IQ", f.read(12))
            for _ in range(n):
                skip(et)
        else:
            f.read(sizes[t])
    for _ in range(n_kv):
        string()
        (t,) = struct.unpack("<I", f.read(4))
        skip(t)
    types = {}
    for _ in range(n_tensors):
        name = string().decode()
        (nd,) = struct.unpack("<I", f.read(4))
        f.read(8 * nd)
        t, _ = struct.unpack("<IQ", f.read(12))
        types[name] = t
    return types

ours, theirs = tensor_types(sys.argv[1]), tensor_types(sys.argv[2])
diff = [(n, ours.get(n), theirs.get(n)) for n in sorted(set(ours) | set(theirs)) if ours.get(n) != theirs.get(n)]
print(f"{sys.argv[1].rsplit('/', 1)[-1]}: {len(ours)} tensors, {len(diff)} differ from llama-quantize")
for d in diff[:10]:
    print("  ", d)
sys.exit(1 if diff else 0)
PY
}

status=0
"$edgerun" generate --shape llama-3-mini --quant Q8_0 --vocab-from "$vocab" "$work/mini-Q8_0.gguf" >/dev/null
for scheme in Q4_K_M Q5_K_M Q6_K Q4_0; do
  "$edgerun" generate --shape llama-3-mini --quant "$scheme" --vocab-from "$vocab" "$work/ours-$scheme.gguf" >/dev/null
  "$bin/llama-quantize" --allow-requantize "$work/mini-Q8_0.gguf" "$work/theirs-$scheme.gguf" "$scheme" \
    >"$work/llama-quantize.log" 2>&1 || { cat "$work/llama-quantize.log" >&2; exit 1; }
  compare "$work/ours-$scheme.gguf" "$work/theirs-$scheme.gguf" || status=1
done
"$edgerun" quantize "$smollm2" "$work/ours-smollm2-Q4_K_M.gguf" Q4_K_M >/dev/null
"$bin/llama-quantize" --allow-requantize "$smollm2" "$work/theirs-smollm2-Q4_K_M.gguf" Q4_K_M \
  >"$work/llama-quantize.log" 2>&1 || { cat "$work/llama-quantize.log" >&2; exit 1; }
compare "$work/ours-smollm2-Q4_K_M.gguf" "$work/theirs-smollm2-Q4_K_M.gguf" || status=1
exit $status
