"""Versions, not keys (issue 12, rows 4 and 5): an images row scores exactly the bytes it registered.

Real moto S3 (plain and versioned buckets), a real folder bucket, real SQLite and PostgreSQL, the real
ingestor, scorer and reconciler; the "inspection tool" uploads with its own boto3 client. Each test ends
with the SQL accounting of ``end_state``.

Before the fix: the overwritten row was scored with the new bytes and the new hash (row 4), the
versioned bucket's old version likewise and ``v_latest_inference`` returned two rows for the key, and
reconciliation matched by key and never registered an overwrite whose notification was lost (row 5).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import FoldEnsemble
from worker import repository
from worker.db import session_scope
from worker.events import ObjectEvent
from worker.ingest import Ingestor, Prefixes
from worker.model_provider import LoadedModel
from worker.reconcile import reconcile
from worker.schema import Image, Inference
from worker.scoring import ScoringOptions, score_batch
from worker.storage import FolderStore, ObjectStore, make_store, normalize_etag

try:
    from end_state import image_states, latest_image_ids
except ModuleNotFoundError:  # tests/faults became a package
    from tests.faults.end_state import image_states, latest_image_ids

BUCKET = "fab-versions"
KEY = "incoming/T1/L1/W1/die.png"


@pytest.fixture(scope="module")
def ensemble(pipeline_model_dir: Path) -> FoldEnsemble:
    return FoldEnsemble.load(pipeline_model_dir, device="cpu")


@pytest.fixture
def model(session_factory: sessionmaker[Session], ensemble: FoldEnsemble) -> LoadedModel:
    """The pipeline model, registered as the active version (inferences reference it)."""
    with session_scope(session_factory) as session:
        repository.ensure_model_version(session, version=ensemble.version, status="active")
    return LoadedModel(ensemble.version, ensemble, "pinned", time.time())


@pytest.fixture
def images(dacon_test_images: list[Path]) -> tuple[bytes, bytes]:
    """Two different real images: the first and the second version of one object."""
    return dacon_test_images[0].read_bytes(), dacon_test_images[1].read_bytes()


@pytest.fixture
def tool(s3_endpoint: str) -> Any:
    """The inspection tool's own S3 client (uploads, bucket versioning)."""
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


def _s3_store(s3_endpoint: str, tool: Any, *, versioned: bool) -> ObjectStore:
    store = make_store("s3", endpoint_url=s3_endpoint, bucket=BUCKET, region="us-east-1")
    store.ensure_bucket()
    if versioned:
        tool.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return store


def _upload(tool: Any, data: bytes, key: str = KEY) -> ObjectEvent:
    """Upload like a tool and return the notification S3 would send for it."""
    response = tool.put_object(Bucket=BUCKET, Key=key, Body=data)
    return ObjectEvent(
        BUCKET, key, normalize_etag(response["ETag"]), response.get("VersionId"), len(data), "ObjectCreated:Put", None
    )


@pytest.fixture
def sent() -> list[list[int]]:
    return []


@pytest.fixture
def ingestor(session_factory: sessionmaker[Session], sent: list[list[int]]) -> Iterator[Ingestor]:
    ingest = Ingestor(
        session_factory=session_factory,
        enqueue=lambda ids: sent.append(list(ids)),
        bucket=BUCKET,
        key_metadata=lambda key: {},
        batch_size=1,
    )
    yield ingest
    ingest.close()


def _score(
    ids: list[int], session_factory: sessionmaker[Session], store: ObjectStore, model: LoadedModel, sent: list
) -> Any:
    return score_batch(
        ids,
        session_factory=session_factory,
        store=store,
        model=model,
        options=ScoringOptions(),
        enqueue=lambda new: sent.append(list(new)),
    )


def _sha256_of(session_factory: sessionmaker[Session], image_id: int) -> str | None:
    with session_scope(session_factory) as session:
        return session.scalar(select(Image.sha256).where(Image.id == image_id))


def test_overwrite_before_scoring_supersedes_the_row_and_scores_the_new_version(
    session_factory: sessionmaker[Session],
    s3_endpoint: str,
    tool: Any,
    ingestor: Ingestor,
    sent: list[list[int]],
    model: LoadedModel,
    images: tuple[bytes, bytes],
) -> None:
    store = _s3_store(s3_endpoint, tool, versioned=False)
    first, second = images
    [old_id] = ingestor.submit([_upload(tool, first)])
    late_event = _upload(tool, second)  # overwritten before any worker fetched it; its event is late

    result = _score([old_id], session_factory, store, model, sent)

    assert result.scored == [] and result.superseded == [old_id]
    [new_id] = result.registered
    assert sent == [[old_id], [new_id]]  # the current version was enqueued by the worker
    with session_scope(session_factory) as session:
        old = session.get(Image, old_id)
        assert old is not None and old.status == "superseded" and old.superseded_by == new_id
        assert "overwritten before it was scored" in (old.status_reason or "")
        new = session.get(Image, new_id)
        assert new is not None and new.etag == late_event.etag and new.status == "queued"

    assert _score([new_id], session_factory, store, model, sent).scored == [new_id]
    assert ingestor.submit([late_event]) == []  # the late notification finds the scored row: no rework
    assert _sha256_of(session_factory, new_id) == hashlib.sha256(second).hexdigest()
    with session_scope(session_factory) as session:
        assert image_states(session, model.version) == {KEY: ["superseded", "scored"]}
        assert latest_image_ids(session, KEY) == [new_id]


