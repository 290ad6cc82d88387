"""Repository functions on real PostgreSQL and SQLite: idempotence, upserts, the one-active rule."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from worker.db import make_engine, make_session_factory, session_scope
from worker.errors import PermanentError
from worker.repository import (
    ObjectVersion,
    UnknownModelVersionError,
    ensure_model_version,
    get_active_model_version,
    get_image,
    has_inference,
    images_without_rows,
    known_keys,
    latest_inference,
    mark_skipped,
    record_failure,
    record_inference,
    register_image,
    register_images,
    set_active_model_version,
    set_image_sha256,
    summary,
    update_model_version,
)
from worker.schema import Failure, Image, Inference, ModelVersion

Factory = sessionmaker[Session]
BUCKET = "fab-images"


def _register(session: Session, key: str, **overrides: object) -> tuple[Image, bool]:
    arguments: dict[str, object] = {
        "bucket": BUCKET,
        "key": key,
        "etag": "etag-1",
        "size": 1234,
        "metadata": {"tool": "T1", "lot": "L1", "wafer": "W1", "filename": "a.png"},
        "kind": "incoming",
    }
    arguments.update(overrides)
    return register_image(session, **arguments)  # type: ignore[arg-type]


def _count(session: Session, model: type) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def _image_with_model(factory: Factory, key: str = "incoming/T1/L1/W1/a.png") -> int:
    with session_scope(factory) as session:
        image, _ = _register(session, key)
        ensure_model_version(session, version="v1", threshold=0.5, fold_thresholds=[0.4, 0.6])
        return image.id


# --- images ---------------------------------------------------------------------------------------


def test_register_image_is_idempotent(session_factory: Factory) -> None:
    with session_scope(session_factory) as session:
        first, created_first = _register(session, "incoming/T1/L1/W1/a.png")
        second, created_second = _register(session, "incoming/T1/L1/W1/a.png")
    assert created_first
    assert not created_second
    assert first.id == second.id
    with session_scope(session_factory) as session:
        assert _count(session, Image) == 1
        image = get_image(session, image_id=first.id)
        assert image is not None
        assert (image.lot, image.wafer, image.tool) == ("L1", "W1", "T1")
        assert image.meta["filename"] == "a.png"
        assert image.status == "queued"
        assert image.first_seen_at.tzinfo is not None
        assert image.first_seen_at.utcoffset() == UTC.utcoffset(None)


def test_a_new_etag_is_a_new_image_and_a_missing_etag_is_empty(session_factory: Factory) -> None:
    with session_scope(session_factory) as session:
        one, _ = _register(session, "k.png", etag="e1")
        two, created = _register(session, "k.png", etag="e2")
        unknown, _ = _register(session, "k.png", etag=None, metadata=None)
        again, created_again = _register(session, "k.png", etag="")
    assert created
    assert one.id != two.id
    assert unknown.etag_or_version == ""
    assert unknown.lot is None
    assert again.id == unknown.id
    assert not created_again


def test_register_image_refuses_an_unknown_kind(session_factory: Factory) -> None:
    with session_scope(session_factory) as session, pytest.raises(ValueError, match="kind"):
        _register(session, "k.png", kind="thumbnail")


def test_concurrent_registration_yields_one_row(session_factory: Factory) -> None:
    """Eight threads, eight sessions, one object: exactly one insert wins on either backend."""
    n_threads = 8
    barrier = threading.Barrier(n_threads)
    results: list[tuple[int, bool]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def register() -> None:
        try:
            barrier.wait(timeout=10)
            with session_scope(session_factory) as session:
                image, created = _register(session, "incoming/race.png")
            with lock:
                results.append((image.id, created))
        except BaseException as exc:  # collected and asserted on in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=register) for _ in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(results) == n_threads
    assert len({image_id for image_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_racing_insert_waits_for_the_other_transaction_on_postgresql(pg_url: str) -> None:
    """A second insert blocks on the first's uncommitted row, then finds it instead of failing."""
    engine = make_engine(pg_url)
    factory = make_session_factory(engine)
    key = f"incoming/race-{uuid.uuid4().hex}.png"
    outcome: dict[str, object] = {}
    try:
        first = factory()
        image, created = _register(first, key)  # inserted, not committed
        assert created

        def second_worker() -> None:
            with session_scope(factory) as session:
                other, other_created = _register(session, key)
                outcome.update(image_id=other.id, created=other_created)

        thread = threading.Thread(target=second_worker)
        thread.start()
        time.sleep(0.3)
        assert thread.is_alive(), "the second insert should wait for the first transaction"
        first.commit()
        first.close()
        thread.join(timeout=10)
        assert outcome == {"image_id": image.id, "created": False}
    finally:
        with session_scope(factory) as session:
            session.execute(Image.__table__.delete().where(Image.key == key))
        engine.dispose()


