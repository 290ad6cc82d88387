"""Retraining end to end on real components: moto S3, Celery on Redis, PostgreSQL, one worker subprocess.

The worker consumes ``train,score`` with ``-P solo``, so rebuild steps and scoring batches interleave on
one process, as on a small GPU node. The first model is the session's pipeline model (20 Dacon training
images, coreset 2 %, 2 folds), brought in with ``waferwatch models register --images --activate`` as a
deployment would; rebuilds inherit its config. Redis database 13 is the broker and result backend,
flushed before and after. The tests run in order and share the cluster: register → a clean rebuild is
promoted → a rebuild on damaged images is held back without labels → the same pool rebuilt adds history
only → a forced promotion and a rollback → the gate with one and with enough labels.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
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

from scheduler import registry
from scheduler.gate import evaluate_gate
from scheduler.rebuild import held_out
from scheduler.tasks import CHECK_RETRAIN, gate_rules_of, start_rebuild
from worker import model_events, repository
from worker.app import create_app, make_enqueue
from worker.db import make_engine, make_session_factory, session_scope, upgrade_database
from worker.demo import start_worker, stop_worker
from worker.model_provider import ModelProvider
from worker.schema import Failure, Image, Inference, Label, ModelEvent, ModelVersion
from worker.settings import Settings

BROKER_URL = "redis://127.0.0.1:6379/13"
BUCKET = "fab-retrain"
HOLDOUT = 0.4  # of nominal keys, by hash: large here so that a few drops give the gate enough images
pytestmark = pytest.mark.timeout(3000)  # a shared 2-core machine can be 10x slower than idle


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
    register_output: str
    counter: list[int] = field(default_factory=lambda: [0])
    records: dict[str, Any] = field(default_factory=dict)

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

    def wait_scored(self, ids: list[int], timeout_s: float = 900.0) -> dict[int, list[Inference]]:
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

    def wait_build(self, since_versions: set[str], timeout_s: float = 2400.0) -> ModelVersion:
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

    def history(self, version: str) -> list[tuple[str, str]]:
        with session_scope(self.session_factory) as session:
            return [(event.event, event.actor) for event in model_events.history(session, version)]

    def row(self, version: str) -> ModelVersion:
        with session_scope(self.session_factory) as session:
            row = session.get(ModelVersion, version)
            session.expunge(row)
            return row

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``waferwatch ARGS`` as a subprocess with the cluster's settings (exit code and output kept)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("WAFERWATCH_")} | self.env | {"COLUMNS": "200"}
        command = [sys.executable, "-c", "from worker.cli import main; main()", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)

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
        "rebuild_chunk_size": "8",
        "gate_auroc_margin": "0.1",
        "gate_f1_margin": "0.3",
        "gate_max_nominal_flag_rate": "0.6",
        "gate_holdout_fraction": str(HOLDOUT),
        "gate_min_holdout": "4",
        "gate_min_labels": "3",
        "gate_min_synthetic_recall": "0.2",  # 4 held-out images: one synthetic anomaly is 0.25
        "gate_synthetic_margin": "0.3",
        "gate_synthetic_auroc_margin": "0.3",  # 9 + 9 images: one pair moves the AUROC by 1/81
    }
    settings = Settings(**{**values, "model_cache_dir": str(workdir / "test-cache")})  # type: ignore[arg-type]
    env = {f"WAFERWATCH_{name.upper()}": value for name, value in values.items()}
    engine = make_engine(url)
    session_factory = make_session_factory(engine)
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
        first = json.loads((pipeline_model_dir / "manifest.json").read_text())["version"]
        cluster = Cluster(settings, env, s3, app, session_factory, train, dacon_test_images, log, first, "")
        csv = str(dacon_data / "train.csv")
        registered = cluster.cli("models", "register", str(pipeline_model_dir), "--images", csv,
                                 "--activate", "--author", "kim", "--reason", "first model")  # fmt: skip
        assert registered.returncode == 0, registered.stderr
        cluster.register_output = " ".join(registered.stderr.split())
        yield cluster
    finally:
        stop_worker(process)
        engine.dispose()
        broker.flushdb()
        broker.close()


def _check_complete_rows(cluster: Cluster, by_image: dict[int, list[Inference]]) -> None:
    """Every row is one version's: its threshold, its number of folds, and its own stored map."""
    with session_scope(cluster.session_factory) as session:
        versions = {row.id: row for row in session.scalars(select(ModelVersion))}
    for rows in by_image.values():
        for row in rows:
            version = versions[row.model_version]
            assert row.threshold == version.threshold
            assert len(row.fold_scores) == len(version.fold_thresholds)
            assert row.anomaly_map_png is not None and row.anomaly_map_low is not None


