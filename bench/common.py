"""Small helpers shared by the benchmarks: data locations, timing, a cached default model."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

from bench.magnetic_tile import DATASETS
from models import FoldEnsemble, PatchCoreConfig
from models.datasets import ImageRef, read_image_csv

DACON = DATASETS / "dacon-semiconductor"
CACHE = Path(__file__).resolve().parents[1] / "runs" / "bench-cache"


def dacon_train() -> list[ImageRef]:
    return read_image_csv(DACON / "train.csv")


def dacon_test() -> list[ImageRef]:
    return read_image_csv(DACON / "test.csv")


def timed(function: Callable[[], object], repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def cached_dacon_model(config: PatchCoreConfig, *, device: str = "auto") -> FoldEnsemble:
    """The Dacon model for ``config``, trained once and kept under runs/bench-cache (keyed by config)."""
    import hashlib
    import json

    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    directory = CACHE / f"dacon-{key}"
    if (directory / "manifest.json").is_file():
        return FoldEnsemble.load(directory, device=device)
    refs = dacon_train()
    ensemble = FoldEnsemble.fit([r.id for r in refs], [r.path for r in refs], config, device=device)
    ensemble.save(directory)
    return ensemble
