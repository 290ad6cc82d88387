"""``waferwatch models calibrate VERSION``: refit a version's threshold on reviewed images, as a new version.

The labelled images are every image whose latest label is ``good`` or ``defect`` (newest object version
per key), less those VERSION was trained on (by key or sha256: a training image scores near zero and
would drag the threshold down) and those that cannot be read. Each is scored by VERSION: the stored
inference of that version where there is one (the same deterministic model gave it), otherwise the
image is fetched and scored now.

:func:`models.calibration.f1_optimal_threshold` fits the threshold; the result is a copy of VERSION with
rule ``labelled`` (a new content version), uploaded to the bucket like any model and registered as a
``candidate`` with a ``registered`` event "calibrated from VERSION" carrying the calibration record, so
``promote`` (and its gate checks) apply as to any candidate. Nothing of VERSION changes.

Lives beside :mod:`scheduler.registry` (registry operations for people) because it shares the pool's
notions of "latest verdict" and "trained on" with :mod:`scheduler.rebuild`.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import BadImageError, decode_image
from models.calibration import Calibration, calibrated_ensemble, f1_optimal_threshold
from scheduler.rebuild import TrainedSet, latest_verdicts
from scheduler.registry import RegistryError
from worker import model_events
from worker.db import session_scope
from worker.errors import PermanentError
from worker.model_provider import ModelProvider, publish_model
from worker.schema import Image, Inference, ModelVersion
from worker.storage import ObjectStore

__all__ = ["Calibrated", "LabelledImage", "NotEnoughLabelsError", "calibrate_version", "labelled_images"]

logger = logging.getLogger(__name__)

_BATCH = 32  # images decoded and scored together


class NotEnoughLabelsError(RegistryError):
    """Fewer usable labelled images of a class than ``--min-labels``: no threshold is fitted."""


@dataclass(frozen=True, slots=True)
class LabelledImage:
    """One reviewed image: its row, object key, verdict (1 defect, 0 good) and stored score by the version."""

    image_id: int
    key: str
    sha256: str | None
    label: int
    stored_score: float | None


@dataclass
class Calibrated:
    """What :func:`calibrate_version` did."""

    version: str
    from_version: str
    created: bool
    calibration: Calibration
    record: dict[str, Any] = field(default_factory=dict)


def labelled_images(session: Session, *, bucket: str, version: str) -> list[LabelledImage]:
    """Images whose latest verdict is good or defect, newest object version per key, sorted by key,
    with ``version``'s stored score where it has one."""
    verdicts = latest_verdicts(session)
    stored = select(Inference.image_id, Inference.score).where(Inference.model_version == version).subquery("stored")
    rows = session.execute(
        select(Image.id, Image.key, Image.sha256, verdicts.c.verdict, stored.c.score)
        .join(verdicts, verdicts.c.image_id == Image.id)
        .outerjoin(stored, stored.c.image_id == Image.id)
        .where(Image.bucket == bucket, Image.status.not_in(("failed",)))
        .order_by(Image.key, Image.first_seen_at.desc(), Image.id.desc())
    ).all()
    seen: set[str] = set()
    images = []
    for image_id, key, sha256, verdict, score in rows:
        if key in seen:
            continue  # an older object version of a key already taken
        seen.add(key)
        images.append(LabelledImage(image_id, key, sha256, 1 if verdict == "defect" else 0, score))
    return images


def _check_counts(n_good: int, n_defect: int, min_labels: int, version: str, when: str) -> None:
    if n_good < min_labels or n_defect < min_labels:
        raise NotEnoughLabelsError(
            f"{version}: {n_good} good and {n_defect} defect labelled images {when}, {min_labels} of each needed "
            f"(--min-labels); label more with waferwatch label KEY good|defect, or lower --min-labels"
        )


