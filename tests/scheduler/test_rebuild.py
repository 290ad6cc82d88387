"""The rebuild's plain functions on both backends: pool selection, triggers, claim under the lock, registry."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from scheduler import registry
from scheduler.gate import GateRules, decide
from scheduler.locks import file_lock, rebuild_lock
from scheduler.rebuild import (
    BuildPlan,
    RebuildOptions,
    claim_build,
    last_build_point,
    plan_chunks,
    pool_fingerprint,
    select_training_pool,
    should_rebuild,
)
from worker import repository
from worker.db import session_scope
from worker.schema import Label, ModelVersion, utcnow
from worker.storage import FolderStore

BUCKET = "fab"


def _image(session: Session, key: str, kind: str, etag: str = "e1") -> int:
    image, _ = repository.register_image(session, bucket=BUCKET, key=key, etag=etag, size=10, kind=kind)
    return image.id


def _label(session: Session, image_id: int, verdict: str, minutes: int = 0) -> None:
    when = utcnow() + timedelta(minutes=minutes)
    session.add(Label(image_id=image_id, verdict=verdict, author="eng", created_at=when))


@pytest.fixture
def store(tmp_path: Path) -> FolderStore:
    folder = FolderStore(tmp_path / "bucket", bucket=BUCKET)
    folder.ensure_bucket()
    return folder


def test_pool_is_nominal_plus_confirmed_good_never_defects(session_factory: sessionmaker[Session]) -> None:
    with session_scope(session_factory) as session:
        _image(session, "nominal/a.png", "nominal")
        _image(session, "nominal/a.png", "nominal", etag="e2")  # a newer version of the same key
        bad_nominal = _image(session, "nominal/b.png", "nominal")
        good = _image(session, "incoming/c.png", "incoming")
        relabelled = _image(session, "incoming/d.png", "incoming")
        defect = _image(session, "incoming/e.png", "incoming")
        _image(session, "incoming/unlabelled.png", "incoming")
        _label(session, bad_nominal, "defect")
        _label(session, good, "good")
        _label(session, relabelled, "good")
        _label(session, relabelled, "defect", minutes=5)  # latest verdict wins
        _label(session, defect, "defect")
    with session_scope(session_factory) as session:
        pool = select_training_pool(session, bucket=BUCKET)
    assert [(image.key, image.etag) for image in pool] == [("incoming/c.png", "e1"), ("nominal/a.png", "e2")]
    assert pool_fingerprint(pool) == pool_fingerprint(list(reversed(pool)))


def test_plan_chunks_sorted_and_bounded() -> None:
    assert plan_chunks(["c", "a", "b", "e", "d"], 2) == [["a", "b"], ["c", "d"], ["e"]]
    with pytest.raises(ValueError, match="chunk_size"):
        plan_chunks(["a"], 0)


def test_triggers_count_new_images_and_nightly_needs_a_change(session_factory: sessionmaker[Session]) -> None:
    with session_scope(session_factory) as session:
        for index in range(5):
            _image(session, f"nominal/{index}.png", "nominal")
        pool = select_training_pool(session, bucket=BUCKET)
        assert last_build_point(session) == (None, None)
    assert should_rebuild(pool, "count", since=None, fingerprint=None, threshold=5)[0]
    assert not should_rebuild(pool, "count", since=None, fingerprint=None, threshold=6)[0]
    later = utcnow() + timedelta(seconds=1)
    assert not should_rebuild(pool, "count", since=later, fingerprint=None, threshold=1)[0]
    print_ = pool_fingerprint(pool)
    assert not should_rebuild(pool, "nightly", since=later, fingerprint=print_, threshold=1)[0]
    assert should_rebuild(pool[:-1], "nightly", since=later, fingerprint=print_, threshold=1)[0]
    assert should_rebuild(pool, "manual", since=later, fingerprint=print_, threshold=99)[0]
    assert not should_rebuild([], "manual", since=None, fingerprint=None, threshold=1)[0]


def test_concurrent_claims_start_one_build(session_factory: sessionmaker[Session], store: FolderStore) -> None:
    with session_scope(session_factory) as session:
        for index in range(6):
            _image(session, f"nominal/{index}.png", "nominal")
    engine = session_factory.kw["bind"]
    options = RebuildOptions(bucket=BUCKET, retrain_threshold=3, chunk_size=4, config_overrides={"folds": 2})
    barrier = threading.Barrier(4)
    outcomes: list[tuple[BuildPlan | None, str]] = []

    def trigger() -> None:
        barrier.wait()
        outcomes.append(
            claim_build(engine=engine, session_factory=session_factory, store=store, trigger="count", options=options)
        )

    threads = [threading.Thread(target=trigger) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    plans = [plan for plan, _ in outcomes if plan is not None]
    assert len(outcomes) == 4 and len(plans) == 1, outcomes
    plan = plans[0]
    assert plan.chunks == [[f"nominal/{i}.png" for i in range(4)], ["nominal/4.png", "nominal/5.png"]]
    assert BuildPlan.from_json(store.get(plan.work_prefix + "plan.json", max_bytes=1 << 20).data) == plan
    with session_scope(session_factory) as session:
        rows = session.scalars(select(ModelVersion)).all()
        assert [(row.id, row.status) for row in rows] == [(plan.build_id, "building")]
        assert rows[0].stage.startswith("planned")
    # A later trigger sees the running build (the lease) and does nothing.
    again, why = claim_build(
        engine=engine, session_factory=session_factory, store=store, trigger="manual", options=options
    )
    assert again is None and "running" in why


def test_expired_lease_is_failed_and_frees_the_next_build(
    session_factory: sessionmaker[Session], store: FolderStore
) -> None:
    with session_scope(session_factory) as session:
        for index in range(3):
            _image(session, f"nominal/{index}.png", "nominal")
        repository.ensure_model_version(
            session, version="build-old", status="building", metrics={"heartbeat_at": "2020-01-01T00:00:00+00:00"}
        )
    engine = session_factory.kw["bind"]
    options = RebuildOptions(bucket=BUCKET, lease_s=60, config_overrides={"folds": 2})
    plan, _ = claim_build(
        engine=engine, session_factory=session_factory, store=store, trigger="manual", options=options
    )
    assert plan is not None
    with session_scope(session_factory) as session:
        old = session.get(ModelVersion, "build-old")
        assert old.status == "failed" and old.reason.startswith("lease expired")


def test_lock_is_exclusive(db_engine, tmp_path: Path) -> None:
    with rebuild_lock(db_engine) as first:
        assert first
        results: list[bool] = []

        def other() -> None:
            with rebuild_lock(db_engine) as taken:
                results.append(taken)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(timeout=30)
        assert results == [False]
    with rebuild_lock(db_engine) as again:
        assert again
    with file_lock(tmp_path / "x.lock") as a, file_lock(tmp_path / "x.lock") as b:
        assert (a, b) == (True, False)


def test_rollback_promote_label_and_rescore_selection(session_factory: sessionmaker[Session]) -> None:
    with session_scope(session_factory) as session:
        for version in ("v1", "v2", "v3"):
            repository.ensure_model_version(session, version=version, artifact_uri=f"models/{version}/")
        repository.ensure_model_version(session, version="build-x", status="building")
        repository.set_active_model_version(session, "v1")
        repository.set_active_model_version(session, "v2")
        registry.promote(session, "v3")
        with pytest.raises(registry.RegistryError):
            registry.promote(session, "build-x")
        image_id = _image(session, "incoming/x.png", "incoming")
        label = registry.label_image(
            session, bucket=BUCKET, key="incoming/x.png", verdict="defect", author="a", note="n"
        )
        assert label.image_id == image_id
        with pytest.raises(registry.RegistryError):
            registry.label_image(session, bucket=BUCKET, key="incoming/none.png", verdict="good", author="a", note=None)
        assert registry.images_to_rescore(
            session, bucket=BUCKET, since=utcnow() - timedelta(hours=1), version="v3"
        ) == [image_id]
    with session_scope(session_factory) as session:
        assert registry.rollback(session) == ("v3", "v2")
    with session_scope(session_factory) as session:
        assert registry.rollback(session) == ("v2", "v1")  # v3 was rolled back: skipped
        assert repository.get_active_model_version(session).id == "v1"


def test_gate_rules() -> None:
    rules = GateRules(auroc_margin=0.02, f1_margin=0.05, max_nominal_flag_rate=0.1)
    active = {"image_auroc": 0.95, "f1": 0.80}
    ok = {"image_auroc": 0.94, "f1": 0.76}
    bad = {"image_auroc": 0.70, "f1": 0.50}
    assert decide(ok, active, n_good=5, n_defect=5, flag_rate=0.05, rules=rules)[0]
    passed, reasons, _ = decide(bad, active, n_good=5, n_defect=5, flag_rate=0.05, rules=rules)
    assert not passed and len(reasons) == 2 and reasons[0].startswith("AUROC 0.7000")
    passed, reasons, _ = decide(ok, active, n_good=5, n_defect=5, flag_rate=0.5, rules=rules)
    assert not passed and "flags 50.0%" in reasons[0]
    passed, reasons, notes = decide(None, None, n_good=0, n_defect=0, flag_rate=0.0, rules=rules)
    assert passed and notes == ["no labelled images: threshold consistency only"]
    passed, _, notes = decide(bad, active, n_good=5, n_defect=0, flag_rate=0.0, rules=rules)
    assert passed and "F1 not compared: no confirmed defect" in notes


def test_chunked_reconpatch_build_equals_the_one_process_build(
    session_factory: sessionmaker[Session], store: FolderStore, tmp_path: Path
) -> None:
    """Chunks → ReConPatch f (one step) → fold banks → finish gives the model FoldEnsemble.fit gives."""
    from bench.magnetic_tile import DATASETS
    from models import FoldEnsemble, PatchCoreConfig
    from scheduler.rebuild import build_fold_bank, extract_chunk, finish_build, train_representation_step

    folder = DATASETS / "dacon-semiconductor" / "train"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present on this machine (set WAFERWATCH_DATASETS)")
    config = PatchCoreConfig(
        folds=2, coreset_ratio=0.02, batch_size=4, reconpatch=True, reconpatch_steps=50, reconpatch_batch=128
    )
    keys = [f"nominal/TRAIN_{i:03d}.png" for i in range(10)]
    for key in keys:
        store.put(key, (folder / key.removeprefix("nominal/")).read_bytes())
    plan = BuildPlan(
        build_id="build-rcp",
        trigger="manual",
        config=config.to_dict(),
        keys=keys,
        etags=["e"] * len(keys),
        chunks=plan_chunks(keys, 4),
        fingerprint="f",
        snapshot_at=utcnow().isoformat(),
        work_prefix="models/build-rcp/work/",
        model_prefix="models/",
    )
    for index in range(len(plan.chunks)):
        extract_chunk(store, plan, index, device="cpu", max_object_bytes=1 << 30)
    assert train_representation_step(store, plan, device="cpu") == 2  # one f per fold
    for index in range(config.folds):
        build_fold_bank(store, plan, index)
    finished = finish_build(store, session_factory, plan, cache_dir=tmp_path / "cache", device="cpu")
    assert "reconpatch" in finished.timings

    direct = FoldEnsemble.fit(
        keys, [(folder / k.removeprefix("nominal/")).read_bytes() for k in keys], config, device="cpu"
    )
    assert finished.version == direct.version
    assert finished.ensemble.fold_thresholds == direct.fold_thresholds
    manifest = store.get(f"models/{finished.version}/manifest.json", max_bytes=1 << 24).data
    assert b"reconpatch_1.safetensors" in manifest
