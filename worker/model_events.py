"""The registry's history: append-only ``model_events`` rows, and the one way to activate with a trace.

``model_versions`` holds where a version is now (status, threshold, artifact); this module records how it
got there. Every function takes the session, runs in the caller's unit of work and never commits, like
:mod:`worker.repository`. Nothing here updates or deletes an event.

:func:`activate` is what every activation goes through (the gate, a person's ``promote``, ``rollback``,
``register --activate``): it records ``promoted`` for the new version and ``retired`` for the version it
replaces, in the same transaction as the state change, so the history can never disagree with the
table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker import repository
from worker.schema import MODEL_EVENTS, ModelEvent, ModelVersion, utcnow

__all__ = ["SCHEDULER", "activate", "history", "recent_events", "record_event"]

SCHEDULER: Final = "scheduler"  # the actor of everything the beat, the trainer and the gate do


def record_event(
    session: Session,
    *,
    version: str,
    event: str,
    actor: str = SCHEDULER,
    reason: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> ModelEvent:
    """Append one event to ``version``'s history."""
    if event not in MODEL_EVENTS:
        raise ValueError(f"event must be one of {MODEL_EVENTS}, got {event!r}")
    row = ModelEvent(
        model_version=version, event=event, at=utcnow(), actor=actor, reason=reason, details=dict(details or {})
    )
    session.add(row)
    session.flush()
    return row


def history(session: Session, version: str) -> list[ModelEvent]:
    """Every event of ``version``, oldest first."""
    return list(
        session.scalars(
            select(ModelEvent).where(ModelEvent.model_version == version).order_by(ModelEvent.at, ModelEvent.id)
        )
    )


def recent_events(session: Session, *, limit: int = 50) -> list[ModelEvent]:
    """The newest events of all versions, newest first (the report's registry section)."""
    return list(session.scalars(select(ModelEvent).order_by(ModelEvent.at.desc(), ModelEvent.id.desc()).limit(limit)))


def activate(
    session: Session,
    version: str,
    *,
    actor: str = SCHEDULER,
    how: str,
    reason: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Make ``version`` active (retiring the current one) and record both events.

    ``how`` says which path activated it (``gate``, ``manual``, ``rollback``, ``register``); it goes into
    both events' details, ``details`` into the ``promoted`` one. Activating the active version records
    nothing.
    """
    previous = repository.get_active_model_version(session)
    if previous is not None and previous.id == version:
        return previous
    row = repository.set_active_model_version(session, version)
    if previous is not None:
        record_event(
            session,
            version=previous.id,
            event="retired",
            actor=actor,
            reason=f"replaced by {version} ({how})",
            details={"how": how, "replaced_by": version},
        )
    record_event(
        session,
        version=version,
        event="promoted",
        actor=actor,
        reason=reason,
        details={"how": how, **dict(details or {}), "replaced": previous.id if previous is not None else None},
    )
    return row
