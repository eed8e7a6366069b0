# syntax=docker/dockerfile:1
#
# edgerun images. Two targets:
#   docker build --target cpu  -t edgerun:cpu  .
#   docker build --target cuda -t edgerun:cuda --build-arg CUDA_COMPUTE_CAP=90 .   (90 = H100/H200, 89 = L4/L40S, 80 = A100, 86 = A10/RTX 30xx)
# Base images are build arguments, so a mirror or a pinned digest can be substituted.
# Runs as a non-root user; models download to the /models volume (HF_HOME); HEALTHCHECK uses
# `edgerun health`, so the runtime image needs no curl.

ARG RUST_IMAGE=rust:1-bookworm
ARG CPU_RUNTIME_IMAGE=debian:bookworm-slim

# ---- CPU build -------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS build-cpu
WORKDIR /src
COPY . .
# x86-64-v3 (AVX2/FMA) is what .cargo/config.toml targets; override for other CPUs.
ARG RUSTFLAGS="-C target-cpu=x86-64-v3"
ENV RUSTFLAGS=${RUSTFLAGS}
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p edgerun-server --bin edgerun \
    && cp target/release/edgerun /usr/local/bin/edgerun

# ---- CUDA build ------------------------------------------------------------------------------
# The same steps as CI and scripts/gpu-check.sh: a CUDA 13.0 toolkit assembled from NVIDIA's
# PyPI wheels by scripts/install-cuda-toolkit.sh (sha256-pinned; no GPU needed to build). The
# image runs on NVIDIA driver 580 or newer (CUDA 13.0); `edgerun serve` refuses an older driver,
# or a GPU older than CUDA_COMPUTE_CAP, in one line before it loads anything.
FROM ${RUST_IMAGE} AS build-cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip \
    && rm -rf /var/lib/apt/lists/*
ARG CUDA_COMPUTE_CAP=90
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} EDGERUN_CACHE_DIR=/cache
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    --mount=type=cache,target=/cache \
    cargo fetch --locked \
    && . "$(scripts/install-cuda-toolkit.sh)" \
    && cargo build --release --locked -p edgerun-server --bin edgerun --features cuda \
    && cp target/release/edgerun /usr/local/bin/edgerun \
    && mkdir -p /opt/edgerun-cuda \
    && cp -L "$CUDA_ROOT"/lib/libcublas.so.13 "$CUDA_ROOT"/lib/libcublasLt.so.13 \
       "$CUDA_ROOT"/lib/libcudart.so.13 "$CUDA_ROOT"/lib/libcurand.so.10 \
       "$CUDA_ROOT"/lib/libnvrtc.so.13 "$CUDA_ROOT"/lib/libnvrtc-builtins.so.13.0 /opt/edgerun-cuda/

# ---- runtime images --------------------------------------------------------------------------
FROM ${CPU_RUNTIME_IMAGE} AS cpu
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /models --shell /usr/sbin/nologin edgerun \
    && mkdir -p /models && chown edgerun /models
COPY --from=build-cpu /usr/local/bin/edgerun /usr/local/bin/edgerun
ENV HF_HOME=/models EDGERUN_LISTEN=0.0.0.0:8080 EDGERUN_DEVICE=cpu
VOLUME ["/models"]
USER edgerun
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10m --retries=3 CMD ["edgerun", "health"]
ENTRYPOINT ["edgerun", "serve"]

# CUDA 13 libraries from the build (the ones it linked against); the driver's libcuda.so.1 is
# mounted by the NVIDIA container toolkit (`docker run --gpus all`).
FROM ${CPU_RUNTIME_IMAGE} AS cuda
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /models --shell /usr/sbin/nologin edgerun \
    && mkdir -p /models && chown edgerun /models
COPY --from=build-cuda /opt/edgerun-cuda /opt/edgerun-cuda
RUN echo /opt/edgerun-cuda > /etc/ld.so.conf.d/edgerun-cuda.conf && ldconfig
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=build-cuda /usr/local/bin/edgerun /usr/local/bin/edgerun
ENV HF_HOME=/models EDGERUN_LISTEN=0.0.0.0:8080 EDGERUN_DEVICE=cuda:0
VOLUME ["/models"]
USER edgerun
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10m --retries=3 CMD ["edgerun", "health"]
ENTRYPOINT ["edgerun", "serve"]
