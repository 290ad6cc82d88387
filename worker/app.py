"""The Celery application: configuration, per-process resources and worker signals.

:func:`create_app` builds an app from a :class:`~worker.settings.Settings` (the only place Celery reads
settings). ``celery -A worker.app worker`` finds the app through this module's ``app`` attribute, which is
created on first access (PEP 562), so importing the module has no side effects.

Delivery semantics: tasks are acknowledged late (after they ran) and rejected back to the queue when the
worker process dies, with a prefetch of one, so at most one batch per process is in flight and a crash
redelivers it. That is safe because scoring is idempotent (unique inference per image and version). On
Redis, unacknowledged messages come back after ``visibility_timeout``, set well above the task time limit
so a slow batch is never handed to a second worker while the first still runs it.

Per-process resources (:class:`WorkerContext`): the engine, the object store and the model provider are
built lazily in the process that uses them and rebuilt after a fork, and ``worker_process_init`` disposes
any engine inherited from the parent, so prefork children never share connections or a CUDA context.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any, Final

from celery import Celery, signals
from kombu import Queue
from kombu.exceptions import ChannelError
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker import metrics
from worker.db import dispose_engine_after_fork, make_engine, make_session_factory
from worker.log_filters import quiet_hostless_transport_warning
from worker.model_provider import ModelProvider
from worker.scoring import ScoringOptions
from worker.settings import Settings, get_settings
from worker.storage import ObjectStore, make_store

__all__ = [
    "INGEST_QUEUE",
    "QUEUES",
    "RECONCILE",
    "REDRIVE_LEASES",
    "SCORE_BATCH",
    "SCORE_QUEUE",
    "TRAIN_QUEUE",
    "WorkerContext",
    "context_of",
    "create_app",
    "get_app",
    "make_enqueue",
    "make_store_from_settings",
    "workers_idle",
]

logger = logging.getLogger(__name__)

SCORE_BATCH: Final = "waferwatch.score_batch"
RECONCILE: Final = "waferwatch.reconcile"
REDRIVE_LEASES: Final = "waferwatch.redrive_leases"
SCORE_QUEUE: Final = "score"
TRAIN_QUEUE: Final = "train"
INGEST_QUEUE: Final = "ingest"
QUEUES: Final = (SCORE_QUEUE, TRAIN_QUEUE, INGEST_QUEUE)


def make_store_from_settings(settings: Settings, *, bucket: str | None = None, max_attempts: int = 3) -> ObjectStore:
    """The configured bucket (S3) or folder (the embedded default); on S3 in ``bucket`` when given (an
    image row's own: rows say where their bytes are). A folder store's bucket is only a label."""
    return make_store(
        settings.storage,
        root=settings.storage_root,
        endpoint_url=settings.s3_endpoint_url,
        bucket=(bucket or settings.s3_bucket) if settings.storage == "s3" else None,
        region=settings.s3_region,
        access_key=settings.s3_access_key.get_secret_value() if settings.s3_access_key else None,
        secret_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
        max_attempts=max_attempts,
        fast_reads=settings.s3_fast_reads,
    )


class WorkerContext:
    """Lazily built resources of one process: engine, sessions, store, model provider, scoring options."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _check_pid(self) -> None:
        """After a fork, forget everything built in the parent (it is rebuilt on first use here)."""
        if self._pid != os.getpid():
            self.after_fork()

    def after_fork(self) -> None:
        """Drop inherited resources: the engine's pooled connections are forgotten, not closed."""
        with self._lock:
            engine = self.__dict__.pop("engine", None)
            if engine is not None:
                dispose_engine_after_fork(engine)
            for name in ("session_factory", "store", "provider"):
                self.__dict__.pop(name, None)
            self._pid = os.getpid()

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.settings.database_url)

    @cached_property
    def session_factory(self) -> sessionmaker[Session]:
        return make_session_factory(self.engine)

    @cached_property
    def store(self) -> ObjectStore:
        return make_store_from_settings(self.settings)

    @cached_property
    def provider(self) -> ModelProvider:
        return ModelProvider(
            session_factory=self.session_factory,
            store=self.store,
            cache_dir=self.settings.model_cache_dir,
            device=self.settings.device,
            model_dir=self.settings.model_dir,
            model_version=self.settings.model_version,
            check_interval_s=self.settings.model_check_interval_s,
        )

    @property
    def scoring_options(self) -> ScoringOptions:
        return ScoringOptions(
            incoming_prefix=self.settings.incoming_prefix,
            heatmap_prefix=self.settings.heatmap_prefix,
            heatmaps=self.settings.heatmaps,
            heatmap_format=self.settings.heatmap_format,
            max_object_bytes=self.settings.max_object_bytes,
            max_image_pixels=self.settings.max_image_pixels,
            fetch_threads=self.settings.fetch_threads,
            model_chunk=self.settings.model_chunk,
        )

    def resources(self) -> WorkerContext:
        """This context, after making sure it belongs to the calling process."""
        self._check_pid()
        return self


