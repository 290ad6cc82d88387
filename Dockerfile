# syntax=docker/dockerfile:1.7
# waferwatch: one image for migrate, ingest, worker, trainer, beat and flower (docker-compose.yml).
# CUDA-enabled torch comes from PyTorch's CUDA wheel index; the backbone weights are baked in at build
# time (TORCH_HUB_WEIGHTS), so no container downloads anything at run time.

ARG PYTHON_VERSION=3.11
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124

# ---------------------------------------------------------------- build: wheels and weights
FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_INDEX_URL
# Comma-separated "model:weights" pairs of torchvision builders to cache, e.g.
# "wide_resnet101_2:IMAGENET1K_V1,resnet18:IMAGENET1K_V1".
ARG TORCH_HUB_WEIGHTS=wide_resnet101_2:IMAGENET1K_V1
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TORCH_HOME=/opt/torch-cache
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY worker ./worker
COPY scheduler ./scheduler
COPY migrations ./migrations
# The pinned torch/torchvision of pyproject.toml, as CUDA builds (the extra index serves +cuXXX wheels).
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" ".[deploy]"
RUN python - <<'PY'
import os
import torchvision

for item in filter(None, os.environ.get("TORCH_HUB_WEIGHTS", "").split(",")):
    name, weights = item.split(":")
    getattr(torchvision.models, name)(weights=weights)
    print("cached", name, weights)
PY

# ---------------------------------------------------------------- runtime
FROM python:${PYTHON_VERSION}-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends procps libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 waferwatch
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=waferwatch:waferwatch /opt/torch-cache /opt/torch-cache
ENV PATH=/opt/venv/bin:$PATH \
    TORCH_HOME=/opt/torch-cache \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /app
USER waferwatch
# Every service answers `waferwatch --help` when the image is sound; services add their own checks
# in docker-compose.yml (pg_isready, webhook /health, celery ping, flower /healthcheck).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 CMD ["waferwatch", "--help"]
CMD ["waferwatch", "--help"]
