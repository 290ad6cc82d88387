"""The end state every fault test asserts, in SQL: each image is accounted for, exactly once.

An incoming image has exactly one inference for the active model version, or exactly one explained
terminal state: ``failed`` with a failures row, ``skipped`` with a reason, ``superseded`` by a newer row
of the same key. Nothing stays ``queued``, nothing is scored twice, nothing is scored *and* failed.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

_ACCOUNTING = text(
    """
SELECT img.id, img.key, img.status, img.status_reason, img.superseded_by,
       (SELECT COUNT(*) FROM inferences AS inf
         WHERE inf.image_id = img.id AND inf.model_version = :version) AS inferences,
       (SELECT COUNT(*) FROM failures AS f WHERE f.image_id = img.id) AS failures,
       (SELECT COUNT(*) FROM images AS newer
         WHERE newer.id = img.superseded_by AND newer.key = img.key AND newer.bucket = img.bucket
           AND newer.id > img.id) AS newer_version
FROM images AS img
WHERE img.kind = 'incoming'
ORDER BY img.id
"""
)


def image_states(session: Session, model_version: str) -> dict[str, list[str]]:
    """Each incoming key's row states in id order (``scored``, ``failed``, ``skipped``, ``superseded``),
    after checking that every row is in exactly one explained terminal state (AssertionError if not)."""
    states: dict[str, list[str]] = {}
    for row in session.execute(_ACCOUNTING, {"version": model_version}):
        explained = {
            "scored": row.inferences == 1 and row.failures == 0,
            "failed": row.inferences == 0 and row.failures == 1,
            "skipped": row.inferences == 0 and row.failures == 0 and bool(row.status_reason),
            "superseded": row.inferences == 0 and row.failures == 0 and row.newer_version == 1,
        }
        assert explained.get(row.status), (
            f"image {row.id} ({row.key}) is not accounted for: status {row.status!r}, "
            f"{row.inferences} inferences by {model_version}, {row.failures} failures rows, "
            f"reason {row.status_reason!r}, superseded_by {row.superseded_by!r}"
        )
        states.setdefault(row.key, []).append(row.status)
    return states


def latest_image_ids(session: Session, key: str) -> list[int]:
    """The image ids ``v_latest_inference`` gives for ``key`` (one, its newest scored version)."""
    return list(session.scalars(text("SELECT image_id FROM v_latest_inference WHERE key = :key"), {"key": key}))
