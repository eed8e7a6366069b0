#!/usr/bin/env bash
# Builds edgerun (release, SIMD on via .cargo/config.toml), fetches the default model and serves
# it on 127.0.0.1:8080 under its own name and as @cf/meta/llama-3-8b-instruct, so client code
# written for Workers AI works unchanged. Extra arguments go to `edgerun serve`
# (for example `--listen 0.0.0.0:8080 --device cuda:0`).
#
# The bearer token is EDGERUN_API_TOKENS if set; otherwise one is generated once into
# .edgerun/api-token (git-ignored) and printed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

model="$(models/fetch-default.sh)"
cargo build --release --locked -p edgerun-server --bin edgerun >&2

token_args=()
if [ -z "${EDGERUN_API_TOKENS:-}" ] && [ -z "${EDGERUN_API_TOKEN_FILE:-}" ]; then
  mkdir -p .edgerun
  if [ ! -s .edgerun/api-token ]; then
    (umask 077 && od -An -tx1 -N24 /dev/urandom | tr -d ' \n' > .edgerun/api-token)
  fi
  token_args=(--api-token-file .edgerun/api-token)
  echo "API token: $(cat .edgerun/api-token)   (Authorization: Bearer <token>)" >&2
fi

exec target/release/edgerun serve \
  --model "$model" \
  --served-as @cf/meta/llama-3-8b-instruct \
  ${token_args[@]+"${token_args[@]}"} "$@"
