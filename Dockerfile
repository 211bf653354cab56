# syntax=docker/dockerfile:1.7
# The gateway image: FastAPI + tokenizers + tritonclient, no torch, no Triton. Multi-stage: the build stage has pip
# and the wheel cache, the runtime stage only the finished virtual environment.
#   docker build -t ghcr.io/loraserve/gateway:0.1.0 --build-arg GIT_SHA=$(git rev-parse --short HEAD) .
# The install line below is exercised in CI without Docker (tests/unit/test_docker.py resolves the very same
# requirement and checks that torch, peft and transformers stay out).
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN python -m venv /opt/venv
RUN /opt/venv/bin/pip install ".[serve]"

FROM ${PYTHON_IMAGE} AS runtime
ARG GIT_SHA=unknown
# A fixed numeric uid/gid, matching the chart's runAsUser/fsGroup (1000), without a login shell or home.
RUN groupadd --system --gid 1000 loraserve \
 && useradd --system --uid 1000 --gid 1000 --no-create-home --shell /usr/sbin/nologin loraserve
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    GATEWAY_TRITON__MODEL_REPOSITORY=/models \
    GATEWAY_BUILD_GIT_SHA=${GIT_SHA}
USER 1000:1000
EXPOSE 8080
# start-period covers the gateway's wait for Triton and its models (GATEWAY_TRITON__STARTUP_TIMEOUT_SECONDS).
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
CMD ["python", "-m", "service.gateway"]
