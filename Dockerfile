# convd in a container: built on NVIDIA's CUDA + cuDNN development image, run on the matching
# runtime image as a non-root user. The build runs the same two scripts CI runs on Debian 12
# (deploy/install-deps.sh, then cmake), so what CI proves about the build holds here.
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
# CUDA 12.6 with cuDNN 9 on Ubuntu 22.04; on a host without a GPU the daemon logs one line and
# runs on its CPU devices.
ARG CUDA_TAG=12.6.3-cudnn
ARG UBUNTU=ubuntu22.04

FROM nvidia/cuda:${CUDA_TAG}-devel-${UBUNTU} AS build
ENV DEBIAN_FRONTEND=noninteractive
WORKDIR /src
COPY deploy/install-deps.sh deploy/install-deps.sh
RUN ./deploy/install-deps.sh && rm -rf /var/lib/apt/lists/*
COPY . .
# The tests need no GPU: they run here as in CI (the Python interop tests included).
RUN cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCONVD_CUDA=AUTO -DCONVD_WERROR=ON \
 && cmake --build build -j"$(nproc)" \
 && ctest --test-dir build --output-on-failure \
 && deploy/docker/collect.sh build /opt/convd

FROM nvidia/cuda:${CUDA_TAG}-runtime-${UBUNTU}
# Only the binaries and the shared libraries they use that the runtime image lacks.
COPY --from=build /opt/convd /opt/convd
# Metrics stay plaintext HTTP without authentication (counters and gauges, no tensors or
# tokens): published on every interface here by choice (CONVD_METRICS_PUBLIC); firewall the
# port, or set CONVD_METRICS_LISTEN=127.0.0.1:9464. CONVD_TLS_CA and CONVD_TLS_SERVER_NAME are
# convctl's, for the HEALTHCHECK.
ENV PATH=/opt/convd/bin:$PATH \
    LD_LIBRARY_PATH=/opt/convd/lib \
    CONVD_LISTEN=0.0.0.0:50051 \
    CONVD_METRICS_LISTEN=0.0.0.0:9464 \
    CONVD_METRICS_PUBLIC=true \
    CONVD_TLS_CA=/etc/convd/tls/ca.crt \
    CONVD_TLS_SERVER_NAME=localhost
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin convd
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
