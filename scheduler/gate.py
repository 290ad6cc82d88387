"""The promotion gate: a candidate becomes ``active`` only if images **neither model was trained on** agree.

Evaluation data (all of it kept out of training, see :mod:`scheduler.rebuild`):

* **held-out nominal**: nominal images whose key falls in the hash-chosen held-out slice
  (:func:`scheduler.rebuild.held_out`), newest first, at most ``nominal_sample``;
* **synthetic anomalies** made from those held-out images (:mod:`models.synthetic`: cut-paste, scar and
  Perlin-blend defects, seeded), so a gate decides even when nobody has labelled a defect;
* **labelled images**: every image whose latest label is ``defect``, and ``good``-labelled images of the
  held-out slice (good labels outside it are training data, so they never grade the model they trained).

Any of these whose bytes (sha256) or id the candidate's or the active model's manifest lists as a
training image is left out and counted: the gate never grades a model on what it learnt.

Checks (each with its value, its bound and whether it had enough data to count):

1. ``held_out_flag_rate``: the candidate flags at most ``max_nominal_flag_rate`` of held-out nominal
   images (absolute floor);
2. ``synthetic_recall``: it flags at least ``min_synthetic_recall`` of the synthetic anomalies (absolute
   floor), and 3. ``synthetic_recall_vs_active``: at most ``synthetic_margin`` below the active version;
   3b. ``synthetic_auroc_vs_active``: its separation of held-out nominal from synthetic anomalies (image
   AUROC, which no threshold moves) at most ``synthetic_auroc_margin`` below the active version's: a
   candidate trained on contaminated nominal images keeps a recall near the floor by lowering nothing but
   separates worse, so this is what holds it back when nobody has labelled anything;
   all need ``min_holdout`` held-out images;
4. ``defect_recall``: it flags at least ``min_defect_recall`` of the labelled defects (absolute floor),
   and 5./6. ``auroc_vs_active`` / ``f1_vs_active``: AUROC and F1 at most ``auroc_margin`` / ``f1_margin``
   below the active version's on the same images. Labelled checks count only with ``min_labels`` images
   of each class ("not enough labels" otherwise: the numbers are recorded, the decision rests on the
   rest).

Absolute floors mean a chain of weak versions cannot ratchet down: each is held to the same bounds, not
only to its predecessor. A candidate passes when every check that had enough data passed and at least
one did; with no usable check it is held back ("not enough evaluation data"), and a person may promote
it with ``waferwatch models promote --force``. The whole record (every number, bound and note) goes into
a ``gated`` event of the registry history and into the candidate's ``metrics["gate"]``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import BadImageError, FoldEnsemble, decode_image
from models.evaluation import image_metrics
from scheduler.rebuild import TrainedSet, active_trained_set, held_out, latest_verdicts
from worker import model_events, repository
from worker.db import session_scope
from worker.errors import PermanentError
from worker.schema import Image, utcnow
from worker.storage import ObjectStore

__all__ = [
    "Check",
    "GateResult",
    "GateRules",
    "SyntheticMaker",
    "apply_gate",
    "decide",
    "evaluate_gate",
    "evaluation_keys",
    "make_synthetic",
]

logger = logging.getLogger(__name__)

#: Makes one synthetic anomaly per (image, id), deterministically from ``seed``: the pluggable
#: label-free check (the default is :func:`make_synthetic`; None switches the check off).
SyntheticMaker = Callable[[Sequence[PILImage.Image], Sequence[str], int], list[PILImage.Image]]


def make_synthetic(images: Sequence[PILImage.Image], ids: Sequence[str], seed: int) -> list[PILImage.Image]:
    """:func:`models.synthetic.synthetic_anomalies` (cut-paste, scar, Perlin blend), images only."""
    from models.synthetic import synthetic_anomalies

    return [anomaly.image for anomaly in synthetic_anomalies(images, ids, seed=seed)]


@dataclass(frozen=True, slots=True)
class GateRules:
    """The bounds and minimum counts of the module docstring (from settings)."""

    auroc_margin: float = 0.02
    f1_margin: float = 0.05
    max_nominal_flag_rate: float = 0.25
    min_synthetic_recall: float = 0.3
    synthetic_margin: float = 0.15
    synthetic_auroc_margin: float = 0.05
    min_defect_recall: float = 0.5
    min_labels: int = 10
    min_holdout: int = 10
    holdout_fraction: float = 0.2
    nominal_sample: int = 200
    max_labelled: int = 500
    synthetic: bool = True
    synthetic_seed: int = 0
    max_object_bytes: int = 200 * 1024 * 1024
    max_image_pixels: int = 64_000_000


@dataclass(frozen=True, slots=True)
class Check:
    """One rule applied to one number: ``value`` against ``bound`` (``>=`` or ``<=``)."""

    name: str
    value: float | None
    bound: float | None
    op: str
    used: bool  # enough data for this check to count
    passed: bool | None  # None when not used
    detail: str


@dataclass
class GateResult:
    """Everything the decision used; :meth:`as_dict` is the gate record stored in the history."""

    passed: bool
    reasons: list[str]
    notes: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    candidate_version: str | None = None
    active_version: str | None = None
    held_out: dict[str, Any] = field(default_factory=dict)
    synthetic: dict[str, Any] = field(default_factory=dict)
    labelled: dict[str, Any] = field(default_factory=dict)
    rules: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN (AUROC of one class) is not JSON
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


# --- which images -----------------------------------------------------------------------------------


def evaluation_keys(
    session: Session, *, bucket: str, rules: GateRules, trained: TrainedSet | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    """(held-out nominal keys, newest first; labelled (key, 1 defect / 0 good)), per the module docstring.

    ``trained`` (default: the active model's set) is what the pool kept although it is in the held-out
    slice; those images are training data, not evaluation data.
    """
    trained = trained if trained is not None else active_trained_set(session)
    verdicts = latest_verdicts(session)
    rows = session.execute(
        select(Image.key, Image.kind, Image.sha256, Image.status, verdicts.c.verdict)
        .outerjoin(verdicts, verdicts.c.image_id == Image.id)
        .where(Image.bucket == bucket, Image.status.not_in(("failed", "skipped")))
        .order_by(Image.first_seen_at.desc(), Image.id.desc())
    ).all()
    nominal: dict[str, None] = {}
    labelled: dict[str, int] = {}
    seen: set[str] = set()
    for key, kind, sha256, _status, verdict in rows:
        if key in seen:
            continue  # an older version of a key already decided on
        seen.add(key)
        kept_for_training = (key, sha256) in trained
        if verdict == "defect":
            labelled[key] = 1
        elif verdict == "good" and held_out(key, rules.holdout_fraction) and not kept_for_training:
            labelled[key] = 0
        elif kind == "nominal" and verdict is None and held_out(key, rules.holdout_fraction) and not kept_for_training:
            nominal[key] = None
    return list(nominal)[: rules.nominal_sample], list(labelled.items())[: rules.max_labelled]


@dataclass
class _Loaded:
    keys: list[str] = field(default_factory=list)
    images: list[PILImage.Image] = field(default_factory=list)
    left_out_trained: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


def _load(store: ObjectStore, keys: Sequence[str], trained: Sequence[TrainedSet], rules: GateRules) -> _Loaded:
    """Decode ``keys``, leaving out unreadable images and those either model was trained on (by bytes)."""
    loaded = _Loaded()
    for key in keys:
        try:
            data = store.get(key, max_bytes=rules.max_object_bytes).data
            image = decode_image(data, name=key, max_pixels=rules.max_image_pixels)
        except (PermanentError, BadImageError) as exc:
            logger.warning("gate: %s left out: %s", key, exc)
            loaded.unreadable.append(key)
            continue
        digest = hashlib.sha256(data).hexdigest()
        if any((key, digest) in model for model in trained):
            loaded.left_out_trained.append(key)
            continue
        loaded.keys.append(key)
        loaded.images.append(image)
    return loaded


def _scores(ensemble: FoldEnsemble, images: Sequence[PILImage.Image], ids: Sequence[str]) -> np.ndarray:
    if not images:
        return np.array([])
    return np.array([s.score for s in ensemble.score_images(list(images), list(ids), with_maps=False)])


def _rate(scores: np.ndarray, threshold: float) -> float | None:
    return float(np.mean(scores > threshold)) if scores.size else None


# --- the decision -----------------------------------------------------------------------------------


def _check(name: str, value: float | None, bound: float | None, op: str, used: bool, detail: str) -> Check:
    if not used or value is None or bound is None or (isinstance(value, float) and math.isnan(value)):
        return Check(name, value, bound, op, False, None, detail)
    passed = value >= bound if op == ">=" else value <= bound
    return Check(name, value, bound, op, True, bool(passed), detail)


def decide(
    *,
    held_out_n: int,
    candidate_flag_rate: float | None,
    synthetic_n: int,
    candidate_synthetic_recall: float | None,
    active_synthetic_recall: float | None,
    n_good: int,
    candidate_synthetic_auroc: float | None = None,
    active_synthetic_auroc: float | None = None,
    n_defect: int,
    candidate_labelled: dict[str, float] | None,
    active_labelled: dict[str, float] | None,
    rules: GateRules,
) -> tuple[bool, list[str], list[str], list[Check]]:
    """The checks of the module docstring on computed numbers: (passed, failure reasons, notes, checks)."""
    notes: list[str] = []
    enough_holdout = held_out_n >= rules.min_holdout
    if not enough_holdout:
        notes.append(f"not enough held-out nominal images: {held_out_n} < {rules.min_holdout}; nominal checks not used")
    enough_labels = n_good >= rules.min_labels and n_defect >= rules.min_labels
    if not enough_labels and (n_good or n_defect):
        notes.append(
            f"not enough labels: {n_good} good / {n_defect} defect, {rules.min_labels} of each needed; "
            "labelled metrics recorded, not used"
        )
    cand = candidate_labelled or {}
    act = active_labelled or {}
    has_active = active_labelled is not None
    checks = [
        _check("held_out_flag_rate", candidate_flag_rate, rules.max_nominal_flag_rate, "<=", enough_holdout,
               f"flagged share of {held_out_n} held-out nominal images"),
        _check("synthetic_recall", candidate_synthetic_recall, rules.min_synthetic_recall, ">=",
               enough_holdout and synthetic_n > 0, f"flagged share of {synthetic_n} synthetic anomalies"),
        _check("synthetic_recall_vs_active", candidate_synthetic_recall,
               None if active_synthetic_recall is None else active_synthetic_recall - rules.synthetic_margin, ">=",
               enough_holdout and synthetic_n > 0 and active_synthetic_recall is not None,
               f"active {active_synthetic_recall} - margin {rules.synthetic_margin}"),
        _check("synthetic_auroc_vs_active", candidate_synthetic_auroc,
               None if active_synthetic_auroc is None else active_synthetic_auroc - rules.synthetic_auroc_margin,
               ">=", enough_holdout and synthetic_n > 0 and active_synthetic_auroc is not None,
               f"held-out nominal vs {synthetic_n} synthetic anomalies; active {active_synthetic_auroc} - margin "
               f"{rules.synthetic_auroc_margin}"),
        _check("defect_recall", cand.get("recall"), rules.min_defect_recall, ">=", enough_labels,
               f"flagged share of {n_defect} labelled defects"),
        _check("auroc_vs_active", cand.get("image_auroc"),
               act["image_auroc"] - rules.auroc_margin if has_active and "image_auroc" in act else None, ">=",
               enough_labels and has_active, f"on {n_good} good / {n_defect} defect labelled images"),
        _check("f1_vs_active", cand.get("f1"), act["f1"] - rules.f1_margin if has_active and "f1" in act else None,
               ">=", enough_labels and has_active, f"on {n_good} good / {n_defect} defect labelled images"),
    ]  # fmt: skip
    if not has_active:
        notes.append("no active version to compare with: absolute floors only")
    reasons = [
        f"{c.name} {c.value:.4f} {'<' if c.op == '>=' else '>'} bound {c.bound:.4f} ({c.detail})"
        for c in checks
        if c.used and not c.passed
    ]
    if not any(c.used for c in checks):
        reasons.append(
            f"not enough evaluation data: {held_out_n} held-out nominal (need {rules.min_holdout}), "
            f"{n_good} good / {n_defect} defect labels (need {rules.min_labels} of each)"
        )
    return not reasons, reasons, notes, checks


def evaluate_gate(
    candidate: FoldEnsemble,
    active: FoldEnsemble | None,
    *,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    rules: GateRules,
    active_version: str | None = None,
    candidate_version: str | None = None,
    synthetic: SyntheticMaker | None = make_synthetic,
) -> GateResult:
    """Score the evaluation images with both models and apply :func:`decide`."""
    trained = [TrainedSet.of_ensemble(candidate)]
    if active is not None:
        trained.append(TrainedSet.of_ensemble(active))
    with session_scope(session_factory) as session:
        nominal_keys, labelled = evaluation_keys(session, bucket=store.bucket, rules=rules)
    models = [candidate] if active is None else [candidate, active]

    held = _load(store, nominal_keys, trained, rules)
    held_scores = [_scores(model, held.images, held.keys) for model in models]
    flag_rates = [_rate(scores, model.threshold) for scores, model in zip(held_scores, models, strict=True)]

    synthetic_record: dict[str, Any] = {"enabled": synthetic is not None and rules.synthetic}
    synthetic_recalls: list[float | None] = [None, None]
    synthetic_aurocs: list[float | None] = [None, None]
    n_synthetic = 0
    if synthetic is not None and rules.synthetic and held.images:
        anomalies = synthetic(held.images, held.keys, rules.synthetic_seed)
        n_synthetic = len(anomalies)
        ids = [f"{key}~synthetic" for key in held.keys]
        for index, model in enumerate(models):
            scores = _scores(model, anomalies, ids)
            synthetic_recalls[index] = _rate(scores, model.threshold)
            both = np.concatenate([held_scores[index], scores])
            truth = [0] * len(held_scores[index]) + [1] * len(scores)
            name = "candidate" if index == 0 else "active"
            synthetic_aurocs[index] = image_metrics(both.tolist(), truth, model.threshold)["image_auroc"]
            synthetic_record[name] = {"recall": synthetic_recalls[index], "image_auroc": synthetic_aurocs[index]}
        synthetic_record.update({"n": n_synthetic, "seed": rules.synthetic_seed, "made_from": "held-out nominal"})

    label_of = dict(labelled)
    lab = _load(store, [key for key, _ in labelled], trained, rules)
    labels = [label_of[key] for key in lab.keys]
    n_defect = sum(labels)
    n_good = len(labels) - n_defect
    labelled_metrics: list[dict[str, float] | None] = [None, None]
    if labels:
        for index, model in enumerate(models):
            labelled_metrics[index] = image_metrics(
                _scores(model, lab.images, lab.keys).tolist(), labels, model.threshold
            )

    passed, reasons, notes, checks = decide(
        held_out_n=len(held.keys),
        candidate_flag_rate=flag_rates[0],
        synthetic_n=n_synthetic,
        candidate_synthetic_recall=synthetic_recalls[0],
        active_synthetic_recall=synthetic_recalls[1] if active is not None else None,
        candidate_synthetic_auroc=synthetic_aurocs[0],
        active_synthetic_auroc=synthetic_aurocs[1] if active is not None else None,
        n_good=n_good,
        n_defect=n_defect,
        candidate_labelled=labelled_metrics[0],
        active_labelled=(labelled_metrics[1] or {}) if active is not None else None,
        rules=rules,
    )
    if held.left_out_trained or lab.left_out_trained:
        notes.append(
            f"left out as training images of a model: {len(held.left_out_trained)} held-out nominal, "
            f"{len(lab.left_out_trained)} labelled"
        )
    return GateResult(
        passed=passed,
        reasons=reasons,
        notes=notes,
        checks=checks,
        candidate_version=candidate_version,
        active_version=active_version if active is not None else None,
        held_out={
            "n": len(held.keys),
            "left_out_trained": len(held.left_out_trained),
            "unreadable": len(held.unreadable),
            "candidate_flag_rate": flag_rates[0],
            "active_flag_rate": flag_rates[1] if active is not None else None,
            "candidate_threshold": candidate.threshold,
            "active_threshold": active.threshold if active is not None else None,
        },
        synthetic=synthetic_record,
        labelled={
            "n_good": n_good,
            "n_defect": n_defect,
            "left_out_trained": len(lab.left_out_trained),
            "unreadable": len(lab.unreadable),
            "enough": n_good >= rules.min_labels and n_defect >= rules.min_labels,
            "candidate": labelled_metrics[0],
            "active": labelled_metrics[1] if active is not None else None,
        },
        rules={
            key: value for key, value in asdict(rules).items() if key not in ("max_object_bytes", "max_image_pixels")
        },
    )


def apply_gate(session_factory: sessionmaker[Session], version: str, result: GateResult) -> str:
    """Record the gate run (event + ``metrics["gate"]``), then promote ``version`` or hold it back with
    the reasons; returns its resulting status."""
    record = {**result.as_dict(), "at": utcnow().isoformat()}
    with session_scope(session_factory) as session:
        row = repository.update_model_version(session, version=version, stage=None)
        row.metrics = {**(row.metrics or {}), "gate": record}
        model_events.record_event(
            session,
            version=version,
            event="gated",
            reason="passed" if result.passed else "; ".join(result.reasons),
            details=record,
        )
        if row.status == "active":
            return "active"
        if result.passed:
            model_events.activate(session, version, how="gate", reason="gate passed")
            return "active"
        repository.update_model_version(
            session, version=version, status="candidate", reason="gate: " + "; ".join(result.reasons)
        )
        return "candidate"