def test_versioned_bucket_scores_each_version_by_its_version_id(
    session_factory: sessionmaker[Session],
    s3_endpoint: str,
    tool: Any,
    ingestor: Ingestor,
    sent: list[list[int]],
    model: LoadedModel,
    images: tuple[bytes, bytes],
) -> None:
    store = _s3_store(s3_endpoint, tool, versioned=True)
    first, second = images
    [old_id] = ingestor.submit([_upload(tool, first)])
    [new_id] = ingestor.submit([_upload(tool, second)])

    result = _score([old_id, new_id], session_factory, store, model, sent)

    assert sorted(result.scored) == [old_id, new_id] and result.superseded == []
    assert _sha256_of(session_factory, old_id) == hashlib.sha256(first).hexdigest()
    assert _sha256_of(session_factory, new_id) == hashlib.sha256(second).hexdigest()
    with session_scope(session_factory) as session:
        scores = dict(session.execute(select(Inference.image_id, Inference.score)).all())
        assert scores[old_id] != scores[new_id]  # two different images, each scored from its own bytes
        assert image_states(session, model.version) == {KEY: ["scored", "scored"]}
        assert latest_image_ids(session, KEY) == [new_id]


def test_folder_store_overwrite_before_scoring_supersedes_the_row(
    session_factory: sessionmaker[Session],
    tmp_path: Path,
    model: LoadedModel,
    images: tuple[bytes, bytes],
    sent: list[list[int]],
) -> None:
    store = FolderStore(tmp_path / "bucket", bucket=BUCKET)
    store.ensure_bucket()
    first, second = images
    info = store.put(KEY, first)
    with session_scope(session_factory) as session:
        old_id = repository.register_image(session, bucket=BUCKET, key=KEY, etag=info.etag, size=info.size)[0].id
    (tmp_path / "bucket" / KEY).write_bytes(second)  # the tool rewrites the file in place

    result = _score([old_id], session_factory, store, model, sent)

    assert result.superseded == [old_id]
    [new_id] = result.registered
    assert _score([new_id], session_factory, store, model, sent).scored == [new_id]
    assert _sha256_of(session_factory, new_id) == hashlib.sha256(second).hexdigest()
    with session_scope(session_factory) as session:
        assert image_states(session, model.version) == {KEY: ["superseded", "scored"]}
        assert latest_image_ids(session, KEY) == [new_id]


@pytest.mark.parametrize("versioned", [False, True], ids=["plain", "versioned"])
def test_reconcile_finds_an_overwrite_whose_notification_was_lost(
    versioned: bool,
    session_factory: sessionmaker[Session],
    s3_endpoint: str,
    tool: Any,
    ingestor: Ingestor,
    sent: list[list[int]],
    model: LoadedModel,
    images: tuple[bytes, bytes],
) -> None:
    store = _s3_store(s3_endpoint, tool, versioned=versioned)
    first, second = images
    [old_id] = ingestor.submit([_upload(tool, first)])
    assert _score([old_id], session_factory, store, model, sent).scored == [old_id]
    lost_event = _upload(tool, second)  # its notification never arrives
    sent.clear()

    def run() -> dict[str, Any]:
        return reconcile(
            session_factory=session_factory,
            store=store,
            enqueue=lambda ids: sent.append(list(ids)),
            key_metadata=lambda key: {},
            prefixes=Prefixes(),
        ).as_dict()

    assert run()["registered"] == {"incoming": 1, "nominal": 0}
    [[new_id]] = sent
    with session_scope(session_factory) as session:
        new = session.get(Image, new_id)
        assert new is not None and (new.etag, new.version_id) == (lost_event.etag, lost_event.version_id)
    assert run()["registered"] == {"incoming": 0, "nominal": 0}  # the version is known now
    assert ingestor.submit([lost_event]) == [new_id]  # a very late notification finds the same row

    assert _score([new_id], session_factory, store, model, sent).scored == [new_id]
    assert _sha256_of(session_factory, old_id) == hashlib.sha256(first).hexdigest()
    assert _sha256_of(session_factory, new_id) == hashlib.sha256(second).hexdigest()
    with session_scope(session_factory) as session:
        assert image_states(session, model.version) == {KEY: ["scored", "scored"]}
        assert latest_image_ids(session, KEY) == [new_id]
