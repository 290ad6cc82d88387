#!/usr/bin/env bash
# The GPU check of a fresh CUDA machine, in one go (about 5 minutes):
#   bench/gpu_check.sh [OUT_DIR]
# It creates (or reuses) the virtual environment like `make test` does, prints the device, runs the tests
# that need CUDA (a GPU batch is normalised from uint8 bit-identically to the CPU's; the banks searched on
# the GPU give the CPU's neighbours and scores), times the scoring
# ensemble for efficientnet_lite0 (real weights) and wide_resnet101_2 (random weights: timing only) at
# batch 32 and 128 in bf16 autocast (images/s, ms/batch, peak GPU memory), and runs the pipeline benchmark
# on the GPU over a 2,000-image backlog (pipeline images/s, ratio to the model alone, CPU per image).
# Every figure also lands in OUT_DIR (default runs/gpu-check) as one log per step.
# Exits 2 when no CUDA device is visible, before installing anything heavy.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu-check}"
mkdir -p "$OUT"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU visible (nvidia-smi -L failed); run this on the GPU host" >&2
    exit 2
fi
nvidia-smi -L | tee "$OUT/device.txt"

make install >"$OUT/install.log" 2>&1 || { echo "gpu_check: make install failed, see $OUT/install.log" >&2; exit 1; }
PY=.venv/bin/python
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch in .venv sees no CUDA device (CPU-only build or driver mismatch)" >&2
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >&2
    exit 2
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee -a "$OUT/device.txt"

run() {  # name, timeout, command...
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    if ! timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        echo "gpu_check: $name failed or ran past ${limit}s; last lines of $OUT/$name.log:" >&2
        tail -20 "$OUT/$name.log" >&2
        return 1
    fi
    grep -iE "ms/image|images/s|ratio|peak GPU|pipeline|cpu|p50" "$OUT/$name.log" || tail -5 "$OUT/$name.log"
}

status=0
run gpu-tests 180 $PY -m pytest -q -p no:cacheprovider tests/models/test_images.py tests/models/test_scoring.py \
    -k "gpu or device" || status=1
for batch in 32 128; do
    run "scoring-lite0-b$batch" 300 $PY bench/bench_scoring.py --device cuda --batch "$batch" || status=1
    run "scoring-wrn101-b$batch" 300 $PY bench/bench_scoring.py --device cuda --batch "$batch" \
        --backbone wide_resnet101_2 --weights random || status=1
done
# PNGs only (--jpeg-size 0) and a short light-load probe, so the whole check stays within about 5 minutes.
run pipeline-cuda-2000 420 $PY bench/bench_pipeline.py --device cuda --images 2000 --jpeg-size 0 \
    --latency-images 5 --latency-interval 1 || status=1
echo "gpu_check: logs in $OUT"
exit $status
