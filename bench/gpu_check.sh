#!/usr/bin/env bash
# The GPU check of a fresh CUDA machine, in one go (about 5 minutes):
#   bench/gpu_check.sh [OUT_DIR]
# It creates (or reuses) the virtual environment like `make test` does, prints the device, runs the tests
# that need CUDA (a GPU batch is normalised from uint8 bit-identically to the CPU's; the banks searched on
# the GPU give the CPU's neighbours and scores), times the scoring
# ensemble for efficientnet_lite0 (real weights) and wide_resnet101_2 (random weights: timing only) at
# batch 32 and 128 in bf16 autocast (images/s, ms/batch, peak GPU memory), and runs the pipeline benchmark
# on the GPU over a 2,000-image backlog (pipeline images/s, ratio to the model alone, CPU per image).
# It also times 2048² JPEGs decoded by nvJPEG against the worker's CPU decode (bench_gpu_decode.py).
# Every figure also lands in OUT_DIR (default runs/gpu-check) as one log per step.
# Exits 2 when no CUDA device is visible, before installing anything heavy.
#
# A GPU machine with no package index but a Python that has torch (a lent or air-gapped box):
#   GPU_CHECK_BUNDLE=.gpu-bundle bench/gpu_check.sh        (the folder comes from bench/gpu_bundle.py)
# uses that Python (GPU_CHECK_PYTHON, default python3) with the bundle's wheels, images and fitted models
# instead of `make install`, and skips the pipeline step (it needs PostgreSQL, Redis and the worker's
# packages). GPU_CHECK_DEVICE=cpu rehearses every step on the CPU (figures meaningless, plumbing checked);
# GPU_CHECK_BATCHES (default "32 128") and GPU_CHECK_REPEATS (default 5) size the scoring steps,
# GPU_CHECK_PIPELINE_IMAGES (default 2000) the pipeline's backlog.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu-check}"
BUNDLE="${GPU_CHECK_BUNDLE:-}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
BATCHES="${GPU_CHECK_BATCHES:-32 128}"
REPEATS="${GPU_CHECK_REPEATS:-5}"
PIPELINE_IMAGES="${GPU_CHECK_PIPELINE_IMAGES:-2000}"
export PYTHONUNBUFFERED=1  # a step stopped at its time limit still leaves what it printed in its log
mkdir -p "$OUT"

if [ "$DEVICE" = cuda ]; then
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu_check: no NVIDIA GPU visible (nvidia-smi -L failed); run this on the GPU host" >&2
        exit 2
    fi
    nvidia-smi -L | tee "$OUT/device.txt"
else
    echo "gpu_check: REHEARSAL on device $DEVICE: the figures are not GPU figures" | tee "$OUT/device.txt"
fi

if [ -n "$BUNDLE" ]; then
    for part in wheels datasets bench-cache; do
        if [ ! -d "$BUNDLE/$part" ]; then
            echo "gpu_check: $BUNDLE/$part is missing; build the bundle with 'python bench/gpu_bundle.py --out $BUNDLE'" >&2
            exit 2
        fi
    done
    PY="${GPU_CHECK_PYTHON:-python3}"
    SITE="${TMPDIR:-/tmp}/waferwatch-gpu-check-site"
    $PY -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$SITE" "$BUNDLE"/wheels/*.whl \
        >"$OUT/install.log" 2>&1 || { echo "gpu_check: installing $BUNDLE/wheels failed, see $OUT/install.log" >&2; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export WAFERWATCH_DATASETS="$PWD/$BUNDLE/datasets"
    mkdir -p runs/bench-cache
    cp -R "$BUNDLE"/bench-cache/. runs/bench-cache/
    # tests/conftest.py serves the database and broker tests: the GPU tests need only tests/models' fixtures.
    TEST_SCOPE=(--confcutdir=tests/models)
else
    make install >"$OUT/install.log" 2>&1 || { echo "gpu_check: make install failed, see $OUT/install.log" >&2; exit 1; }
    PY=.venv/bin/python
    TEST_SCOPE=()
fi
if [ "$DEVICE" = cuda ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch of $PY sees no CUDA device (CPU-only build or driver mismatch)" >&2
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >&2
    exit 2
fi
$PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee -a "$OUT/device.txt"

run() {  # name, timeout, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    if ! timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        echo "gpu_check: $name failed or ran past ${limit}s; last lines of $OUT/$name.log:" >&2
        tail -20 "$OUT/$name.log" >&2
        return 1
    fi
    grep -iE "ms/image|images/s|ratio|peak GPU|pipeline|cpu|p50|passed|skipped" "$OUT/$name.log" || tail -5 "$OUT/$name.log"
}

status=0
run gpu-tests 180 $PY -m pytest -q -p no:cacheprovider "${TEST_SCOPE[@]}" tests/models/test_images.py \
    tests/models/test_scoring.py -k "gpu or device" || status=1
for batch in $BATCHES; do
    run "scoring-lite0-b$batch" 300 $PY bench/bench_scoring.py --device "$DEVICE" --batch "$batch" \
        --repeats "$REPEATS" || status=1
    run "scoring-wrn101-b$batch" 300 $PY bench/bench_scoring.py --device "$DEVICE" --batch "$batch" \
        --repeats "$REPEATS" --backbone wide_resnet101_2 --weights random || status=1
done
# 2048² JPEGs decoded by nvJPEG on the GPU against the worker's CPU path: the CPU each leaves per image.
run "decode-jpeg-$DEVICE" 240 $PY bench/bench_gpu_decode.py --device "$DEVICE" --images 32 --batch $BATCHES \
    --rounds "$REPEATS" || status=1
if [ -n "$BUNDLE" ]; then
    echo "== pipeline: skipped (a bundle carries no PostgreSQL, Redis or worker packages; run it where make install works)"
else
    # PNGs only (--jpeg-size 0) and a short light-load probe, so the whole check stays within about 5 minutes.
    run "pipeline-$DEVICE-$PIPELINE_IMAGES" 420 $PY bench/bench_pipeline.py --device "$DEVICE" \
        --images "$PIPELINE_IMAGES" --jpeg-size 0 \
        --latency-images 5 --latency-interval 1 || status=1
fi
echo "gpu_check: logs in $OUT"
exit $status
