#!/usr/bin/env bash
# Installs the official OpenAI SDKs the OpenAI-compatibility tests (tests/tests/openai.rs, the
# clients in tests/sdk/) drive the node with: the Python `openai` package from PyPI into a venv,
# and the Node `openai` package from npm. Pinned versions, installed outside the repository
# (EDGERUN_SDK_DIR, default ~/.cache/edgerun/sdk); idempotent: each is skipped when that exact
# version is already there. Prints nothing on stdout unless given --print-env, which prints the
# variables the tests read (EDGERUN_SDK_PYTHON, EDGERUN_SDK_NODE_PATH) as `export` lines.
# With --check it installs nothing: it prints those lines when both are installed, and fails
# otherwise (the tests use this, so a missing SDK fails them instead of installing it).
set -euo pipefail

PYTHON_OPENAI=3.57.0
NODE_OPENAI=7.59.0
SDK="${EDGERUN_SDK_DIR:-$HOME/.cache/edgerun/sdk}"
VENV="$SDK/python-openai-$PYTHON_OPENAI"
NODE_DIR="$SDK/node-openai-$NODE_OPENAI"

log() { echo "install-sdk-clients: $*" >&2; }

python_ok() {
    "$VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$PYTHON_OPENAI')" 2>/dev/null
}
node_ok() {
    [ "$(node -p "require('$NODE_DIR/node_modules/openai/package.json').version" 2>/dev/null)" = "$NODE_OPENAI" ]
}
print_env() {
    echo "export EDGERUN_SDK_PYTHON=$VENV/bin/python"
    echo "export EDGERUN_SDK_NODE_PATH=$NODE_DIR/node_modules"
}

if [ "${1:-}" = "--check" ]; then
    python_ok || { log "Python openai==$PYTHON_OPENAI is not in $VENV: run scripts/install-sdk-clients.sh"; exit 1; }
    node_ok || { log "npm openai@$NODE_OPENAI is not in $NODE_DIR: run scripts/install-sdk-clients.sh"; exit 1; }
    print_env
    exit 0
fi

if ! python_ok; then
    log "installing Python openai==$PYTHON_OPENAI into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "openai==$PYTHON_OPENAI" >&2
fi

if ! node_ok; then
    log "installing npm openai@$NODE_OPENAI into $NODE_DIR"
    rm -rf "$NODE_DIR"
    mkdir -p "$NODE_DIR"
    (cd "$NODE_DIR" && echo '{"private":true}' > package.json \
        && npm install --silent --no-audit --no-fund --save-exact "openai@$NODE_OPENAI" >&2)
fi

if [ "${1:-}" = "--print-env" ]; then
    print_env
fi
