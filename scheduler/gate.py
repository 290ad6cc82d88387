"""The promotion gate: a candidate becomes ``active`` only if the data already in the database agree.

Rules (margins and bounds from settings):

1. **Labelled images** (latest label per image: ``good`` → 0, ``defect`` → 1; the most recent
   ``max_labelled``), scored by the candidate and by the active version. The candidate's AUROC may be at
   most ``auroc_margin`` below the active one's, and its F1 at its own threshold at most ``f1_margin``
   below the active one's F1 at *its* threshold. AUROC is compared only when both classes are present,
   F1 only when there is at least one defect (with goods only, F1 is 0 for everyone).
2. **Threshold consistency**: of the most recent ``nominal_sample`` nominal and confirmed-good images,
   the fraction the candidate flags (score > its threshold) must be at most ``max_nominal_flag_rate``.

With no labelled image (or no active version to compare with) only rule 2 decides, and the result says
so. Every number and every reason is returned in :class:`GateResult` and stored in the candidate's
``metrics["gate"]``; a failed gate leaves the candidate a candidate with the reasons in ``reason``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import BadImageError, FoldEnsemble, decode_image
from models.evaluation import image_metrics
from scheduler.rebuild import latest_verdicts
from worker import repository
from worker.db import session_scope
from worker.errors import PermanentError
from worker.schema import Image, utcnow
from worker.storage import ObjectStore

__all__ = ["GateResult", "GateRules", "apply_gate", "decide", "evaluate_gate", "labelled_images", "recent_nominal"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GateRules:
    auroc_margin: float = 0.02
    f1_margin: float = 0.05
    max_nominal_flag_rate: float = 0.10
    nominal_sample: int = 200
    max_labelled: int = 500
    max_object_bytes: int = 200 * 1024 * 1024
    max_image_pixels: int = 64_000_000


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]
    notes: list[str] = field(default_factory=list)
    candidate: dict[str, float] = field(default_factory=dict)
    active: dict[str, float] = field(default_factory=dict)
    active_version: str | None = None
    n_good: int = 0
    n_defect: int = 0
    n_nominal: int = 0
    nominal_flag_rate: float | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for group in ("candidate", "active"):  # NaN is not JSON
            data[group] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in data[group].items()}
        return data


def labelled_images(session: Session, *, bucket: str, limit: int) -> list[tuple[str, int]]:
    """(key, 1 for defect / 0 for good) of the most recently labelled images, by latest verdict."""
    verdicts = latest_verdicts(session)
    rows = session.execute(
        select(Image.key, verdicts.c.verdict)
        .join(verdicts, verdicts.c.image_id == Image.id)
        .where(Image.bucket == bucket, Image.status.not_in(("failed", "skipped")))
        .order_by(verdicts.c.created_at.desc(), Image.id.desc())
        .limit(limit)
    ).all()
    return [(key, 1 if verdict == "defect" else 0) for key, verdict in rows]


def recent_nominal(session: Session, *, bucket: str, limit: int) -> list[str]:
    """Keys of the newest nominal images and images confirmed good (never confirmed defects)."""
    verdicts = latest_verdicts(session)
    rows = session.execute(
        select(Image.key, Image.kind, verdicts.c.verdict)
        .outerjoin(verdicts, verdicts.c.image_id == Image.id)
        .where(Image.bucket == bucket, Image.status.not_in(("failed", "skipped")))
        .where((Image.kind == "nominal") | (verdicts.c.verdict == "good"))
        .order_by(Image.first_seen_at.desc(), Image.id.desc())
        .limit(limit * 2)
    ).all()
    keys = [key for key, _kind, verdict in rows if verdict != "defect"]
    return list(dict.fromkeys(keys))[:limit]


def _score_keys(
    ensembles: Sequence[FoldEnsemble], store: ObjectStore, keys: Sequence[str], rules: GateRules
) -> tuple[list[str], list[np.ndarray]]:
    """Scores of the readable ``keys`` under each ensemble (one decode, shared)."""
    images, kept = [], []
    for key in keys:
        try:
            data = store.get(key, max_bytes=rules.max_object_bytes).data
            images.append(decode_image(data, name=key, max_pixels=rules.max_image_pixels))
            kept.append(key)
        except (PermanentError, BadImageError) as exc:
            logger.warning("gate: %s left out: %s", key, exc)
    scores = [
        np.array([s.score for s in ensemble.score_images(images, kept, with_maps=False)]) if images else np.array([])
        for ensemble in ensembles
    ]
    return kept, scores


def decide(
    candidate: dict[str, float] | None,
    active: dict[str, float] | None,
    *,
    n_good: int,
    n_defect: int,
    flag_rate: float | None,
    rules: GateRules,
) -> tuple[bool, list[str], list[str]]:
    """The rules of the module docstring on computed numbers: (passed, failure reasons, notes)."""
    reasons: list[str] = []
    notes: list[str] = []
    if candidate is None or active is None:
        notes.append(
            "no labelled images: threshold consistency only"
            if candidate is None
            else "no active version to compare with: threshold consistency only"
        )
    else:
        if n_good and n_defect:
            if candidate["image_auroc"] < active["image_auroc"] - rules.auroc_margin:
                reasons.append(
                    f"AUROC {candidate['image_auroc']:.4f} < active {active['image_auroc']:.4f} "
                    f"- margin {rules.auroc_margin} on {n_good} good / {n_defect} defect images"
                )
        else:
            notes.append("AUROC not compared: labelled images of one class only")
        if n_defect:
            if candidate["f1"] < active["f1"] - rules.f1_margin:
                reasons.append(
                    f"F1 {candidate['f1']:.4f} < active {active['f1']:.4f} - margin {rules.f1_margin} "
                    f"on {n_good} good / {n_defect} defect images"
                )
        else:
            notes.append("F1 not compared: no confirmed defect")
    if flag_rate is None:
        notes.append("no recent nominal image: threshold consistency not checked")
    elif flag_rate > rules.max_nominal_flag_rate:
        reasons.append(
            f"threshold flags {flag_rate:.1%} of recent nominal/good images > bound {rules.max_nominal_flag_rate:.1%}"
        )
    return not reasons, reasons, notes


def evaluate_gate(
    candidate: FoldEnsemble,
    active: FoldEnsemble | None,
    *,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    rules: GateRules,
    active_version: str | None = None,
) -> GateResult:
    """Score the labelled and recent nominal images and apply :func:`decide`."""
    with session_scope(session_factory) as session:
        labelled = labelled_images(session, bucket=store.bucket, limit=rules.max_labelled)
        nominal = recent_nominal(session, bucket=store.bucket, limit=rules.nominal_sample)
    label_of = dict(labelled)
    models = [candidate] if active is None else [candidate, active]
    kept, scores = _score_keys(models, store, [key for key, _ in labelled], rules)
    labels = [label_of[key] for key in kept]
    n_defect = sum(labels)
    n_good = len(labels) - n_defect
    candidate_metrics = active_metrics = None
    if labels:
        candidate_metrics = image_metrics(scores[0].tolist(), labels, candidate.threshold)
        if active is not None:
            active_metrics = image_metrics(scores[1].tolist(), labels, active.threshold)
    nominal_kept, nominal_scores = _score_keys([candidate], store, nominal, rules)
    flag_rate = float(np.mean(nominal_scores[0] > candidate.threshold)) if nominal_kept else None
    passed, reasons, notes = decide(
        candidate_metrics,
        active_metrics if active is not None else None,
        n_good=n_good,
        n_defect=n_defect,
        flag_rate=flag_rate,
        rules=rules,
    )
    trained = {image.id for image in candidate.training_images}
    in_pool = sum(1 for key in nominal_kept if key in trained)
    if nominal_kept:
        notes.append(f"{in_pool}/{len(nominal_kept)} recent nominal images are in the candidate's training pool")
    return GateResult(
        passed=passed,
        reasons=reasons,
        notes=notes,
        candidate=candidate_metrics or {},
        active=active_metrics or {},
        active_version=active_version,
        n_good=n_good,
        n_defect=n_defect,
        n_nominal=len(nominal_kept),
        nominal_flag_rate=flag_rate,
    )


def apply_gate(session_factory: sessionmaker[Session], version: str, result: GateResult) -> str:
    """Promote ``version`` or hold it back with the reasons; returns its resulting status."""
    with session_scope(session_factory) as session:
        row = repository.update_model_version(session, version=version, stage=None)
        row.metrics = {**(row.metrics or {}), "gate": {**result.as_dict(), "at": utcnow().isoformat()}}
        if row.status == "active":
            return "active"
        if result.passed:
            repository.set_active_model_version(session, version)
            return "active"
        repository.update_model_version(
            session, version=version, status="candidate", reason="gate: " + "; ".join(result.reasons)
        )
        return "candidate"
