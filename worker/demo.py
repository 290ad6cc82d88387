"""The embedded demo: the whole pipeline on one machine, no external service.

Layout under ``workdir``: ``.env`` (the demo's settings, so ``waferwatch --workdir DIR <command>`` and
``WAFERWATCH_HOME=DIR`` point every other command at this database and storage), ``waferwatch.db`` (SQLite
results), ``storage/`` (the folder that stands in for the bucket: ``incoming/``, ``models/``, and
``heatmaps/`` only with ``heatmap_format=overlay``), ``broker/`` (kombu's filesystem broker), ``model/``
(the trained model, reused by later runs on the same training images with the same config, retrained
otherwise), ``model-cache/`` and ``worker.log``.

Flow: train (or reuse) a model → publish it to ``storage/models/<version>/`` and activate it → start a
real Celery worker as a child process (``waferwatch worker``, the same task code as production) → watch
``storage/incoming/`` with the folder source feeding the same :class:`~worker.ingest.Ingestor` as
production → copy the test images in one by one → show scores as rows land in the database → print a
summary computed by SQL and the exact commands to look further. Each run starts with an empty database,
storage and broker; only the model is kept.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from models import FoldEnsemble, PatchCoreConfig
from models.artifacts import MANIFEST, read_manifest, sha256_file
from models.datasets import ImageRef, list_images, read_image_csv
from models.errors import ArtifactError, ConfigError
from worker import repository
from worker.app import create_app, make_enqueue, make_store_from_settings, workers_idle
from worker.db import make_engine, make_session_factory, session_scope, upgrade_database
from worker.ingest import build_source, make_ingestor, run_ingest
from worker.model_provider import publish_model
from worker.schema import Image, Inference
from worker.settings import HOME_ENV, Settings

__all__ = ["DemoError", "DemoOptions", "find_images", "run_demo"]

_ACCOUNTED = ("scored", "failed", "skipped")
_LOTS_OF = 10  # images per synthetic lot in the dropped keys


class DemoError(Exception):
    """The data folder does not have what the demo needs; the message says what it expects."""


@dataclass(frozen=True)
class DemoOptions:
    """What ``waferwatch demo`` was asked to do."""

    data: Path
    workdir: Path
    limit: int | None = None
    interval_ms: int = 200
    timeout_s: float = 600.0
    device: str = "auto"
    train_limit: int | None = None
    config: PatchCoreConfig = field(default_factory=PatchCoreConfig)  # the model defaults unless told
    batch_size: int = 8
    batch_wait_ms: int = 300


@dataclass(frozen=True)
class DemoPaths:
    """Where everything of one demo lives."""

    workdir: Path

    @property
    def database(self) -> Path:
        return self.workdir / "waferwatch.db"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    @property
    def broker(self) -> Path:
        return self.workdir / "broker"

    @property
    def model(self) -> Path:
        return self.workdir / "model"

    @property
    def worker_log(self) -> Path:
        return self.workdir / "worker.log"

    @property
    def settings_file(self) -> Path:
        return self.workdir / ".env"


def demo_settings(paths: DemoPaths, options: DemoOptions) -> tuple[Settings, dict[str, str]]:
    """The embedded settings and the same values as ``WAFERWATCH_*`` variables for the worker process."""
    values = {
        "database_url": f"sqlite:///{paths.database.resolve()}",
        "broker_url": "filesystem://",
        "broker_dir": str(paths.broker.resolve()),
        "storage": "folder",
        "storage_root": str(paths.storage.resolve()),
        "model_cache_dir": str((paths.workdir / "model-cache").resolve()),
        "device": options.device,
        "batch_size": str(options.batch_size),
        "batch_wait_ms": str(options.batch_wait_ms),
        "watch_poll_s": "0.2",
        "model_check_interval_s": "0",
    }
    settings = Settings(_env_file=None, **values)  # type: ignore[arg-type,call-arg]  (pydantic parses strings)
    env = {f"WAFERWATCH_{name.upper()}": value for name, value in values.items()}
    return settings, env


def write_settings_file(paths: DemoPaths, env: dict[str, str]) -> Path:
    """``workdir/.env``: the demo's settings as ``WAFERWATCH_*`` lines (absolute paths), read by every command
    run with ``--workdir DIR``, with ``WAFERWATCH_HOME=DIR`` or from inside DIR."""
    lines = [
        "# Written by `waferwatch demo`: the settings of this demo's database, storage and broker.",
        f"# Every command reads them with `waferwatch --workdir {paths.workdir} ...` or {HOME_ENV}={paths.workdir}.",
        *(f"{name}={value}" for name, value in sorted(env.items())),
    ]
    temporary = paths.settings_file.with_name(".env.tmp")
    temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    temporary.replace(paths.settings_file)
    return paths.settings_file


def find_images(data: Path) -> tuple[list[ImageRef], list[ImageRef]]:
    """Training and test images of ``data``: ``train.csv``/``test.csv``, else ``train/``/``test/`` folders.

    Raises:
        DemoError: neither layout is there (the message describes both).
    """
    if not data.is_dir():
        raise DemoError(f"--data {data} is not a folder")

    def pick(name: str) -> list[ImageRef] | None:
        if (data / f"{name}.csv").is_file():
            return sorted(read_image_csv(data / f"{name}.csv"), key=lambda ref: ref.id)
        if (data / name).is_dir():
            return list_images(data / name)
        return None

    train, test = pick("train"), pick("test")
    if train is None or test is None:
        missing = [name for name, refs in (("train", train), ("test", test)) if refs is None]
        raise DemoError(
            f"--data {data} lacks {' and '.join(missing)} images. The demo expects either train.csv and "
            "test.csv (id,img_path columns, paths relative to the CSV, as in the Dacon data) or train/ and "
            "test/ folders of images; it trains on the (defect-free) train images and scores the test ones"
        )
    if not train or not test:
        raise DemoError(f"--data {data}: found {len(train)} train and {len(test)} test images; need both")
    return train, test


def training_fingerprint(refs: list[ImageRef]) -> dict[str, str]:
    """``{id: sha256 of the file}`` of the training images: what a reusable model must have been trained on."""
    return {ref.id: sha256_file(ref.path) for ref in refs}


def reuse_problem(model_dir: Path, fingerprint: dict[str, str], config: PatchCoreConfig) -> str | None:
    """Why the model in ``model_dir`` cannot serve these training images and config (None: it can).

    The manifest lists every training image's id and sha256 (and the images left out as unreadable) and
    the full config, so both are compared: another data folder, other images or another option retrains.
    """
    try:
        manifest = read_manifest(model_dir)
    except ArtifactError as exc:
        return f"it cannot be read ({exc})"
    try:
        built_with = PatchCoreConfig.from_dict(manifest["config"])
    except (KeyError, TypeError, ConfigError) as exc:
        return f"its config is not this waferwatch's ({exc})"
    if built_with != config:
        changed = sorted(name for name, value in config.to_dict().items() if built_with.to_dict().get(name) != value)
        return (
            "it was trained with another config ("
            + ", ".join(f"{name} {built_with.to_dict().get(name)!r} → {config.to_dict()[name]!r}" for name in changed)
            + ")"
        )
    trained = {image["id"]: image["sha256"] for image in manifest.get("training_images", [])}
    left_out = {image["id"] for image in manifest.get("skipped_images", [])}
    asked = set(fingerprint)
    if set(trained) | left_out != asked or any(trained[i] != fingerprint[i] for i in trained if i in fingerprint):
        differ = len(asked ^ (set(trained) | left_out)) + sum(
            1 for i in trained if i in fingerprint and trained[i] != fingerprint[i]
        )
        return f"it was trained on other images ({differ} of {len(asked)} differ)"
    return None


def prepare_model(paths: DemoPaths, train: list[ImageRef], options: DemoOptions, console: Console) -> str:
    """Reuse ``workdir/model`` when it was trained on these images with this config, else (re)train it there;
    returns the model's version."""
    refs = train[: options.train_limit] if options.train_limit else train
    config = options.config
    fingerprint = training_fingerprint(refs)
    if (paths.model / MANIFEST).is_file():
        problem = reuse_problem(paths.model, fingerprint, config)
        if problem is None:
            ensemble = FoldEnsemble.load(paths.model, device="cpu")
            console.print(
                f"reusing model {ensemble.version} from {paths.model}: trained on these {len(refs)} images "
                "with this config (delete it to retrain)"
            )
            return ensemble.version
        console.print(f"[yellow]not reusing the model in {paths.model}:[/yellow] {problem}; retraining")
    console.print(
        f"training on {len(refs)} images ({config.backbone}, {config.folds} folds, coreset {config.coreset_ratio:g}) …"
    )
    started = time.perf_counter()
    ensemble = FoldEnsemble.fit([ref.id for ref in refs], [ref.path for ref in refs], config, device=options.device)
    ensemble.save(paths.model, overwrite=True)  # the demo owns workdir/model; replaced atomically
    console.print(f"model {ensemble.version} trained in {time.perf_counter() - started:.1f} s → {paths.model}")
    return ensemble.version


