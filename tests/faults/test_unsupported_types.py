"""Every object accounted for (issue 12, row 6): nothing dropped under ``incoming/`` vanishes.

An animated GIF, a WebP and a BMP (made from real Dacon images) are scored on their first frame; a text
file, a file without a suffix and an unknown type get a ``skipped`` row with the reason; a corrupt GIF
gets a failures row; half-written ``.tmp`` files and folder markers are ignored. Through the real
ingestor (events as S3 sends them), the real folder watcher, and reconciliation on a moto bucket whose
notifications were lost; real SQLite and PostgreSQL.

Before the fix the GIF, the WebP and every non-image had no images row and no failures row at all.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import boto3
import pytest
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import FoldEnsemble
from worker import repository
from worker.db import session_scope
from worker.events import ObjectEvent
from worker.ingest import Ingestor, Prefixes
from worker.model_provider import LoadedModel
from worker.reconcile import reconcile
from worker.schema import Image
from worker.scoring import ScoringOptions, score_batch
from worker.sources.folder import FolderWatcher
from worker.storage import FolderStore, make_store

try:
    from end_state import image_states
except ModuleNotFoundError:  # tests/faults became a package
    from tests.faults.end_state import image_states

BUCKET = "fab-types"
SCORED = ("incoming/anim.gif", "incoming/still.webp", "incoming/plain.bmp", "incoming/upper.GIF")
SKIPPED = ("incoming/notes.txt", "incoming/README", "incoming/scan.raw")
IGNORED = ("incoming/half.png.tmp", "incoming/.DS_Store", "incoming/folder/")


@pytest.fixture(scope="module")
def ensemble(pipeline_model_dir: Path) -> FoldEnsemble:
    return FoldEnsemble.load(pipeline_model_dir, device="cpu")


@pytest.fixture
def model(session_factory: sessionmaker[Session], ensemble: FoldEnsemble) -> LoadedModel:
    with session_scope(session_factory) as session:
        repository.ensure_model_version(session, version=ensemble.version, status="active")
    return LoadedModel(ensemble.version, ensemble, "pinned", time.time())


def _encode(frames: list[PILImage.Image], fmt: str) -> bytes:
    out = io.BytesIO()
    if len(frames) > 1:
        frames[0].save(out, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    else:
        frames[0].save(out, format=fmt)
    return out.getvalue()


@pytest.fixture
def objects(dacon_test_images: list[Path]) -> dict[str, bytes]:
    """Every dropped object by key: real images in other formats, and non-images."""
    first, second = (PILImage.open(path).convert("RGB") for path in dacon_test_images[:2])
    return {
        "incoming/anim.gif": _encode([first, second], "GIF"),
        "incoming/still.webp": _encode([first, second], "WEBP"),
        "incoming/plain.bmp": _encode([second], "BMP"),
        "incoming/upper.GIF": _encode([second], "GIF"),
        "incoming/broken.gif": b"GIF89a" + b"\x00" * 40,
        "incoming/notes.txt": b"operator notes, not an image",
        "incoming/README": b"no suffix at all",
        "incoming/scan.raw": bytes(range(256)) * 16,
        "incoming/half.png.tmp": b"still being written",
        "incoming/.DS_Store": b"a hidden file a desktop leaves behind",
    }


def _assert_accounted(session_factory: sessionmaker[Session], version: str) -> dict[str, Image]:
    with session_scope(session_factory) as session:
        states = image_states(session, version)
        rows = {row.key: row for row in session.scalars(select(Image))}
        session.expunge_all()
    assert {key: states[key] for key in SCORED} == {key: ["scored"] for key in SCORED}
    assert states["incoming/broken.gif"] == ["failed"]
    assert {key: states[key] for key in SKIPPED} == {key: ["skipped"] for key in SKIPPED}
    assert not set(IGNORED) & set(rows)
    assert "unsupported file type '.txt'" in (rows["incoming/notes.txt"].status_reason or "")
    assert "without a file suffix" in (rows["incoming/README"].status_reason or "")
    return rows


def _score(ids: list[int], session_factory: sessionmaker[Session], store: Any, model: LoadedModel) -> Any:
    return score_batch(ids, session_factory=session_factory, store=store, model=model, options=ScoringOptions())


def test_s3_events_of_every_type_are_scored_or_skipped_with_a_reason(
    session_factory: sessionmaker[Session], s3_endpoint: str, model: LoadedModel, objects: dict[str, bytes]
) -> None:
    store = make_store("s3", endpoint_url=s3_endpoint, bucket=BUCKET, region="us-east-1")
    store.ensure_bucket()
    tool = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    events = []
    for key, data in [*objects.items(), ("incoming/folder/", b"")]:
        etag = tool.put_object(Bucket=BUCKET, Key=key, Body=data)["ETag"].strip('"')
        events.append(ObjectEvent(BUCKET, key, etag, None, len(data), "ObjectCreated:Put", None))
    sent: list[list[int]] = []
    ingestor = Ingestor(
        session_factory=session_factory, enqueue=lambda ids: sent.append(list(ids)), bucket=BUCKET,
        key_metadata=lambda key: {}, batch_size=100, batch_wait_ms=60_000,
    )  # fmt: skip
    try:
        to_score = ingestor.submit(events)
    finally:
        ingestor.close()
    assert [i for batch in sent for i in batch] == to_score and len(to_score) == len(SCORED) + 1

    result = _score(to_score, session_factory, store, model)

    assert len(result.scored) == len(SCORED) and len(result.failed) == 1
    _assert_accounted(session_factory, model.version)


def test_folder_watcher_drops_are_scored_or_skipped_with_a_reason(
    session_factory: sessionmaker[Session], tmp_path: Path, model: LoadedModel, objects: dict[str, bytes]
) -> None:
    root = tmp_path / "bucket"
    store = FolderStore(root, bucket=BUCKET)
    store.ensure_bucket()
    for key, data in objects.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "incoming" / "folder").mkdir()
    sent: list[list[int]] = []
    ingestor = Ingestor(
        session_factory=session_factory, enqueue=lambda ids: sent.append(list(ids)), bucket=BUCKET,
        key_metadata=lambda key: {}, batch_size=100, batch_wait_ms=60_000,
    )  # fmt: skip
    watcher = FolderWatcher(
        root, submit=ingestor.submit, prefix="incoming/", bucket_name=BUCKET, stable_after_s=0.0, poll_interval_s=0.1
    )
    try:
        watcher.poll_once()  # first sighting
        assert watcher.poll_once() == len(objects) - 2  # stable: every file but .DS_Store and the .tmp one
    finally:
        ingestor.close()

    _score([i for batch in sent for i in batch], session_factory, store, model)

    _assert_accounted(session_factory, model.version)


def test_reconcile_accounts_for_objects_whose_notifications_were_lost(
    session_factory: sessionmaker[Session], s3_endpoint: str, model: LoadedModel, objects: dict[str, bytes]
) -> None:
    store = make_store("s3", endpoint_url=s3_endpoint, bucket=BUCKET, region="us-east-1")
    store.ensure_bucket()
    for key, data in [*objects.items(), ("incoming/folder/", b"")]:
        store.put(key, data)
    sent: list[list[int]] = []

    report = reconcile(
        session_factory=session_factory,
        store=store,
        enqueue=lambda ids: sent.append(list(ids)),
        key_metadata=lambda key: {},
        prefixes=Prefixes(),
    )

    assert report.registered["incoming"] == len(SCORED) + 1 + len(SKIPPED)
    _score([i for batch in sent for i in batch], session_factory, store, model)
    _assert_accounted(session_factory, model.version)
    again = reconcile(
        session_factory=session_factory, store=store, enqueue=lambda ids: sent.append(list(ids)),
        key_metadata=lambda key: {}, prefixes=Prefixes(),
    )  # fmt: skip
    assert again.registered == {"incoming": 0, "nominal": 0}
