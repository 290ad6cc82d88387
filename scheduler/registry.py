"""Registry operations for people: labels, promotion, rollback and re-scoring history.

Like :mod:`worker.repository`, every function takes the session and never commits; the CLI owns the unit
of work. Uploading and downloading artifacts stays in :mod:`worker.model_provider` (``publish_model``,
``ModelProvider``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker import repository
from worker.errors import PermanentError
from worker.schema import LABEL_VERDICTS, Image, Inference, Label, ModelVersion, utcnow

__all__ = [
    "ROLLED_BACK",
    "RegistryError",
    "images_to_rescore",
    "label_image",
    "list_versions",
    "promote",
    "rollback",
]

ROLLED_BACK = "rolled back"


class RegistryError(PermanentError):
    """A registry request that cannot be done as asked (unknown key, nothing to roll back to, …)."""


def label_image(session: Session, *, bucket: str, key: str, verdict: str, author: str, note: str | None) -> Label:
    """Record a person's verdict on the newest version of the object ``key``."""
    if verdict not in LABEL_VERDICTS:
        raise RegistryError(f"verdict must be one of {LABEL_VERDICTS}, got {verdict!r}")
    image = session.scalars(
        select(Image)
        .where(Image.bucket == bucket, Image.key == key)
        .order_by(Image.first_seen_at.desc(), Image.id.desc())
    ).first()
    if image is None:
        raise RegistryError(f"no image with key {key!r} in bucket {bucket!r}; is it ingested?")
    label = Label(image_id=image.id, verdict=verdict, author=author, note=note, created_at=utcnow())
    session.add(label)
    session.flush()
    return label


def list_versions(session: Session, *, limit: int = 50) -> list[ModelVersion]:
    """Model versions and builds, newest first."""
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc()).limit(limit)))


def promote(session: Session, version: str) -> ModelVersion:
    """Activate ``version`` by hand (a person's decision: the gate is not consulted)."""
    row = session.get(ModelVersion, version)
    if row is None:
        raise RegistryError(f"model version {version!r} does not exist")
    if row.status in ("building", "failed") or not row.artifact_uri:
        raise RegistryError(f"model version {version!r} is {row.status} and has no usable artifact")
    return repository.set_active_model_version(session, version)


def rollback(session: Session) -> tuple[str, str]:
    """Re-activate the version that was active before the current one; returns (from, to).

    The previous version is the retired one activated most recently, skipping versions that were
    themselves rolled back; the version rolled back from is marked with ``reason = "rolled back …"``.
    """
    current = repository.get_active_model_version(session)
    if current is None:
        raise RegistryError("no active model version to roll back from")
    candidates = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.status == "retired", ModelVersion.activated_at.is_not(None), ModelVersion.id != current.id)
        .order_by(ModelVersion.activated_at.desc())
    ).all()
    previous = next((row for row in candidates if not (row.reason or "").startswith(ROLLED_BACK)), None)
    if previous is None:
        raise RegistryError(f"no earlier active version to roll back to from {current.id}")
    repository.set_active_model_version(session, previous.id)
    repository.update_model_version(
        session, version=current.id, reason=f"{ROLLED_BACK} to {previous.id} at {utcnow().isoformat()}"
    )
    return current.id, previous.id


def images_to_rescore(session: Session, *, bucket: str, since: datetime, version: str) -> list[int]:
    """Incoming images first seen since ``since`` that have no inference by ``version`` (oldest first)."""
    scored = select(Inference.image_id).where(Inference.model_version == version)
    return list(
        session.scalars(
            select(Image.id)
            .where(Image.bucket == bucket, Image.kind == "incoming", Image.first_seen_at >= since)
            .where(Image.status.not_in(("failed", "skipped")), Image.id.not_in(scored))
            .order_by(Image.first_seen_at, Image.id)
        )
    )
