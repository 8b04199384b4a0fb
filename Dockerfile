# kvrouter image: one image for every role (`kvrouter serve`, `kvrouter listen`, ...).
#
#   docker build -t kvrouter:0.1.0 .
#   docker run --rm -p 8000:8000 -e KVR_REDIS_URL=redis://host.docker.internal:6379/0 \
#       -e KVR_MODEL=... -e KVR_WORKERS=http://vllm:8000 kvrouter:0.1.0 serve
#
# Builder stage: build the kvrouter wheel and install it with its dependencies (all of which
# ship manylinux wheels for amd64 and arm64, so no compiler is needed) into a virtualenv.
# Final stage: the same slim Python with only that virtualenv, running as uid 10001, and
# fit for a read-only root filesystem (nothing writes outside /tmp).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvrouter ./kvrouter
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install /wheels/kvrouter-*.whl \
    && /opt/venv/bin/kvrouter --version

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="kvrouter" \
      org.opencontainers.image.description="KV-cache-aware request router for LLM inference fleets" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache
RUN groupadd --system --gid 10001 kvrouter \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin kvrouter
COPY --from=builder /opt/venv /opt/venv
USER 10001:10001
# 8000: router HTTP (KVR_PORT); 9100: listener metrics and health (KVR_METRICS_PORT).
EXPOSE 8000 9100
ENTRYPOINT ["kvrouter"]
CMD ["--help"]
