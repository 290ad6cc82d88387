"""The HTML report's registry section: every model version with its gate result, and the recent history.

Kept apart from :mod:`worker.report_html` (which draws the defect plots): this module reads
``model_versions`` and ``model_events`` through a connection and renders two plain tables, so an
engineer reading the report sees which version scored, which ones the gate held back and why, and who
promoted or rolled back what, overriding the gate or not.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import Connection, select

from worker.schema import ModelEvent, ModelVersion

__all__ = ["RegistryEvent", "RegistrySection", "RegistryVersion", "collect_registry", "registry_html"]

MAX_VERSIONS: Final = 50
MAX_EVENTS: Final = 100


@dataclass(frozen=True, slots=True)
class RegistryVersion:
    id: str
    status: str
    created_at: datetime
    activated_at: datetime | None
    threshold: float | None
    gate: str  # "passed", "held back", or "" (never gated)
    reason: str


@dataclass(frozen=True, slots=True)
class RegistryEvent:
    at: datetime
    version: str
    event: str
    actor: str
    reason: str
    overridden: bool


@dataclass(slots=True)
class RegistrySection:
    versions: list[RegistryVersion] = field(default_factory=list)
    events: list[RegistryEvent] = field(default_factory=list)


def _aware(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)  # SQLite returns naive UTC through Core
    return value


def collect_registry(connection: Connection) -> RegistrySection:
    """Versions newest first (builds in progress included) and the newest events."""
    section = RegistrySection()
    versions = connection.execute(
        select(ModelVersion.__table__).order_by(ModelVersion.created_at.desc()).limit(MAX_VERSIONS)
    ).mappings()
    for row in versions:
        gate = (row["metrics"] or {}).get("gate")
        verdict = "" if not gate else ("passed" if gate.get("passed") else "held back")
        section.versions.append(
            RegistryVersion(
                id=row["id"],
                status=row["status"],
                created_at=_aware(row["created_at"]),
                activated_at=_aware(row["activated_at"]),
                threshold=row["threshold"],
                gate=verdict,
                reason=row["reason"] or "",
            )
        )
    events = connection.execute(
        select(ModelEvent.__table__).order_by(ModelEvent.at.desc(), ModelEvent.id.desc()).limit(MAX_EVENTS)
    ).mappings()
    for row in events:
        details = row["details"] or {}
        section.events.append(
            RegistryEvent(
                at=_aware(row["at"]),
                version=row["model_version"],
                event=row["event"],
                actor=row["actor"],
                reason=row["reason"] or "",
                overridden=bool(details.get("gate_overridden")),
            )
        )
    return section


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _time(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def registry_html(section: RegistrySection) -> str:
    """The section's HTML: a versions table and a history table (ids in full, never shortened)."""
    parts = ['<h2 id="registry">Model registry</h2>']
    if not section.versions:
        parts.append('<p class="empty-table">no model version registered</p>')
        return "".join(parts)
    parts.append('<table class="report" data-report="registry-versions"><thead><tr>')
    parts.append("".join(f"<th>{name}</th>" for name in ("version", "status", "created", "activated",
                                                          "threshold", "gate", "reason")))  # fmt: skip
    parts.append("</tr></thead><tbody>")
    for version in section.versions:
        threshold = "" if version.threshold is None else f"{version.threshold:.4g}"
        parts.append(
            f'<tr class="status-{_e(version.status)}"><td><code>{_e(version.id)}</code></td>'
            f"<td>{_e(version.status)}</td><td>{_time(version.created_at)}</td><td>{_time(version.activated_at)}</td>"
            f'<td class="num">{threshold}</td><td>{_e(version.gate)}</td><td>{_e(version.reason)}</td></tr>'
        )
    parts.append("</tbody></table>")
    parts.append('<h3 id="registry-history">History</h3>')
    if not section.events:
        parts.append('<p class="empty-table">no events recorded</p>')
        return "".join(parts)
    parts.append('<table class="report" data-report="registry-history"><thead><tr>')
    parts.append("".join(f"<th>{name}</th>" for name in ("at", "version", "event", "by", "reason")))
    parts.append("</tr></thead><tbody>")
    for event in section.events:
        label = event.event + (" (gate overridden)" if event.overridden else "")
        parts.append(
            f"<tr><td>{_time(event.at)}</td><td><code>{_e(event.version)}</code></td><td>{_e(label)}</td>"
            f"<td>{_e(event.actor)}</td><td>{_e(event.reason)}</td></tr>"
        )
    parts.append("</tbody></table>")
    return "".join(parts)
