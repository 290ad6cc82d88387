"""Rebuild speed-up across 2 worker processes, where the time goes, and how fast workers switch versions.

Prints (not a test):

* the 5 fold banks over N nominal Dacon images built in one process (extract → 5 × fold → assemble → save)
  ÷ the same rebuild as the Celery canvas (chunked extraction, one task per fold bank, finish) on 2
  ``celery worker -P solo -Q train,score`` subprocesses; per-step times of both; whether both give the same
  model version (they must: the steps are pure functions);
* a scoring stream (one batch of 4 images every 0.5 s) during the promotion: seconds from activation to the
  first inference by the new version, and how many images registered after the activation were still
  scored by the old one (i.e. waited longer than one batch for it).

Embedded storage and database (a folder bucket, SQLite), Redis on 127.0.0.1:6379 database 12 as broker and
result backend (flushed). Usage: ``python bench/bench_rebuild.py [--images 40] [--chunk 10] [--coreset 0.02]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.magnetic_tile import DATASETS
from models import FoldEnsemble, PatchCoreConfig
from models.training import assemble_ensemble, build_folds, extract_features
from scheduler.rebuild import held_out
from scheduler.tasks import start_rebuild
from worker import repository
from worker.app import create_app, make_enqueue, make_store_from_settings
from worker.db import make_engine, make_session_factory, session_scope, upgrade_database
from worker.model_provider import publish_model
from worker.schema import Image, Inference, ModelVersion
from worker.settings import Settings

BROKER = "redis://127.0.0.1:6379/12"


def single_process(paths: list[Path], keys: list[str], config: PatchCoreConfig, out: Path) -> tuple[str, dict]:
    seconds: dict[str, float] = {}
    begin = time.perf_counter()
    features = extract_features(keys, paths, config, device="cpu")
    seconds["extract"] = time.perf_counter() - begin
    begin = time.perf_counter()
    folds = build_folds(features, config)
    seconds["folds"] = time.perf_counter() - begin
    begin = time.perf_counter()
    ensemble = assemble_ensemble(config, features, folds, device="cpu")
    ensemble.save(out)
    seconds["assemble+save"] = time.perf_counter() - begin
    return ensemble.version, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--coreset", type=float, default=PatchCoreConfig().coreset_ratio)
    args = parser.parse_args()
    train = sorted((DATASETS / "dacon-semiconductor" / "train").glob("*.png"))
    pool = train[: args.images]
    seed_images = pool[:12]  # the seed's images are pool images (a rebuild never forgets them), by key
    config = PatchCoreConfig(coreset_ratio=args.coreset, folds=5)
    work = Path(tempfile.mkdtemp(prefix="bench-rebuild-"))
    keys = [f"nominal/{path.name}" for path in pool]
    # What the canvas trains on: the pool less the gate's held-out slice (the seed's own images stay).
    seed_keys = {f"nominal/{path.name}" for path in seed_images}
    trained = [(path, key) for path, key in zip(pool, keys, strict=True) if not held_out(key, 0.2) or key in seed_keys]

    print(
        f"pool: {len(pool)} Dacon images, {config.folds} folds, coreset {config.coreset_ratio}, chunks of {args.chunk}"
    )
    total = time.perf_counter()
    single_version, single = single_process([p for p, _ in trained], [k for _, k in trained], config, work / "single")
    single_wall = time.perf_counter() - total
    print(f"one process: {single_wall:.1f} s  " + "  ".join(f"{k} {v:.1f}" for k, v in single.items()))

    broker = redis.Redis.from_url(BROKER)
    broker.flushdb()
    url = f"sqlite:///{work / 'waferwatch.db'}"
    upgrade_database(url)
    values = {
        "database_url": url, "broker_url": BROKER, "storage": "folder", "storage_root": str(work / "bucket"),
        "s3_bucket": "bench", "device": "cpu", "batch_size": "4", "retrain_threshold": "1",
        "rebuild_chunk_size": str(args.chunk),
        "gate_max_nominal_flag_rate": "1.0", "gate_nominal_sample": "8",
        "gate_holdout_fraction": "0.2", "gate_min_holdout": "4",
    }  # fmt: skip
    overrides = {"folds": 5, "coreset_ratio": args.coreset}
    settings = Settings(**values, rebuild_config=overrides, model_cache_dir=work / "cache-main")  # type: ignore[arg-type]
    store = make_store_from_settings(settings)
    store.ensure_bucket()
    bucket = store.bucket
    session_factory = make_session_factory(make_engine(url))
    seed = FoldEnsemble.fit(sorted(seed_keys), sorted(seed_images), config.replace(folds=2), device="cpu")
    first = publish_model(store, session_factory, seed.save(work / "seed"), model_prefix="models/").version
    with session_scope(session_factory) as session:
        for path, key in zip(pool, keys, strict=True):
            info = store.put(key, path.read_bytes())
            repository.register_image(session, bucket=bucket, key=key, etag=info.etag, size=info.size, kind="nominal")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAFERWATCH_")}
    env |= {f"WAFERWATCH_{k.upper()}": str(v) for k, v in values.items()}
    env["WAFERWATCH_REBUILD_CONFIG"] = json.dumps(overrides)
    workers = []
    for index in range(2):
        log = work / f"worker{index}.log"
        command = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-P", "solo", "-Q", "train,score",
                   "-n", f"bench{index}@%h", "--without-gossip", "--without-mingle", "-l", "INFO"]  # fmt: skip
        child_env = env | {"WAFERWATCH_MODEL_CACHE_DIR": str(work / f"cache{index}"), "OMP_NUM_THREADS": "1"}
        workers.append(
            (subprocess.Popen(command, env=child_env, cwd=work, stdout=log.open("wb"), stderr=subprocess.STDOUT), log)
        )
    try:
        for process, log in workers:
            while "ready." not in log.read_text(errors="replace"):
                if process.poll() is not None:
                    raise SystemExit(log.read_text()[-3000:])
                time.sleep(0.3)
        app = create_app(settings, set_as_current=False)
        stop = threading.Event()
        registered: list[tuple[int, float]] = []
        tests = sorted((DATASETS / "dacon-semiconductor" / "test").glob("*.png"))

        def stream() -> None:
            n = 0
            while not stop.is_set():
                ids = []
                with session_scope(session_factory) as session:
                    for _ in range(4):
                        key = f"incoming/{n:05d}.png"
                        info = store.put(key, tests[n % len(tests)].read_bytes())
                        image, _ = repository.register_image(
                            session, bucket=bucket, key=key, etag=info.etag, size=info.size
                        )
                        ids.append(image.id)
                        n += 1
                registered.extend((i, time.time()) for i in ids)
                make_enqueue(app)(ids)
                stop.wait(0.5)

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        begin = time.perf_counter()
        build_id, why = start_rebuild(app, "manual")
        assert build_id, why
        row = None
        while row is None or row.stage is not None:
            time.sleep(0.5)
            with session_scope(session_factory) as session:
                rows = session.scalars(select(ModelVersion).where(ModelVersion.id.not_in([first, build_id]))).all()
                failed = session.get(ModelVersion, build_id)
            if failed is not None and failed.status == "failed":
                raise SystemExit(f"build failed: {failed.reason}")
            row = rows[0] if rows else None
        canvas_wall = time.perf_counter() - begin
        time.sleep(6)
        stop.set()
        thread.join()
        time.sleep(8)
        timings = row.metrics["build"]["timings_s"]
        activated = (row.activated_at.timestamp() if row.activated_at else 0) or None
        print(f"canvas on 2 workers: {canvas_wall:.1f} s to candidate gated ({row.status}); "
              + "  ".join(f"{k} {v:.1f}" for k, v in timings.items()))  # fmt: skip
        print(f"speed-up (one process ÷ canvas, canvas includes gate and queueing): {single_wall / canvas_wall:.2f}")
        print(f"same model version as one process: {row.id == single_version} ({row.id} vs {single_version})")
        with session_scope(session_factory) as session:
            scored = session.execute(
                select(Inference.image_id, Inference.model_version, Inference.created_at).join(Image)
            ).all()
        if row.status == "active" and activated:
            new_rows = sorted(r.created_at.timestamp() for r in scored if r.model_version == row.id)
            switch = (new_rows[0] - activated) if new_rows else float("nan")
            seen = dict(registered)
            late = [r for r in scored if r.model_version != row.id and seen.get(r.image_id, 0) > activated]
            print(f"switch: first inference by the new version {switch:.2f} s after activation; "
                  f"{len(late)} images registered after activation scored by the old version")  # fmt: skip
    finally:
        for process, _ in workers:
            process.terminate()
        for process, _ in workers:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        broker.flushdb()


if __name__ == "__main__":
    main()
