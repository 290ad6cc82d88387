"""The rebuild as plain functions: training pool, trigger decisions, claim, and the steps of the canvas.

Training pool: every image under the nominal prefix plus every image whose latest label is ``good``,
minus the **held-out slice** (:func:`held_out`: a hash of the key below ``holdout_fraction``, decided
before any training and the same at every build) that only the gate sees, minus images a person took out
(a ``defect`` label, or ``waferwatch pool remove``). Images the active model was trained on are never
held out (a registered model's images stay its successors' training data). The pool is deduplicated by
key (the newest object version wins) and sorted, and each image's id in the model is its key, so the
same pool always gives the same folds and the same model version.

A nominal image is read and decoded once (:func:`pool_pending_nominal`, before every trigger decision):
it becomes ``pooled`` with its sha256, or ``failed`` with a ``failures`` row, and never counts toward a
rebuild or is read again by a build.

A build never trains on fewer of the active model's training images than the active model did (matched
by key or by sha256) unless a person removed them: :func:`claim_build` refuses and says which are missing.

A build is identified by a build id (``build-<utc time>-<random>``) until its content hash, the model
version, is known. Its ``model_versions`` row (status ``building``, progress in ``stage``, heartbeat in
``metrics``) is the lease described in :mod:`scheduler.locks`; when the candidate is registered under its
version, the build row is deleted and its history (trigger, pool, timings) moves into the candidate's
``metrics``. A failed build keeps its row with status ``failed`` and the reason.

Intermediate artifacts live in the bucket under ``<model_prefix><build_id>/work/``: ``plan.json``, one
``chunk_<i>.npy``/``.json`` :class:`~models.training.FeatureSet` per extraction task, one
``fold_<k>.safetensors``/``.json`` per fold bank, and ``timings/<step>.json``. The bucket is the one store
that every train worker already reaches, on any machine, and every file is hash-checked when read back.
The ``work/`` objects are deleted once the candidate is uploaded, and when the build fails.

History: a build whose content version is new registers the candidate with a ``built`` event; one whose
version already exists (an unchanged pool and config give the same bytes) changes nothing on that row
(status, reason, gate record stay) and appends a ``rebuilt`` event with the build's trigger and timings.
A failed build gets a ``failed`` event.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from models import BadImageError, FoldEnsemble, PatchCoreConfig, decode_image
from models.artifacts import load_fold, save_fold
from models.reconpatch import PatchRepresentation
from models.training import FeatureSet, assemble_ensemble, build_fold, extract_features, train_representation
from scheduler.locks import rebuild_lock
from worker import model_events, repository
from worker.db import session_scope
from worker.errors import PermanentError
from worker.model_provider import publish_model
from worker.schema import Image, Label, ModelEvent, ModelVersion, utcnow
from worker.storage import ObjectStore

__all__ = [
    "BuildPlan",
    "PoolImage",
    "RebuildError",
    "RebuildOptions",
    "TrainedSet",
    "Trigger",
    "active_trained_set",
    "build_fold_bank",
    "claim_build",
    "extract_chunk",
    "fail_build",
    "finish_build",
    "held_out",
    "last_build_point",
    "latest_verdicts",
    "load_plan",
    "plan_chunks",
    "pool_fingerprint",
    "pool_pending_nominal",
    "removed_by_person",
    "select_training_pool",
    "set_stage",
    "should_rebuild",
    "train_representation_step",
]

logger = logging.getLogger(__name__)

Trigger = Literal["count", "nightly", "manual"]
_OBJECT_MAX_BYTES = 8 * 1024**3
REMOVED_BY_PERSON = "removed from the pool by "  # status_reason prefix of ``waferwatch pool remove``
_HOLDOUT_SALT = "waferwatch-holdout"


class RebuildError(PermanentError):
    """A rebuild cannot go on (no plan, too few usable images): recorded on the build row, not retried."""


@dataclass(frozen=True, slots=True)
class PoolImage:
    """One training image: its ``images`` row, key (the id inside the model) and object version."""

    image_id: int
    key: str
    etag: str
    added_at: datetime
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class RebuildOptions:
    """The settings values a rebuild needs (passed down from the entry point)."""

    bucket: str
    model_prefix: str = "models/"
    retrain_threshold: int = 50
    chunk_size: int = 64
    lease_s: int = 7200
    config_overrides: Mapping[str, Any] = field(default_factory=dict)
    max_object_bytes: int = 200 * 1024 * 1024
    max_image_pixels: int = 64_000_000
    holdout_fraction: float = 0.2


@dataclass
class BuildPlan:
    """What one build trains on and how it is split; stored as ``work/plan.json`` in the bucket."""

    build_id: str
    trigger: str
    config: dict[str, Any]
    keys: list[str]
    etags: list[str]
    chunks: list[list[str]]
    fingerprint: str
    snapshot_at: str
    work_prefix: str
    model_prefix: str

    @property
    def patchcore_config(self) -> PatchCoreConfig:
        return PatchCoreConfig.from_dict(self.config)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> BuildPlan:
        return cls(**json.loads(data))


# --- training pool -----------------------------------------------------------------------------------


def latest_verdicts(session: Session) -> Any:
    """A subquery (image_id, verdict, created_at) with each image's latest label (later relabels win)."""
    ranked = select(
        Label.image_id,
        Label.verdict,
        Label.created_at,
        func.row_number()
        .over(partition_by=Label.image_id, order_by=(Label.created_at.desc(), Label.id.desc()))
        .label("rank"),
    ).subquery()
    return (
        select(ranked.c.image_id, ranked.c.verdict, ranked.c.created_at).where(ranked.c.rank == 1).subquery("verdicts")
    )


