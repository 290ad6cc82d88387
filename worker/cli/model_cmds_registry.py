"""``waferwatch label | models list|show|register|calibrate|promote|rollback | pool remove | retrain | beat |
rescore``."""

from __future__ import annotations

import getpass
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import typer
from sqlalchemy.orm import Session, sessionmaker

from worker.cli.root import app, console
from worker.cli.tables import identified_table, print_table
from worker.settings import Settings, get_settings

models_app = typer.Typer(help="The model registry: versions, running builds, promotion and rollback.")
app.add_typer(models_app, name="models")
pool_app = typer.Typer(help="The training pool: what rebuilds learn from.")
app.add_typer(pool_app, name="pool")

AuthorOpt = typer.Option(None, "--author", help="Who decided (default: the OS user); kept in the history.")


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
        rows = list_versions(session, limit=limit)
        for row in rows:
            pool = (row.metrics or {}).get("pool") or {}
            table.add_row(
                row.id,
                row.status,
                row.stage or "",
                f"{row.created_at:%Y-%m-%d %H:%M:%S}",
                "" if row.threshold is None else f"{row.threshold:.4f}",
                str(pool.get("size", len((row.manifest or {}).get("training_images", [])) or "")),
                row.reason or "",
            )
    print_table(table)


@models_app.command("show")
def show_model(version: str = typer.Argument(...)) -> None:
    """Everything about one version (JSON): status, thresholds, metrics, gate result, build timings, and its
    history (registered/built, every gate run, promotions with who and why, rollbacks, rebuilds)."""
    from worker.db import session_scope
    from worker.model_events import history
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
            "history": [
                {
                    "at": event.at.isoformat(),
                    "event": event.event,
                    "actor": event.actor,
                    "reason": event.reason,
                    "details": event.details,
                }
                for event in history(session, version)
            ],
        }
    typer.echo(json.dumps(data, indent=2, default=str))


@models_app.command("register")
def register_model_cmd(
    directory: Path = typer.Argument(..., help="A model directory from 'waferwatch train'."),
    images: Path | None = typer.Option(
        None, "--images", help="The folder or CSV it was trained from: its images join the training pool."
    ),
    activate: bool = typer.Option(False, "--activate", help="Make it the active version now."),
    author: str | None = AuthorOpt,
    reason: str | None = typer.Option(None, "--reason", help="Why (kept in the history)."),
) -> None:
    """Verify a model directory (hashes, manifest, version), upload it to the bucket and add the version."""
    from scheduler.registry import register_model
    from worker.app import make_store_from_settings

    settings = get_settings()
    store = make_store_from_settings(settings)
    done = register_model(
        store,
        _session_factory(settings),
        directory,
        model_prefix=settings.model_prefix,
        nominal_prefix=settings.nominal_prefix,
        images=images,
        activate=activate,
        author=author or getpass.getuser(),
        reason=reason,
    )
    state = "active" if done.active else "registered"
    known = "new" if done.created else "already known"
    console.print(f"{done.version} {state} ({known}) at {settings.model_prefix}{done.version}/")
    if images is not None:
        console.print(
            f"{done.uploaded_images} training images in the pool under {settings.nominal_prefix}{done.version}/"
        )
    else:
        console.print(
            f"[yellow]its {done.training_images} training images are not in the pool:[/yellow] rebuilds refuse to "
            "forget them; register again with --images SOURCE"
        )


