"""The report's registry section: versions with their gate result and the history, on both backends."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from scheduler import registry
from worker import model_events, repository
from worker.db import session_scope
from worker.report_html import collect_page, render_page
from worker.report_registry import collect_registry


def test_registry_section_shows_versions_gate_results_and_history(
    db_engine: Engine, session_factory: sessionmaker[Session]
) -> None:
    long_id = "0123456789abcdef" * 4  # 64 characters: shown whole
    held = {"gate": {"passed": False, "reasons": ["synthetic_recall 0.1000 < bound 0.3000"]}}
    with session_scope(session_factory) as session:
        repository.ensure_model_version(session, version="first-version", artifact_uri="models/a/", threshold=1.5)
        model_events.record_event(session, version="first-version", event="registered", actor="kim")
        model_events.activate(session, "first-version", actor="kim", how="register")
        repository.ensure_model_version(session, version=long_id, artifact_uri="models/b/", metrics=held)
        repository.update_model_version(session, version=long_id, reason="gate: synthetic_recall 0.1000 < 0.3")
        model_events.record_event(session, version=long_id, event="gated", reason="synthetic_recall 0.1000 < 0.3")
    with session_scope(session_factory) as session:
        registry.promote(session, long_id, author="lee", reason="customer hold", force=True)
    with db_engine.connect() as connection:
        section = collect_registry(connection)
        document = render_page(collect_page(connection))
    assert [(v.id, v.status, v.gate) for v in section.versions] == [
        (long_id, "active", "held back"),
        ("first-version", "retired", ""),
    ]
    assert [(e.version, e.event, e.actor, e.overridden) for e in section.events][:3] == [
        (long_id, "promoted", "lee", True),
        ("first-version", "retired", "lee", False),
        (long_id, "gated", "scheduler", False),
    ]
    registry_part = document[document.index('<h2 id="registry">') : document.index('<h2 id="tables">')]
    assert f"<code>{long_id}</code>" in registry_part
    assert "promoted (gate overridden)" in registry_part and "customer hold" in registry_part
    assert "held back" in registry_part and "gate overridden by lee: customer hold" in registry_part


def test_registry_section_when_nothing_is_registered(db_engine: Engine) -> None:
    with db_engine.connect() as connection:
        document = render_page(collect_page(connection))
    assert "no model version registered" in document