def test_models_register_then_the_pipeline_scores(cluster: Cluster) -> None:
    first = cluster.first_version
    assert f"{first} active (new)" in cluster.register_output
    assert cluster.history(first) == [("registered", "kim"), ("promoted", "kim")]
    seeds = cluster.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"nominal/{first}/").get("Contents", [])
    assert len(seeds) == 20  # the first model's training images are in the pool
    with session_scope(cluster.session_factory) as session:
        statuses = set(session.scalars(select(Image.status).where(Image.kind == "nominal")))
    assert statuses == {"pooled"}
    ids = cluster.drop_incoming(3)
    scored = cluster.wait_scored(ids)
    assert {rows[0].model_version for rows in scored.values()} == {first}


def test_nominal_drops_start_a_rebuild_that_is_promoted_and_workers_switch(cluster: Cluster) -> None:
    first = cluster.first_version
    before = cluster.versions()
    # Nothing new in the pool since the registered model (its own images do not count).
    assert start_rebuild(cluster.app, "count") == (None, "0 new pool images < 6")
    keys = [f"nominal/batch1/{index:02d}.png" for index in range(12)]
    held = [key for key in keys if held_out(key, HOLDOUT)]
    assert len(held) >= 4, held  # deterministic: the hash of the key decides
    for key, path in zip(keys, cluster.train_images[30:42], strict=True):
        cluster.put(key, path.read_bytes(), "nominal")
    corrupt = cluster.put("nominal/batch1/corrupt.png", b"\x89PNG\r\n\x1a\n cut short", "nominal")

    # Beat's periodic check, twice at once: one build.
    cluster.app.send_task(CHECK_RETRAIN, queue="train")
    cluster.app.send_task(CHECK_RETRAIN, queue="train")
    # Scoring goes on during the rebuild and the promotion.
    stop = threading.Event()
    dropped: list[int] = []

    def stream() -> None:  # three batches while the build runs (the worker is shared with the build)
        for _ in range(3):
            dropped.extend(cluster.drop_incoming(2))
            if stop.wait(10.0):
                return

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        candidate = cluster.wait_build(before)
    finally:
        stop.set()
        thread.join(timeout=30)

    gate = candidate.metrics["gate"]
    cluster.records["good candidate, no labels"] = gate
    assert candidate.status == "active", (candidate.reason, gate)
    metrics = candidate.metrics
    assert metrics["build"]["trigger"] == "count"
    # The pool: the first model's 20 images, the readable drops outside the held-out slice.
    assert metrics["pool"]["size"] == 20 + len(keys) - len(held)
    trained = {image["id"] for image in candidate.manifest["training_images"]}
    assert {
        o["Key"] for o in cluster.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"nominal/{first}/")["Contents"]
    } <= trained
    assert not trained & set(held)
    # The gate graded it on the held-out images and synthetic anomalies made from them, no labels.
    assert gate["passed"] and gate["held_out"]["n"] == len(held) and gate["held_out"]["left_out_trained"] == 0
    assert gate["synthetic"]["n"] == len(held) and gate["labelled"]["n_good"] == gate["labelled"]["n_defect"] == 0
    used = {check["name"] for check in gate["checks"] if check["used"]}
    assert used == {"held_out_flag_rate", "synthetic_recall", "synthetic_recall_vs_active", "synthetic_auroc_vs_active"}
    assert set(metrics["build"]["timings_s"]) >= {"extract_total", "fold_total", "assemble", "upload"}
    assert cluster.versions() - before == {candidate.id}  # one build, its row replaced by the candidate
    assert not list(cluster.s3.list_objects_v2(Bucket=BUCKET, Prefix="models/build-").get("Contents", []))
    keys_up = {
        o["Key"] for o in cluster.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"models/{candidate.id}/")["Contents"]
    }
    assert f"models/{candidate.id}/manifest.json" in keys_up
    assert [event for event, _ in cluster.history(candidate.id)] == ["built", "gated", "promoted"]
    assert cluster.history(first)[-1] == ("retired", "scheduler")

    # Nominal images end pooled; the corrupt one failed with a failures row, out of the count.
    with session_scope(cluster.session_factory) as session:
        statuses = dict(
            session.execute(
                select(Image.key, Image.status).where(Image.key.in_([*keys, "nominal/batch1/corrupt.png"]))
            ).all()
        )
        failure = session.scalars(select(Failure).where(Failure.image_id == corrupt)).one()
    assert {statuses[key] for key in keys} == {"pooled"} and statuses["nominal/batch1/corrupt.png"] == "failed"
    assert failure.error_type == "BadImageError"
    status = cluster.cli("status", "--format", "json", "--ping-timeout", "0.5")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["pool"] == {"pooled": 20 + len(keys), "pending": 0, "unreadable": 1}
    assert report["scoring_backlog"] < len(dropped) + 3

    scored_during = cluster.wait_scored(dropped)
    _check_complete_rows(cluster, scored_during)
    after = cluster.drop_incoming(4)
    scored_after = cluster.wait_scored(after)
    assert {rows[0].model_version for rows in scored_after.values()} == {candidate.id}
    _check_complete_rows(cluster, scored_after)
    cluster.records["good"] = candidate.id


