"""Peak RSS of one scoring process: a batch of poison images against a batch of ordinary ones.

Issue 12, row 7: eight 1.4 MB 16-bit 8000² PNGs took one pool process to 11.7 GB (float64 copies at full
size, eight decodes at once). Each scenario runs in a fresh child process, which loads the default Dacon
model, registers the batch in a throw-away SQLite database and scores it with
:func:`worker.scoring.score_batch` exactly as a worker does (a folder bucket, ``fetch_threads`` = 8, the
default pixel budget), then reports its peak RSS (``ru_maxrss``):

* ``ordinary``: 8 Dacon test images (512² RGB PNG);
* ``poison``: 8 smooth 16-bit 8000² PNGs (64 M pixels each, at the default ``max_image_pixels``);
* ``poison, no budget`` (``--no-budget-run``): the same with the budget lifted to 8 images, to show what
  the budget itself contributes (the 8-bit reduction in bands stays on; the pre-fix code is not run, it
  needs ~12 GB).

Goal: poison ≤ 1.5 × ordinary. Run: ``python -m bench.bench_decode_memory`` (about a minute on 2 cores,
plus a one-off model training the first time).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

BATCH = 8
POISON_SIDE = 8000


def _poison_png(side: int) -> bytes:
    """A smooth 16-bit field (compresses to ~1.4 MB at 8000², like the report's files), built in bands."""
    image = PILImage.new("I;16", (side, side))
    band_rows = 500
    x = np.arange(side)
    for top in range(0, side, band_rows):
        y = np.arange(top, min(side, top + band_rows))[:, None]
        field = 20_000 + 8_000 * np.sin(x / 997.0) * np.cos(y / 1_231.0)
        band = (field // 1024 * 1024).astype(np.uint16)  # terraces: compresses like the report's files
        image.paste(PILImage.fromarray(band), (0, top))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=6)
    return out.getvalue()


def _prepare(folder: Path) -> None:
    from bench.common import dacon_test

    ordinary = folder / "ordinary" / "incoming"
    poison = folder / "poison" / "incoming"
    ordinary.mkdir(parents=True)
    poison.mkdir(parents=True)
    for index, ref in enumerate(sorted(dacon_test(), key=lambda ref: ref.id)[:BATCH]):
        (ordinary / f"{index}.png").write_bytes(Path(ref.path).read_bytes())
    data = _poison_png(POISON_SIDE)
    print(f"poison file: {len(data) / 1e6:.2f} MB, {POISON_SIDE}² 16-bit", flush=True)
    for index in range(BATCH):
        (poison / f"{index}.png").write_bytes(data)


def _child(root: Path, budget: int | None) -> None:
    """Score the batch under ``root`` (a folder bucket) and print this process's figures as JSON."""
    from bench.common import cached_dacon_model
    from models import PatchCoreConfig
    from worker import repository
    from worker.db import make_engine, make_session_factory, session_scope, upgrade_database
    from worker.model_provider import LoadedModel
    from worker.scoring import ScoringOptions, score_batch
    from worker.storage import FolderStore

    ensemble = cached_dacon_model(PatchCoreConfig(), device="cpu")
    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{scratch}/bench.db"
        upgrade_database(url)
        engine = make_engine(url)
        factory = make_session_factory(engine)
        store = FolderStore(root, bucket="bench")
        with session_scope(factory) as session:
            repository.ensure_model_version(session, version=ensemble.version, status="active")
            ids = [
                repository.register_image(session, bucket="bench", key=info.key, etag=info.etag, size=info.size)[0].id
                for info in store.list("incoming/")
            ]
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        model = LoadedModel(ensemble.version, ensemble, "pinned", time.time())
        options = ScoringOptions(fetch_threads=BATCH, decode_pixel_budget=budget)
        started = time.perf_counter()
        result = score_batch(ids, session_factory=factory, store=store, model=model, options=options)
        seconds = time.perf_counter() - started
        engine.dispose()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps({"scored": len(result.scored), "model_loaded_mib": before, "peak_rss_mib": peak, "seconds": seconds})
    )


def _run_child(root: Path, budget: int | None) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.bench_decode_memory", "--child", str(root)]
    if budget is not None:
        command += ["--budget", str(budget)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"child {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-budget-run", action="store_true", help="also score the poison set with no budget")
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child, args.budget)
        return
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _prepare(root)
        scenarios = [("ordinary", root / "ordinary", None), ("poison", root / "poison", None)]
        if args.no_budget_run:
            scenarios.append(("poison, no budget", root / "poison", BATCH * POISON_SIDE * POISON_SIDE))
        rows = [(name, _run_child(path, budget)) for name, path, budget in scenarios]
    print(f"{'scenario':<20}{'scored':>7}{'model loaded MiB':>18}{'peak RSS MiB':>14}{'seconds':>9}")
    for name, row in rows:
        print(
            f"{name:<20}{row['scored']:>7}{row['model_loaded_mib']:>18.0f}{row['peak_rss_mib']:>14.0f}"
            f"{row['seconds']:>9.1f}"
        )
    ordinary, poison = rows[0][1]["peak_rss_mib"], rows[1][1]["peak_rss_mib"]
    print(f"poison ÷ ordinary peak RSS: {poison / ordinary:.2f} (goal ≤ 1.5; before the fix one process hit 11.7 GB)")


if __name__ == "__main__":
    main()
