#!/usr/bin/env bash
# Builds the engine's CPU kernels for aarch64 and runs their unit tests there under qemu-user:
# the NEON paths (Q4_1, Q8_0) and the portable ones (the K-quants' in place: candle's NEON dot
# products) against candle's reference, every batch size, rows bitwise independent of the batch.
# No aarch64 machine is needed. Idempotent: installs the target's std (rustup), a cross linker
# and qemu-user (Debian) once, then builds incrementally (target/aarch64, ~6 min from scratch).
#   scripts/test-aarch64.sh [extra cargo test args, e.g. a test name filter]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TARGET=aarch64-unknown-linux-gnu
log() { echo "test-aarch64: $*" >&2; }

if ! rustup target list --installed | grep -qx "$TARGET"; then
    log "installing the $TARGET standard library (rustup)"
    rustup target add "$TARGET" || {
        log "rustup could not install $TARGET's standard library: the NEON kernels cannot be built here"
        exit 1
    }
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null \
    || [ ! -d /usr/aarch64-linux-gnu/lib ]; then
    log "installing gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, qemu-user (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# The engine's library tests that need no model (kernels, sampler, planner, allocator, ...),
# compiled for aarch64 (neon is part of its baseline) and run under emulation.
# Line tables only (file:line in a panic's backtrace, no full debuginfo): most of this build's
# time is candle and its dependencies compiled at opt-level 3 for aarch64, and full debuginfo
# there costs compile and link time nothing here reads.
CARGO_PROFILE_DEV_DEBUG=line-tables-only \
    cargo test --locked --target "$TARGET" --target-dir target/aarch64 -p edgerun-engine --lib "$@"
