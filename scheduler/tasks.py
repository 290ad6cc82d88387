"""The retraining tasks on the ``train`` queue, and the canvas that runs a rebuild on the cluster.

``waferwatch.check_retrain`` (beat, every few minutes) and ``waferwatch.nightly_retrain`` (beat, nightly)
only decide and claim under the rebuild lock (:func:`scheduler.rebuild.claim_build`), then send::

    chord(group(extract_chunk(build, i) for each chunk),
          chord(group(build_fold(build, k) for each fold), finish_rebuild(build)))

(with ReConPatch on, the chunks' body is ``train_representation(build) | chord(folds, finish)``).

Every signature is immutable and takes the build id (and an index) only; the data flow between steps
goes through the bucket (``models/<build_id>/work/``), so any train worker on any machine can run any
step. Chords need a result backend: :func:`register_train_tasks` sets one when the app has none (the
Redis broker itself, or a ``file://`` folder next to the embedded filesystem broker).

A step that fails for good (or exhausts its retries) marks the build ``failed`` with the reason, so the
lease is released at once instead of at its expiry; transient errors are retried with backoff.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from celery import Celery, Task, chord, group
from celery.canvas import Signature

from scheduler import gate as gate_rules
from scheduler import rebuild
from worker import repository
from worker.app import TRAIN_QUEUE, context_of
from worker.db import session_scope
from worker.errors import TransientError
from worker.model_provider import ModelProvider, ModelUnavailableError
from worker.schema import ModelVersion
from worker.settings import Settings

__all__ = [
    "BUILD_FOLD",
    "CHECK_RETRAIN",
    "EXTRACT_CHUNK",
    "FINISH_REBUILD",
    "NIGHTLY_RETRAIN",
    "TRAIN_TASKS",
    "rebuild_canvas",
    "rebuild_options",
    "register_train_tasks",
    "result_backend_for",
    "start_rebuild",
]

logger = logging.getLogger(__name__)

CHECK_RETRAIN: Final = "waferwatch.check_retrain"
NIGHTLY_RETRAIN: Final = "waferwatch.nightly_retrain"
EXTRACT_CHUNK: Final = "waferwatch.extract_chunk"
BUILD_FOLD: Final = "waferwatch.build_fold"
FINISH_REBUILD: Final = "waferwatch.finish_rebuild"
TRAIN_REPRESENTATION: Final = "waferwatch.train_representation"  # ReConPatch f, between chunks and folds
TRAIN_TASKS: Final = (CHECK_RETRAIN, NIGHTLY_RETRAIN, EXTRACT_CHUNK, BUILD_FOLD, FINISH_REBUILD, TRAIN_REPRESENTATION)


def result_backend_for(settings: Settings) -> str:
    """The chord result backend: explicit setting, else the Redis broker, else a folder by the broker's."""
    if settings.result_backend_url:
        return settings.result_backend_url
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return settings.broker_url
    folder = (settings.broker_dir / "results").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"file://{folder}"


def rebuild_options(settings: Settings, bucket: str) -> rebuild.RebuildOptions:
    return rebuild.RebuildOptions(
        bucket=bucket,
        model_prefix=settings.model_prefix,
        retrain_threshold=settings.retrain_threshold,
        chunk_size=settings.rebuild_chunk_size,
        lease_s=settings.rebuild_lease_s,
        config_overrides=settings.rebuild_config,
        max_object_bytes=settings.max_object_bytes,
        max_image_pixels=settings.max_image_pixels,
        holdout_fraction=settings.gate_holdout_fraction,
    )


def gate_rules_of(settings: Settings) -> gate_rules.GateRules:
    return gate_rules.GateRules(
        auroc_margin=settings.gate_auroc_margin,
        f1_margin=settings.gate_f1_margin,
        max_nominal_flag_rate=settings.gate_max_nominal_flag_rate,
        min_synthetic_recall=settings.gate_min_synthetic_recall,
        synthetic_margin=settings.gate_synthetic_margin,
        synthetic_auroc_margin=settings.gate_synthetic_auroc_margin,
        min_defect_recall=settings.gate_min_defect_recall,
        min_labels=settings.gate_min_labels,
        min_holdout=settings.gate_min_holdout,
        holdout_fraction=settings.gate_holdout_fraction,
        nominal_sample=settings.gate_nominal_sample,
        max_labelled=settings.gate_max_labelled,
        synthetic=settings.gate_synthetic,
        max_object_bytes=settings.max_object_bytes,
        max_image_pixels=settings.max_image_pixels,
    )


