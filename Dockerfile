# syntax=docker/dockerfile:1.7
# The gateway image: FastAPI + tokenizers + tritonclient, no torch, no Triton, no model. Multi-stage: the build
# stage has pip, the runtime stage only the finished virtual environment. It also runs the chart's model-setup
# init container (python -m service.modelprep.package install), which needs nothing beyond the standard library.
#   docker build -t ghcr.io/loraserve/gateway:0.1.0 --build-arg GIT_SHA=$(git rev-parse --short HEAD) .
# Debian's own Python 3.11 (the interpreter whose libpython the CPU Triton image's python backend stub links):
# one base for every image of the project. The release workflow pins BASE by digest.
ARG BASE=docker.io/library/debian:bookworm-slim

FROM ${BASE} AS python
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

FROM python AS build
# Behind a TLS-intercepting proxy, mount its CA bundle for the build only and name it here
# (--build-arg PIP_CERT=/path, e.g. with podman build -v /etc/ssl/certs/ca-certificates.crt:/path:ro);
# it is never copied into an image. Unset by default.
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY containers/constraints-gateway.txt ./
COPY service ./service
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --upgrade "pip==25.3"
RUN /opt/venv/bin/pip install --constraint constraints-gateway.txt ".[serve]"

FROM python AS runtime
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
EXPOSE 8080 9001
# start-period covers the gateway's wait for Triton and its models (GATEWAY_TRITON__STARTUP_TIMEOUT_SECONDS).
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
CMD ["python", "-m", "service.gateway"]
