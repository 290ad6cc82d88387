"""``waferwatch config`` and ``waferwatch db ...``: inspect settings and migrate the results database.

Settings are read here, at the entry point, and only the URL is passed down to :mod:`worker.db`.
Command output (the settings, the revision) goes to stdout so it can be piped; progress and errors go
to the shared stderr console.
"""

from __future__ import annotations

import json
from enum import StrEnum

import typer
from rich.console import Console
from rich.table import Table

from worker.cli.root import app, console
from worker.settings import get_settings, mask_url

db_app = typer.Typer(help="Create, migrate and inspect the results database.", no_args_is_help=True)
app.add_typer(db_app, name="db")


class OutputFormat(StrEnum):
    """How ``waferwatch config`` prints."""

    TABLE = "table"
    JSON = "json"


def _database_url(url: str | None) -> str:
    """``--url`` when given (normalised like the setting), else the configured ``database_url``."""
    from worker.db import normalize_database_url

    return normalize_database_url(url) if url else get_settings().database_url


URL_OPTION = typer.Option(None, "--url", help="Database URL (default: WAFERWATCH_DATABASE_URL / settings).")


@app.command("config")
def show_config(
    output_format: OutputFormat = typer.Option(OutputFormat.TABLE, "--format", "-f", help="table or json."),
) -> None:
    """Print the effective settings (environment, .env and defaults), with secrets masked."""
    values = get_settings().masked()
    if output_format is OutputFormat.JSON:
        typer.echo(json.dumps(values, indent=2, sort_keys=True, default=str))
        return
    table = Table(title="waferwatch settings", show_lines=False)
    table.add_column("setting", style="cyan", no_wrap=True)
    table.add_column("value", overflow="fold")
    for name, value in values.items():
        table.add_row(name, "" if value is None else str(value))
    Console().print(table)


@db_app.command("upgrade")
def db_upgrade(
    url: str | None = URL_OPTION,
    revision: str = typer.Option("head", "--revision", "-r", help="Target revision."),
) -> None:
    """Migrate the results database up to REVISION (default: the newest). Safe to repeat."""
    from worker.db import current_revision, upgrade_database

    database_url = _database_url(url)
    console.print(f"upgrading {mask_url(database_url)} to {revision}")
    upgrade_database(database_url, revision)
    typer.echo(current_revision(database_url) or "base")


@db_app.command("downgrade")
def db_downgrade(
    revision: str = typer.Argument(..., help="Target revision, e.g. -1 or base (drops every table)."),
    url: str | None = URL_OPTION,
) -> None:
    """Migrate the results database down to REVISION."""
    from worker.db import current_revision, downgrade_database

    database_url = _database_url(url)
    console.print(f"downgrading {mask_url(database_url)} to {revision}")
    downgrade_database(database_url, revision)
    typer.echo(current_revision(database_url) or "base")


@db_app.command("current")
def db_current(url: str | None = URL_OPTION) -> None:
    """Print the database's revision (``base`` if never migrated) and whether it is the newest."""
    from worker.db import current_revision, head_revision

    database_url = _database_url(url)
    current = current_revision(database_url)
    head = head_revision()
    typer.echo(current or "base")
    if current != head:
        console.print(f"[yellow]not at head[/yellow] ({head}); run `waferwatch db upgrade`")


@db_app.command("create-reader")
def db_create_reader(
    url: str | None = URL_OPTION,
    name: str = typer.Option("waferwatch_reader", "--name", help="Name of the read-only role."),
    password: str | None = typer.Option(
        None,
        "--password",
        envvar="WAFERWATCH_READER_PASSWORD",
        help="Login password of the role (default: WAFERWATCH_READER_PASSWORD; none: keep/no password).",
        show_default=False,
    ),
) -> None:
    """Create (or reset) the read-only PostgreSQL role that `waferwatch report sql` runs as. Safe to repeat.

    The role may SELECT our tables and views and nothing else (no superuser, no server files or programs);
    run it as the application's role after `db upgrade`, then set WAFERWATCH_REPORT_DATABASE_URL to a URL
    that logs in as the printed role.
    """
    from sqlalchemy.engine import make_url

    from worker.reader_role import create_reader_role

    database_url = _database_url(url)
    console.print(f"creating read-only role {name!r} on {mask_url(database_url)}")
    try:
        schema = create_reader_role(database_url, name=name, password=password)
    except (ValueError, PermissionError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    reader_url = make_url(database_url).set(username=name, password=password or None)
    console.print(f"{name} may read every table and view of schema {schema!r}; set WAFERWATCH_REPORT_DATABASE_URL to:")
    typer.echo(mask_url(reader_url.render_as_string(hide_password=False)))
