# convd in a container, built on Debian 12 (bookworm) exactly as CI builds it and run on Debian 12
# slim as a non-root user. The build stage runs CI's own line (.ci/run: deploy/install-deps.sh,
# cmake, the build, ctest), so what CI proves about the build holds here; the runtime stage
# installs the Debian 12 runtime packages those -dev packages depend on, plus the CUDA runtime
# and cuDNN from NVIDIA's Debian 12 repository, and copies what `cmake --install` put in
# /opt/convd. tests/deploy/check_deploy.py checks all of that without a Docker engine; no
# `docker build` of this file has been run where it was written (docs/operations.md).
#
#   docker build -t convd .
#   docker run --gpus all -p 50051:50051 -p 9464:9464 -v /srv/convd:/etc/convd:ro convd
#
# The image serves on every interface, so it starts only with TLS and tokens (protected mode,
# docs/operations.md "Security"); their files come from the host, mounted at /etc/convd:
#   /etc/convd/tls/tls.crt, tls/tls.key   the server's certificate chain and key; the chain
#                                          must name localhost for the HEALTHCHECK below (or
#                                          run with -e CONVD_TLS_SERVER_NAME=a name it carries)
#   /etc/convd/tls/ca.crt                  the CA that signed it (for the HEALTHCHECK's client)
#   /etc/convd/tokens                      TENANT TOKEN lines, owned by uid 10001, mode 600
# (install -o 10001 -m 600 tokens /srv/convd/tokens). SIGHUP re-reads them all:
# docker kill --signal HUP CONTAINER. Mutual TLS: add --tls-client-ca /etc/convd/tls/clients.crt
# to the command, and give the HEALTHCHECK a client certificate with -e CONVD_TLS_CERT=...
# -e CONVD_TLS_KEY=... (the daemon's own are flags below, which win over those variables).
#
# Memory and CPUs: run with --memory and --cpus (or a pod's limits); the daemon reads its
# cgroup's limits and sizes --max-inflight-bytes, --max-request-bytes and --cpu-threads from
# them (docs/operations.md "Memory and CPU limits"). On a host without a GPU the daemon logs one
# line and runs on its CPU devices.
#
# CUDA and cuDNN: NVIDIA's packages, not Debian's (Debian 12 has no cuDNN). NVIDIA's apt key and
# the address of its CUDA repository are taken from NVIDIA's own CUDA base image, whose
# cuda-keyring package installed them (/usr/share/keyrings/cuda-archive-keyring.gpg and
# /etc/apt/sources.list.d/cuda-ubuntu2204-x86_64.list); only the distribution in the address is
# changed, to debian12, whose repository is signed with the same key. The package names below
# (cuda-nvcc-12-6, cuda-cudart-dev-12-6, cuda-cudart-12-6, libcudnn9-dev-cuda-12,
# libcudnn9-cuda-12) follow NVIDIA's naming in its Ubuntu and Debian repositories and its own
# images' Dockerfiles; that the debian12 repository carries each of them was not checked where
# this file was written (no access to it there).
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.6.3-base-ubuntu22.04

FROM ${CUDA_BASE_IMAGE} AS nvidia-apt
RUN sed -n 's|/repos/ubuntu2204/|/repos/debian12/|p' /etc/apt/sources.list.d/cuda-ubuntu2204-*.list \
      > /cuda-debian12.list \
 && grep -q '/repos/debian12/' /cuda-debian12.list

# ---- build: Debian 12, CI's script and commands ---------------------------------------------
FROM debian:bookworm AS build
# The CUDA release (its packages are named 12-6, its files live in /usr/local/cuda-12.6) and
# the NVIDIA packages the build needs: nvcc (CMake's FindCUDAToolkit wants it), the CUDA
# runtime's headers and library, cuDNN's headers and library.
ARG CUDA_VERSION=12.6
ARG CUDA_BUILD_PACKAGES="cuda-nvcc-12-6 cuda-cudart-dev-12-6 libcudnn9-dev-cuda-12"
ENV DEBIAN_FRONTEND=noninteractive
COPY --from=nvidia-apt /usr/share/keyrings/cuda-archive-keyring.gpg /usr/share/keyrings/
COPY --from=nvidia-apt /cuda-debian12.list /etc/apt/cuda-debian12.list
# The package lists stay in this stage: the deploy test (ctest below) asks apt about Debian 12's
# packages.
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends ca-certificates \
 && mv /etc/apt/cuda-debian12.list /etc/apt/sources.list.d/ \
 && apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends ${CUDA_BUILD_PACKAGES}
