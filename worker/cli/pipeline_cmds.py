"""``waferwatch worker`` and ``waferwatch demo``: run the scoring side of the pipeline.

Pool choice for ``worker`` (override with ``--pool``/``--concurrency``; ``WAFERWATCH_CPU_THREADS`` sets
the threads of each process):

* GPU present (``device`` cuda, or auto with CUDA available): ``threads`` with
  :data:`GPU_BATCHES_IN_FLIGHT` (2) batches in flight. The CUDA context and the model live in the one
  worker process (nothing is forked after CUDA is initialised); model calls take turns (a lock in
  :mod:`worker.scoring`), so while one batch is on the GPU the other is fetched, decoded and written:
  on a GPU the model takes well under a millisecond per image and that CPU work decides the rate. Scale
  with one worker process per GPU (``CUDA_VISIBLE_DEVICES``). A worker that also builds (``train`` in
  ``--queues``) stays ``solo``: builds must not run two at a time.
* CPU, scoring: ``prefork`` with one process per core (at most :data:`MAX_CPU_SCORERS`), the cores split
  between them (torch and faiss threads). A scoring process spends a third of its time fetching, decoding
  and encoding heatmaps; with several processes another one's model fills that time, and one thread per
  process wastes nothing on OpenMP barriers. Measured on the 2-core dev machine
  (``bench/bench_pipeline.py``, back-to-back runs): 2 processes × 1 thread drained a 300-image backlog
  1.2× faster than 1 process × 2 threads, at 28% less CPU per image. Each process holds its own model
  (about 650 MiB resident with the default one), hence the cap. Children
  load the model lazily on their first batch (never in the parent), and the parent supervises them, so
  the hard time limit is enforced and a child killed mid-batch (OOM) has its message redelivered
  (``task_reject_on_worker_lost``). With ``metrics_port`` set, the children's metrics are aggregated by
  prometheus-client's multiprocess mode and served once, by the parent.
* CPU, training (``--queues`` includes ``train``): ``prefork`` with concurrency 1, every core for the one
  build (feature extraction is one large batch job).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import typer

from worker.cli.root import app, console
from worker.settings import HOME_ENV, get_settings

_DEFAULT_QUEUES = "score,ingest"


#: Most scoring processes a CPU worker starts by default (each holds a model in memory).
MAX_CPU_SCORERS = 4

#: Batches a GPU worker holds at once: one on the GPU, one being fetched, decoded or written.
GPU_BATCHES_IN_FLIGHT = 2


def default_pool(device: str, queues: str = _DEFAULT_QUEUES, *, cores: int | None = None) -> tuple[str, int]:
    """``(pool, concurrency)`` for ``device`` and the consumed ``queues`` (see the module docstring)."""
    training = "train" in queues.split(",")
    gpu = ("solo", 1) if training else ("threads", GPU_BATCHES_IN_FLIGHT)
    if device.startswith("cuda"):
        return gpu
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return gpu
    if training:
        return "prefork", 1
    return "prefork", max(1, min(cores or _cores(), MAX_CPU_SCORERS))


def threads_per_process(pool: str, concurrency: int, *, cores: int | None = None) -> int | None:
    """CPU threads for each prefork child, so the children split the cores; None leaves torch's default."""
    if pool != "prefork" or concurrency <= 1:
        return None
    return max(1, (cores or _cores()) // concurrency)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _use_multiprocess_metrics() -> None:
    """Let prefork children record metrics in files that the parent's ``/metrics`` sums (prometheus-client
    multiprocess mode). Must run before ``prometheus_client`` is imported in this process."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    directory = tempfile.mkdtemp(prefix="waferwatch-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    atexit.register(shutil.rmtree, directory, ignore_errors=True)


@app.command()
def worker(
    pool: str | None = typer.Option(None, "--pool", "-P", help="solo, prefork or threads (default: see docs)."),
    concurrency: int | None = typer.Option(None, "--concurrency", "-c", min=1, help="Processes/threads."),
    queues: str = typer.Option(_DEFAULT_QUEUES, "--queues", "-Q", help="Comma-separated queues to consume."),
    loglevel: str = typer.Option("INFO", "--loglevel", "-l"),
    hostname: str | None = typer.Option(None, "--hostname", "-n", help="Node name (default: celery@host)."),
    supervise: bool = typer.Option(
        True,
        "--supervise/--no-supervise",
        help="Run Celery as a child and restart it with backoff when it dies (default); --no-supervise: the raw "
        "Celery process, for a process manager of your own.",
    ),
) -> None:
    """Start a Celery worker that scores batches (the same task code in every deployment)."""
    settings = get_settings()
    from worker.device import device_problem

    problem = device_problem(settings.device)
    if problem:  # one line, unwrapped, before anything is consumed (a GPU worker must not score on nothing)
        typer.echo(f"worker: {problem}", err=True)
        raise SystemExit(1)  # not typer.Exit: main() runs click with standalone_mode=False, which returns its code
    if supervise:
        from worker.supervisor import supervise as run_supervised

        child = [sys.executable, "-c", "from worker.cli import main; main()", "worker", "--no-supervise"]
        child += [f"--queues={queues}", f"--loglevel={loglevel}"]
        child += [f"--pool={pool}"] if pool else []
        child += [f"--concurrency={concurrency}"] if concurrency else []
        child += [f"--hostname={hostname}"] if hostname else []
        raise SystemExit(run_supervised(child))
    chosen_pool, chosen_concurrency = default_pool(settings.device, queues)
    pool = pool or chosen_pool
    concurrency = concurrency or (chosen_concurrency if pool == chosen_pool else 1)
    if settings.cpu_threads is None:
        settings = settings.model_copy(update={"cpu_threads": threads_per_process(pool, concurrency)})
    if pool == "prefork" and concurrency > 1 and settings.metrics_port:
        _use_multiprocess_metrics()
    from worker.app import create_app

    celery_app = create_app(settings)
    argv = [
        "worker",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--queues={queues}",
        f"--loglevel={loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    threads = f", {settings.cpu_threads} CPU thread(s) each" if settings.cpu_threads else ""
    console.print(
        f"worker: {' '.join(argv[1:3])}{threads} on queues {queues}, broker {settings.masked()['broker_url']}"
    )
    celery_app.worker_main(argv)


@app.command()
def demo(
    data: Path = typer.Option(
        Path("../shared/datasets/dacon-semiconductor"),
        "--data",
        help="Folder with train.csv/test.csv (Dacon layout) or train/ and test/ image folders.",
    ),
    workdir: Path | None = typer.Option(
        None,
        "--workdir",
        help="Where the settings (.env), database, storage and model go (default: $WAFERWATCH_HOME or runs/demo).",
        show_default=False,
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Drop only the first N test images."),
    interval_ms: int = typer.Option(200, "--interval-ms", min=0, help="Pause between two dropped images."),
    timeout_s: float = typer.Option(600.0, "--timeout", min=1, help="Fail if images are not all scored by then."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per score_batch task."),
    batch_wait_ms: int = typer.Option(300, "--batch-wait-ms", min=0, help="Send a partial batch after this."),
    train_limit: int | None = typer.Option(None, "--train-limit", min=2, hidden=True),
    coreset_ratio: float | None = typer.Option(None, "--coreset-ratio", hidden=True),  # tests: a faster model
    folds: int | None = typer.Option(None, "--folds", hidden=True),
) -> None:
    """Run the whole pipeline on this machine: SQLite, a folder as the bucket, an embedded broker, a real worker.

    The model uses the same defaults as `waferwatch train` and `waferwatch dacon` (models/config.py)."""
    from worker.cli.model_cmds import check_device, model_config
    from worker.demo import DemoError, DemoOptions, run_demo

    config = model_config(coreset_ratio=coreset_ratio, folds=folds)
    workdir = workdir or Path(os.environ.get(HOME_ENV) or "runs/demo")
    device = check_device(device)

    options = DemoOptions(
        data=data,
        workdir=workdir,
        limit=limit,
        interval_ms=interval_ms,
        timeout_s=timeout_s,
        device=device,
        train_limit=train_limit,
        config=config,
        batch_size=batch_size,
        batch_wait_ms=batch_wait_ms,
    )
    try:
        code = run_demo(options, console)
    except DemoError as exc:
        raise typer.BadParameter(str(exc), param_hint="--data") from exc
    raise typer.Exit(code)
