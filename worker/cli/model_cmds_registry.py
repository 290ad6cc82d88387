"""``waferwatch label | models list|show|promote|rollback | retrain | beat | rescore``: the model registry."""

from __future__ import annotations

import getpass
import json
import time
from datetime import UTC, datetime

import typer
from sqlalchemy.orm import Session, sessionmaker

from worker.cli.root import app, console
from worker.cli.tables import identified_table, print_table
from worker.settings import Settings, get_settings

models_app = typer.Typer(help="The model registry: versions, running builds, promotion and rollback.")
app.add_typer(models_app, name="models")


def _session_factory(settings: Settings) -> sessionmaker[Session]:
    from worker.cli.database import require_migrated
    from worker.db import make_engine, make_session_factory

    require_migrated(settings.database_url)
    return make_session_factory(make_engine(settings.database_url))


def _bucket(settings: Settings) -> str:
    from worker.app import make_store_from_settings

    return make_store_from_settings(settings).bucket


@app.command()
def label(
    key: str = typer.Argument(..., help="Object key of the image (e.g. incoming/T1/L1/W1/x.png)."),
    verdict: str = typer.Argument(..., help="good or defect."),
    note: str | None = typer.Option(None, "--note", help="Free text kept with the verdict."),
    author: str | None = typer.Option(None, "--author", help="Who decided (default: the OS user)."),
) -> None:
    """Record a person's verdict on an image: good images join the training pool, defects the evaluation set."""
    from scheduler.registry import label_image
    from worker.db import session_scope

    settings = get_settings()
    with session_scope(_session_factory(settings)) as session:
        row = label_image(
            session, bucket=_bucket(settings), key=key, verdict=verdict, author=author or getpass.getuser(), note=note
        )
        console.print(f"label {row.id}: {key} is {verdict} (by {row.author})")


@models_app.command("list")
def list_models(limit: int = typer.Option(20, "--limit", min=1)) -> None:
    """Versions and running builds, newest first, with status, stage and the gate's reason."""
    from scheduler.registry import list_versions
    from worker.db import session_scope

    table = identified_table("version", "status", "stage", "created", "threshold", "images", "reason")
    with session_scope(_session_factory(get_settings())) as session:
        for row in list_versions(session, limit=limit):
            pool = (row.metrics or {}).get("pool") or {}
            table.add_row(
                row.id,
                row.status,
                row.stage or "",
                f"{row.created_at:%Y-%m-%d %H:%M:%S}",
                "" if row.threshold is None else f"{row.threshold:.4f}",
                str(pool.get("size", len((row.manifest or {}).get("training_images", [])) or "")),
                (row.reason or "")[:80],
            )
    print_table(table)


@models_app.command("show")
def show_model(version: str = typer.Argument(...)) -> None:
    """Everything about one version (JSON): status, thresholds, metrics, gate result, build timings."""
    from worker.db import session_scope
    from worker.schema import ModelVersion

    with session_scope(_session_factory(get_settings())) as session:
        row = session.get(ModelVersion, version)
        if row is None:
            raise typer.BadParameter(f"no model version {version!r}", param_hint="VERSION")
        manifest = dict(row.manifest or {})
        manifest.pop("training_images", None)
        data = {
            "id": row.id,
            "status": row.status,
            "stage": row.stage,
            "reason": row.reason,
            "artifact_uri": row.artifact_uri,
            "threshold": row.threshold,
            "fold_thresholds": row.fold_thresholds,
            "created_at": row.created_at.isoformat(),
            "activated_at": row.activated_at.isoformat() if row.activated_at else None,
            "metrics": row.metrics,
            "manifest": manifest,
        }
    typer.echo(json.dumps(data, indent=2, default=str))


@models_app.command("promote")
def promote_model(version: str = typer.Argument(...)) -> None:
    """Make VERSION active now (a person's decision; the gate is not consulted)."""
    from scheduler.registry import promote
    from worker.db import session_scope

    with session_scope(_session_factory(get_settings())) as session:
        promote(session, version)
    console.print(f"{version} is active; workers switch at their next batch")