def test_a_candidate_trained_on_damaged_images_is_held_back_without_any_labels(cluster: Cluster) -> None:
    with session_scope(cluster.session_factory) as session:
        active_before = repository.get_active_model_version(session).id
        assert session.scalars(select(Label)).first() is None  # no labels at all
    for index, path in enumerate(cluster.train_images[60:76]):
        cluster.put(f"nominal/mislabelled/{index:02d}.png", black_square(path, index + 7), "nominal")
    before = cluster.versions()
    build_id, why = start_rebuild(cluster.app, "manual")  # what `waferwatch retrain` does
    assert build_id is not None, why
    held = cluster.wait_build(before)

    gate = held.metrics["gate"]
    cluster.records["bad candidate, no labels"] = gate
    assert held.status == "candidate", gate
    assert held.reason.startswith("gate: ") and "synthetic_recall" in held.reason, held.reason
    assert gate["labelled"]["n_good"] == gate["labelled"]["n_defect"] == 0
    assert gate["synthetic"]["candidate"]["recall"] < gate["synthetic"]["active"]["recall"]
    with session_scope(cluster.session_factory) as session:
        assert repository.get_active_model_version(session).id == active_before
    assert [event for event, _ in cluster.history(held.id)] == ["built", "gated"]
    cluster.records["bad"] = held.id


def test_a_rebuild_of_an_unchanged_pool_leaves_the_history_intact_and_adds_an_event(cluster: Cluster) -> None:
    held_id = cluster.records["bad"]
    before_row = cluster.row(held_id)
    before_history = cluster.history(held_id)
    before = cluster.versions()
    build_id, why = start_rebuild(cluster.app, "manual")
    assert build_id is not None, why
    deadline = time.monotonic() + 2400
    while True:
        with session_scope(cluster.session_factory) as session:
            rebuilt = session.scalars(
                select(ModelEvent).where(ModelEvent.model_version == held_id, ModelEvent.event == "rebuilt")
            ).first()
            build = session.get(ModelVersion, build_id)
            if build is not None and build.status == "failed":
                pytest.fail(f"build failed: {build.reason}\n{cluster.tail()}")
        if rebuilt is not None and build is None:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"no rebuilt event after 2400 s\n{cluster.tail()}")
        time.sleep(0.5)

    after_row = cluster.row(held_id)
    assert (after_row.status, after_row.reason) == (before_row.status, before_row.reason)
    assert after_row.metrics["gate"] == before_row.metrics["gate"]
    assert after_row.metrics["build"] == before_row.metrics["build"]
    assert cluster.history(held_id) == [*before_history, ("rebuilt", "scheduler")]
    assert rebuilt.details["build"]["build_id"] == build_id and rebuilt.details["build"]["trigger"] == "manual"
    assert cluster.versions() == before  # the build row is gone, nothing else changed
    # The work files are removed just after the commit that writes the event (finish_build): wait for them.
    cleanup_deadline = time.monotonic() + 120
    while list(cluster.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"models/{build_id}/").get("Contents", [])):
        if time.monotonic() > cleanup_deadline:
            pytest.fail(f"models/{build_id}/ still holds work files 120 s after the rebuilt event")
        time.sleep(0.5)


