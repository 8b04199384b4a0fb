# kvrouter image: one image for every role (`kvrouter serve`, `kvrouter listen`, ...).
#
#   docker build -t kvrouter:0.1.0 .
#   docker run --rm -p 8000:8000 -e KVR_REDIS_URL=redis://host.docker.internal:6379/0 \
#       -e KVR_MODEL=... -e KVR_WORKERS=http://vllm:8000 kvrouter:0.1.0 serve
#
# Builder stage: uv (pinned) installs exactly what uv.lock pins, the runtime dependencies and
# the yaml, otel and epp extras (`kvrouter epp`), then kvrouter itself as a regular
# (non-editable) install, into /opt/venv.
# Every dependency ships manylinux wheels for amd64 and arm64, so no compiler is needed.
# Final stage: the same slim Python with only that virtualenv, running as uid 10001, and
# fit for a read-only root filesystem (nothing writes outside /tmp).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
RUN python -m pip install --no-cache-dir uv==0.13.8
WORKDIR /src
# Dependencies first, in a layer of their own that a code change does not rebuild.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --locked --no-install-project --no-editable --extra yaml --extra otel --extra epp
COPY kvrouter ./kvrouter
COPY router_node ./router_node
COPY eviction_listener ./eviction_listener
COPY lua ./lua
RUN uv sync --locked --no-editable --extra yaml --extra otel --extra epp \
    && /opt/venv/bin/kvrouter --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kvrouter" \
      org.opencontainers.image.description="KV-cache-aware request router for LLM inference fleets" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    KVR_PORT=8000
RUN groupadd --system --gid 10001 kvrouter \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin kvrouter
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
# 8000: router HTTP (KVR_PORT, the CLI's default too); 9100: listener metrics and health (KVR_METRICS_PORT).
EXPOSE 8000 9100
ENTRYPOINT ["kvrouter"]
CMD ["--help"]
