"""``waferwatch report NAME|sql`` and ``waferwatch status``: read the history and see the system.

Settings are read here and only URLs and values are passed to :mod:`worker.reports` and
:mod:`worker.report_html`. Tables go to stdout (or ``--out``), so reports can be piped; messages go to
the shared stderr console.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from worker.cli.database import require_migrated
from worker.cli.root import app, console
from worker.reports import (
    REPORTS,
    ReportFilters,
    ReportResult,
    get_report,
    parse_time,
    run_read_only_sql,
    run_report,
    to_csv,
    to_json,
    to_jsonable,
)
from worker.settings import Settings, get_settings, mask_url

QUEUES = ("score", "train", "ingest")


class ReportFormat(StrEnum):
    """Output formats of ``waferwatch report``."""

    TABLE = "table"
    CSV = "csv"
    JSON = "json"
    HTML = "html"


class StatusFormat(StrEnum):
    """Output formats of ``waferwatch status`` (no html: it is a snapshot, not a report)."""

    TABLE = "table"
    JSON = "json"


report_app = typer.Typer(
    help=(
        "Reports over the SQL views (one command per view), `all` for the HTML page with plots, "
        "`sql` for a read-only query of your own."
    ),
    no_args_is_help=True,
)
app.add_typer(report_app, name="report")

URL_OPTION = typer.Option(None, "--url", help="Database URL (default: WAFERWATCH_DATABASE_URL / settings).")
FORMAT_OPTION = typer.Option(ReportFormat.TABLE, "--format", "-f", help="table, csv, json or html.")
OUT_OPTION = typer.Option(None, "--out", "-o", help="Write to this file instead of stdout.")


def _database_url(url: str | None) -> str:
    from worker.db import normalize_database_url

    return normalize_database_url(url) if url else get_settings().database_url


def _filters(since: str | None, until: str | None, lot: str | None, tool: str | None) -> ReportFilters:
    try:
        return ReportFilters(
            since=parse_time(since) if since else None,
            until=parse_time(until) if until else None,
            lot=lot,
            tool=tool,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _storage_loaders(settings: Settings) -> tuple[Any, Any]:
    """``load_heatmap(key)`` and ``load_image(record)`` over the configured storage, for the page's
    thumbnails; both give None on any error, with a warning (a missing picture must not stop the report;
    the page says so). One store per bucket, built on first use, one attempt per object."""
    from worker.app import make_store_from_settings
    from worker.cli.heatmap_cmds import MAX_OVERLAY_BYTES
    from worker.overlays import read_object
    from worker.storage import ObjectStore

    stores: dict[str | None, ObjectStore] = {}

    def store(bucket: str | None) -> ObjectStore:
        if bucket not in stores:
            stores[bucket] = make_store_from_settings(settings, bucket=bucket, max_attempts=1)
        return stores[bucket]

    def load_heatmap(key: str) -> bytes | None:
        try:
            data, problem = read_object(store(None), key=key, max_bytes=MAX_OVERLAY_BYTES, what="the overlay")
        except Exception as exc:  # a store that cannot even be built (settings): same as unreadable
            data, problem = None, f"{type(exc).__name__}: {exc}"
        if data is None:
            console.print(f"[yellow]heatmap {key!r} not loaded:[/yellow] {problem}")
        return data

    def load_image(record: Mapping[str, Any]) -> bytes | None:
        try:
            data, problem = read_object(
                store(record.get("bucket")),
                key=record["key"],
                max_bytes=settings.max_object_bytes,
                version_id=record.get("version_id"),
                etag=record.get("etag"),
            )
        except Exception as exc:  # as above
            data, problem = None, f"{type(exc).__name__}: {exc}"
        if data is None:
            console.print(
                f"[yellow]image {record['key']!r} not loaded, its thumbnail is drawn without it:[/yellow] {problem}"
            )
        return data

    return load_heatmap, load_image


def _table(result: ReportResult) -> Table:
    table = Table(title=result.title, show_lines=False)
    for column in result.columns:
        table.add_column(column, overflow="fold")
    for row in result.rows:
        cells = []
        for value in row:
            if value is None:
                cells.append("")
            elif isinstance(value, float):
                cells.append(f"{value:.4g}")
            elif isinstance(value, datetime):
                cells.append(value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"))
            else:
                cells.append(str(to_jsonable(value)))
        table.add_row(*cells)
    return table


def _emit(result: ReportResult, output_format: ReportFormat, out: Path | None) -> None:
    if output_format is ReportFormat.TABLE:
        target = Console(file=out.open("w", encoding="utf-8"), width=200) if out else Console()
        target.print(_table(result))
        if not result.rows:
            console.print("no rows for these filters")
        return
    body = to_csv(result) if output_format is ReportFormat.CSV else to_json(result) + "\n"
    if out:
        out.write_text(body, encoding="utf-8")
    else:
        typer.echo(body, nl=False)


@report_app.command("sql")
def report_sql(
    query: str = typer.Argument(..., help='One SELECT statement, e.g. "SELECT * FROM v_defects_daily".'),
    url: str | None = typer.Option(
        None,
        "--url",
        help="Database URL (default: WAFERWATCH_REPORT_DATABASE_URL, the reader role, else WAFERWATCH_DATABASE_URL).",
    ),
    output_format: ReportFormat = FORMAT_OPTION,
    out: Path | None = OUT_OPTION,
    max_rows: int = typer.Option(10_000, "--max-rows", min=1, help="Stop after this many rows."),
    timeout_s: float = typer.Option(60.0, "--timeout", min=0.1, help="Statement timeout in seconds (PostgreSQL)."),
) -> None:
    """Run one read-only query (as WAFERWATCH_REPORT_DATABASE_URL's role); anything but a SELECT is refused."""
    if output_format is ReportFormat.HTML:
        raise typer.BadParameter("html is for named reports; use table, csv or json", param_hint="--format")
    import psycopg

    from worker.db import normalize_database_url
    from worker.reader_role import privilege_warnings

    settings = get_settings()
    database_url = normalize_database_url(url) if url else settings.report_database_url or settings.database_url
    require_migrated(database_url)
    try:
        warnings = privilege_warnings(database_url)
    except psycopg.Error:
        warnings = []  # unreachable or refused: the query below reports it with the database's own words
    if warnings:
        console.print(
            f"[yellow]warning:[/yellow] report sql runs as a role that is more than a reader "
            f"({'; '.join(warnings)}); create one with `waferwatch db create-reader` and set "
            "WAFERWATCH_REPORT_DATABASE_URL to its URL"
        )
    result = run_read_only_sql(database_url, query, max_rows=max_rows, timeout_s=timeout_s)
    _emit(result, output_format, out)
    if result.truncated:
        console.print(f"[yellow]stopped after {max_rows} rows[/yellow] (--max-rows)")


def _run_named(
    name: str,
    filters: ReportFilters,
    url: str | None,
    output_format: ReportFormat,
    out: Path | None,
    limit: int | None,
) -> None:
    from worker.db import make_engine

    settings = get_settings()
    database_url = _database_url(url)
    every = name.strip().lower() == "all"
    if every and output_format is not ReportFormat.HTML:
        raise typer.BadParameter("`all` is only for --format html; name one report", param_hint="NAME")
    names = list(REPORTS) if every else [get_report(name).name]
    require_migrated(database_url)
    engine = make_engine(database_url, sqlite_begin="DEFERRED")
    try:
        with engine.connect() as connection:
            if output_format is ReportFormat.HTML:
                from worker.report_html import collect_page, render_page

                load_heatmap, load_image = _storage_loaders(settings)
                page = collect_page(
                    connection, filters, reports=names, load_heatmap=load_heatmap, load_image=load_image
                )
                document = render_page(page)
                target = out or Path(f"waferwatch-{'report' if every else names[0]}.html")
                target.write_text(document, encoding="utf-8")
                console.print(f"wrote {target} ({len(document) // 1024} KiB)")
                return
            result = run_report(connection, names[0], filters, limit=limit)
    finally:
        engine.dispose()
    _emit(result, output_format, out)


def _make_report_command(report_name: str) -> None:
    spec = REPORTS[report_name]

    def command(
        since: str | None = typer.Option(None, "--since", help="From (inclusive): 2026-03-01, ISO time, or 7d/24h."),
        until: str | None = typer.Option(None, "--until", help="Until (exclusive), same forms as --since."),
        lot: str | None = typer.Option(None, "--lot", help="Only this lot."),
        tool: str | None = typer.Option(None, "--tool", help="Only this tool."),
        output_format: ReportFormat = FORMAT_OPTION,
        out: Path | None = OUT_OPTION,
        limit: int | None = typer.Option(None, "--limit", min=1, help="At most this many rows."),
        url: str | None = URL_OPTION,
    ) -> None:
        _run_named(report_name, _filters(since, until, lot, tool), url, output_format, out, limit)

    accepted = ", ".join(f"--{name}" for name in spec.filters) or "no filters"
    command.__doc__ = f"{spec.title}: {spec.description} (view {spec.view}; filters: {accepted})."
    report_app.command(report_name)(command)


for _name in REPORTS:
    _make_report_command(_name)


@report_app.command("all")
def report_all(
    since: str | None = typer.Option(None, "--since", help="From (inclusive)."),
    until: str | None = typer.Option(None, "--until", help="Until (exclusive)."),
    lot: str | None = typer.Option(None, "--lot", help="Only this lot."),
    tool: str | None = typer.Option(None, "--tool", help="Only this tool."),
    output_format: ReportFormat = typer.Option(ReportFormat.HTML, "--format", "-f", help="html only."),
    out: Path | None = OUT_OPTION,
    url: str | None = URL_OPTION,
) -> None:
    """Every report, the plots and the top anomalies on one self-contained HTML page."""
    _run_named("all", _filters(since, until, lot, tool), url, output_format, out, None)


# --- status ---------------------------------------------------------------------------------------


def queue_depths(settings: Settings, queues: tuple[str, ...] = QUEUES) -> dict[str, int | None]:
    """Messages waiting per queue: ``LLEN`` on Redis, message files for the filesystem broker.

    None for a queue whose depth cannot be read (an unreachable broker, an unsupported transport).
    """
    if settings.broker_is_filesystem:
        folder = Path(settings.broker_transport_options(create_dirs=False)["data_folder_in"])
        if not folder.is_dir():
            return dict.fromkeys(queues, 0)
        names = [path.name for path in folder.iterdir()]
        return {queue: sum(1 for name in names if name.endswith(f".{queue}.msg")) for queue in queues}
    if settings.broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        import redis

        try:
            client = redis.Redis.from_url(settings.broker_url, socket_timeout=3, socket_connect_timeout=3)
            try:
                return {queue: int(client.llen(queue)) for queue in queues}
            finally:
                client.close()
        except redis.RedisError as exc:
            console.print(f"[yellow]broker unreachable:[/yellow] {exc}")
            return dict.fromkeys(queues)
    return dict.fromkeys(queues)


def workers_alive(timeout_s: float = 1.0) -> list[str] | None:
    """Names of workers that answered a ping within ``timeout_s``; None when that cannot be known."""
    try:
        from worker.app import app as celery_app
    except Exception as exc:  # the Celery app may not exist yet, or fail to configure
        console.print(f"[yellow]workers unknown:[/yellow] worker.app not importable ({type(exc).__name__}: {exc})")
        return None
    try:
        replies = celery_app.control.inspect(timeout=timeout_s).ping() or {}
    except Exception as exc:  # broker down or a transport without broadcast
        console.print(f"[yellow]workers unknown:[/yellow] {type(exc).__name__}: {exc}")
        return None
    return sorted(replies)


def last_hour_counts(database_url: str, *, now: datetime | None = None) -> dict[str, Any]:
    """The active model version and what happened in the last hour, from the results database."""
    from sqlalchemy import case, func, select

    from worker.db import make_engine, make_session_factory, session_scope
    from worker.repository import get_active_model_version
    from worker.schema import Failure, Image, Inference

    since = (now or datetime.now(UTC)) - timedelta(hours=1)
    engine = make_engine(database_url, sqlite_begin="DEFERRED")
    try:
        with session_scope(make_session_factory(engine)) as session:
            active = get_active_model_version(session)
            seen = dict(
                session.execute(
                    select(Image.status, func.count()).where(Image.first_seen_at >= since).group_by(Image.status)
                ).all()
            )
            scored, anomalous = session.execute(
                select(func.count(), func.coalesce(func.sum(case((Inference.is_anomalous, 1), else_=0)), 0)).where(
                    Inference.created_at >= since
                )
            ).one()
            failed = session.scalar(select(func.count()).select_from(Failure).where(Failure.last_at >= since)) or 0
            # All time, by kind: incoming images waiting for a score vs the nominal training pool.
            by_kind = dict(
                session.execute(
                    select(Image.kind + ":" + Image.status, func.count()).group_by(Image.kind, Image.status)
                ).all()
            )
    finally:
        engine.dispose()
    return {
        "active_model_version": active.id if active else None,
        "images_seen": sum(seen.values()),
        "images_by_status": seen,
        "inferences": int(scored),
        "anomalies": int(anomalous),
        "failures": int(failed),
        "scoring_backlog": int(by_kind.get("incoming:queued", 0)),
        "pool": {
            "pooled": int(by_kind.get("nominal:pooled", 0)),
            "pending": int(by_kind.get("nominal:queued", 0)),
            "unreadable": int(by_kind.get("nominal:failed", 0)),
        },
    }


@app.command("status")
def status(
    url: str | None = URL_OPTION,
    output_format: StatusFormat = typer.Option(StatusFormat.TABLE, "--format", "-f", help="table or json."),
    ping_timeout_s: float = typer.Option(1.0, "--ping-timeout", min=0.1, help="Seconds to wait for workers."),
) -> None:
    """Queue depths, workers alive, the active model version and the last hour's counts."""
    settings = get_settings()
    require_migrated(_database_url(url))
    depths = queue_depths(settings)
    workers = workers_alive(ping_timeout_s)
    counts = last_hour_counts(_database_url(url))
    report = {
        "broker": mask_url(settings.broker_url),
        "queues": depths,
        "workers": workers,
        **counts,
    }
    if output_format is StatusFormat.JSON:
        typer.echo(json.dumps(report, indent=2, default=str))
        return
    table = Table(title="waferwatch status", show_header=False)
    table.add_column("what", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row("broker", report["broker"])
    for queue, depth in depths.items():
        table.add_row(f"queue {queue}", "unknown" if depth is None else str(depth))
    table.add_row("workers alive", "unknown" if workers is None else f"{len(workers)} {' '.join(workers)}".strip())
    table.add_row("active model version", counts["active_model_version"] or "none")
    table.add_row("images seen (1 h)", str(counts["images_seen"]))
    for state, number in sorted(counts["images_by_status"].items()):
        table.add_row(f"  {state}", str(number))
    table.add_row("inferences (1 h)", str(counts["inferences"]))
    table.add_row("anomalies (1 h)", str(counts["anomalies"]))
    table.add_row("failures (1 h)", str(counts["failures"]))
    table.add_row("scoring backlog (incoming queued)", str(counts["scoring_backlog"]))
    pool = counts["pool"]
    table.add_row("training pool (nominal)", f"{pool['pooled']} pooled, {pool['pending']} to check, "
                  f"{pool['unreadable']} unreadable")  # fmt: skip
    Console().print(table)
