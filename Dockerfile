# offramp serving image (docs/deployment.md).
#
#   CPU (default target):  docker build -t offramp:cpu .
#   GPU:                   docker build --target gpu -t offramp:gpu .
#   Other base:            docker build --build-arg BASE_IMAGE=my/python:3.11 -t offramp:cpu .
#   Run:                   docker run --rm -p 8000:8000 -e OFFRAMP_API_KEY="$(openssl rand -hex 32)" offramp:cpu
#   Other bundles:         docker run --rm -p 8000:8000 -e OFFRAMP_API_KEY=... -v "$PWD/models:/models:ro" offramp:cpu
#
# The image binds 0.0.0.0 and sets no OFFRAMP_API_KEY and no OFFRAMP_ALLOW_ANONYMOUS: without a
# key `offramp serve` exits 2 rather than serve predict and reload to anyone. An open demo must
# say so: -e OFFRAMP_ALLOW_ANONYMOUS=true.
#
# The runtime image holds the serving install only (`pip install .`, no extras: no torch, no
# transformers, no compilers, no pip), in /opt/venv, and the bundles of models/ in /models.
# Builder and runtime start from the same base, so the venv's interpreter path holds.
# BASE_IMAGE must have python3 (>= 3.10) with venv; CI builds with a debootstrapped Debian
# bookworm (tests/deploy/container_test.sh), which has no registry to pull from.
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# Bundles: whatever models/ holds (possibly nothing) goes to /models.
FROM ${BASE_IMAGE} AS bundles
COPY . /context
RUN mkdir -p /models \
 && if [ -d /context/models ]; then cp -R /context/models/. /models/; fi \
 && chmod -R a+rX,go-w /models

# ---------------------------------------------------------------------------------------------
# GPU variant: CUDA runtime (with cuDNN) plus the distribution's Python, onnxruntime-gpu in
# place of onnxruntime, OFFRAMP_PROVIDER=cuda. Run with a GPU: docker run --gpus all ...
FROM ${CUDA_IMAGE} AS gpu-base
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM gpu-base AS gpu-bundles
COPY . /context
RUN mkdir -p /models \
 && if [ -d /context/models ]; then cp -R /context/models/. /models/; fi \
 && chmod -R a+rX,go-w /models

FROM gpu-base AS gpu-builder
COPY pyproject.toml README.md /src/
COPY app /src/app
COPY training /src/training
COPY bench /src/bench
RUN if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --default-timeout=120 /src \
 && /opt/venv/bin/pip uninstall -y onnxruntime \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --default-timeout=120 "onnxruntime-gpu>=1.18" \
 && /opt/venv/bin/python -c "import app.server, onnxruntime; print(onnxruntime.get_available_providers())" \
 && /opt/venv/bin/pip uninstall -y pip setuptools

FROM gpu-base AS gpu
RUN if command -v useradd >/dev/null; then \
        groupadd --gid 10001 offramp \
        && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin offramp; \
    else \
        echo 'offramp:x:10001:' >> /etc/group \
        && echo 'offramp:x:10001:10001::/tmp:/usr/sbin/nologin' >> /etc/passwd; \
    fi
COPY --from=gpu-builder /opt/venv /opt/venv
COPY --from=gpu-bundles /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    OFFRAMP_HOST=0.0.0.0 \
    OFFRAMP_PORT=8000 \
    OFFRAMP_MODEL_DIR=/models \
    OFFRAMP_PROVIDER=cuda
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('OFFRAMP_PORT', '8000'), timeout=4)"]
CMD ["/opt/venv/bin/offramp", "serve"]

# ---------------------------------------------------------------------------------------------
# CPU builder: the serving install into /opt/venv. No build tools reach the runtime stage.
FROM ${BASE_IMAGE} AS builder
COPY pyproject.toml README.md /src/
COPY app /src/app
COPY training /src/training
COPY bench /src/bench
# PIP_CERT: the base's CA bundle (a build that mounts the host's /etc/ssl/certs trusts what the
# host trusts; pip otherwise uses its own bundle).
RUN if [ -f /etc/ssl/certs/ca-certificates.crt ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi \
 && python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --default-timeout=120 /src \
 && /opt/venv/bin/python -c "import app.server, onnxruntime; print('onnxruntime', onnxruntime.__version__)" \
 && /opt/venv/bin/pip uninstall -y pip setuptools \
 && find /opt/venv -depth -type d -name tests -path '*/site-packages/numpy/*' -exec rm -rf {} +

# ---------------------------------------------------------------------------------------------
# CPU runtime (the default target).
FROM ${BASE_IMAGE} AS runtime
RUN if command -v useradd >/dev/null; then \
        groupadd --gid 10001 offramp \
        && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin offramp; \
    else \
        echo 'offramp:x:10001:' >> /etc/group \
        && echo 'offramp:x:10001:10001::/tmp:/usr/sbin/nologin' >> /etc/passwd; \
    fi
COPY --from=builder /opt/venv /opt/venv
COPY --from=bundles /models /models
# OFFRAMP_HOST 0.0.0.0: reachable from outside the container, so the server wants OFFRAMP_API_KEY
# at run time (deliberately not set here, nor OFFRAMP_ALLOW_ANONYMOUS). /models may be replaced by a
# mounted folder of bundles. The root filesystem may be read-only: only /tmp is written.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    OFFRAMP_HOST=0.0.0.0 \
    OFFRAMP_PORT=8000 \
    OFFRAMP_MODEL_DIR=/models
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('OFFRAMP_PORT', '8000'), timeout=4)"]
# Exec form: the server is PID 1 and gets SIGTERM itself, then drains in-flight requests.
CMD ["/opt/venv/bin/offramp", "serve"]
