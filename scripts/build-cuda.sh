#!/usr/bin/env bash
# Builds the CUDA binary for the test suite and the GPU check's pack: target/cuda/release/edgerun.
# A CUDA 13.0 toolkit (what driver 580 runs) is assembled from NVIDIA's PyPI wheels first (cached,
# ~650 MB once; scripts/install-cuda-toolkit.sh); no GPU is needed.
#
# It builds in the main target directory, with exactly the feature set of the test build
# (`--workspace --all-targets`) plus `edgerun-server/cuda`, so only what CUDA changes is compiled
# again (candle, cudarc, candle-kernels' PTX, the engine, the server and their tests): every other
# crate is the test build's own. That build's `target/release/edgerun` is then put back (cargo
# re-links a fresh unit), so nothing later runs the CUDA binary by mistake. An operator who wants
# only the binary builds it alone instead (docs/gpu.md):
#   cargo build --release --locked -p edgerun-server --features cuda --target-dir target/cuda
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

had_cpu_build=0
[ -x target/release/edgerun ] && had_cpu_build=1
(
    . "$(scripts/install-cuda-toolkit.sh)"
    cargo build --release --locked --workspace --all-targets --features edgerun-server/cuda
)
mkdir -p target/cuda/release
cp target/release/edgerun target/cuda/release/edgerun.partial
mv target/cuda/release/edgerun.partial target/cuda/release/edgerun
if [ "$had_cpu_build" = 1 ]; then
    cargo build --release --locked --workspace --all-targets
else
    rm -f target/release/edgerun
fi
