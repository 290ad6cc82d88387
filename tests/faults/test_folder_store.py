"""Row 8 of the fault suite: the folder store turns every OSError into an explained outcome and stays in its root.

Before the fix a 240-character file name made the heatmap's temp file name too long, and the clean-up of
that temp file raised a raw ``OSError: File name too long`` out of ``score_batch``: the whole batch stayed
``queued`` with no failures row. A symbolic link under ``incoming/`` was read from outside the root, and
``put()`` wrote through a symlinked ``heatmaps/`` folder. Real files, real links, a real FIFO, the real
scoring code and database.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from worker import repository
from worker.db import session_scope
from worker.errors import BadObjectError, ObjectMissingError
from worker.model_provider import ModelProvider, publish_model
from worker.schema import Failure, Image, Inference
from worker.scoring import ScoringOptions, score_batch
from worker.storage import FolderStore

SECRET = b"outside the root: must never be read or overwritten"


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, size=(96, 96, 3), dtype=np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory next to the store's root, holding a file the store must never touch."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.png").write_bytes(SECRET)
    return path


@pytest.fixture
def store(tmp_path: Path) -> FolderStore:
    folder = FolderStore(tmp_path / "bucket", bucket="fab")
    folder.ensure_bucket()
    (folder.root / "incoming").mkdir()
    return folder


def test_a_symlinked_file_or_folder_under_incoming_is_refused_not_read(store: FolderStore, outside: Path) -> None:
    (store.root / "incoming" / "link.png").symlink_to(outside / "secret.png")
    (store.root / "incoming" / "linked-dir").symlink_to(outside, target_is_directory=True)
    store.put("incoming/real.png", b"real bytes")

    for key in ("incoming/link.png", "incoming/linked-dir/secret.png"):
        with pytest.raises(BadObjectError, match="symbolic link"):
            store.get(key, max_bytes=1 << 20)
        with pytest.raises(BadObjectError, match="symbolic link"):
            store.head(key)
    assert [info.key for info in store.list("incoming/")] == ["incoming/real.png"]
    assert list(store.list("incoming/linked-dir/")) == []


def test_put_never_writes_through_a_symlinked_folder_or_file(store: FolderStore, outside: Path) -> None:
    (store.root / "heatmaps").symlink_to(outside, target_is_directory=True)
    (store.root / "incoming" / "over.png").symlink_to(outside / "secret.png")

    with pytest.raises(BadObjectError, match="symbolic link"):
        store.put("heatmaps/v1/a.png", b"overlay")
    with pytest.raises(BadObjectError, match="symbolic link"):
        store.put("heatmaps/secret.png", b"overlay")
    store.put("incoming/over.png", b"new bytes")  # replaces the link itself, not its target
    store.delete("incoming/over.png")

    assert sorted(path.name for path in outside.iterdir()) == ["secret.png"]
    assert (outside / "secret.png").read_bytes() == SECRET
    assert not (store.root / "incoming" / "over.png").exists()


def test_long_names_and_impossible_keys_are_permanent_errors_that_say_why(store: FolderStore) -> None:
    long_key = "incoming/" + "n" * 300 + ".png"
    (store.root / "incoming" / "file.png").write_bytes(b"x")

    with pytest.raises(BadObjectError, match="limit of 255"):
        store.get(long_key, max_bytes=1 << 20)
    with pytest.raises(BadObjectError, match="limit of 255"):
        store.put(long_key, b"x")
    with pytest.raises(BadObjectError, match="not a valid"):
        store.get("incoming/nul\x00.png", max_bytes=1 << 20)
    with pytest.raises(BadObjectError):
        store.put("incoming/file.png/inner.png", b"x")  # a file where a folder would have to be
    with pytest.raises(ObjectMissingError):
        store.get("incoming/file.png/inner.png", max_bytes=1 << 20)
    # 250 characters fit the file system; the temp file of the atomic write must fit too
    near_limit = "incoming/" + "m" * 246 + ".png"
    assert store.put(near_limit, b"bytes").size == 5
    assert store.get(near_limit, max_bytes=10).data == b"bytes"
    assert [info.key for info in store.list("incoming/m")] == [near_limit]


@pytest.mark.timeout(30)
def test_a_fifo_is_refused_without_blocking(store: FolderStore) -> None:
    os.mkfifo(store.root / "incoming" / "pipe.png")

    with pytest.raises(BadObjectError, match="not a regular file"):
        store.get("incoming/pipe.png", max_bytes=1 << 20)
    assert list(store.list("incoming/")) == []


def test_scoring_records_every_folder_failure_and_scores_the_rest(
    session_factory: sessionmaker[Session],
    store: FolderStore,
    outside: Path,
    pipeline_model_dir: Path,
    tmp_path: Path,
) -> None:
    publish_model(store, session_factory, pipeline_model_dir, model_prefix="models/")
    names = {
        "ok": "incoming/tool/lot/ok.png",
        "long240": "incoming/tool/lot/" + "a" * 236 + ".png",  # its heatmap name still fits in 255 bytes
        "long252": "incoming/tool/lot/" + "b" * 248 + ".png",  # fits, but its heatmap name does not
        "long300": "incoming/tool/lot/" + "c" * 296 + ".png",  # announced by an event, cannot exist on disk
        "link": "incoming/tool/lot/link.png",
    }
    for index, name in enumerate(("ok", "long240", "long252")):
        store.put(names[name], _png(index))
    (outside / "image.png").write_bytes(_png(9))
    (store.root / names["link"]).symlink_to(outside / "image.png")
    with session_scope(session_factory) as session:
        ids = {
            name: repository.register_image(session, bucket=store.bucket, key=key, etag=None, size=None)[0].id
            for name, key in names.items()
        }
    provider = ModelProvider(session_factory=session_factory, store=store, cache_dir=tmp_path / "cache", device="cpu")

    result = score_batch(
        list(ids.values()),
        session_factory=session_factory,
        store=store,
        model=provider.current,
        options=ScoringOptions(heatmap_format="overlay"),  # the overlay objects are what the names must fit
    )

    assert sorted(result.scored) == sorted([ids["ok"], ids["long240"]])
    assert sorted(result.failed) == sorted([ids["long252"], ids["long300"], ids["link"]])
    with session_scope(session_factory) as session:
        statuses = dict(session.execute(select(Image.id, Image.status)).all())
        failures = {row.image_id: row for row in session.scalars(select(Failure))}
        inferences = {row.image_id: row for row in session.scalars(select(Inference))}
    assert {name: statuses[ids[name]] for name in names} == {
        "ok": "scored",
        "long240": "scored",
        "long252": "failed",
        "long300": "failed",
        "link": "failed",
    }
    assert set(inferences) == {ids["ok"], ids["long240"]}
    assert store.head(inferences[ids["long240"]].heatmap_key).size > 0
    assert "heatmap" in failures[ids["long252"]].message and "too long" in failures[ids["long252"]].message
    assert "limit of 255" in failures[ids["long300"]].message
    assert "symbolic link" in failures[ids["link"]].message
    assert {row.error_type for row in failures.values()} == {"BadObjectError"}
    assert sorted(path.name for path in outside.iterdir()) == ["image.png", "secret.png"]