def test_reconciliation_queries(session_factory: Factory) -> None:
    with session_scope(session_factory) as session:
        _register(session, "incoming/a.png")
        _register(session, "incoming/b.png")
        _register(session, "incoming/b.png", etag="etag-2")
        _register(session, "incoming_%/c.png")
        _register(session, "nominal/n.png", kind="nominal")
        _register(session, "incoming/a.png", bucket="other-bucket")
    with session_scope(session_factory) as session:
        assert known_keys(session, BUCKET, "incoming/") == {"incoming/a.png", "incoming/b.png"}
        assert known_keys(session, bucket=BUCKET, prefix="incoming_%/") == {"incoming_%/c.png"}
        assert len(known_keys(session, BUCKET)) == 4
        listing = ["incoming/z.png", "incoming/a.png", "incoming/y.png", "incoming/z.png"]
        assert images_without_rows(session, bucket=BUCKET, keys=listing) == [
            "incoming/z.png",
            "incoming/y.png",
        ]
        many = [f"incoming/{index}.png" for index in range(1200)] + ["incoming/b.png"]
        assert len(images_without_rows(session, bucket=BUCKET, keys=many)) == 1200


def test_sha256_first_writer_wins_and_skip_records_the_reason(session_factory: Factory) -> None:
    with session_scope(session_factory) as session:
        image, _ = _register(session, "incoming/big.tif")
        set_image_sha256(session, image_id=image.id, sha256="a" * 64)
        set_image_sha256(session, image_id=image.id, sha256="b" * 64)
        mark_skipped(session, image_id=image.id, reason="larger than max_object_bytes")
    with session_scope(session_factory) as session:
        stored = get_image(session, image_id=image.id)
        assert stored is not None
        assert stored.sha256 == "a" * 64
        assert stored.status == "skipped"
        assert stored.status_reason == "larger than max_object_bytes"


def _seed_page_history(session: Session, bucket: str) -> None:
    """The rows a page meets: a known queued row, a known skipped row, and one from before migration 0003
    (its ETag only in ``etag_or_version``), which the page teaches its ETag."""
    _register(session, "incoming/T1/L1/W1/known.png", bucket=bucket, etag="e-known")
    skipped, _ = _register(session, "incoming/T1/L1/W1/known-skipped.png", bucket=bucket, etag="e-skip")
    mark_skipped(session, image_id=skipped.id, reason="larger than max_object_bytes")
    session.add(Image(bucket=bucket, key="incoming/legacy.png", etag_or_version="e-old", etag=None, meta={}))
    session.flush()


def _mixed_page(bucket: str) -> list[ObjectVersion]:
    """New, known, in-page duplicates, unsupported, versioned, nominal, no ETag, a legacy row to teach."""
    meta = {"tool": "T1", "lot": "L1", "wafer": "W1", "filename": "x.png", "extra": ""}

    def version(key: str, etag: str | None, **overrides: object) -> ObjectVersion:
        arguments: dict[str, object] = {"bucket": bucket, "key": key, "etag": etag, "size": 10, "metadata": meta}
        arguments.update(overrides)
        return ObjectVersion(**arguments)  # type: ignore[arg-type]

    return [
        version("incoming/T1/L1/W1/new.png", "e-new"),
        version("incoming/T1/L1/W1/known.png", "e-known"),
        version("incoming/dup.png", "e-dup", size=1),
        version("incoming/T1/L1/W1/known-skipped.png", "e-skip"),
        version("incoming/notes.txt", "e-txt", skip_reason="not a supported image: " + "x" * 5000),
        version("incoming/versioned.png", "e-v", version_id="v1"),
        version("incoming/late-etag.png", None, version_id="v9"),
        version("incoming/dup.png", "e-dup", size=2),  # SQS redelivery within the page
        version("incoming/legacy.png", "e-old"),
        version("incoming/late-etag.png", "e-late", version_id="v9"),
        version("nominal/good.png", "e-nom", kind="nominal", metadata=None),
        version("incoming/no-etag.png", None, version_id=""),
        version("incoming/T1/L1/W1/new.png", "e-new"),
    ]


