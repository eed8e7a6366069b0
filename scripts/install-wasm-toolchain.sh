#!/usr/bin/env bash
# Installs what building the Worker (deploy/worker) to wasm and running it in workerd needs.
# Idempotent: every step is skipped when its result is already there, so only the first run on a
# machine is slow (~2.5 min: apt, two debug `cargo install`s, npm); later runs take a second.
#
# What and why (see deploy/worker/README.md):
# - Debian's rustc-web/cargo-web (>= 1.91: worker 0.8.x needs it) + rust-web-src, because the
#   rustup toolchain here has no wasm32 std and cannot download it: std is built from source
#   (build-std) with RUSTC_BOOTSTRAP=1. lld-22 provides wasm-ld.
# - wasm-bindgen-cli at exactly the wasm-bindgen version in deploy/worker/Cargo.lock.
# - worker-build at the version of the `worker` crate.
# - workerd (and wrangler, for operators) from npm, pinned by deploy/worker/package-lock.json.
#
# Prints the environment the build needs as `export` lines on stdout when given --print-env.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORKER_DIR="$ROOT/deploy/worker"
TOOLS="${EDGERUN_TOOLS_DIR:-$HOME/.cache/edgerun/tools}"
MIN_RUSTC_MINOR=91

log() { echo "install-wasm-toolchain: $*" >&2; }

locked_version() { # crate name -> version in deploy/worker/Cargo.lock
    awk -v name="$1" '$0 == "name = \"" name "\"" { getline; gsub(/version = |"/, ""); print; exit }' \
        "$WORKER_DIR/Cargo.lock"
}

debian_rustc_ok() {
    [ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] && command -v wasm-ld-22 >/dev/null \
        && [ -d /usr/lib/rustlib/src/rust/library ] || return 1
    local minor
    minor="$(/usr/bin/rustc --version | sed -E 's/^rustc 1\.([0-9]+).*/\1/')"
    [ "$minor" -ge "$MIN_RUSTC_MINOR" ]
}

need() { command -v "$1" >/dev/null || { log "$1 is needed: $2"; exit 1; }; }
need cargo "the Rust toolchain (https://rustup.rs) builds wasm-bindgen-cli and worker-build"
need npm "Node.js 20+ and npm install workerd and wrangler"

if ! debian_rustc_ok; then
    command -v apt-get >/dev/null || {
        log "needs Debian's rustc-web >= 1.$MIN_RUSTC_MINOR, rust-web-src and lld-22 (apt); elsewhere install"
        log "a Rust toolchain with the wasm32-unknown-unknown target and adapt scripts/build-worker.sh"
        exit 1
    }
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
        need sudo "installing Debian packages needs root"
        SUDO=sudo
    fi
    log "installing Debian's rustc-web, cargo-web, rust-web-src, lld-22"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        rustc-web cargo-web rust-web-src libstd-rust-web-dev lld-22 >&2
    debian_rustc_ok || { log "Debian's rustc is $(/usr/bin/rustc --version); need 1.$MIN_RUSTC_MINOR+"; exit 1; }
fi

# worker-build refuses to start unless `rustc --print target-libdir --target wasm32-unknown-unknown`
# names a directory; with build-std there is none. This wrapper answers that one query with an
# empty folder and hands everything else to Debian's rustc.
mkdir -p "$TOOLS/wasm-rustc/bin" "$TOOLS/wasm-rustc/empty-libdir"
cat > "$TOOLS/wasm-rustc/bin/rustc.tmp" <<WRAP
#!/bin/sh
case " \$* " in
  *" --print target-libdir "*|*" --print=target-libdir "*) echo "$TOOLS/wasm-rustc/empty-libdir"; exit 0 ;;
esac
exec /usr/bin/rustc "\$@"
WRAP
chmod +x "$TOOLS/wasm-rustc/bin/rustc.tmp"
mv "$TOOLS/wasm-rustc/bin/rustc.tmp" "$TOOLS/wasm-rustc/bin/rustc"
ln -sf /usr/bin/cargo "$TOOLS/wasm-rustc/bin/cargo"

# The host's (rustup) cargo builds the two tools: they run on the host.
HOST_CARGO="$(command -v cargo)"
case "$HOST_CARGO" in "$TOOLS"/*) HOST_CARGO="$HOME/.cargo/bin/cargo" ;; esac

install_crate() { # name version binary [extra args]
    local name="$1" version="$2" bin="$3"; shift 3
    local dest="$TOOLS/$name-$version"
    if [ -x "$dest/bin/$bin" ]; then return; fi
    log "cargo install $name $version (once per machine; several minutes)"
    rm -rf "$dest.partial"
    # A debug build without debug info: compiles in a fraction of a release build's time (this is
    # most of what a new machine spends here), and both tools run for seconds per Worker build.
    env -u RUSTFLAGS -u CARGO_BUILD_RUSTFLAGS CARGO_PROFILE_DEV_DEBUG=0 \
        "$HOST_CARGO" install "$name" --version "$version" --debug \
        --root "$dest.partial" --quiet "$@" >&2
    mv "$dest.partial" "$dest"
}

WASM_BINDGEN_VERSION="$(locked_version wasm-bindgen)"
WORKER_VERSION="$(locked_version worker)"
# Not --locked: wasm-bindgen-cli's own lockfile pins a webpki-roots that conflicts.
install_crate wasm-bindgen-cli "$WASM_BINDGEN_VERSION" wasm-bindgen
install_crate worker-build "$WORKER_VERSION" worker-build

# workerd (and wrangler) from npm, exactly as locked.
if [ ! -x "$WORKER_DIR/node_modules/.bin/workerd" ] \
    || ! cmp -s "$WORKER_DIR/package-lock.json" "$WORKER_DIR/node_modules/.package-lock.json.installed"; then
    log "npm ci in deploy/worker"
    (cd "$WORKER_DIR" && npm ci --no-audit --no-fund --loglevel=error >&2)
    cp "$WORKER_DIR/package-lock.json" "$WORKER_DIR/node_modules/.package-lock.json.installed"
fi

if [ "${1:-}" = "--print-env" ]; then
    echo "export PATH=\"$TOOLS/wasm-rustc/bin:$TOOLS/worker-build-$WORKER_VERSION/bin:$TOOLS/wasm-bindgen-cli-$WASM_BINDGEN_VERSION/bin:\$PATH\""
    echo "export WASM_BINDGEN_BIN=\"$TOOLS/wasm-bindgen-cli-$WASM_BINDGEN_VERSION/bin/wasm-bindgen\""
    echo "export WORKERD_BIN=\"$WORKER_DIR/node_modules/.bin/workerd\""
fi