def held_out(key: str, fraction: float) -> bool:
    """Whether ``key`` belongs to the gate's held-out slice: a salted hash of the key, not a draw, so the
    slice is fixed before any training, identical at every build and unaffected by new images."""
    if fraction <= 0:
        return False
    bucket = int(hashlib.sha256(f"{_HOLDOUT_SALT}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


@dataclass(frozen=True, slots=True)
class TrainedSet:
    """What a model was trained on, by the two names an image can have: its id in the model, its sha256."""

    ids: frozenset[str] = frozenset()
    sha256: frozenset[str] = frozenset()

    @classmethod
    def of_manifest(cls, manifest: Mapping[str, Any] | None) -> TrainedSet:
        images = (manifest or {}).get("training_images") or []
        return cls(frozenset(str(t["id"]) for t in images), frozenset(str(t["sha256"]) for t in images))

    @classmethod
    def of_ensemble(cls, ensemble: FoldEnsemble) -> TrainedSet:
        images = ensemble.training_images
        return cls(frozenset(t.id for t in images), frozenset(t.sha256 for t in images))

    def __contains__(self, item: object) -> bool:
        key, sha256 = item if isinstance(item, tuple) else (item, None)
        return key in self.ids or (sha256 is not None and sha256 in self.sha256)


def active_trained_set(session: Session) -> TrainedSet:
    active = repository.get_active_model_version(session)
    return TrainedSet.of_manifest(active.manifest if active is not None else None)


def candidate_images(session: Session, *, bucket: str) -> list[tuple[PoolImage, str, str | None]]:
    """(image, kind, latest verdict) of every readable nominal or good-labelled image, newest version per key.

    Keys whose newest version is not (or no longer) training material (a defect label, an unlabelled
    incoming image, a person's removal) are left out.
    """
    verdicts = latest_verdicts(session)
    rows = session.execute(
        select(Image.id, Image.key, Image.etag_or_version, Image.kind, Image.first_seen_at, verdicts.c.verdict,
               verdicts.c.created_at, Image.sha256, Image.status, Image.status_reason)
        .outerjoin(verdicts, verdicts.c.image_id == Image.id)
        .where(Image.bucket == bucket, Image.status != "failed")
        .order_by(Image.key, Image.id)
    ).all()  # fmt: skip
    newest: dict[str, tuple[PoolImage, str, str | None] | None] = {}
    for image_id, key, etag, kind, first_seen_at, verdict, labelled_at, sha256, status, _status_reason in rows:
        if status == "skipped" or verdict == "defect" or (kind != "nominal" and verdict != "good"):
            newest[key] = None  # a newer version of a key that is not (or no longer) training data
            continue
        added_at = labelled_at if kind != "nominal" and labelled_at is not None else first_seen_at
        newest[key] = (PoolImage(image_id, key, etag, added_at, sha256), kind, verdict)
    return [entry for entry in newest.values() if entry is not None]


def select_training_pool(
    session: Session, *, bucket: str, holdout_fraction: float = 0.0, trained: TrainedSet | None = None
) -> list[PoolImage]:
    """Nominal images and images confirmed good, never confirmed defects or removed ones, minus the
    held-out slice (except what ``trained``, the active model's set, already used); sorted by key."""
    trained = trained if trained is not None else TrainedSet()
    return [
        image
        for image, _kind, _verdict in candidate_images(session, bucket=bucket)
        if not held_out(image.key, holdout_fraction) or (image.key, image.sha256) in trained
    ]


def removed_by_person(session: Session, *, bucket: str) -> list[tuple[str, str | None, str]]:
    """(key, sha256, why) of images a person took out of the pool: a ``defect`` label or ``pool remove``."""
    verdicts = latest_verdicts(session)
    rows = session.execute(
        select(Image.key, Image.sha256, Image.status, Image.status_reason, verdicts.c.verdict)
        .outerjoin(verdicts, verdicts.c.image_id == Image.id)
        .where(Image.bucket == bucket)
        .where((verdicts.c.verdict == "defect") | Image.status_reason.startswith(REMOVED_BY_PERSON))
    ).all()
    return [
        (key, sha256, "labelled defect" if verdict == "defect" else status_reason)
        for key, sha256, _status, status_reason, verdict in rows
    ]


def missing_from_pool(session: Session, *, bucket: str, pool: Sequence[PoolImage]) -> tuple[int, list[str]]:
    """(the active model's number of training images, those of them neither in ``pool`` nor removed by a
    person), matched by key or sha256: what a rebuild would silently forget."""
    active = repository.get_active_model_version(session)
    images = ((active.manifest or {}).get("training_images") or []) if active is not None else []
    have = TrainedSet(frozenset(i.key for i in pool), frozenset(i.sha256 for i in pool if i.sha256))
    taken_out = removed_by_person(session, bucket=bucket)
    removed = TrainedSet(frozenset(key for key, _, _ in taken_out), frozenset(sha for _, sha, _ in taken_out if sha))
    missing = [
        str(t["id"])
        for t in images
        if (str(t["id"]), str(t["sha256"])) not in have and (str(t["id"]), str(t["sha256"])) not in removed
    ]
    return len(images), missing


def pool_pending_nominal(
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    *,
    bucket: str,
    max_object_bytes: int,
    max_image_pixels: int,
    limit: int = 1000,
) -> tuple[int, int]:
    """Read and decode nominal images still ``queued``: ``pooled`` with their sha256, or ``failed`` with a
    failures row (out of the pool and the rebuild count, never read again). Returns (pooled, failed).

    Storage outages raise (the trigger retries); only permanent problems of one object fail that image.
    """
    with session_scope(session_factory) as session:
        pending = session.execute(
            select(Image.id, Image.key)
            .where(Image.bucket == bucket, Image.kind == "nominal", Image.status == "queued")
            .order_by(Image.id)
            .limit(limit)
        ).all()
    pooled = failed = 0
    for image_id, key in pending:
        try:
            data = store.get(key, max_bytes=max_object_bytes).data
            decode_image(data, name=key, max_pixels=max_image_pixels)
        except (PermanentError, BadImageError) as exc:
            with session_scope(session_factory) as session:
                repository.record_failure(session, image_id=image_id, error_type=type(exc).__name__, message=str(exc))
            logger.warning("nominal image %s left out of the pool: %s", key, exc)
            failed += 1
            continue
        with session_scope(session_factory) as session:
            repository.set_image_sha256(session, image_id=image_id, sha256=hashlib.sha256(data).hexdigest())
            session.execute(
                update(Image)
                .where(Image.id == image_id, Image.status == "queued")
                .values(status="pooled", status_reason=None, status_changed_at=utcnow())
            )
        pooled += 1
    return pooled, failed


def pool_fingerprint(pool: Sequence[PoolImage]) -> str:
    """sha256 over the sorted (key, object version) pairs: equal fingerprints, equal training data."""
    digest = hashlib.sha256()
    for image in sorted(pool, key=lambda item: item.key):
        digest.update(f"{image.key}\0{image.etag}\n".encode())
    return digest.hexdigest()


def plan_chunks(keys: Sequence[str], chunk_size: int) -> list[list[str]]:
    """Sorted keys split into extraction chunks of at most ``chunk_size`` (the last may be shorter)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ordered = sorted(keys)
    return [ordered[begin : begin + chunk_size] for begin in range(0, len(ordered), chunk_size)]


def last_build_point(session: Session) -> tuple[datetime | None, str | None]:
    """(pool snapshot time, pool fingerprint) of the newest finished build, or of the active version.

    Candidates held back by the gate count as builds, so an unchanged pool is not rebuilt every few
    minutes. A version registered outside the scheduler (no pool recorded) counts from its creation.
    """
    rows = session.scalars(
        select(ModelVersion).where(ModelVersion.status != "building").order_by(ModelVersion.created_at.desc()).limit(50)
    ).all()
    points = []
    for row in rows:
        pool = (row.metrics or {}).get("pool") or {}
        if pool.get("snapshot_at"):
            points.append((datetime.fromisoformat(pool["snapshot_at"]), pool.get("fingerprint")))
            break
    # A rebuild that produced an existing version leaves that row alone; its pool is in the event.
    for event in session.scalars(
        select(ModelEvent).where(ModelEvent.event == "rebuilt").order_by(ModelEvent.at.desc()).limit(1)
    ):
        pool = (event.details or {}).get("pool") or {}
        if pool.get("snapshot_at"):
            points.append((datetime.fromisoformat(pool["snapshot_at"]), pool.get("fingerprint")))
    if points:
        return max(points, key=lambda point: point[0])
    active = next((row for row in rows if row.status == "active"), None)
    return (active.created_at, None) if active is not None else (None, None)


def should_rebuild(
    pool: Sequence[PoolImage], trigger: Trigger, *, since: datetime | None, fingerprint: str | None, threshold: int
) -> tuple[bool, str]:
    """Whether ``trigger`` starts a build now, and why (or why not)."""
    if not pool:
        return False, "the training pool is empty"
    if trigger == "manual":
        return True, f"manual, {len(pool)} images"
    current = pool_fingerprint(pool)
    if trigger == "nightly":
        if current == fingerprint:
            return False, "nothing changed since the last build"
        return True, f"nightly, {len(pool)} images (pool changed)"
    new = len(pool) if since is None else sum(1 for image in pool if image.added_at > since)
    if new >= threshold:
        return True, f"{new} new pool images >= {threshold}"
    return False, f"{new} new pool images < {threshold}"


# --- claim and progress ------------------------------------------------------------------------------


def _new_build_id() -> str:
    return f"build-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def _expire_stale_builds(session: Session, lease_s: int) -> list[ModelVersion]:
    """Builds whose heartbeat is older than the lease become ``failed``; returns the live ones."""
    live = []
    now = utcnow()
    for row in session.scalars(select(ModelVersion).where(ModelVersion.status == "building")).all():
        beat = (row.metrics or {}).get("heartbeat_at")
        last = datetime.fromisoformat(beat) if beat else row.created_at
        if now - last > timedelta(seconds=lease_s):
            reason = f"lease expired: no progress since {last.isoformat()}"
            repository.update_model_version(session, version=row.id, status="failed", reason=reason)
            model_events.record_event(session, version=row.id, event="failed", reason=reason)
        else:
            live.append(row)
    return live


def build_config(session: Session, overrides: Mapping[str, Any]) -> PatchCoreConfig:
    """The active version's config (same recipe as what is scoring now), or the default, plus overrides.

    A threshold refitted on labels (rule ``labelled``, ``waferwatch models calibrate``) belongs to the
    banks it was fitted with: a rebuild goes back to the nominal-only rule that version was calibrated
    from (``base_rule`` of its calibration record), and a person calibrates the new banks again.
    """
    active = repository.get_active_model_version(session)
    manifest = (active.manifest or {}) if active is not None else {}
    base = manifest.get("config")
    config = PatchCoreConfig.from_dict(base) if base else PatchCoreConfig()
    if config.threshold_rule == "labelled":
        rule = (manifest.get("calibration") or {}).get("base_rule") or PatchCoreConfig().threshold_rule
        config = config.replace(threshold_rule=rule, labelled_threshold=None)
    return config.replace(**dict(overrides)) if overrides else config


def claim_build(
    *,
    engine: Engine,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    trigger: Trigger,
    options: RebuildOptions,
) -> tuple[BuildPlan | None, str]:
    """Decide under the rebuild lock whether to build; if so, register the ``building`` row and the plan.

    Returns (plan, why). The plan is None when another trigger holds the lock, a build is running, or the
    pool does not call for one. The row is committed before the plan is uploaded and before the caller
    sends any task, so a task never looks for a row that is not there.
    """
    with rebuild_lock(engine) as taken:
        if not taken:
            return None, "another trigger holds the rebuild lock"
        with session_scope(session_factory) as session:
            before = {row.id for row in session.scalars(select(ModelVersion).where(ModelVersion.status == "failed"))}
            live = _expire_stale_builds(session, options.lease_s)
            expired = [
                row.id
                for row in session.scalars(select(ModelVersion).where(ModelVersion.status == "failed"))
                if row.id not in before
            ]
        for build_id in expired:
            remove_work_files(store, options.model_prefix, build_id)
        if live:
            return None, f"build {live[0].id} is running ({live[0].stage})"
        with session_scope(session_factory) as session:
            snapshot_at = utcnow()
            pool = select_training_pool(
                session,
                bucket=options.bucket,
                holdout_fraction=options.holdout_fraction,
                trained=active_trained_set(session),
            )
            since, fingerprint = last_build_point(session)
            start, why = should_rebuild(
                pool, trigger, since=since, fingerprint=fingerprint, threshold=options.retrain_threshold
            )
            if not start:
                return None, why
            n_active, missing = missing_from_pool(session, bucket=options.bucket, pool=pool)
            if missing:
                return None, (
                    f"the pool lacks {len(missing)} of the active model's {n_active} training images "
                    f"(e.g. {', '.join(missing[:3])}) and no person removed them: upload them under the nominal "
                    "prefix (waferwatch models register DIR --images SOURCE) or take them out with "
                    "waferwatch pool remove"
                )
            config = build_config(session, options.config_overrides)
            if len(pool) < config.folds:
                return None, f"{len(pool)} pool images for {config.folds} folds"
            build_id = _new_build_id()
            keys = [image.key for image in pool]
            plan = BuildPlan(
                build_id=build_id,
                trigger=trigger,
                config=config.to_dict(),
                keys=keys,
                etags=[image.etag for image in pool],
                chunks=plan_chunks(keys, options.chunk_size),
                fingerprint=pool_fingerprint(pool),
                snapshot_at=snapshot_at.isoformat(),
                work_prefix=f"{options.model_prefix}{build_id}/work/",
                model_prefix=options.model_prefix,
            )
            repository.ensure_model_version(
                session,
                version=build_id,
                status="building",
                manifest={"build_id": build_id, "trigger": trigger, "why": why, "config": plan.config},
                metrics={
                    "heartbeat_at": snapshot_at.isoformat(),
                    "pool": {
                        "size": len(pool),
                        "fingerprint": plan.fingerprint,
                        "snapshot_at": plan.snapshot_at,
                        "holdout_fraction": options.holdout_fraction,
                        "kept_from_active": n_active,
                    },
                },
            )
            repository.update_model_version(session, version=build_id, stage=f"planned: {len(plan.chunks)} chunks")
    try:
        store.put(plan.work_prefix + "plan.json", plan.to_json(), content_type="application/json")
    except Exception as exc:
        fail_build(
            session_factory, build_id, f"plan upload failed: {exc}", store=store, model_prefix=options.model_prefix
        )
        raise
    logger.info("build %s claimed (%s): %d images, %d chunks", build_id, why, len(plan.keys), len(plan.chunks))
    return plan, why


def set_stage(session_factory: sessionmaker[Session], build_id: str, stage: str) -> None:
    """Show progress on the build row and renew its lease (a no-op once the build row is gone)."""
    with session_scope(session_factory) as session:
        row = session.get(ModelVersion, build_id)
        if row is None or row.status != "building":
            return
        row.stage = stage
        row.metrics = {**(row.metrics or {}), "heartbeat_at": utcnow().isoformat()}


def remove_work_files(store: ObjectStore, model_prefix: str, build_id: str) -> int:
    """Delete everything under ``<model_prefix><build_id>/`` (plan, chunks, folds, timings); returns how many."""
    removed = 0
    for info in list(store.list(f"{model_prefix}{build_id}/")):
        store.delete(info.key)
        removed += 1
    return removed


def fail_build(
    session_factory: sessionmaker[Session],
    build_id: str,
    reason: str,
    *,
    store: ObjectStore | None = None,
    model_prefix: str = "models/",
) -> None:
    """Mark a build ``failed`` with its reason (only while it is still ``building``), record the event
    and, given the store, delete its work files (they would otherwise stay in the bucket forever)."""
    with session_scope(session_factory) as session:
        row = session.get(ModelVersion, build_id)
        if row is not None and row.status == "building":
            repository.update_model_version(session, version=build_id, status="failed", reason=reason[:4000])
            model_events.record_event(session, version=build_id, event="failed", reason=reason[:4000])
    logger.error("build %s failed: %s", build_id, reason)
    if store is not None:
        try:
            remove_work_files(store, model_prefix, build_id)
        except Exception:  # the failure is recorded; leftovers are removed by the next expiry or by hand
            logger.exception("build %s: could not delete its work files", build_id)


# --- the steps (one per task) -----------------------------------------------------------------------


def load_plan(store: ObjectStore, model_prefix: str, build_id: str) -> BuildPlan:
    key = f"{model_prefix}{build_id}/work/plan.json"
    return BuildPlan.from_json(store.get(key, max_bytes=_OBJECT_MAX_BYTES).data)


def _upload(store: ObjectStore, prefix: str, paths: Sequence[Path]) -> None:
    for path in paths:
        store.put(prefix + path.name, path.read_bytes())


def _download(store: ObjectStore, key: str, target: Path) -> Path:
    target.write_bytes(store.get(key, max_bytes=_OBJECT_MAX_BYTES).data)
    return target


def _record_timing(store: ObjectStore, plan: BuildPlan, step: str, seconds: float) -> None:
    body = json.dumps({"step": step, "seconds": seconds}).encode()
    store.put(f"{plan.work_prefix}timings/{step}.json", body, content_type="application/json")


def extract_chunk(store: ObjectStore, plan: BuildPlan, index: int, *, device: str, max_object_bytes: int) -> int:
    """Features of chunk ``index`` to ``work/chunk_<index>.*``; returns how many images it kept."""
    started = time.perf_counter()
    keys = plan.chunks[index]

    def reader(key: str) -> Callable[[], bytes]:
        return lambda: store.get(key, max_bytes=max_object_bytes).data

    features = extract_features(keys, [reader(key) for key in keys], plan.patchcore_config, device=device)
    with tempfile.TemporaryDirectory(prefix="waferwatch-chunk-") as folder:
        _upload(store, plan.work_prefix, features.save(Path(folder), f"chunk_{index:04d}"))
    _record_timing(store, plan, f"extract_{index:04d}", time.perf_counter() - started)
    return len(features.ids)


def load_features(store: ObjectStore, plan: BuildPlan, folder: Path) -> FeatureSet:
    """Every chunk of the plan, hash-checked, merged into one set sorted by id."""
    parts = []
    for index in range(len(plan.chunks)):
        name = f"chunk_{index:04d}"
        for suffix in (".npy", ".json"):
            _download(store, f"{plan.work_prefix}{name}{suffix}", folder / f"{name}{suffix}")
        if json.loads((folder / f"{name}.json").read_text(encoding="utf-8")).get("augmented_sha256"):
            _download(store, f"{plan.work_prefix}{name}-augmented.npy", folder / f"{name}-augmented.npy")
        parts.append(FeatureSet.load(folder, name))
    return FeatureSet.concatenate(parts)


# --- ReConPatch: f trained once, between the chunks and the folds -------------------------------------

_REPRESENTATION_META = "reconpatch.json"


def train_representation_step(store: ObjectStore, plan: BuildPlan, *, device: str) -> int:
    """ReConPatch f (per fold or shared) to ``work/reconpatch_<i>.safetensors`` + ``work/reconpatch.json``
    (their hashes and input width); returns how many f were trained (0: the config does not use it)."""
    if not plan.patchcore_config.reconpatch:
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="waferwatch-reconpatch-") as folder:
        features = load_features(store, plan, Path(folder))
        representation = train_representation(features, plan.patchcore_config, device=device)
        out = Path(folder) / "out"
        files = representation.save(out)
        meta = {"files": files, "in_dim": representation.in_dim, "summary": representation.describe()}
        (out / _REPRESENTATION_META).write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
        _upload(store, plan.work_prefix, [out / name for name in sorted(files)] + [out / _REPRESENTATION_META])
    _record_timing(store, plan, "reconpatch", time.perf_counter() - started)
    return len(files)


def load_representation(store: ObjectStore, plan: BuildPlan, folder: Path) -> PatchRepresentation | None:
    """The f of :func:`train_representation_step`, every file hash-checked (None for plain PatchCore)."""
    config = plan.patchcore_config
    if not config.reconpatch:
        return None
    meta_path = _download(store, plan.work_prefix + _REPRESENTATION_META, folder / _REPRESENTATION_META)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    for name in sorted(meta["files"]):
        _download(store, plan.work_prefix + name, folder / name)
    return PatchRepresentation.load(folder, meta["files"], config, in_dim=int(meta["in_dim"]), n_folds=config.folds)


def build_fold_bank(store: ObjectStore, plan: BuildPlan, index: int) -> int:
    """Fold ``index``'s bank and threshold to ``work/fold_<index>.*``; returns the bank size."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="waferwatch-fold-") as folder:
        features = load_features(store, plan, Path(folder))
        representation = load_representation(store, plan, Path(folder))  # ReConPatch (None: plain)
        fold = build_fold(features, index, plan.patchcore_config, representation)
        out = Path(folder) / "out"
        _upload(store, plan.work_prefix, save_fold(fold, out))
    _record_timing(store, plan, f"fold_{index}", time.perf_counter() - started)
    return fold.bank.n_entries


@dataclass
class FinishedBuild:
    """A finished build: its version, the ensemble in memory and where the build time went.

    ``rebuilt`` is true when the version already existed (same pool, same config, same bytes): its row
    was left as it was, and the caller must not gate it again.
    """

    version: str
    ensemble: FoldEnsemble
    timings: dict[str, float]
    skipped: int
    rebuilt: bool = False


def finish_build(
    store: ObjectStore, session_factory: sessionmaker[Session], plan: BuildPlan, *, cache_dir: Path, device: str
) -> FinishedBuild:
    """Assemble the folds, upload ``models/<version>/`` (manifest last), register the candidate row.

    The build row is deleted in the same transaction that writes the pool and timings into the
    candidate's metrics (or, for an existing version, into its ``rebuilt`` event); the ``work/`` objects
    are deleted afterwards.
    """
    started = time.perf_counter()
    config = plan.patchcore_config
    with tempfile.TemporaryDirectory(prefix="waferwatch-finish-") as folder:
        features = load_features(store, plan, Path(folder))
        for index in range(config.folds):
            for suffix in (".safetensors", ".json"):
                _download(store, f"{plan.work_prefix}fold_{index}{suffix}", Path(folder) / f"fold_{index}{suffix}")
        folds = [load_fold(Path(folder), index) for index in range(config.folds)]
        representation = load_representation(store, plan, Path(folder))  # ReConPatch (None: plain)
        ensemble = assemble_ensemble(config, features, folds, device=device, representation=representation)
        version = ensemble.version
        target = cache_dir / version
        assembled = time.perf_counter()
        with session_scope(session_factory) as session:
            existing = session.get(ModelVersion, version)
            existing_status = existing.status if existing is not None else None
        if existing_status is None:
            if not (target / "manifest.json").is_file():
                ensemble.save(target)
            publish_model(
                store,
                session_factory,
                target,
                model_prefix=plan.model_prefix,
                activate=False,
                stage="gate",
                event="built",
                details={"build_id": plan.build_id, "trigger": plan.trigger},
            )
        uploaded = time.perf_counter()
    timings = _collect_timings(store, plan)
    timings["assemble"] = assembled - started
    timings["upload"] = uploaded - assembled
    with session_scope(session_factory) as session:
        build = session.get(ModelVersion, plan.build_id)
        history = dict(build.metrics or {}) if build is not None else {}
        history.pop("heartbeat_at", None)
        build_record = {"build_id": plan.build_id, "trigger": plan.trigger, "timings_s": timings}
        if existing_status is None:
            row = session.get(ModelVersion, version, populate_existing=True)
            row.metrics = {**(row.metrics or {}), **history, "build": build_record}
            row.stage = "gate"
        else:
            model_events.record_event(
                session,
                version=version,
                event="rebuilt",
                reason=f"build {plan.build_id} ({plan.trigger}) made this version again; it stays {existing_status}",
                details={**history, "build": build_record},
            )
        session.execute(delete(ModelVersion).where(ModelVersion.id == plan.build_id, ModelVersion.status == "building"))
    remove_work_files(store, plan.model_prefix, plan.build_id)
    return FinishedBuild(version, ensemble, timings, len(features.skipped), rebuilt=existing_status is not None)


def _collect_timings(store: ObjectStore, plan: BuildPlan) -> dict[str, float]:
    extract, folds = [], []
    timings: dict[str, float] = {}
    for info in store.list(plan.work_prefix + "timings/"):
        entry = json.loads(store.get(info.key, max_bytes=1 << 20).data)
        if entry["step"] == "reconpatch":
            timings["reconpatch"] = float(entry["seconds"])
            continue
        (extract if entry["step"].startswith("extract") else folds).append(float(entry["seconds"]))
    return {
        "extract_total": sum(extract),
        "extract_max_task": max(extract, default=0.0),
        "fold_total": sum(folds),
        "fold_max_task": max(folds, default=0.0),
        **timings,
    }
