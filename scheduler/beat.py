"""The beat table, in one place, from settings.

* ``waferwatch.check_retrain`` every ``retrain_check_interval_s`` (default 5 min): count the pool images
  added since the last build and start a rebuild at ``retrain_threshold`` (default 50);
* ``waferwatch.nightly_retrain`` at ``nightly_retrain_time`` in ``nightly_retrain_zone`` (default 02:00
  UTC; fabs schedule in local time, so any IANA zone such as ``Asia/Seoul``, daylight saving included):
  rebuild if the pool changed since the last build;
* ``waferwatch.reconcile`` every ``reconcile_interval_s`` (default 10 min): the pipeline's bucket scan;
* ``waferwatch.redrive_leases`` every ``redrive_interval_s`` (default 20 s): re-enqueue the images of a
  worker that died or hung (their lease expired; ``worker/leases.py``).

Periodic messages expire after one period, so a beat that ran while no worker listened does not leave a
pile of identical checks behind. Several beat processes are harmless: every trigger goes through the
rebuild lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from celery.schedules import crontab

from scheduler.tasks import CHECK_RETRAIN, NIGHTLY_RETRAIN
from worker.app import INGEST_QUEUE, RECONCILE, REDRIVE_LEASES, TRAIN_QUEUE
from worker.settings import Settings

__all__ = ["ZonedCrontab", "schedule"]


class ZonedCrontab(crontab):
    """A crontab read in its own IANA zone instead of Celery's app timezone (one entry in local time
    while the rest of the schedule, and the stored timestamps, stay UTC)."""

    def __init__(self, minute: Any = "*", hour: Any = "*", *args: Any, zone: str = "UTC", **kwargs: Any) -> None:
        super().__init__(minute, hour, *args, **kwargs)
        self.zone = zone
        self._orig_kwargs = {**kwargs, "zone": zone}  # crontab pickles its kwargs (beat's schedule file)

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        self.zone = state.pop("zone", "UTC")
        super().__setstate__(state)
        self._orig_kwargs = {**state, "zone": self.zone}

    @property
    def tz(self) -> tzinfo:
        return ZoneInfo(self.zone)

    def __repr__(self) -> str:
        return f"<crontab: {self._orig_minute} {self._orig_hour} * * * ({self.zone})>"


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
            "schedule": ZonedCrontab(hour=hour, minute=minute, zone=settings.nightly_retrain_zone),
            "options": {"queue": TRAIN_QUEUE, "expires": 3600},
        },
        "reconcile": {
            "task": RECONCILE,
            "schedule": settings.reconcile_interval_s,
            "options": {"queue": INGEST_QUEUE, "expires": settings.reconcile_interval_s},
        },
        "redrive-leases": {
            "task": REDRIVE_LEASES,
            "schedule": settings.redrive_interval_s,
            "options": {"queue": INGEST_QUEUE, "expires": settings.redrive_interval_s},
        },
    }
