"""``waferwatch ingest --source …`` and ``waferwatch reconcile``: get objects from the bucket into the pipeline.

Settings are read here, at the entry point; the event source, the ingestor and the Celery app are built
from them and everything below receives plain values.
"""

from __future__ import annotations

import json
import signal
import threading
from enum import StrEnum
from types import FrameType
from typing import TYPE_CHECKING

import typer

from worker.cli.root import app, console
from worker.settings import Settings, get_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from worker.ingest import Enqueue
    from worker.reconcile import ReconcileReport
    from worker.storage import ObjectStore


class SourceName(StrEnum):
    """Where object notifications come from."""

    SQS = "sqs"
    WEBHOOK = "webhook"
    REDIS = "redis"
    FOLDER = "folder"


def _install_stop_handlers(stop_event: threading.Event) -> None:
    def stop(signum: int, _frame: FrameType | None) -> None:
        console.print(f"signal {signal.Signals(signum).name}: stopping after the current poll")
        stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


@app.command()
def ingest(
    source: SourceName = typer.Option(SourceName.FOLDER, "--source", "-s", help="sqs, webhook, redis or folder."),
    metrics_port: int | None = typer.Option(None, "--metrics-port", help="Serve /metrics here (0: off)."),
    reconcile_first: bool = typer.Option(
        True, "--reconcile/--no-reconcile", help="Run one reconciliation pass before listening."
    ),
) -> None:
    """Listen for new objects, register them in the database and send score_batch tasks in micro-batches."""
    from worker.app import create_app, make_enqueue, make_store_from_settings, queue_depth, workers_idle
    from worker.db import make_engine, make_session_factory
    from worker.ingest import build_source, make_ingestor, run_ingest
    from worker.metrics import start_metrics_server

    settings = get_settings()
    celery_app = create_app(settings)
    engine = make_engine(settings.database_url)
    session_factory = make_session_factory(engine)
    store = make_store_from_settings(settings)
    enqueue = make_enqueue(celery_app)
    start_metrics_server(settings.metrics_port if metrics_port is None else metrics_port)
    if reconcile_first:
        _reconcile(settings, session_factory, store, enqueue)
    ingestor = make_ingestor(
        settings,
        session_factory=session_factory,
        enqueue=enqueue,
        bucket=store.bucket,
        idle=workers_idle(celery_app),
    )
    try:
        event_source = build_source(source.value, settings, ingestor, bucket=store.bucket)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--source") from exc
    stop_event = threading.Event()
    _install_stop_handlers(stop_event)
    console.print(f"ingest: listening on {source.value} for {store.bucket}/{settings.incoming_prefix}")
    try:
        run_ingest(event_source, ingestor, stop_event, on_idle=lambda: queue_depth(celery_app))
    finally:
        engine.dispose()


def _reconcile(
    settings: Settings, session_factory: sessionmaker[Session], store: ObjectStore, enqueue: Enqueue
) -> ReconcileReport:
    from worker.reconcile import reconcile_with_settings

    return reconcile_with_settings(settings, session_factory=session_factory, store=store, enqueue=enqueue)


@app.command("reconcile")
def reconcile_command(
    stale_after_s: int | None = typer.Option(
        None, "--stale-after", help="Re-send images queued longer than this many seconds (default: settings)."
    ),
) -> None:
    """List the bucket's incoming/ and nominal/ prefixes, register objects that have no row, send their tasks."""
    from worker.app import create_app, make_enqueue, make_store_from_settings
    from worker.db import make_engine, make_session_factory

    settings = get_settings()
    if stale_after_s is not None:
        settings = settings.model_copy(update={"reconcile_stale_after_s": stale_after_s})
    celery_app = create_app(settings)
    engine = make_engine(settings.database_url)
    try:
        report = _reconcile(
            settings, make_session_factory(engine), make_store_from_settings(settings), make_enqueue(celery_app)
        )
    finally:
        engine.dispose()
    typer.echo(json.dumps(report.as_dict(), sort_keys=True))
