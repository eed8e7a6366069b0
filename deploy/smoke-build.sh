#!/usr/bin/env bash
# Smoke-builds the CPU image without a registry or a Docker engine: a Debian base made locally
# with debootstrap, a Rust build base made from it plus this machine's rustup toolchain, then
# `buildah bud --isolation chroot --target cpu` on the Dockerfile with those as the base-image
# build arguments, and finally `edgerun --version` inside the built image.
# Needs root, buildah and debootstrap (Debian packages). Not part of CI (tens of minutes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work="${SMOKE_DIR:-/tmp/edgerun-smoke}"
mkdir -p "$work"

if ! buildah inspect --type image localhost/edgerun-base:bookworm >/dev/null 2>&1; then
  if [ ! -x "$work/rootfs/usr/bin/apt-get" ]; then
    debootstrap --variant=minbase --include=ca-certificates,passwd,gcc,libc6-dev \
      bookworm "$work/rootfs" http://deb.debian.org/debian
  fi
  ctr=$(buildah from scratch)
  buildah add "$ctr" "$work/rootfs" /
  buildah commit --rm "$ctr" localhost/edgerun-base:bookworm
fi

if ! buildah inspect --type image localhost/edgerun-rust:local >/dev/null 2>&1; then
  toolchain="$(rustc --print sysroot)"
  ctr=$(buildah from localhost/edgerun-base:bookworm)
  buildah add "$ctr" "$toolchain" /opt/rust
  # Trust what this machine trusts (a workplace proxy's CA, say), so cargo can reach crates.io.
  buildah add "$ctr" "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" /etc/ssl/certs/ca-certificates.crt
  buildah config --env PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env CARGO_HOME=/usr/local/cargo "$ctr"
  buildah commit --rm "$ctr" localhost/edgerun-rust:local
fi

buildah bud --isolation chroot --format docker --target cpu \
  --build-arg RUST_IMAGE=localhost/edgerun-rust:local \
  --build-arg CPU_RUNTIME_IMAGE=localhost/edgerun-base:bookworm \
  -t localhost/edgerun:cpu .

buildah inspect --type image --format "healthcheck: {{.Docker.Config.Healthcheck.Test}}{{println}}" localhost/edgerun:cpu
ctr=$(buildah from localhost/edgerun:cpu)
trap 'buildah rm "$ctr" >/dev/null' EXIT
buildah run --isolation chroot "$ctr" -- edgerun --version
buildah run --isolation chroot --user edgerun "$ctr" -- id
