"""The root Typer application and the error boundary shared by every command.

Exit codes, the same for every command (scripts and cron rely on them):

* ``0`` — everything asked for was done;
* ``1`` — an error stopped the command (one line on stderr, ``--debug`` for the traceback), or the work
  ran but did not succeed (a ``demo`` whose images were not all accounted for in time);
* ``2`` — a usage error (a bad option, a missing file named on the command line), or some inputs failed
  while the others were processed (``score`` with an unreadable image);
* ``130`` — interrupted (Ctrl-C).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from worker.settings import HOME_ENV, get_settings

app = typer.Typer(
    name="waferwatch",
    help="Fold-ensemble PatchCore defect scoring for semiconductor images. "
    "Exit codes: 0 ok, 1 error, 2 usage error or some inputs failed.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
console = Console(stderr=True)
_state = {"debug": False}


def _use_workdir(workdir: Path | None) -> None:
    """``--workdir DIR`` is ``WAFERWATCH_HOME=DIR``: the settings file ``DIR/.env`` (the demo writes one)."""
    if workdir is None:
        return
    if not workdir.is_dir():
        raise typer.BadParameter(
            f"{workdir} is not a folder; give the folder `waferwatch demo --workdir` used (default runs/demo)",
            param_hint="--workdir",
        )
    os.environ[HOME_ENV] = str(workdir.resolve())
    get_settings.cache_clear()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
    workdir: Path | None = typer.Option(
        None,
        "--workdir",
        "-w",
        help=f"Read the settings in DIR/.env (what `waferwatch demo` writes); same as {HOME_ENV}=DIR.",
        show_default=False,
    ),
) -> None:
    _state["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    _use_workdir(workdir)


def main() -> None:
    """Console-script entry point: run the app and exit with its code (see the module docstring); domain
    errors are printed as one line unless ``--debug``."""
    debug = "--debug" in sys.argv[1:]
    try:
        code = app(standalone_mode=False, prog_name="waferwatch")
    except SystemExit as exc:
        raise SystemExit(exc.code) from None
    except (KeyboardInterrupt, typer.Abort):
        console.print("[red]interrupted[/red]")
        raise SystemExit(130) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except Exception as exc:  # the CLI's error boundary: one line, exit 1
        show = getattr(exc, "show", None)
        if isinstance(exc, typer.TyperException) and callable(show):
            show()  # usage errors name the option: "Invalid value for '--k': ..."
            raise SystemExit(exc.exit_code) from None
        if debug:
            raise
        console.print(f"[red]error:[/red] {type(exc).__name__}: {exc}", soft_wrap=True)
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)