def create_app(settings: Settings | None = None, *, set_as_current: bool = True) -> Celery:
    """Build the Celery app for ``settings`` (default: :func:`get_settings`) and register the tasks."""
    settings = settings or get_settings()
    app = Celery("waferwatch", set_as_current=set_as_current)
    transport_options = settings.broker_transport_options()
    if settings.broker_is_filesystem:
        transport_options.setdefault("polling_interval", 0.2)  # kombu polls the folder; default is 1 s
        quiet_hostless_transport_warning()
    soft_limit = max(1, settings.task_time_limit_s - max(5, settings.task_time_limit_s // 20))
    app.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue=SCORE_QUEUE,
        task_create_missing_queues=False,
        task_routes={
            SCORE_BATCH: {"queue": SCORE_QUEUE},
            RECONCILE: {"queue": INGEST_QUEUE},
            REDRIVE_LEASES: {"queue": INGEST_QUEUE},
            "waferwatch.train.*": {"queue": TRAIN_QUEUE},
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=soft_limit,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    app.waferwatch_context = WorkerContext(settings)  # type: ignore[attr-defined]
    from worker.tasks import register_tasks  # tasks import this module's names

    register_tasks(app, settings)
    from scheduler.beat import schedule  # the retraining tasks (train queue) and the beat table
    from scheduler.tasks import register_train_tasks

    register_train_tasks(app, settings)
    app.conf.beat_schedule = schedule(settings)
    _connect_signals()
    return app


def context_of(app: Celery) -> WorkerContext:
    """The per-process resources of ``app`` (built by :func:`create_app`)."""
    context: WorkerContext = app.waferwatch_context  # type: ignore[attr-defined]
    return context.resources()


def make_enqueue(app: Celery) -> Callable[[Sequence[int]], None]:
    """A function that sends one ``score_batch`` task for a list of image ids (routed to ``score``)."""

    def enqueue(image_ids: Sequence[int]) -> None:
        if image_ids:
            app.send_task(SCORE_BATCH, args=[list(image_ids)])
            metrics.TASKS_ENQUEUED.inc()

    return enqueue


def workers_idle(app: Celery) -> Callable[[], bool]:
    """The micro-batcher's ``idle`` probe: True when no score task waits in the broker and, on Redis, no
    task of any queue is being worked on (kombu keeps delivered, unacknowledged messages in its
    ``unacked`` hash; with late acks that is every running task). An empty queue alone is not enough:
    each worker process holds the task it runs, so the queue is empty while every worker is busy.
    Other brokers are judged by the queue alone; any doubt (the broker does not answer) means "busy".
    """

    def probe() -> bool:
        try:
            with app.pool.acquire(block=True, timeout=5) as connection:
                channel = connection.default_channel
                if _message_count(channel, SCORE_QUEUE):
                    return False
                client, unacked_key = getattr(channel, "client", None), getattr(channel, "unacked_key", None)
                return client is None or not unacked_key or int(client.hlen(unacked_key)) == 0
        except Exception:  # batching by count and age still works; never stop ingest over a probe
            logger.debug("worker idleness unknown", exc_info=True)
            return False

    return probe


def _message_count(channel: Any, queue: str) -> int:
    """Messages waiting in ``queue``; a queue nobody has declared yet (no worker started, nothing sent) holds 0."""
    try:
        return int(channel.queue_declare(queue=queue, passive=True).message_count)
    except ChannelError as exc:
        if str(getattr(exc, "reply_code", "")) == "404":
            return 0
        raise


def queue_depth(app: Celery, queue: str = SCORE_QUEUE) -> int | None:
    """Messages waiting in ``queue`` (not counting reserved ones), or None when the broker cannot tell."""
    try:
        with app.pool.acquire(block=True, timeout=5) as connection:
            depth = _message_count(connection.default_channel, queue)
    except Exception:  # the gauge is informational; a broker hiccup must not stop ingest
        logger.debug("queue depth of %s unavailable", queue, exc_info=True)
        return None
    metrics.QUEUE_DEPTH.labels(queue=queue).set(depth)
    return depth


# --- signals -------------------------------------------------------------------------------------

_signals_connected = False
_app_lock = threading.Lock()
_app: Celery | None = None


def _current_context() -> WorkerContext | None:
    from celery import current_app

    return getattr(current_app, "waferwatch_context", None)


def _on_worker_process_init(**_: Any) -> None:
    """Prefork child: forget the parent's engine and store, and export this child's metrics."""
    context = _current_context()
    if context is None:
        return
    context.after_fork()
    if context.settings.cpu_threads:
        from models.threads import set_cpu_threads

        set_cpu_threads(context.settings.cpu_threads)
    if not metrics.multiprocess_mode():  # else the parent serves every child's samples
        metrics.start_metrics_server(context.settings.metrics_port)


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Main worker process: it sets the allocator (:mod:`worker.decode_budget`), and exports metrics with a
    solo or threads pool (it is the scoring process) and in multiprocess mode (it serves the sum over its
    prefork children)."""
    context = _current_context()
    pool = str(getattr(sender, "pool_cls", "")).lower()
    if context is not None:  # before the pool forks: builds and scoring alike keep their memory mapped
        from worker.decode_budget import return_large_buffers_to_the_os

        return_large_buffers_to_the_os()
    if context is not None and ("solo" in pool or "thread" in pool or metrics.multiprocess_mode()):
        metrics.start_metrics_server(context.settings.metrics_port)
    if context is not None and ("solo" in pool or "thread" in pool):  # prefork enforces the limit itself
        _install_watchdog(context.settings.task_time_limit_s)


def _install_watchdog(time_limit_s: float) -> None:
    """Watch every task of this process against the hard time limit (``worker.watchdog``)."""
    from worker.watchdog import TaskWatchdog

    watchdog = TaskWatchdog(time_limit_s)

    def started(task_id: str = "", task: Any = None, **_: Any) -> None:
        watchdog.task_started(task_id, getattr(task, "name", "?"))

    def finished(task_id: str = "", **_: Any) -> None:
        watchdog.task_finished(task_id)

    signals.task_prerun.connect(started, weak=False)
    signals.task_postrun.connect(finished, weak=False)


def _connect_signals() -> None:
    global _signals_connected
    if _signals_connected:
        return
    signals.worker_process_init.connect(_on_worker_process_init, weak=False)
    signals.worker_init.connect(_on_worker_init, weak=False)
    _signals_connected = True


def get_app() -> Celery:
    """The process-wide app built from :func:`get_settings` (what ``celery -A worker.app`` loads)."""
    global _app
    with _app_lock:
        if _app is None:
            _app = create_app()
        return _app


def __getattr__(name: str) -> Any:
    """``worker.app.app`` / ``worker.app.celery``: the app, built on first access."""
    if name in ("app", "celery"):
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
