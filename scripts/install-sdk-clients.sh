#!/usr/bin/env bash
# Installs the official client packages the compatibility tests drive the node with (the clients
# in tests/sdk/, the Worker scripts in tests/workers/):
#   * `openai` for Python (PyPI) and Node (npm): tests/tests/openai.rs and the edge tests;
#   * `cloudflare` for Python (PyPI) and Node (npm): tests/tests/models.rs (client.ai.models,
#     client.ai.run);
#   * `@cloudflare/ai` (npm, `new Ai(env.AI)`): tests/tests/binding.rs runs it inside workerd.
# Pinned versions, installed outside the repository (EDGERUN_SDK_DIR, default
# ~/.cache/edgerun/sdk); idempotent: each is skipped when that exact version is already there.
# Prints nothing on stdout unless given --print-env, which prints the variables the tests read
# as `export` lines: EDGERUN_SDK_PYTHON (openai), EDGERUN_SDK_CF_PYTHON (cloudflare),
# EDGERUN_SDK_NODE_PATH (a NODE_PATH with both npm SDKs), EDGERUN_SDK_CF_AI (the node_modules
# folder holding @cloudflare/ai and the two packages it imports). With --check it installs nothing: it prints those lines when everything is
# installed, and fails otherwise (the tests use this, so a missing SDK fails them instead of
# installing it).
set -euo pipefail

PYTHON_OPENAI=3.57.0
NODE_OPENAI=7.59.0
PYTHON_CLOUDFLARE=5.9.0
NODE_CLOUDFLARE=7.3.0
NODE_CLOUDFLARE_AI=1.2.2
SDK="${EDGERUN_SDK_DIR:-$HOME/.cache/edgerun/sdk}"

log() { echo "install-sdk-clients: $*" >&2; }

# python_venv NAME VERSION: the venv folder for PyPI package NAME at VERSION.
python_venv() { echo "$SDK/python-$1-$2"; }
# node_dir NAME VERSION: the npm folder for package NAME at VERSION (`/` in scopes made `-`).
node_dir() { echo "$SDK/node-$(echo "$1" | tr -d @ | tr / -)-$2"; }

python_ok() { # NAME MODULE VERSION
    "$(python_venv "$1" "$3")/bin/python" -c \
        "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$3')" 2>/dev/null
}
node_ok() { # NAME VERSION [EXTRA@VERSION...]
    local dir pkg
    dir="$(node_dir "$1" "$2")/node_modules"
    [ "$(node -p "require('$dir/$1/package.json').version" 2>/dev/null)" = "$2" ] || return 1
    for pkg in "${@:3}"; do
        [ "$(node -p "require('$dir/${pkg%@*}/package.json').version" 2>/dev/null)" = "${pkg##*@}" ] || return 1
    done
}

PYTHON_PACKAGES=("openai openai $PYTHON_OPENAI" "cloudflare cloudflare $PYTHON_CLOUDFLARE")
# @cloudflare/ai imports mustache and base64-js without declaring them: installed beside it, at
# the versions it was built against, so a Worker can load it.
NODE_PACKAGES=("openai $NODE_OPENAI" "cloudflare $NODE_CLOUDFLARE"
    "@cloudflare/ai $NODE_CLOUDFLARE_AI mustache@4.2.0 base64-js@1.5.1")

print_env() {
    echo "export EDGERUN_SDK_PYTHON=$(python_venv openai "$PYTHON_OPENAI")/bin/python"
    echo "export EDGERUN_SDK_CF_PYTHON=$(python_venv cloudflare "$PYTHON_CLOUDFLARE")/bin/python"
    echo "export EDGERUN_SDK_NODE_PATH=$(node_dir openai "$NODE_OPENAI")/node_modules:$(node_dir cloudflare "$NODE_CLOUDFLARE")/node_modules"
    echo "export EDGERUN_SDK_CF_AI=$(node_dir @cloudflare/ai "$NODE_CLOUDFLARE_AI")/node_modules"
}

if [ "${1:-}" = "--check" ]; then
    for p in "${PYTHON_PACKAGES[@]}"; do
        set -- $p
        python_ok "$1" "$2" "$3" || { log "Python $1==$3 is not in $(python_venv "$1" "$3"): run scripts/install-sdk-clients.sh"; exit 1; }
    done
    for p in "${NODE_PACKAGES[@]}"; do
        set -- $p
        node_ok "$@" || { log "npm $1@$2 is not in $(node_dir "$1" "$2"): run scripts/install-sdk-clients.sh"; exit 1; }
    done
    print_env
    exit 0
fi
MODE="${1:-}"

for p in "${PYTHON_PACKAGES[@]}"; do
    set -- $p
    if ! python_ok "$1" "$2" "$3"; then
        venv="$(python_venv "$1" "$3")"
        log "installing Python $1==$3 into $venv"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$1==$3" >&2
    fi
done

for p in "${NODE_PACKAGES[@]}"; do
    set -- $p
    if ! node_ok "$@"; then
        dir="$(node_dir "$1" "$2")"
        log "installing npm $1@$2 into $dir"
        rm -rf "$dir"
        mkdir -p "$dir"
        (cd "$dir" && echo '{"private":true}' > package.json \
            && npm install --silent --no-audit --no-fund --save-exact "$1@$2" "${@:3}" >&2)
    fi
done

if [ "$MODE" = "--print-env" ]; then
    print_env
fi
