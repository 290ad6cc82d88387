"""The beat table, in one place, from settings.

* ``waferwatch.check_retrain`` every ``retrain_check_interval_s`` (default 5 min): count the pool images
  added since the last build and start a rebuild at ``retrain_threshold`` (default 50);
* ``waferwatch.nightly_retrain`` at ``nightly_retrain_time`` (default 02:00, Celery's timezone, UTC by
  default): rebuild if the pool changed since the last build;
* ``waferwatch.reconcile`` every ``reconcile_interval_s`` (default 10 min): the pipeline's bucket scan.

Periodic messages expire after one period, so a beat that ran while no worker listened does not leave a
pile of identical checks behind. Several beat processes are harmless: every trigger goes through the
rebuild lock.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

from scheduler.tasks import CHECK_RETRAIN, NIGHTLY_RETRAIN
from worker.app import INGEST_QUEUE, RECONCILE, TRAIN_QUEUE
from worker.settings import Settings

__all__ = ["schedule"]


def schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """``app.conf.beat_schedule`` for ``settings``."""
    hour, minute = (int(part) for part in settings.nightly_retrain_time.split(":"))
    return {
        "check-retrain": {
            "task": CHECK_RETRAIN,
            "schedule": settings.retrain_check_interval_s,
            "options": {"queue": TRAIN_QUEUE, "expires": settings.retrain_check_interval_s},
        },
        "nightly-retrain": {
            "task": NIGHTLY_RETRAIN,
            "schedule": crontab(hour=hour, minute=minute),
            "options": {"queue": TRAIN_QUEUE, "expires": 3600},
        },
        "reconcile": {
            "task": RECONCILE,
            "schedule": settings.reconcile_interval_s,
            "options": {"queue": INGEST_QUEUE, "expires": settings.reconcile_interval_s},
        },
    }
