# LabelFool server image. Built with the very script the README and CI use (scripts/setup), so the
# image runs what the tests tested.
#
#   docker build -t labelfool .                          # CPU (torch CPU wheel, ~1 GB image)
#   docker build --build-arg VARIANT=cuda -t labelfool:cuda .   # CUDA (torch's CUDA wheels)
#   docker run -p 8080:8080 -e LABELFOOL_API_KEY=$(openssl rand -hex 24) -v labelfool-data:/var/lib/labelfool labelfool
#   docker run --gpus all -p 8080:8080 -e LABELFOOL_API_KEY=… labelfool:cuda    # needs the NVIDIA container toolkit
# It binds 0.0.0.0, so it refuses to start without an API key (LABELFOOL_API_KEY); probes answer on
# 8081 too. Jobs and studies live in the volume /var/lib/labelfool, owned by the runtime user.
#
# BUILD=prebuilt takes the binary, libtorch and the default model already built by scripts/setup
# instead of building them here: `scripts/container build` assembles that context and builds the
# image with podman (the container test in tests/container.rs does so). The runtime stage is the
# same either way.
ARG VARIANT=cpu
ARG BUILD=source

# ---- build from source: libtorch from the pinned torch wheel, models, binary, matrices -------------
FROM rust:1.95-bookworm AS build-source
ARG VARIANT
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ENV LABELFOOL_CACHE=/opt/labelfool
# LABELFOOL_SETUP=serve: only what `serve` needs (no MLServer, no Chromium).
RUN if [ "$VARIANT" = "cpu" ]; then export TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu; fi \
 && LABELFOOL_SETUP=serve scripts/setup \
 && target/release/labelfool doctor --device cpu
# Keep only what the binary loads: libtorch (+ the NVIDIA libraries it points at, CUDA variant).
RUN mkdir -p /opt/runtime \
 && site=$(ls -d /opt/labelfool/torch-*/lib/python3*/site-packages) \
 && mkdir -p "/opt/runtime$site/torch" \
 && cp -a "$site/torch/lib" "/opt/runtime$site/torch/lib" \
 && cp -a "$site/torch/version.py" "/opt/runtime$site/torch/version.py" \
 && if [ -d "$site/nvidia" ]; then cp -a "$site/nvidia" "/opt/runtime$site/nvidia"; fi \
 && mkdir -p /opt/runtime/opt/labelfool/models \
 && cp -a /opt/labelfool/models/efficientnet-lite0 /opt/runtime/opt/labelfool/models/ \
 && cp target/release/labelfool /opt/runtime/labelfool

# ---- or prebuilt: the same tree, assembled by scripts/container from this checkout's build ---------
# libtorch and the model first, the binary apart: a rebuild that changes only the binary reuses the
# gigabytes' layers.
FROM debian:bookworm-slim AS build-prebuilt
COPY runtime/opt/ /opt/runtime/opt/
COPY bin/labelfool /opt/runtime/labelfool

FROM build-${BUILD} AS build

# ---- runtime ---------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 labelfool \
 && mkdir -p /var/lib/labelfool \
 && chown labelfool /var/lib/labelfool
COPY --from=build /opt/runtime/opt/ /opt/
COPY --from=build /opt/runtime/labelfool /usr/local/bin/labelfool
COPY config/default.toml /etc/labelfool/default.toml
ENV LABELFOOL_CACHE=/opt/labelfool \
    LABELFOOL_CONFIG=/etc/labelfool/default.toml \
    LABELFOOL_BIND=0.0.0.0:8080 \
    LABELFOOL_SERVER__PROBE_BIND=0.0.0.0:8081 \
    LABELFOOL_JOBS__DATABASE=/var/lib/labelfool/jobs.sqlite3 \
    LABELFOOL_JOBS__DIR=/var/lib/labelfool/jobs \
    LABELFOOL_LOG_FORMAT=json
VOLUME /var/lib/labelfool
USER labelfool
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/labelfool"]
CMD ["serve"]