@models_app.command("calibrate")
def calibrate_model_cmd(
    version: str = typer.Argument(..., help="The version whose threshold is refitted (it is not changed)."),
    min_labels: int | None = typer.Option(
        None, "--min-labels", min=1, help="Labelled images of each class needed (default: gate_min_labels)."
    ),
    author: str | None = AuthorOpt,
    reason: str | None = typer.Option(None, "--reason", help="Why (kept in the history)."),
) -> None:
    """Refit VERSION's threshold on the reviewed images (good + defect labels, F1-optimal) and register the
    result as a new candidate version (rule 'labelled'); exit 2 when there are too few labels."""
    from scheduler.calibrate import NotEnoughLabelsError, calibrate_version
    from worker.app import make_store_from_settings

    settings = get_settings()
    needed = min_labels if min_labels is not None else settings.gate_min_labels
    try:
        done = calibrate_version(
            make_store_from_settings(settings),
            _session_factory(settings),
            version,
            model_prefix=settings.model_prefix,
            cache_dir=settings.model_cache_dir,
            min_labels=needed,
            author=author or getpass.getuser(),
            reason=reason,
            device=settings.device,
        )
    except NotEnoughLabelsError as exc:
        console.print(f"[red]not calibrated:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(2) from None
    c = done.calibration
    console.print(
        f"{done.version} {'registered' if done.created else 'already known'} as a candidate, calibrated from "
        f"{version}: threshold {done.record['old_threshold']:.4f} → {c.threshold:.4f} on {c.n_good} good / "
        f"{c.n_defect} defect images: F1 {c.f1:.3f}, precision {c.precision:.3f}, recall {c.recall:.3f}, "
        f"false alarms {c.false_alarm_rate:.3f}",
        soft_wrap=True,
    )
    console.print(f"promote it with: waferwatch models promote {done.version}", soft_wrap=True)


@models_app.command("promote")
def promote_model(
    version: str = typer.Argument(...),
    author: str | None = AuthorOpt,
    reason: str | None = typer.Option(None, "--reason", help="Why (required with --force; kept in the history)."),
    force: bool = typer.Option(False, "--force", help="Promote a version the gate held back."),
) -> None:
    """Make VERSION active now: a person's decision, recorded with author and reason (--force over a failed gate)."""
    from scheduler.registry import promote
    from worker.db import session_scope

    with session_scope(_session_factory(get_settings())) as session:
        row = promote(session, version, author=author or getpass.getuser(), reason=reason, force=force)
        overridden = row.reason is not None and row.reason.startswith("gate overridden")
    console.print(
        f"{version} is active{' (gate overridden)' if overridden else ''}; workers switch at their next batch"
    )


@models_app.command("rollback")
def rollback_model(
    author: str | None = AuthorOpt,
    reason: str | None = typer.Option(None, "--reason", help="Why (kept in the history)."),
) -> None:
    """Re-activate the version that was active before the current one."""
    from scheduler.registry import rollback
    from worker.db import session_scope

    with session_scope(_session_factory(get_settings())) as session:
        old, new = rollback(session, author=author or getpass.getuser(), reason=reason)
    console.print(f"rolled back from {old} to {new}; workers switch at their next batch")


@pool_app.command("remove")
def pool_remove(
    key: str = typer.Argument(..., help="Object key of the image, e.g. nominal/2026-03/x.png."),
    reason: str = typer.Option(..., "--reason", help="Why it must not be trained on (kept on the image)."),
    author: str | None = AuthorOpt,
) -> None:
    """Take an image out of the training pool for good (rebuilds may then train on fewer images)."""
    from scheduler.registry import remove_from_pool
    from worker.db import session_scope

    settings = get_settings()
    with session_scope(_session_factory(settings)) as session:
        count = remove_from_pool(
            session, bucket=_bucket(settings), key=key, author=author or getpass.getuser(), reason=reason
        )
    console.print(f"{key}: {count} object version(s) out of the pool")


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
    from worker.schema import ModelEvent, ModelVersion

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
                again = session.scalars(
                    select(ModelEvent).where(ModelEvent.event == "rebuilt").order_by(ModelEvent.at.desc()).limit(20)
                ).all()
                rebuilt = [e for e in again if ((e.details or {}).get("build") or {}).get("build_id") == build_id]
                if rebuilt:
                    console.print(f"{rebuilt[0].model_version}: rebuilt unchanged ({rebuilt[0].reason})")
                    raise typer.Exit(0)
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
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until every queued image is scored or failed."),
    timeout_s: float = typer.Option(3600.0, "--timeout", min=1, help="Give up waiting after this many seconds."),
) -> None:
    """Re-score history with the active version: new inference rows, the old ones are kept. Reports when done
    (exit 0), with the images that failed (exit 2) or that were still unscored at --timeout (exit 1)."""
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
    version = active.id
    console.print(f"{len(ids)} images since {since:%Y-%m-%d %H:%M} queued for {version}")
    if not wait or not ids:
        return
    scored, failed = _wait_rescored(_session_factory(settings), ids, version, timeout_s)
    left = len(ids) - scored - failed
    console.print(f"rescore by {version}: {scored} scored, {failed} failed, {left} not done")
    if left:
        raise typer.Exit(1)
    if failed:
        raise typer.Exit(2)


def _wait_rescored(factory: sessionmaker[Session], ids: list[int], version: str, timeout_s: float) -> tuple[int, int]:
    """(scored by ``version``, failed) among ``ids``, polled until all are one or the other or time is up."""
    from sqlalchemy import func, select

    from worker.db import session_scope
    from worker.schema import Image, Inference

    deadline = time.monotonic() + timeout_s
    chunks = [ids[begin : begin + 500] for begin in range(0, len(ids), 500)]
    last = -1
    while True:
        scored = failed = 0
        with session_scope(factory) as session:
            for chunk in chunks:
                scored += (
                    session.scalar(
                        select(func.count(func.distinct(Inference.image_id))).where(
                            Inference.image_id.in_(chunk), Inference.model_version == version
                        )
                    )
                    or 0
                )
                failed += session.scalar(select(func.count()).where(Image.id.in_(chunk), Image.status == "failed")) or 0
        if scored + failed >= len(ids) or time.monotonic() > deadline:
            return scored, failed
        if scored + failed != last:
            console.print(f"  {scored + failed}/{len(ids)}")
            last = scored + failed
        time.sleep(1.0)
