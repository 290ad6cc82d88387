"""The Celery tasks: explicit names, ids in, plain functions doing the work.

``waferwatch.score_batch`` (queue ``score``) scores a micro-batch of image ids with
:func:`worker.scoring.score_batch`, holding a lease on their rows (:mod:`worker.leases`) while it runs;
``waferwatch.reconcile`` (queue ``ingest``) runs :func:`worker.reconcile.reconcile_with_settings`;
``waferwatch.redrive_leases`` (queue ``ingest``, every ``redrive_interval_s`` from beat) re-enqueues the
rows of workers that died or hung.

Transient errors of a batch (storage, database, no model yet) are retried with exponential backoff
(``retry_backoff_s`` doubling up to ``retry_backoff_max_s``, half of it jittered) for ``retry_total_s``
after the batch's first attempt (15 min by default), so an outage of minutes is outlasted. Then the images
still ``queued`` are dead-lettered in ``failures``; if even that cannot be written (the database is the
thing that is down), the batch keeps retrying at ``retry_backoff_max_s``: it is never acknowledged while
its images are in no terminal state. Permanent errors never reach this layer as exceptions: scoring
records them per image and the message is acknowledged.

Tasks are registered on an app by :func:`register_tasks` (called by :func:`worker.app.create_app`), so the
retry policy comes from the same settings as the app.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from celery import Celery, Task

from worker.app import RECONCILE, REDRIVE_LEASES, SCORE_BATCH, WorkerContext, context_of, make_enqueue
from worker.errors import TransientError
from worker.leases import LeaseHeartbeat, claim, extend, lease_owner, redrive_expired, release
from worker.reconcile import reconcile_with_settings
from worker.scoring import record_gave_up, score_batch
from worker.settings import Settings

__all__ = ["backoff_s", "register_tasks"]

logger = logging.getLogger(__name__)

_jitter = random.SystemRandom()


def backoff_s(settings: Settings, retries: int) -> float:
    """Seconds before retry number ``retries + 1``: ``retry_backoff_s * 2**retries`` capped at
    ``retry_backoff_max_s``, the upper half jittered (workers that failed together do not retry together,
    and no retry comes immediately, as full jitter allows)."""
    ceiling = min(settings.retry_backoff_max_s, settings.retry_backoff_s * 2 ** min(retries, 32))
    return ceiling / 2 + _jitter.uniform(0, ceiling / 2)


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

    @app.task(bind=True, name=SCORE_BATCH, shared=False, acks_late=True, ignore_result=True, max_retries=None)
    def score_batch_task(self: Task, image_ids: list[int], first_attempt_at: float | None = None) -> None:
        context = context_of(self.app)
        first_attempt_at = first_attempt_at or time.time()
        try:
            _score_leased(self, context, image_ids)
        except TransientError as exc:
            retry_in = backoff_s(context.settings, self.request.retries)
            kwargs = {"first_attempt_at": first_attempt_at}
            if time.time() - first_attempt_at + retry_in <= context.settings.retry_total_s:
                _hold_lease(context, image_ids, retry_in)
                raise self.retry(exc=exc, countdown=retry_in, kwargs=kwargs) from exc
            try:
                record_gave_up(context.session_factory, image_ids, exc)
                release(context.session_factory, image_ids, owner=lease_owner())
            except TransientError as recording:  # the database is down: not done, try again later
                logger.warning("batch of %d images gave up but cannot record it: %s", len(image_ids), recording)
                raise self.retry(exc=exc, countdown=context.settings.retry_backoff_max_s, kwargs=kwargs) from exc
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

    @app.task(bind=True, name=REDRIVE_LEASES, shared=False, acks_late=True, ignore_result=True)
    def redrive_leases_task(self: Task) -> None:
        context = context_of(self.app)
        redrive_expired(
            context.session_factory,
            enqueue=make_enqueue(self.app),
            max_redrives=context.settings.max_redrives,
            batch_size=context.settings.batch_size,
        )


def _score_leased(task: Task, context: WorkerContext, image_ids: list[int]) -> None:
    """Claim the batch's rows, score them while a heartbeat renews the lease, release the finished ones."""
    owner, lease_s = lease_owner(), context.settings.lease_s
    claim(context.session_factory, image_ids, owner=owner, lease_s=lease_s)
    with LeaseHeartbeat(context.session_factory, image_ids, owner=owner, lease_s=lease_s):
        score_batch(
            image_ids,
            session_factory=context.session_factory,
            store=context.store,
            model=context.provider.current,
            options=context.scoring_options,
            enqueue=make_enqueue(task.app),  # the current version of an object overwritten meanwhile
        )
    release(context.session_factory, image_ids, owner=owner)


def _hold_lease(context: WorkerContext, image_ids: list[int], retry_in: float) -> None:
    """Keep the rows leased while the retry waits (this worker holds the delayed message); best effort:
    with the database down the lease may expire and the rows be re-driven, which is harmless."""
    try:
        extend(context.session_factory, image_ids, owner=lease_owner(), lease_s=retry_in + context.settings.lease_s)
    except TransientError:
        logger.info("lease of %d images not extended for the retry (database unavailable)", len(image_ids))