def rebuild_canvas(app: Celery, build_id: str, n_chunks: int, n_folds: int, *, reconpatch: bool = False) -> Signature:
    """The chord of chunk extractions whose body is the chord of fold builds into ``finish_rebuild``;
    with ``reconpatch`` the body first trains f (one task), then the folds."""

    def step(name: str, *args: Any) -> Signature:
        return app.signature(name, args=args, immutable=True, queue=TRAIN_QUEUE)

    folds = chord(group(step(BUILD_FOLD, build_id, k) for k in range(n_folds)), step(FINISH_REBUILD, build_id))
    if reconpatch:
        folds = step(TRAIN_REPRESENTATION, build_id) | folds
    return chord(group(step(EXTRACT_CHUNK, build_id, i) for i in range(n_chunks)), folds)


def start_rebuild(app: Celery, trigger: rebuild.Trigger) -> tuple[str | None, str]:
    """Claim a build under the lock and send its canvas (after the commit); returns (build id, why)."""
    context = context_of(app)
    options = rebuild_options(context.settings, context.store.bucket)
    pooled, failed = rebuild.pool_pending_nominal(
        context.session_factory,
        context.store,
        bucket=options.bucket,
        max_object_bytes=options.max_object_bytes,
        max_image_pixels=options.max_image_pixels,
    )
    if pooled or failed:
        logger.info("nominal images: %d pooled, %d unreadable (failed)", pooled, failed)
    plan, why = rebuild.claim_build(
        engine=context.engine,
        session_factory=context.session_factory,
        store=context.store,
        trigger=trigger,
        options=options,
    )
    if plan is None:
        logger.info("no rebuild (%s): %s", trigger, why)
        return None, why
    try:
        config = plan.patchcore_config
        rebuild_canvas(app, plan.build_id, len(plan.chunks), config.folds, reconpatch=config.reconpatch).apply_async()
    except Exception as exc:
        rebuild.fail_build(
            context.session_factory,
            plan.build_id,
            f"could not send the rebuild canvas: {exc}",
            store=context.store,
            model_prefix=options.model_prefix,
        )
        raise
    return plan.build_id, why


def _finish(app: Celery, build_id: str) -> dict[str, Any]:
    """Assemble and register the candidate, run the gate, promote or hold back."""
    context = context_of(app)
    settings = context.settings
    plan = rebuild.load_plan(context.store, settings.model_prefix, build_id)
    rebuild.set_stage(context.session_factory, build_id, "assemble + upload")
    finished = rebuild.finish_build(
        context.store, context.session_factory, plan, cache_dir=settings.model_cache_dir, device=settings.device
    )
    if finished.rebuilt:  # an existing version: its state and gate record stay as they are
        with session_scope(context.session_factory) as session:
            status = session.get(ModelVersion, finished.version).status
        logger.info("build %s → %s again (stays %s): history event only", build_id, finished.version, status)
        return {"version": finished.version, "status": status, "reasons": [], "rebuilt": True}
    with session_scope(context.session_factory) as session:
        active_row = repository.get_active_model_version(session)
        active_version = active_row.id if active_row is not None else None
    active = None
    if active_version is not None and active_version != finished.version:
        provider = ModelProvider(
            session_factory=context.session_factory,
            store=context.store,
            cache_dir=settings.model_cache_dir,
            device=settings.device,
            model_version=active_version,
        )
        try:
            active = provider.current().ensemble
        except ModelUnavailableError as exc:
            logger.warning("gate: active version %s cannot be loaded (%s); comparing without it", active_version, exc)
            active_version = None
    result = gate_rules.evaluate_gate(
        finished.ensemble,
        active,
        session_factory=context.session_factory,
        store=context.store,
        rules=gate_rules_of(settings),
        active_version=active_version,
        candidate_version=finished.version,
    )
    status = gate_rules.apply_gate(context.session_factory, finished.version, result)
    logger.info("build %s → %s %s (%s)", build_id, finished.version, status, "; ".join(result.reasons) or "passed")
    return {"version": finished.version, "status": status, "reasons": result.reasons}