@models_app.command("rollback")
def rollback_model() -> None:
    """Re-activate the version that was active before the current one."""
    from scheduler.registry import rollback
    from worker.db import session_scope

    with session_scope(_session_factory(get_settings())) as session:
        old, new = rollback(session)
    console.print(f"rolled back from {old} to {new}; workers switch at their next batch")


@app.command()
def retrain(
    wait: bool = typer.Option(False, "--wait", help="Wait until the build is registered and gated."),
    timeout_s: float = typer.Option(3600.0, "--timeout", min=1),
) -> None:
    """Start a rebuild now on the train workers (same lock as the scheduled triggers)."""
    from sqlalchemy import select

    from scheduler.tasks import start_rebuild
    from worker.app import context_of, create_app
    from worker.db import session_scope
    from worker.schema import ModelVersion

    celery_app = create_app(get_settings())
    build_id, why = start_rebuild(celery_app, "manual")
    if build_id is None:
        console.print(f"no rebuild started: {why}")
        raise typer.Exit(1)
    console.print(f"build {build_id} started ({why})")
    if not wait:
        return
    factory = context_of(celery_app).session_factory
    deadline = time.monotonic() + timeout_s
    last_stage = None
    while time.monotonic() < deadline:
        with session_scope(factory) as session:
            row = session.get(ModelVersion, build_id)
            stage, status, reason = (row.stage, row.status, row.reason) if row is not None else (None, None, None)
            if row is None:
                recent = session.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc()).limit(20))
                built = [r for r in recent if ((r.metrics or {}).get("build") or {}).get("build_id") == build_id]
        if row is not None and status == "failed":
            console.print(f"[red]build failed:[/red] {reason}")
            raise typer.Exit(1)
        if row is None and built and built[0].stage is None:
            done = built[0]
            console.print(f"{done.id}: {done.status}" + (f" ({done.reason})" if done.reason else ""))
            raise typer.Exit(0 if done.status == "active" else 2)
        if stage != last_stage and stage:
            console.print(f"  {stage}")
            last_stage = stage
        time.sleep(1.0)
    console.print("[red]timed out waiting for the build[/red]")
    raise typer.Exit(1)


@app.command()
def beat(
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
    schedule_file: str = typer.Option("var/celerybeat-schedule", "--schedule", help="Beat's state file."),
) -> None:
    """Run Celery beat with the retraining and reconciliation schedule (see scheduler/beat.py)."""
    from pathlib import Path

    from worker.app import create_app

    settings = get_settings()
    celery_app = create_app(settings)
    Path(schedule_file).parent.mkdir(parents=True, exist_ok=True)
    for name, entry in celery_app.conf.beat_schedule.items():
        console.print(f"beat: {name} → {entry['task']} ({entry['schedule']})")
    celery_app.start(["beat", f"--loglevel={loglevel}", f"--schedule={schedule_file}"])


@app.command()
def rescore(
    since: datetime = typer.Option(..., "--since", help="First-seen date/time (UTC), e.g. 2026-03-01."),
) -> None:
    """Re-score history with the active version: new inference rows, the old ones are kept."""
    from scheduler.registry import images_to_rescore
    from worker import repository
    from worker.app import create_app, make_enqueue
    from worker.db import session_scope

    settings = get_settings()
    celery_app = create_app(settings)
    since = since if since.tzinfo else since.replace(tzinfo=UTC)
    with session_scope(_session_factory(settings)) as session:
        active = repository.get_active_model_version(session)
        if active is None:
            raise typer.BadParameter("no active model version", param_hint="--since")
        ids = images_to_rescore(session, bucket=_bucket(settings), since=since, version=active.id)
    enqueue = make_enqueue(celery_app)
    for begin in range(0, len(ids), settings.batch_size):
        enqueue(ids[begin : begin + settings.batch_size])
    console.print(f"{len(ids)} images since {since:%Y-%m-%d %H:%M} queued for {active.id}")
