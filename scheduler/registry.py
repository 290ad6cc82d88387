"""Registry operations for people: register, labels, promotion, rollback, pool removal, re-scoring.

Like :mod:`worker.repository`, every function but :func:`register_model` (which uploads, then commits
its rows) takes the session and never commits; the CLI owns the unit of work. Every state change is also
an event of the append-only history (:mod:`worker.model_events`) naming who did it and why, so
``waferwatch models show VERSION`` can tell how a version got where it is, including a promotion that
overrode a failed gate.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from models import FoldEnsemble
from models.datasets import list_image_source
from models.errors import ArtifactError
from scheduler.rebuild import REMOVED_BY_PERSON
from worker import model_events, repository
from worker.db import session_scope
from worker.errors import PermanentError
from worker.model_provider import publish_model
from worker.schema import LABEL_VERDICTS, Image, Inference, Label, ModelVersion, utcnow
from worker.storage import ObjectStore

__all__ = [
    "ROLLED_BACK",
    "Registered",
    "RegistryError",
    "gate_failed",
    "images_to_rescore",
    "label_image",
    "list_versions",
    "promote",
    "register_model",
    "remove_from_pool",
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


def gate_failed(row: ModelVersion) -> list[str] | None:
    """The reasons of the last gate run if it held ``row`` back, else None (passed, or never gated)."""
    gate = (row.metrics or {}).get("gate")
    if not gate or gate.get("passed", True):
        return None
    return list(gate.get("reasons") or ["gate failed"])


def promote(
    session: Session, version: str, *, author: str, reason: str | None = None, force: bool = False
) -> ModelVersion:
    """Activate ``version`` by hand: a person's decision, recorded with their name and reason.

    A version the gate held back needs ``force`` and a ``reason``; the override is recorded in the
    history (``gate_overridden``, the gate's reasons) and on the row's ``reason``.
    """
    row = session.get(ModelVersion, version)
    if row is None:
        raise RegistryError(
            f"model version {version!r} does not exist; bring a model directory in with waferwatch models register DIR"
        )
    if row.status in ("building", "failed") or not row.artifact_uri:
        raise RegistryError(f"model version {version!r} is {row.status} and has no usable artifact")
    if row.status == "active":
        return row
    failed = gate_failed(row)
    if failed and not force:
        raise RegistryError(
            f"the gate held {version} back ({'; '.join(failed)}); pass --force with --reason to promote it anyway"
        )
    if failed and not reason:
        raise RegistryError(f"promoting {version} over a failed gate needs --reason (it is kept in the history)")
    row = model_events.activate(
        session,
        version,
        actor=author,
        how="manual",
        reason=reason,
        details={"gate_overridden": bool(failed), "gate_reasons": failed or []},
    )
    if failed:
        row.reason = f"gate overridden by {author}: {reason} (gate: {'; '.join(failed)})"
    return row


def rollback(session: Session, *, author: str = model_events.SCHEDULER, reason: str | None = None) -> tuple[str, str]:
    """Re-activate the version that was active before the current one; returns (from, to).

    The previous version is the retired one activated most recently, skipping versions that were
    themselves rolled back; the version rolled back from is marked with ``reason = "rolled back …"`` and a
    ``rolled back`` event.
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
    current_id = current.id
    model_events.activate(session, previous.id, actor=author, how="rollback", reason=reason)
    repository.update_model_version(
        session, version=current_id, reason=f"{ROLLED_BACK} to {previous.id} at {utcnow().isoformat()}"
    )
    model_events.record_event(
        session,
        version=current_id,
        event="rolled back",
        actor=author,
        reason=reason,
        details={"to": previous.id},
    )
    return current_id, previous.id


def remove_from_pool(session: Session, *, bucket: str, key: str, author: str, reason: str) -> int:
    """Take every version of ``key`` out of the training pool for good (a person's decision, kept on the
    image as ``skipped`` with who and why); returns how many rows changed."""
    rows = session.execute(
        update(Image)
        .where(Image.bucket == bucket, Image.key == key)
        .values(status="skipped", status_reason=f"{REMOVED_BY_PERSON}{author}: {reason}", status_changed_at=utcnow())
        .returning(Image.id)
    ).all()
    if not rows:
        raise RegistryError(f"no image with key {key!r} in bucket {bucket!r}")
    return len(rows)


@dataclass(frozen=True, slots=True)
class Registered:
    """What :func:`register_model` did."""

    version: str
    created: bool
    uploaded_images: int
    training_images: int
    active: bool


def _training_image_files(manifest: dict[str, object], source: Path) -> list[tuple[str, Path, bytes]]:
    """(id, path, bytes) of every training image of ``manifest`` found in ``source``, checked by sha256."""
    wanted = {str(t["id"]): str(t["sha256"]) for t in manifest["training_images"]}  # type: ignore[index, union-attr]
    refs = {ref.id: ref.path for ref in list_image_source(source)}
    missing = sorted(set(wanted) - set(refs))
    if missing:
        raise RegistryError(
            f"--images {source} lacks {len(missing)} of the model's {len(wanted)} training images "
            f"(e.g. {', '.join(missing[:3])}); pass the folder or CSV the model was trained from"
        )
    found = []
    for image_id in sorted(wanted):
        data = refs[image_id].read_bytes()
        if hashlib.sha256(data).hexdigest() != wanted[image_id]:
            raise RegistryError(
                f"{refs[image_id]} (id {image_id}) differs from the image the model was trained on (sha256); "
                "pass the exact training images"
            )
        found.append((image_id, refs[image_id], data))
    return found


def register_model(
    store: ObjectStore,
    session_factory: sessionmaker[Session],
    directory: Path,
    *,
    model_prefix: str,
    nominal_prefix: str,
    images: Path | None = None,
    activate: bool = False,
    author: str,
    reason: str | None = None,
) -> Registered:
    """Bring a model directory in: verify it, upload it under ``model_prefix``, add the version.

    Verification loads it completely (every file's sha256 against the manifest, banks against the
    config, the content version recomputed). With ``images`` (the folder or CSV it was trained from),
    its training images, checked by sha256, are uploaded under ``<nominal_prefix><version>/`` and join the
    pool as ``pooled`` nominal images, so the next rebuild learns from them too.
    """
    try:
        ensemble = FoldEnsemble.load(directory, device="cpu")
    except (ArtifactError, OSError, KeyError, ValueError) as exc:
        raise RegistryError(f"{directory} is not a valid model directory: {exc}") from exc
    version = ensemble.version
    manifest = {"training_images": [{"id": t.id, "sha256": t.sha256} for t in ensemble.training_images]}
    files = _training_image_files(manifest, images) if images is not None else []
    with session_scope(session_factory) as session:
        created = session.get(ModelVersion, version) is None
    for image_id, path, data in files:
        key = f"{nominal_prefix}{version}/{image_id}{path.suffix.lower()}"
        info = store.put(key, data)
        with session_scope(session_factory) as session:
            image, _ = repository.register_image(
                session, bucket=store.bucket, key=key, etag=info.etag, size=len(data), kind="nominal"
            )
            repository.set_image_sha256(session, image_id=image.id, sha256=hashlib.sha256(data).hexdigest())
            session.execute(update(Image).where(Image.id == image.id, Image.status == "queued").values(status="pooled"))
    publish_model(
        store,
        session_factory,
        Path(directory),
        model_prefix=model_prefix,
        activate=False,
        actor=author,
        details={"source": str(Path(directory).resolve()), "training_images_uploaded": len(files), "reason": reason},
    )
    if activate:
        with session_scope(session_factory) as session:
            model_events.activate(session, version, actor=author, how="register", reason=reason)
    return Registered(version, created, len(files), len(ensemble.training_images), activate)


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
