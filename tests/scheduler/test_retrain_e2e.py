"""Retraining end to end on real components: moto S3, Celery on Redis, PostgreSQL, one worker subprocess.

The worker consumes ``train,score`` with ``-P solo``, so rebuild steps and scoring batches interleave on
one process, as on a small GPU node. The active model at the start is the session's pipeline model
(20 Dacon training images, coreset 2 %, 2 folds); rebuilds inherit its config. Redis database 13 is the
broker and result backend, flushed before and after.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from scheduler import registry
from scheduler.tasks import CHECK_RETRAIN, start_rebuild
from worker import repository
from worker.app import create_app, make_enqueue
from worker.cli import app as cli_app
from worker.db import make_engine, make_session_factory, session_scope, upgrade_database
from worker.demo import start_worker, stop_worker
from worker.model_provider import publish_model
from worker.schema import Inference, ModelVersion
from worker.settings import Settings, get_settings

BROKER_URL = "redis://127.0.0.1:6379/13"
BUCKET = "fab-retrain"
pytestmark = pytest.mark.timeout(600)


def black_square(path: Path, index: int) -> bytes:
    """A Dacon image with a pasted black square (synthetic damage), at a position that depends on index."""
    image = PILImage.open(path).convert("RGB")
    side = image.width // 4
    x = (index * 37) % (image.width - side)
    y = (index * 53) % (image.height - side)
    image.paste((0, 0, 0), (x, y, x + side, y + side))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@dataclass
class Cluster:
    settings: Settings
    env: dict[str, str]
    s3: Any
    app: Any
    session_factory: sessionmaker[Session]
    train_images: list[Path]
    test_images: list[Path]
    log: Path
    first_version: str
    counter: list[int] = field(default_factory=lambda: [0])

    def put(self, key: str, data: bytes, kind: str) -> int:
        response = self.s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        with session_scope(self.session_factory) as session:
            image, _ = repository.register_image(
                session, bucket=BUCKET, key=key, etag=response["ETag"].strip('"'), size=len(data), kind=kind
            )
            return image.id

    def drop_incoming(self, count: int) -> list[int]:
        """Upload ``count`` test images under incoming/ and send one score batch for them."""
        ids = []
        for _ in range(count):
            index = self.counter[0]
            self.counter[0] += 1
            path = self.test_images[index % len(self.test_images)]
            ids.append(self.put(f"incoming/run/{index:04d}.png", path.read_bytes(), "incoming"))
        make_enqueue(self.app)(ids)
        return ids

    def wait_scored(self, ids: list[int], timeout_s: float = 180.0) -> dict[int, list[Inference]]:
        deadline = time.monotonic() + timeout_s
        while True:
            with session_scope(self.session_factory) as session:
                rows = session.scalars(select(Inference).where(Inference.image_id.in_(ids))).all()
            by_image: dict[int, list[Inference]] = {}
            for row in rows:
                by_image.setdefault(row.image_id, []).append(row)
            if len(by_image) == len(set(ids)):
                return by_image
            if time.monotonic() > deadline:
                pytest.fail(f"{len(by_image)}/{len(ids)} scored after {timeout_s} s\n{self.tail()}")
            time.sleep(0.5)

    def wait_build(self, since_versions: set[str], timeout_s: float = 300.0) -> ModelVersion:
        """The first new version that finished its gate (stage cleared), or fail with the worker log."""
        deadline = time.monotonic() + timeout_s
        while True:
            with session_scope(self.session_factory) as session:
                rows = session.scalars(select(ModelVersion)).all()
            failed = [row for row in rows if row.status == "failed"]
            if failed:
                pytest.fail(f"build failed: {failed[0].reason}\n{self.tail()}")
            done = [
                row for row in rows if row.id not in since_versions and row.status != "building" and row.stage is None
            ]
            if done:
                return done[0]
            if time.monotonic() > deadline:
                pytest.fail(f"no build finished after {timeout_s} s: {[(r.id, r.status, r.stage) for r in rows]}\n"
                            f"{self.tail()}")  # fmt: skip
            time.sleep(0.5)

    def versions(self) -> set[str]:
        with session_scope(self.session_factory) as session:
            return set(session.scalars(select(ModelVersion.id)))

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def cluster(
    s3_server: str,
    pg_database_factory: Callable[[], str],
    redis_client: redis.Redis,
    pipeline_model_dir: Path,
    dacon_data: Path,
    dacon_test_images: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("retrain")
    broker = redis.Redis.from_url(BROKER_URL)
    broker.flushdb()
    url = pg_database_factory()
    upgrade_database(url)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    values = {
        "database_url": url,
        "broker_url": BROKER_URL,
        "storage": "s3",
        "s3_endpoint_url": s3_server,
        "s3_bucket": BUCKET,
        "model_cache_dir": str(workdir / "worker-cache"),
        "device": "cpu",
        "batch_size": "4",
        "task_max_attempts": "2",
        "retry_backoff_s": "0.5",
        "retrain_threshold": "6",
        "rebuild_chunk_size": "6",
        "gate_auroc_margin": "0.1",
        "gate_f1_margin": "0.3",
        "gate_max_nominal_flag_rate": "0.5",
    }
    settings = Settings(**{**values, "model_cache_dir": str(workdir / "test-cache")})  # type: ignore[arg-type]
    env = {f"WAFERWATCH_{name.upper()}": value for name, value in values.items()}
    engine = make_engine(url)
    session_factory = make_session_factory(engine)
    from worker.storage import make_store

    store = make_store("s3", endpoint_url=s3_server, bucket=BUCKET, region="us-east-1")
    first = publish_model(store, session_factory, pipeline_model_dir, model_prefix="models/")
    app = create_app(settings, set_as_current=False)
    log = workdir / "worker.log"
    process = start_worker(env, log, "--pool", "solo", "--queues", "train,score")
    try:
        deadline = time.monotonic() + 120
        while "ready." not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        train = sorted((dacon_data / "train").glob("*.png"))
        yield Cluster(settings, env, s3, app, session_factory, train, dacon_test_images, log, first.version)
    finally:
        stop_worker(process)
        engine.dispose()
        broker.flushdb()
        broker.close()


def _check_complete_rows(cluster: Cluster, by_image: dict[int, list[Inference]]) -> None:
    """Every row is one version's: its threshold, its number of folds, its heatmap folder."""
    with session_scope(cluster.session_factory) as session:
        versions = {row.id: row for row in session.scalars(select(ModelVersion))}
    for rows in by_image.values():
        for row in rows:
            version = versions[row.model_version]
            assert row.threshold == version.threshold
            assert len(row.fold_scores) == len(version.fold_thresholds)
            assert f"/{row.model_version}/" in row.heatmap_key


