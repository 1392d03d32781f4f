# convd in a container: built on NVIDIA's CUDA + cuDNN development image, run on the matching
# runtime image as a non-root user. The build runs the same two scripts CI runs on Debian 12
# (deploy/install-deps.sh, then cmake), so what CI proves about the build holds here.
#
#   docker build -t convd .
#   docker run --gpus all -p 50051:50051 -p 9464:9464 convd
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
ENV PATH=/opt/convd/bin:$PATH \
    LD_LIBRARY_PATH=/opt/convd/lib \
    CONVD_LISTEN=0.0.0.0:50051 \
    CONVD_METRICS_LISTEN=0.0.0.0:9464
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin convd
USER 10001
EXPOSE 50051 9464
# The standard gRPC health service, asked by convd's own client.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["convctl", "health", "--server", "127.0.0.1:50051", "--timeout", "4"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["convd"]