def calibrate_version(
    store: ObjectStore,
    session_factory: sessionmaker[Session],
    version: str,
    *,
    model_prefix: str,
    cache_dir: Path,
    min_labels: int,
    author: str,
    reason: str | None = None,
    device: str = "auto",
    max_object_bytes: int = 200 * 1024 * 1024,
    max_image_pixels: int = 64_000_000,
) -> Calibrated:
    """Fit VERSION's threshold on the labelled images and register the result (module docstring).

    Raises:
        RegistryError: VERSION is unknown or has no usable artifact.
        NotEnoughLabelsError: fewer than ``min_labels`` usable good or defect images.
    """
    with session_scope(session_factory) as session:
        row = session.get(ModelVersion, version)
        if row is None:
            raise RegistryError(f"model version {version!r} does not exist (waferwatch models list shows them)")
        if row.status in ("building", "failed") or not row.artifact_uri:
            raise RegistryError(f"model version {version!r} is {row.status} and has no usable artifact")
        images = labelled_images(session, bucket=store.bucket, version=version)
    provider = ModelProvider(
        session_factory=session_factory, store=store, cache_dir=cache_dir, device=device, model_version=version
    )
    source = provider.current().ensemble
    trained = TrainedSet.of_ensemble(source)
    usable = [image for image in images if (image.key, image.sha256) not in trained]
    left_out_trained = len(images) - len(usable)
    n_defect = sum(image.label for image in usable)
    _check_counts(len(usable) - n_defect, n_defect, min_labels, version, "not used to train it")

    scores = {image.image_id: image.stored_score for image in usable if image.stored_score is not None}
    to_score = [image for image in usable if image.stored_score is None]
    unreadable: list[str] = []
    scored_now = 0
    for begin in range(0, len(to_score), _BATCH):  # decoded a batch at a time: memory stays bounded
        batch, pictures = [], []
        for image in to_score[begin : begin + _BATCH]:
            try:
                data = store.get(image.key, max_bytes=max_object_bytes).data
                picture = decode_image(data, name=image.key, max_pixels=max_image_pixels)
            except (PermanentError, BadImageError) as exc:
                logger.warning("calibrate: %s left out: %s", image.key, exc)
                unreadable.append(image.key)
                continue
            if (image.key, hashlib.sha256(data).hexdigest()) in trained:
                left_out_trained += 1  # its row had no sha256 yet, its bytes are a training image
                continue
            batch.append(image)
            pictures.append(picture)
        results = source.score_images(pictures, [image.key for image in batch], with_maps=False) if batch else []
        scores.update({image.image_id: result.score for image, result in zip(batch, results, strict=True)})
        scored_now += len(batch)
    scored = [image for image in usable if image.image_id in scores]
    good = [scores[image.image_id] for image in scored if image.label == 0]
    defect = [scores[image.image_id] for image in scored if image.label == 1]
    _check_counts(len(good), len(defect), min_labels, version, "readable and not used to train it")

    calibration = f1_optimal_threshold(good, defect)
    old = source.config
    base_rule = (source.calibration or {}).get("base_rule") if old.threshold_rule == "labelled" else old.threshold_rule
    record = {
        **calibration.as_dict(),
        "from_version": version,
        "old_threshold": source.threshold,
        "old_rule": old.threshold_rule,
        "base_rule": base_rule,
        "min_labels": min_labels,
        "reused_scores": len(scored) - scored_now,
        "scored_now": scored_now,
        "left_out_trained": left_out_trained,
        "unreadable": len(unreadable),
        "labelled_keys_sha256": hashlib.sha256("\n".join(i.key for i in scored).encode()).hexdigest(),
    }
    model = calibrated_ensemble(source, calibration, record)
    with session_scope(session_factory) as session:
        created = session.get(ModelVersion, model.version) is None
    with tempfile.TemporaryDirectory(prefix="waferwatch-calibrate-") as folder:
        directory = model.save(Path(folder) / model.version)
        publish_model(
            store,
            session_factory,
            directory,
            model_prefix=model_prefix,
            activate=False,
            actor=author,
            reason=f"calibrated from {version}" + (f": {reason}" if reason else ""),
            details={"calibrated_from": version, "calibration": record},
        )
    with session_scope(session_factory) as session:
        new_row = session.get(ModelVersion, model.version)
        assert new_row is not None
        if created:
            new_row.metrics = {**(new_row.metrics or {}), "calibration": record}
        else:  # calibrated before to the same threshold: the history says so, the row stays as it is
            model_events.record_event(
                session,
                version=model.version,
                event="registered",
                actor=author,
                reason=f"calibrated again from {version} (same threshold; state unchanged)",
                details={"calibrated_from": version, "calibration": record},
            )
    return Calibrated(model.version, version, created, calibration, record)
