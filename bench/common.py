"""Small helpers shared by the benchmarks: data locations, timing, a cached default model."""

from __future__ import annotations

import io
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

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
    directory = dacon_model_directory(config)
    if (directory / "manifest.json").is_file():
        return FoldEnsemble.load(directory, device=device)
    refs = dacon_train()
    ensemble = FoldEnsemble.fit([r.id for r in refs], [r.path for r in refs], config, device=device)
    ensemble.save(directory)
    return ensemble


def dacon_model_directory(config: PatchCoreConfig) -> Path:
    """Where :func:`cached_dacon_model` keeps the model of ``config`` (bench/gpu_bundle.py carries it)."""
    import hashlib
    import json

    key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
    return CACHE / f"dacon-{key}"


class CpuLedger:
    """CPU seconds spent by groups of processes between two snapshots (where the cores went).

    Groups: ``worker`` (the process tree of ``worker_pid``), ``bench`` (this process: in the pipeline
    benchmark it hosts the moto server, the ingest thread and the uploader), ``postgres`` and ``redis`` (by
    process name), and ``idle`` (system-wide idle time, in core-seconds). ``worker_io`` is the part of
    ``worker`` spent on obstore's I/O threads (``tokio-rt-worker``: the S3 GETs' request work, which the
    worker's per-stage accounting of its own threads cannot see); it is not a group of its own in reports.
    """

    def __init__(self, worker_pid: int) -> None:
        self.worker_pid = worker_pid
        self._start = self._snapshot()
        self._wall = time.perf_counter()

    def _snapshot(self) -> dict[str, float]:
        import psutil

        groups = {"worker": 0.0, "bench": 0.0, "postgres": 0.0, "redis": 0.0, "idle": psutil.cpu_times().idle}
        groups["worker_io"] = 0.0
        worker_tree: set[int] = set()
        try:
            root = psutil.Process(self.worker_pid)
            worker_tree = {root.pid, *(child.pid for child in root.children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
        for process in psutil.process_iter(["pid", "name", "cpu_times"]):
            times = process.info["cpu_times"]
            if times is None:
                continue
            spent = times.user + times.system
            name = process.info["name"] or ""
            if process.info["pid"] in worker_tree:
                groups["worker"] += spent
                groups["worker_io"] += _threads_cpu(process.info["pid"], "tokio-rt-worker")
            elif process.info["pid"] == os.getpid():
                groups["bench"] += spent
            elif name.startswith("postgres"):
                groups["postgres"] += spent
            elif name.startswith("redis"):
                groups["redis"] += spent
        return groups

    def spent(self) -> tuple[dict[str, float], float]:
        """CPU seconds per group since construction, and the wall seconds they were spent in."""
        end = self._snapshot()
        return {group: end[group] - begin for group, begin in self._start.items()}, time.perf_counter() - self._wall

    def report(self, spent: tuple[dict[str, float], float] | None = None) -> str:
        """``group s (share of the cores)`` since construction (or of ``spent``), one line."""
        groups, wall = spent or self.spent()
        cores = os.cpu_count() or 1
        parts = [
            f"{group} {seconds:.1f} s ({100 * seconds / (wall * cores):.0f}%)"
            for group, seconds in groups.items()
            if group != "worker_io"
        ]
        return f"CPU over {wall:.1f} s × {cores} cores: " + ", ".join(parts)


def _threads_cpu(pid: int, name: str) -> float:
    """CPU seconds of the threads of ``pid`` called ``name`` (Linux ``/proc``; 0 elsewhere)."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        try:
            if (task / "comm").read_text().strip() != name:
                continue
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def jpeg_payloads(payloads: list[bytes], size: int) -> list[bytes]:
    """The Dacon images upscaled to ``size``² (bicubic) as quality-90 JPEGs: what a high-resolution
    inspection camera writes, where decoding, not the model, is the work."""
    out = []
    for data in payloads:
        with Image.open(io.BytesIO(data)) as image:
            big = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        big.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out