ENV PATH=/usr/local/cuda-${CUDA_VERSION}/bin:$PATH
WORKDIR /src
# The dependencies first, in their own layer (the same script runs again below and finds them).
COPY deploy/install-deps.sh deploy/install-deps.sh
RUN ./deploy/install-deps.sh
COPY . .
# CI's line, as .ci/run has it: the tests need no GPU and run here as in CI (the Python interop
# tests and the deploy checks included).
RUN ./deploy/install-deps.sh && cmake -S . -B build -DCONVD_WERROR=ON && cmake --build build -j"$(nproc)" && ctest --test-dir build --output-on-failure
# CONVD_CUDA is AUTO in CI: an image whose build did not find nvcc and cuDNN would serve on CPUs
# alone, so it fails here instead.
RUN ldd build/convd | grep -q 'libcudnn\.so' \
 || { echo "convd was built without CUDA/cuDNN: see build/CMakeCache.txt (CUDNN_INCLUDE_DIR, CUDNN_LIBRARY)" >&2; exit 1; }
RUN cmake --install build --prefix /opt/convd

# ---- runtime: Debian 12 slim, the runtime packages, the installed files ------------------------
FROM debian:bookworm-slim
ARG CUDA_RUNTIME_PACKAGES="cuda-cudart-12-6 libcudnn9-cuda-12"
COPY --from=nvidia-apt /usr/share/keyrings/cuda-archive-keyring.gpg /usr/share/keyrings/
COPY --from=nvidia-apt /cuda-debian12.list /etc/apt/cuda-debian12.list
# Debian's: the runtime packages that libgrpc-dev, libprotobuf-c-dev, libuv1-dev, libdnnl-dev,
# libxxhash-dev and libopenmpi-dev depend on (what they pull in, OpenSSL, c-ares, abseil, re2,
# libgomp, OpenCL's loader, hwloc, PMIx, comes with them), and openmpi-bin for mpirun and orted
# where the image runs as MPI ranks (convd --mpi, docs/operations.md); NVIDIA's: the CUDA runtime and cuDNN. The GPU driver's
# libraries come from the host through the NVIDIA container runtime.
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends ca-certificates \
 && mv /etc/apt/cuda-debian12.list /etc/apt/sources.list.d/ \
 && apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends \
      libgrpc29 libprotobuf-c1 libuv1 libdnnl2 libxxhash0 libopenmpi3 openmpi-bin \
      ${CUDA_RUNTIME_PACKAGES} \
 && rm -rf /var/lib/apt/lists/*
# bin/convd, bin/convctl, lib/libconvd_client.so* (convctl finds it through its run path), the
# client's headers and pkg-config file.
COPY --from=build /opt/convd /opt/convd
# Metrics stay plaintext HTTP without authentication (counters and gauges, no tensors or
# tokens): published on every interface here by choice (CONVD_METRICS_PUBLIC); firewall the
# port, or set CONVD_METRICS_LISTEN=127.0.0.1:9464. CONVD_TLS_CA and CONVD_TLS_SERVER_NAME are
# convctl's, for the HEALTHCHECK. NVIDIA_DRIVER_CAPABILITIES asks the NVIDIA container runtime
# for the compute libraries; which GPUs, --gpus (or Kubernetes' device plugin) says, so this
# image sets no NVIDIA_VISIBLE_DEVICES.
ENV PATH=/opt/convd/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CONVD_LISTEN=0.0.0.0:50051 \
    CONVD_METRICS_LISTEN=0.0.0.0:9464 \
    CONVD_METRICS_PUBLIC=true \
    CONVD_TLS_CA=/etc/convd/tls/ca.crt \
    CONVD_TLS_SERVER_NAME=localhost
RUN groupadd --system --gid 10001 convd \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin convd
USER 10001
EXPOSE 50051 9464
# The standard gRPC health service (open without a token), asked by convd's own client over TLS.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["convctl", "health", "--server", "127.0.0.1:50051", "--timeout", "4"]
STOPSIGNAL SIGTERM
# The secrets as flags, not CONVD_TLS_CERT/CONVD_TLS_KEY: convctl reads those names for a
# client certificate, and the HEALTHCHECK runs in this environment.
ENTRYPOINT ["convd", "--tls-cert", "/etc/convd/tls/tls.crt", "--tls-key", "/etc/convd/tls/tls.key", \
            "--auth-tokens", "/etc/convd/tokens"]
