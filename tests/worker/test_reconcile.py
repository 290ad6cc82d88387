"""Reconciliation on real databases and a real folder bucket: lost notifications and lost enqueues."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from worker.db import session_scope
from worker.ingest import Prefixes
from worker.reconcile import reconcile
from worker.schema import Image, utcnow
from worker.storage import FolderStore


def test_reconcile_registers_unknown_objects_and_requeues_stale_ones(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    store = FolderStore(tmp_path / "bucket", bucket="fab")
    store.ensure_bucket()
    for key in ("incoming/T1/L1/a.png", "incoming/T1/L1/b b+%.png", "nominal/good.png", "incoming/readme.txt"):
        store.put(key, key.encode())
    store.put("heatmaps/v/x.png", b"not listed")
    sent: list[list[int]] = []

    def run() -> dict[str, object]:
        return reconcile(
            session_factory=session_factory,
            store=store,
            enqueue=lambda ids: sent.append(list(ids)),
            key_metadata=lambda key: {"lot": key.split("/")[2]} if key.count("/") >= 3 else {},
            prefixes=Prefixes(),
            stale_after_s=60,
            batch_size=1,
        ).as_dict()

    first = run()

    # readme.txt is not an image: accounted for as skipped (issue 12, row 6), never enqueued.
    assert first["registered"] == {"incoming": 3, "nominal": 1}
    assert first["listed"] == {"incoming": 3, "nominal": 1}
    assert first["tasks"] == 2 and first["requeued_stale"] == 0
    with session_scope(session_factory) as session:
        rows = {row.key: row for row in session.scalars(select(Image))}
    assert set(rows) == {"incoming/T1/L1/a.png", "incoming/T1/L1/b b+%.png", "nominal/good.png", "incoming/readme.txt"}
    assert rows["incoming/readme.txt"].status == "skipped"
    assert "unsupported file type '.txt'" in (rows["incoming/readme.txt"].status_reason or "")
    assert rows["nominal/good.png"].kind == "nominal"
    assert rows["incoming/T1/L1/a.png"].lot == "L1"
    assert sorted(i for batch in sent for i in batch) == sorted(
        rows[key].id for key in rows if key.startswith("incoming/") and key.endswith(".png")
    )

    sent.clear()
    assert run()["enqueued_images"] == 0 and sent == []  # nothing new, nothing stale yet

    # One image's task was lost: it is still queued long after registration.
    stale_id = rows["incoming/T1/L1/a.png"].id
    with session_scope(session_factory) as session:
        session.execute(
            update(Image).where(Image.id == stale_id).values(status_changed_at=utcnow() - timedelta(hours=1))
        )
    assert run()["requeued_stale"] == 1
    assert sent == [[stale_id]]
    sent.clear()
    assert run()["requeued_stale"] == 0  # its clock restarted: not sent again at once