def register_train_tasks(app: Celery, settings: Settings) -> None:
    """Define the retraining tasks on ``app`` (called from :func:`worker.app.create_app`)."""
    if not app.conf.result_backend:
        app.conf.result_backend = result_backend_for(settings)
    app.conf.result_expires = max(3600, settings.rebuild_lease_s * 2)
    routes = dict(app.conf.task_routes or {})
    routes.update({name: {"queue": TRAIN_QUEUE} for name in TRAIN_TASKS})
    app.conf.task_routes = routes

    policy: dict[str, Any] = {
        "bind": True,
        "shared": False,
        "acks_late": True,
        "autoretry_for": (TransientError,),
        "retry_backoff": settings.retry_backoff_s,
        "retry_backoff_max": int(settings.retry_backoff_max_s),
        "retry_jitter": True,
        "max_retries": settings.task_max_attempts - 1,
    }

    def guarded(task: Task, build_id: str, work: Any) -> Any:
        """Run ``work``; a permanent error, or the last transient one, fails the build with its reason."""
        context = context_of(task.app)
        cleanup = {"store": context.store, "model_prefix": context.settings.model_prefix}
        try:
            return work()
        except TransientError:
            if task.request.retries >= (task.max_retries or 0):
                rebuild.fail_build(context.session_factory, build_id, f"{task.name}: gave up", **cleanup)
            raise
        except Exception as exc:
            rebuild.fail_build(context.session_factory, build_id, f"{task.name}: {exc!r}", **cleanup)
            raise

    @app.task(name=CHECK_RETRAIN, ignore_result=True, expires=settings.retrain_check_interval_s, **policy)
    def check_retrain(self: Task) -> str | None:
        return start_rebuild(self.app, "count")[0]

    @app.task(name=NIGHTLY_RETRAIN, ignore_result=True, **policy)
    def nightly_retrain(self: Task) -> str | None:
        return start_rebuild(self.app, "nightly")[0]

    @app.task(name=EXTRACT_CHUNK, ignore_result=False, **policy)
    def extract_chunk(self: Task, build_id: str, index: int) -> int:
        context = context_of(self.app)

        def work() -> int:
            plan = rebuild.load_plan(context.store, context.settings.model_prefix, build_id)
            kept = rebuild.extract_chunk(
                context.store,
                plan,
                index,
                device=context.settings.device,
                max_object_bytes=context.settings.max_object_bytes,
            )
            done = sum(1 for info in context.store.list(plan.work_prefix) if info.key.endswith(".npy"))
            rebuild.set_stage(context.session_factory, build_id, f"extract {done}/{len(plan.chunks)} chunks")
            return kept

        return guarded(self, build_id, work)

    @app.task(name=BUILD_FOLD, ignore_result=False, **policy)
    def build_fold(self: Task, build_id: str, index: int) -> int:
        context = context_of(self.app)

        def work() -> int:
            plan = rebuild.load_plan(context.store, context.settings.model_prefix, build_id)
            size = rebuild.build_fold_bank(context.store, plan, index)
            done = sum(1 for info in context.store.list(plan.work_prefix) if info.key.endswith(".safetensors"))
            rebuild.set_stage(context.session_factory, build_id, f"folds {done}/{plan.patchcore_config.folds}")
            return size

        return guarded(self, build_id, work)

    @app.task(name=TRAIN_REPRESENTATION, ignore_result=False, **policy)
    def train_representation(self: Task, build_id: str) -> int:
        context = context_of(self.app)

        def work() -> int:
            plan = rebuild.load_plan(context.store, context.settings.model_prefix, build_id)
            rebuild.set_stage(context.session_factory, build_id, "reconpatch: training f")
            return rebuild.train_representation_step(context.store, plan, device=context.settings.device)

        return guarded(self, build_id, work)

    @app.task(name=FINISH_REBUILD, ignore_result=False, **policy)
    def finish_rebuild(self: Task, build_id: str) -> dict[str, Any]:
        return guarded(self, build_id, lambda: _finish(self.app, build_id))