def test_nominal_drops_start_a_rebuild_that_is_promoted_and_workers_switch(cluster: Cluster) -> None:
    # Labelled evaluation data: held-out good images and synthetic defects, in the incoming prefix.
    for index, path in enumerate(cluster.train_images[20:24]):
        cluster.put(f"incoming/labelled/good-{index}.png", path.read_bytes(), "incoming")
    for index, path in enumerate(cluster.train_images[24:28]):
        cluster.put(f"incoming/labelled/defect-{index}.png", black_square(path, index), "incoming")
    with session_scope(cluster.session_factory) as session:
        for index in range(4):
            registry.label_image(session, bucket=BUCKET, key=f"incoming/labelled/good-{index}.png", verdict="good",
                                 author="test", note=None)  # fmt: skip
            registry.label_image(session, bucket=BUCKET, key=f"incoming/labelled/defect-{index}.png",
                                 verdict="defect", author="test", note="black square")  # fmt: skip

    before = cluster.versions()
    # Below the threshold (6): 4 good labels since the active version; the check starts nothing.
    assert start_rebuild(cluster.app, "count") == (None, "4 new pool images < 6")
    for index, path in enumerate(cluster.train_images[30:38]):
        cluster.put(f"nominal/batch1/{index}.png", path.read_bytes(), "nominal")

    # Beat's periodic check, twice at once: one build.
    cluster.app.send_task(CHECK_RETRAIN, queue="train")
    cluster.app.send_task(CHECK_RETRAIN, queue="train")
    # Scoring goes on during the rebuild and the promotion.
    stop = threading.Event()
    dropped: list[int] = []

    def stream() -> None:
        while not stop.is_set():
            dropped.extend(cluster.drop_incoming(2))
            stop.wait(3.0)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        candidate = cluster.wait_build(before)
    finally:
        stop.set()
        thread.join(timeout=30)

    assert candidate.status == "active", (candidate.reason, candidate.metrics.get("gate"))
    metrics = candidate.metrics
    assert metrics["build"]["trigger"] == "count" and metrics["pool"]["size"] == 12
    assert metrics["gate"]["n_good"] == 4 and metrics["gate"]["n_defect"] == 4
    assert set(metrics["build"]["timings_s"]) >= {"extract_total", "fold_total", "assemble", "upload"}
    assert cluster.versions() - before == {candidate.id}  # one build, its row replaced by the candidate
    assert not list(cluster.s3.list_objects_v2(Bucket=BUCKET, Prefix="models/build-").get("Contents", []))
    keys = {o["Key"] for o in cluster.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"models/{candidate.id}/")["Contents"]}
    assert f"models/{candidate.id}/manifest.json" in keys

    scored_during = cluster.wait_scored(dropped)
    _check_complete_rows(cluster, scored_during)
    after = cluster.drop_incoming(4)
    scored_after = cluster.wait_scored(after)
    assert {rows[0].model_version for rows in scored_after.values()} == {candidate.id}
    _check_complete_rows(cluster, scored_after)


def test_a_candidate_trained_on_defects_is_held_back_with_its_reason(cluster: Cluster) -> None:
    with session_scope(cluster.session_factory) as session:
        active_before = repository.get_active_model_version(session).id
    for index, path in enumerate(cluster.train_images[40:52]):
        cluster.put(f"nominal/mislabelled/{index}.png", black_square(path, index + 7), "nominal")
    before = cluster.versions()
    build_id, why = start_rebuild(cluster.app, "manual")  # what `waferwatch retrain` does
    assert build_id is not None, why
    held = cluster.wait_build(before)

    assert held.status == "candidate"
    assert held.reason.startswith("gate: ") and ("AUROC" in held.reason or "F1" in held.reason), held.reason
    with session_scope(cluster.session_factory) as session:
        assert repository.get_active_model_version(session).id == active_before


def test_rollback_reactivates_the_previous_version_and_workers_follow(cluster: Cluster) -> None:
    get_settings.cache_clear()
    result = CliRunner().invoke(cli_app, ["models", "rollback"], env=cluster.env)
    get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    with session_scope(cluster.session_factory) as session:
        assert repository.get_active_model_version(session).id == cluster.first_version
    ids = cluster.drop_incoming(2)
    scored = cluster.wait_scored(ids)
    assert {rows[0].model_version for rows in scored.values()} == {cluster.first_version}