def _rows(session: Session, bucket: str) -> dict[tuple[str, str], tuple[object, ...]]:
    """Every column but the id and the clock, by (key, etag_or_version)."""
    skip = {"id", "bucket", "first_seen_at", "status_changed_at"}
    columns = [column for column in Image.__table__.c if column.name not in skip]
    query = select(Image.key, Image.etag_or_version, *columns).where(Image.bucket == bucket)
    return {(key, version): tuple(rest) for key, version, *rest in session.execute(query)}


def _by_row(session: Session, results: list[tuple[int, str, bool]]) -> list[tuple[tuple[str, str], str, bool]]:
    """Results with each id replaced by its row's (key, etag_or_version): comparable across buckets."""
    triples = {image.id: (image.key, image.etag_or_version) for image in session.scalars(select(Image))}
    return [(triples[image_id], status, created) for image_id, status, created in results]


def test_register_images_gives_what_one_register_image_per_object_gives(session_factory: Factory) -> None:
    one_by_one, set_based = "bucket-one-by-one", "bucket-set-based"
    with session_scope(session_factory) as session:
        _seed_page_history(session, one_by_one)
        _seed_page_history(session, set_based)
    with session_scope(session_factory) as session:
        singles = []
        for item in _mixed_page(one_by_one):
            image, created = register_image(
                session,
                bucket=item.bucket,
                key=item.key,
                etag=item.etag,
                size=item.size,
                metadata=item.metadata,
                kind=item.kind,
                version_id=item.version_id,
                skip_reason=item.skip_reason,
            )
            singles.append((image.id, image.status, created))
        page = [(r.image_id, r.status, r.created) for r in register_images(session, _mixed_page(set_based))]
    with session_scope(session_factory) as session:
        assert _by_row(session, page) == _by_row(session, singles)
        assert _rows(session, set_based) == _rows(session, one_by_one)
    created_flags = [created for _, _, created in page]
    assert created_flags == [True, False, True, False, True, True, True, False, False, False, True, True, False]
    assert page[2][0] == page[7][0] and page[0][0] == page[12][0]
    assert [status for _, status, _ in page][1:5] == ["queued", "queued", "skipped", "skipped"]
    with session_scope(session_factory) as session:

        def row(key: str) -> Image:
            return session.scalars(select(Image).where(Image.bucket == set_based, Image.key == key)).one()

        legacy, late, notes, dup = (
            row(f"incoming/{name}") for name in ("legacy.png", "late-etag.png", "notes.txt", "dup.png")
        )
        new = row("incoming/T1/L1/W1/new.png")
    assert (legacy.etag, late.etag, late.version_id, late.etag_or_version) == ("e-old", "e-late", "v9", "v9")
    assert notes.status == "skipped" and notes.status_reason is not None and len(notes.status_reason) == 4000
    assert dup.size == 1  # the first occurrence wins
    assert (new.lot, new.wafer, new.tool, new.meta["extra"]) == ("L1", "W1", "T1", "")
    assert new.first_seen_at.utcoffset() == UTC.utcoffset(None)


def test_register_images_of_an_empty_page_and_of_more_than_a_parameter_chunk(session_factory: Factory) -> None:
    page = [ObjectVersion(bucket=BUCKET, key=f"incoming/{index}.png", etag=f"e{index}", size=1) for index in range(700)]
    with session_scope(session_factory) as session:
        assert register_images(session, []) == []
        first = register_images(session, page)
        again = register_images(session, [*reversed(page), page[0]])
    assert all(result.created for result in first)
    expected_ids = [result.image_id for result in reversed(first)] + [first[0].image_id]
    assert [result.image_id for result in again] == expected_ids
    assert not any(result.created for result in again)


def test_register_images_refuses_an_unknown_kind_before_writing(session_factory: Factory) -> None:
    page = [
        ObjectVersion(bucket=BUCKET, key="incoming/a.png", etag="e", size=1),
        ObjectVersion(bucket=BUCKET, key="thumbs/a.png", etag="e", size=1, kind="thumbnail"),
    ]
    with session_scope(session_factory) as session:
        with pytest.raises(ValueError, match=r"kind.*thumbs/a\.png"):
            register_images(session, page)
        assert _count(session, Image) == 0


# --- inferences and failures ----------------------------------------------------------------------


