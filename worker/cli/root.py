"""The root Typer application and the error boundary shared by every command."""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console

app = typer.Typer(
    name="waferwatch",
    help="Fold-ensemble PatchCore defect scoring for semiconductor images.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
) -> None:
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def main() -> None:
    """Console-script entry point: run the app, print domain errors as one line unless ``--debug``."""
    debug = "--debug" in sys.argv[1:]
    try:
        app(standalone_mode=False)
    except SystemExit as exc:
        raise SystemExit(exc.code) from None
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        raise SystemExit(130) from None
    except Exception as exc:  # the CLI's error boundary: one line, exit 1
        import click

        if isinstance(exc, click.exceptions.Abort):
            raise SystemExit(1) from None
        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        if debug:
            raise
        console.print(f"[red]error:[/red] {type(exc).__name__}: {exc}")
        raise SystemExit(1) from None