def _reset_run_state(paths: DemoPaths) -> None:
    for path in (paths.storage, paths.broker, paths.workdir / "model-cache"):
        shutil.rmtree(path, ignore_errors=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{paths.database}{suffix}").unlink(missing_ok=True)


def start_worker(env: dict[str, str], log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """``waferwatch worker [args]`` as a child process (its own process group, so it can be stopped as a whole),
    with this process's environment less its ``WAFERWATCH_*`` variables, plus ``env``."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("WAFERWATCH_")}
    child_env.update(env)
    command = [sys.executable, "-c", "from worker.cli import main; main()", "worker", "--loglevel", "INFO", *args]
    with log_path.open("ab") as log:
        return subprocess.Popen(command, env=child_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_worker(process: subprocess.Popen[bytes], *, timeout_s: float = 30.0) -> None:
    """SIGTERM to the main process (Celery's warm shutdown: the batch in flight finishes and the pool
    children are stopped by their parent), then SIGKILL to the whole process group after ``timeout_s``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def drop_images(refs: list[ImageRef], incoming: Path, *, interval_s: float, stop_event: threading.Event) -> list[str]:
    """Copy images into ``incoming/<tool>/<lot>/`` one by one (write a temp file, then rename)."""
    keys: list[str] = []
    for index, ref in enumerate(refs):
        if stop_event.is_set():
            break
        relative = Path("demo-tool") / f"lot-{index // _LOTS_OF + 1:02d}" / ref.path.name
        target = incoming / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(ref.path, temporary)
        temporary.replace(target)
        keys.append(relative.as_posix())
        stop_event.wait(interval_s)
    return keys


def _progress(session_factory: sessionmaker[Session], expected: int) -> tuple[Table, Text, int]:
    with session_scope(session_factory) as session:
        counts = dict(session.execute(select(Image.status, func.count()).group_by(Image.status)).all())
        latest = session.execute(
            select(Image.key, Inference.score, Inference.threshold, Inference.is_anomalous, Inference.model_ms)
            .join(Inference, Inference.image_id == Image.id)
            .order_by(Inference.id.desc())
            .limit(12)
        ).all()
    table = Table("score", "threshold", "decision", "model ms")  # titled once, above the live display
    table.add_column("key", overflow="fold")
    for key, score, threshold, anomalous, model_ms in reversed(latest):
        decision = "[red]DEFECT[/red]" if anomalous else "[green]ok[/green]"
        table.add_row(f"{score:.4f}", f"{threshold:.4f}", decision, f"{model_ms or 0:.0f}", key)
    done = sum(counts.get(status, 0) for status in _ACCOUNTED)
    line = Text(
        f"{done}/{expected} accounted for · " + " · ".join(f"{name} {count}" for name, count in sorted(counts.items()))
    )
    return table, line, done


def heatmap_command(paths: DemoPaths, key: str) -> str:
    """The command that draws the heatmap overlay of ``key`` into the work folder, as a user types it here.

    The worker keeps each image's anomaly map in its inference row and no longer writes an overlay PNG
    per image, so the way to see one is to ask for it (``waferwatch heatmap``, or the HTML report)."""
    out = shlex.quote(str(paths.workdir / f"{Path(key).stem}.heatmap.png"))
    return f"waferwatch --workdir {shlex.quote(str(paths.workdir))} heatmap {shlex.quote(key)} --out {out}"


def print_summary(session_factory: sessionmaker[Session], paths: DemoPaths, console: Console, *, version: str) -> None:
    """Counts, anomalies per lot and the slowest images, all computed by SQL from the results database,
    and the command that draws the heatmap of ``version``'s highest-scoring image (an anomaly if any)."""
    with session_scope(session_factory) as session:
        result = repository.summary(session, slowest=5)
        top_key = session.scalar(
            select(Image.key)
            .join(Inference, Inference.image_id == Image.id)
            .where(Inference.model_version == version)
            .order_by(Inference.is_anomalous.desc(), Inference.score.desc(), Inference.id)
            .limit(1)
        )
    console.print()
    console.rule("summary (from the results database)")
    statuses = ", ".join(f"{name} {count}" for name, count in sorted(result.images_by_status.items()))
    console.print(f"images: {result.images} ({statuses})")
    console.print(f"inferences: {result.inferences}, anomalies: {result.anomalies}, failures: {result.failures}")
    if result.anomalies_by_lot:
        console.print(
            "anomalies per lot: " + ", ".join(f"{lot or '-'} {n}" for lot, n in sorted(result.anomalies_by_lot.items()))
        )
    slow = Table("total ms", "download", "decode", "model", "score")
    slow.add_column("slowest images", overflow="fold")
    for item in result.slowest:
        slow.add_row(
            f"{item.total_ms:.0f}",
            f"{item.download_ms or 0:.1f}",
            f"{item.decode_ms or 0:.1f}",
            f"{item.model_ms or 0:.0f}",
            f"{item.score:.4f}",
            item.key,
        )
    console.print(slow)
    console.print(f"results database: {paths.database}")
    console.print(f"storage:          {paths.storage} (the keys in the database are relative to it)")
    if top_key is not None:
        what = "the top anomaly" if result.anomalies else "the highest score (no anomaly)"
        console.print(f"heatmap:          {heatmap_command(paths, top_key)}  # {what}", soft_wrap=True)
    query = (
        "SELECT i.key, f.score, f.is_anomalous FROM inferences f "
        "JOIN images i ON i.id = f.image_id ORDER BY f.score DESC LIMIT 10;"
    )
    console.print(f'query it:         sqlite3 {paths.database} "{query}"', soft_wrap=True)


def next_commands(paths: DemoPaths) -> list[str]:
    """The commands that look further into this demo's results, exactly as a user types them here."""
    workdir = shlex.quote(str(paths.workdir))
    report = shlex.quote(str(paths.workdir / "report.html"))
    return [
        f"waferwatch --workdir {workdir} report all --format html --out {report}",
        f"waferwatch --workdir {workdir} models list",
        f"waferwatch --workdir {workdir} status",
    ]


def print_next_steps(paths: DemoPaths, console: Console) -> None:
    """Where the CLI is, how to reach this demo's data, and the exact next commands."""
    console.print()
    console.rule("next")
    bin_dir = Path(sys.executable).parent
    installed = bin_dir / "waferwatch"
    on_path = shutil.which("waferwatch")
    if installed.is_file() and (on_path is None or Path(on_path).resolve() != installed.resolve()):
        activate = bin_dir / "activate"
        shown = os.path.relpath(activate) if activate.is_relative_to(Path.cwd()) else str(activate)
        console.print(f"waferwatch is in {bin_dir}; put it on your PATH first:  source {shown}", soft_wrap=True)
    console.print(
        f"the demo's settings are in {paths.settings_file}; --workdir {paths.workdir} (or "
        f"{HOME_ENV}={paths.workdir}) points any command at them:",
        soft_wrap=True,
    )
    for command in next_commands(paths):
        console.print(f"  {command}", soft_wrap=True, highlight=False, markup=False)


def run_demo(options: DemoOptions, console: Console, *, live_console: Console | None = None) -> int:
    """Run the demo; returns the exit code (0 when every dropped image was accounted for in time)."""
    paths = DemoPaths(options.workdir)
    train, test = find_images(options.data)
    test = test[: options.limit] if options.limit else test
    paths.workdir.mkdir(parents=True, exist_ok=True)
    _reset_run_state(paths)
    settings, env = demo_settings(paths, options)
    write_settings_file(paths, env)
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    session_factory = make_session_factory(engine)
    store = make_store_from_settings(settings)
    store.ensure_bucket()
    prepare_model(paths, train, options, console)
    ref = publish_model(store, session_factory, paths.model, model_prefix=settings.model_prefix, activate=True)
    console.print(f"active model {ref.version} at {settings.model_prefix}{ref.version}/ in {paths.storage}")

    celery_app = create_app(settings, set_as_current=False)
    ingestor = make_ingestor(
        settings,
        session_factory=session_factory,
        enqueue=make_enqueue(celery_app),
        bucket=store.bucket,
        idle=workers_idle(celery_app),
    )
    source = build_source("folder", settings, ingestor, bucket=store.bucket, stable_after_s=0.2)
    stop_event = threading.Event()
    ingest_thread = threading.Thread(target=run_ingest, args=(source, ingestor, stop_event), name="ingest")
    worker = start_worker(env, paths.worker_log)
    console.print(f"worker pid {worker.pid} (log: {paths.worker_log}); dropping {len(test)} images …")
    dropped: list[str] = []
    dropper = threading.Thread(
        target=lambda: dropped.extend(
            drop_images(
                test,
                paths.storage / settings.incoming_prefix,
                interval_s=options.interval_ms / 1000,
                stop_event=stop_event,
            )
        ),
        name="dropper",
    )
    ok = False
    try:
        ingest_thread.start()
        dropper.start()
        ok = _watch(session_factory, len(test), options.timeout_s, worker, live_console or console)
    finally:
        stop_event.set()
        dropper.join(timeout=10)
        ingest_thread.join(timeout=30)
        stop_worker(worker)
    print_summary(session_factory, paths, console, version=ref.version)
    engine.dispose()
    print_next_steps(paths, console)
    if not ok:
        console.print(
            f"[red]not every image was accounted for within {options.timeout_s:.0f} s[/red]; see {paths.worker_log}"
        )
        return 1
    return 0


def _watch(
    session_factory: sessionmaker[Session],
    expected: int,
    timeout_s: float,
    worker: subprocess.Popen[bytes],
    console: Console,
) -> bool:
    """Refresh the live table until ``expected`` images are accounted for, the timeout, or a dead worker."""
    deadline = time.monotonic() + timeout_s
    table, line, done = _progress(session_factory, expected)
    console.rule("latest scores")
    with Live(Group(table, line), console=console, refresh_per_second=4, transient=False) as live:
        while time.monotonic() < deadline:
            table, line, done = _progress(session_factory, expected)
            live.update(Group(table, line))
            if done >= expected:
                return True
            if worker.poll() is not None:
                console.print(f"[red]the worker exited with code {worker.returncode}[/red]")
                return False
            time.sleep(0.5)
    return done >= expected
