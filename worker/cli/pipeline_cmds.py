"""``waferwatch worker`` and ``waferwatch demo``: run the scoring side of the pipeline.

Pool choice for ``worker`` (override with ``--pool``/``--concurrency``):

* GPU present (``device`` cuda, or auto with CUDA available): ``solo``. The CUDA context and the model
  live in the one worker process; nothing is forked after CUDA is initialised. Scale with one worker
  process per GPU (``CUDA_VISIBLE_DEVICES``), each scoring one batch at a time.
* CPU: ``prefork`` with concurrency 1. torch already spreads one batch over every core, so more
  processes would only multiply the model's memory and fight for the same cores; the single child loads
  the model lazily on its first batch (never in the parent), and the parent supervises it, so the hard
  time limit is enforced and a child killed mid-batch (OOM) has its message redelivered
  (``task_reject_on_worker_lost``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from worker.cli.root import app, console
from worker.settings import get_settings

_DEFAULT_QUEUES = "score,ingest"


def default_pool(device: str) -> tuple[str, int]:
    """``(pool, concurrency)`` for ``device`` (see the module docstring)."""
    if device.startswith("cuda"):
        return "solo", 1
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return "solo", 1
    return "prefork", 1


@app.command()
def worker(
    pool: str | None = typer.Option(None, "--pool", "-P", help="solo, prefork or threads (default: see docs)."),
    concurrency: int | None = typer.Option(None, "--concurrency", "-c", min=1, help="Processes/threads."),
    queues: str = typer.Option(_DEFAULT_QUEUES, "--queues", "-Q", help="Comma-separated queues to consume."),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
    hostname: str | None = typer.Option(None, "--hostname", "-n", help="Node name (default: celery@host)."),
) -> None:
    """Start a Celery worker that scores batches (the same task code in every deployment)."""
    from worker.app import create_app

    settings = get_settings()
    celery_app = create_app(settings)
    chosen_pool, chosen_concurrency = default_pool(settings.device)
    argv = [
        "worker",
        f"--pool={pool or chosen_pool}",
        f"--concurrency={concurrency or chosen_concurrency}",
        f"--queues={queues}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    console.print(f"worker: {' '.join(argv[1:3])} on queues {queues}, broker {settings.masked()['broker_url']}")
    celery_app.worker_main(argv)


@app.command()
def demo(
    data: Path = typer.Option(
        Path("../shared/datasets/dacon-semiconductor"),
        "--data",
        help="Folder with train.csv/test.csv (Dacon layout) or train/ and test/ image folders.",
    ),
    workdir: Path = typer.Option(Path("runs/demo"), "--workdir", help="Where the database, storage and model go."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Drop only the first N test images."),
    interval_ms: int = typer.Option(200, "--interval-ms", min=0, help="Pause between two dropped images."),
    timeout_s: float = typer.Option(600.0, "--timeout", min=1, help="Fail if images are not all scored by then."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per score_batch task."),
    batch_wait_ms: int = typer.Option(300, "--batch-wait-ms", min=0, help="Send a partial batch after this."),
    train_limit: int | None = typer.Option(None, "--train-limit", min=2, hidden=True),
    coreset_ratio: float = typer.Option(0.10, "--coreset-ratio", min=0.0001, max=1.0, hidden=True),
    folds: int = typer.Option(5, "--folds", min=2, hidden=True),
) -> None:
    """Run the whole pipeline on this machine: SQLite, a folder as the bucket, an embedded broker, a real worker."""
    from worker.demo import DemoError, DemoOptions, run_demo

    options = DemoOptions(
        data=data,
        workdir=workdir,
        limit=limit,
        interval_ms=interval_ms,
        timeout_s=timeout_s,
        device=device,
        train_limit=train_limit,
        coreset_ratio=coreset_ratio,
        folds=folds,
        batch_size=batch_size,
        batch_wait_ms=batch_wait_ms,
    )
    try:
        code = run_demo(options, console)
    except DemoError as exc:
        raise typer.BadParameter(str(exc), param_hint="--data") from exc
    raise typer.Exit(code)
