"""The Celery tasks: explicit names, ids in, plain functions doing the work.

``waferwatch.score_batch`` (queue ``score``) scores a micro-batch of image ids with
:func:`worker.scoring.score_batch`; ``waferwatch.reconcile`` (queue ``ingest``) runs
:func:`worker.reconcile.reconcile_with_settings`. Transient errors (storage, database, no model yet) are retried with
exponential backoff and full jitter up to ``task_max_attempts`` attempts; when the last attempt fails, the
images of the batch still ``queued`` are dead-lettered in ``failures``. Permanent errors never reach this
layer as exceptions: scoring records them per image and the message is acknowledged.

Tasks are registered on an app by :func:`register_tasks` (called by :func:`worker.app.create_app`), so the
retry policy comes from the same settings as the app.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task

from worker.app import RECONCILE, SCORE_BATCH, context_of, make_enqueue
from worker.errors import TransientError
from worker.reconcile import reconcile_with_settings
from worker.scoring import record_gave_up, score_batch
from worker.settings import Settings

__all__ = ["register_tasks"]


def register_tasks(app: Celery, settings: Settings) -> None:
    """Define the waferwatch tasks on ``app`` with the retry policy of ``settings``."""
    retry_policy: dict[str, Any] = {
        "autoretry_for": (TransientError,),
        "retry_backoff": settings.retry_backoff_s,
        "retry_backoff_max": int(settings.retry_backoff_max_s),
        "retry_jitter": True,
        "max_retries": settings.task_max_attempts - 1,
        "acks_late": True,
        "ignore_result": True,
    }

    @app.task(bind=True, name=SCORE_BATCH, shared=False, **retry_policy)
    def score_batch_task(self: Task, image_ids: list[int]) -> None:
        context = context_of(self.app)
        try:
            score_batch(
                image_ids,
                session_factory=context.session_factory,
                store=context.store,
                model=context.provider.current,
                options=context.scoring_options,
                enqueue=make_enqueue(self.app),  # the current version of an object overwritten meanwhile
            )
        except TransientError as exc:
            if self.request.retries >= (self.max_retries or 0):
                record_gave_up(context.session_factory, image_ids, exc)
            raise

    @app.task(bind=True, name=RECONCILE, shared=False, **retry_policy)
    def reconcile_task(self: Task) -> None:
        context = context_of(self.app)
        reconcile_with_settings(
            context.settings,
            session_factory=context.session_factory,
            store=context.store,
            enqueue=make_enqueue(self.app),
        )