def test_record_inference_twice_keeps_one_row(session_factory: Factory) -> None:
    image_id = _image_with_model(session_factory)
    arguments = {
        "image_id": image_id,
        "model_version": "v1",
        "score": 0.8,
        "threshold": 0.5,
        "is_anomalous": True,
        "fold_scores": [0.7, 0.9],
        "heatmap_key": "heatmaps/a.png",
        "timings": {"download_ms": 3.0, "decode_ms": 1.5, "model_ms": 12.0},
    }
    with session_scope(session_factory) as session:
        assert not has_inference(session, image_id=image_id, model_version="v1")
        assert record_inference(session, **arguments)  # type: ignore[arg-type]
    with session_scope(session_factory) as session:
        assert not record_inference(session, **{**arguments, "score": 0.1})  # type: ignore[arg-type]
    with session_scope(session_factory) as session:
        assert _count(session, Inference) == 1
        assert has_inference(session, image_id=image_id, model_version="v1")
        inference = latest_inference(session, image_id=image_id)
        assert inference is not None
        assert inference.score == pytest.approx(0.8)
        assert inference.fold_scores == [0.7, 0.9]
        assert inference.model_ms == pytest.approx(12.0)
        assert inference.created_at.tzinfo is not None
        image = get_image(session, image_id=image_id)
        assert image is not None
        assert image.status == "scored"


def test_record_inference_stores_the_anomaly_map(session_factory: Factory) -> None:
    """The map travels with its row (bytes and the two scores its levels span), and comes back equal."""
    from models.heatmap import encode_map
    from worker.repository import stored_map

    image_id = _image_with_model(session_factory)
    anomaly_map = encode_map(np.linspace(0.1, 0.9, 224 * 224, dtype=np.float32).reshape(224, 224))
    with session_scope(session_factory) as session:
        record_inference(
            session,
            image_id=image_id,
            model_version="v1",
            score=0.9,
            threshold=0.5,
            is_anomalous=True,
            fold_scores=[0.9],
            anomaly_map=anomaly_map,
        )
    with session_scope(session_factory) as session:
        inference = latest_inference(session, image_id=image_id)
        assert inference is not None and inference.heatmap_key is None
        assert stored_map(inference) == anomaly_map


def test_record_inference_refuses_unknown_timings(session_factory: Factory) -> None:
    image_id = _image_with_model(session_factory)
    with session_scope(session_factory) as session, pytest.raises(ValueError, match="timing"):
        record_inference(
            session,
            image_id=image_id,
            model_version="v1",
            score=0.1,
            threshold=0.5,
            is_anomalous=False,
            fold_scores=[0.1],
            timings={"gpu_ms": 1.0},
        )


def test_foreign_keys_are_enforced(session_factory: Factory) -> None:
    image_id = _image_with_model(session_factory)
    with pytest.raises(IntegrityError), session_scope(session_factory) as session:
        record_inference(
            session,
            image_id=image_id + 1000,
            model_version="v1",
            score=0.1,
            threshold=0.5,
            is_anomalous=False,
            fold_scores=[],
        )
    with pytest.raises(IntegrityError), session_scope(session_factory) as session:
        record_inference(
            session,
            image_id=image_id,
            model_version="no-such-version",
            score=0.1,
            threshold=0.5,
            is_anomalous=False,
            fold_scores=[],
        )


def test_failure_upsert_counts_attempts(session_factory: Factory) -> None:
    image_id = _image_with_model(session_factory)
    with session_scope(session_factory) as session:
        assert record_failure(session, image_id=image_id, error_type="StorageUnavailableError", message="x") == 1
    with session_scope(session_factory) as session:
        long_message = "y" * 10_000
        assert record_failure(session, image_id=image_id, error_type="BadObjectError", message=long_message) == 2
    with session_scope(session_factory) as session:
        failure = session.scalars(select(Failure)).one()
        assert failure.attempts == 2
        assert failure.error_type == "BadObjectError"
        assert len(failure.message) < 10_000
        assert failure.last_at >= failure.first_at
        image = get_image(session, image_id=image_id)
        assert image is not None
        assert image.status == "failed"


# --- model versions -------------------------------------------------------------------------------


def test_ensure_model_version_is_idempotent(session_factory: Factory) -> None:
    with session_scope(session_factory) as session:
        row, created = ensure_model_version(
            session,
            version="v1",
            manifest={"folds": 2},
            artifact_uri="models/v1/",
            threshold=0.5,
            fold_thresholds=[0.4, 0.6],
        )
        again, created_again = ensure_model_version(session, version="v1", threshold=0.9)
    assert created
    assert not created_again
    assert again.threshold == pytest.approx(0.5)
    assert row.manifest == {"folds": 2}
    assert row.status == "candidate"