def test_a_manual_promote_over_a_failed_gate_records_the_override_and_rollback_restores(cluster: Cluster) -> None:
    held_id, good_id = cluster.records["bad"], cluster.records["good"]
    refused = cluster.cli("models", "promote", held_id, "--author", "lee")
    assert refused.returncode == 1 and "--force" in " ".join(refused.stderr.split())
    forced = cluster.cli("models", "promote", held_id, "--author", "lee", "--force", "--reason", "customer hold")
    assert forced.returncode == 0, forced.stderr
    shown = json.loads(cluster.cli("models", "show", held_id).stdout)
    assert shown["status"] == "active" and shown["reason"].startswith("gate overridden by lee: customer hold")
    promoted = shown["history"][-1]
    assert (promoted["event"], promoted["actor"], promoted["reason"]) == ("promoted", "lee", "customer hold")
    assert promoted["details"]["gate_overridden"] is True and promoted["details"]["gate_reasons"]
    assert shown["metrics"]["gate"]["passed"] is False  # the gate's record is kept as it was

    rolled = cluster.cli("models", "rollback", "--author", "lee", "--reason", "false alarms on line 3")
    assert rolled.returncode == 0, rolled.stderr
    with session_scope(cluster.session_factory) as session:
        assert repository.get_active_model_version(session).id == good_id
    assert [event for event, _ in cluster.history(held_id)][-3:] == ["promoted", "retired", "rolled back"]
    assert cluster.history(good_id)[-1] == ("promoted", "lee")
    ids = cluster.drop_incoming(2)
    scored = cluster.wait_scored(ids)
    assert {rows[0].model_version for rows in scored.values()} == {good_id}
    # Re-scoring what the first model scored reports completion, not just "queued".
    rescored = cluster.cli("rescore", "--since", "2020-01-01", "--timeout", "300")
    output = " ".join(rescored.stderr.split())
    assert rescored.returncode == 0, output
    assert f"rescore by {good_id}:" in output and "0 failed, 0 not done" in output


def _ensemble(cluster: Cluster, version: str) -> Any:
    provider = ModelProvider(
        session_factory=cluster.session_factory,
        store=make_store_for(cluster),
        cache_dir=cluster.settings.model_cache_dir,
        device="cpu",
        model_version=version,
    )
    return provider.current().ensemble


def make_store_for(cluster: Cluster) -> Any:
    from worker.app import make_store_from_settings

    return make_store_from_settings(cluster.settings)


def _label(cluster: Cluster, key: str, data: bytes, verdict: str) -> None:
    cluster.put(key, data, "incoming")
    with session_scope(cluster.session_factory) as session:
        registry.label_image(session, bucket=BUCKET, key=key, verdict=verdict, author="test", note=None)


def test_one_label_cannot_decide_and_enough_labels_count(cluster: Cluster) -> None:
    """The gate on the real models and data: one good and one defect label are recorded but do not decide;
    with the minimum of each, the labelled checks count (every record kept for the closing note)."""
    store = make_store_for(cluster)
    first, good, bad = cluster.first_version, cluster.records["good"], cluster.records["bad"]
    models = {version: _ensemble(cluster, version) for version in (first, good, bad)}
    rules = gate_rules_of(cluster.settings)
    good_keys = [key for key in (f"incoming/labelled/good-{i:02d}.png" for i in range(60)) if held_out(key, HOLDOUT)]
    clean = cluster.train_images[100:103]
    damaged = [black_square(path, index) for index, path in enumerate(cluster.train_images[110:113])]

    def gate(candidate: str, active: str) -> dict[str, Any]:
        return evaluate_gate(models[candidate], models[active], session_factory=cluster.session_factory, store=store,
                             rules=rules, active_version=active, candidate_version=candidate).as_dict()  # fmt: skip

    _label(cluster, good_keys[0], clean[0].read_bytes(), "good")
    _label(cluster, "incoming/labelled/defect-00.png", damaged[0], "defect")
    one = gate(bad, good)
    assert one["labelled"]["n_good"] == 1 and one["labelled"]["n_defect"] == 1 and not one["labelled"]["enough"]
    assert any(note.startswith("not enough labels: 1 good / 1 defect") for note in one["notes"])
    labelled_checks = {"defect_recall", "auroc_vs_active", "f1_vs_active"}
    assert not any(check["used"] for check in one["checks"] if check["name"] in labelled_checks)
    assert not one["passed"]  # still held back, by the label-free checks
    cluster.records["bad candidate, one label of each"] = one

    for index in (1, 2):
        _label(cluster, good_keys[index], clean[index].read_bytes(), "good")
        _label(cluster, f"incoming/labelled/defect-{index:02d}.png", damaged[index], "defect")
    for name, (candidate, active) in {"bad": (bad, good), "good": (good, first)}.items():
        record = gate(candidate, active)
        assert record["labelled"]["enough"] and record["labelled"]["n_defect"] == 3
        assert all(check["used"] for check in record["checks"] if check["name"] in labelled_checks)
        cluster.records[f"{name} candidate, 3 good + 3 defect labels"] = record
    print("GATE-RECORDS " + json.dumps({k: v for k, v in cluster.records.items() if isinstance(v, dict)}))