def test_only_one_model_version_is_active(session_factory: Factory) -> None:
    with session_scope(session_factory) as session:
        ensure_model_version(session, version="v1", status="active", threshold=0.5)
        ensure_model_version(session, version="v2", threshold=0.6)
        active = get_active_model_version(session)
        assert active is not None
        assert active.id == "v1"
    with session_scope(session_factory) as session:
        promoted = set_active_model_version(session, "v2")
        assert promoted.status == "active"
        assert promoted.activated_at is not None
        assert set_active_model_version(session, version="v2").id == "v2"  # already active: no-op
    with session_scope(session_factory) as session:
        statuses = dict(session.execute(select(ModelVersion.id, ModelVersion.status)).all())
        assert statuses == {"v1": "retired", "v2": "active"}
        active = get_active_model_version(session)
        assert active is not None
        assert active.id == "v2"
    # The database itself refuses a second active row, whatever the code path.
    with pytest.raises(IntegrityError), session_scope(session_factory) as session:
        session.get_one(ModelVersion, "v1").status = "active"
        session.flush()


def test_unknown_model_versions_are_permanent_errors(session_factory: Factory) -> None:
    with session_scope(session_factory) as session:
        with pytest.raises(UnknownModelVersionError) as caught:
            set_active_model_version(session, "nope")
        assert isinstance(caught.value, PermanentError)
        with pytest.raises(UnknownModelVersionError):
            update_model_version(session, version="nope", stage="fold 1/5")


def test_update_model_version_tracks_a_build(session_factory: Factory) -> None:
    with session_scope(session_factory) as session:
        ensure_model_version(session, version="v3", status="building")
        update_model_version(session, version="v3", stage="fold 2/5")
    with session_scope(session_factory) as session:
        row = update_model_version(
            session,
            version="v3",
            status="candidate",
            stage=None,
            reason="held back: AUROC below the active version",
            metrics={"auroc": 0.91},
            artifact_uri="models/v3/",
            threshold=0.42,
            fold_thresholds=[0.4, 0.44],
        )
        assert (row.status, row.stage, row.metrics) == ("candidate", None, {"auroc": 0.91})
        with pytest.raises(ValueError, match="set_active_model_version"):
            update_model_version(session, version="v3", status="active")


# --- units of work and reporting ------------------------------------------------------------------


def test_session_scope_rolls_back_on_error(session_factory: Factory) -> None:
    with pytest.raises(RuntimeError), session_scope(session_factory) as session:
        _register(session, "incoming/rolled-back.png")
        raise RuntimeError("boom")
    with session_scope(session_factory) as session:
        assert _count(session, Image) == 0


def test_summary_counts_and_slowest(session_factory: Factory) -> None:
    with session_scope(session_factory) as session:
        ensure_model_version(session, version="v1", threshold=0.5)
        for index in range(4):
            image, _ = _register(session, f"incoming/T1/L{index % 2}/W1/{index}.png", metadata={"lot": f"L{index % 2}"})
            record_inference(
                session,
                image_id=image.id,
                model_version="v1",
                score=index / 4,
                threshold=0.5,
                is_anomalous=index >= 2,
                fold_scores=[index / 4],
                timings={"download_ms": float(index), "model_ms": 10.0 * index},
            )
        failed, _ = _register(session, "incoming/broken.png")
        record_failure(session, image_id=failed.id, error_type="BadObjectError", message="not an image")
        record_failure(session, image_id=failed.id, error_type="BadObjectError", message="not an image")
        skipped, _ = _register(session, "incoming/huge.png")
        mark_skipped(session, image_id=skipped.id, reason="too large")
        _register(session, "incoming/waiting.png")
    with session_scope(session_factory) as session:
        report = summary(session, slowest=2)
    assert report.images_by_status == {"scored": 4, "failed": 1, "skipped": 1, "queued": 1}
    assert report.images == 7
    assert (report.inferences, report.anomalies) == (4, 2)
    assert (report.failures, report.failed_attempts) == (1, 2)
    assert report.anomalies_by_lot == {"L0": 1, "L1": 1}
    assert [row.key for row in report.slowest] == ["incoming/T1/L1/W1/3.png", "incoming/T1/L0/W1/2.png"]
    assert report.slowest[0].total_ms == pytest.approx(33.0)
    with session_scope(session_factory) as session:
        assert summary(session, model_version="other").inferences == 0
