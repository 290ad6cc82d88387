"""``waferwatch doctor``: is this machine set up to run waferwatch, and if not, what to do.

One line per check (settings, database, broker, queues, bucket, notifications, model, GPU, the compiled fast
paths), each saying what was found and, when something is wrong, what to run or set. Checks only read:
nothing is created, migrated or uploaded. Exit code 1 when a check failed, 0 otherwise (warnings do not
fail): a warning is what doctor cannot tell (no worker answered, the bucket does not show its notification
rules), or a compiled fast path this install lacks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import typer
from rich.console import Console
from rich.markup import escape

from worker.cli.root import app
from worker.settings import HOME_ENV, Settings, get_settings, mask_url, settings_files

Status = Literal["ok", "warn", "fail"]
_MARK = {"ok": "[green]ok  [/green]", "warn": "[yellow]warn[/yellow]", "fail": "[red]FAIL[/red]"}

#: How long the queues check waits for workers to say what they consume.
QUEUES_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Check:
    """The outcome of one check: its name, ok/warn/fail and one line saying what was found or what to do."""

    name: str
    status: Status
    detail: str


def check_settings() -> tuple[Check, Settings | None]:
    read = [str(path) for path in settings_files() if path.is_file()]
    source = (
        f"from {', '.join(read)} and WAFERWATCH_* variables" if read else "from WAFERWATCH_* variables and defaults"
    )
    try:
        settings = get_settings()
    except Exception as exc:  # pydantic's ValidationError: the message names the setting
        first = str(exc).strip().splitlines()
        return Check("settings", "fail", f"invalid ({' '.join(first[:3])}); fix it {source}"), None
    return Check("settings", "ok", f"read {source}"), settings


def check_database(settings: Settings) -> Check:
    from worker.cli.database import database_problem
    from worker.db import head_revision

    problem = database_problem(settings.database_url)
    if problem:
        return Check("database", "fail", problem)
    return Check("database", "ok", f"{mask_url(settings.database_url)} at revision {head_revision()} (newest)")


def check_broker(settings: Settings) -> Check:
    shown = mask_url(settings.broker_url)
    if settings.broker_is_filesystem:
        folder = Path(settings.broker_transport_options(create_dirs=False)["data_folder_in"])
        if folder.is_dir():
            return Check("broker", "ok", f"{shown}, queue folder {folder}")
        return Check("broker", "warn", f"{shown}: {folder} does not exist yet (created when a worker or ingest starts)")
    if settings.broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        import redis

        try:
            client = redis.Redis.from_url(settings.broker_url, socket_timeout=3, socket_connect_timeout=3)
            try:
                client.ping()
            finally:
                client.close()
        except redis.RedisError as exc:
            return Check("broker", "fail", f"{shown} unreachable ({exc}); start Redis or fix WAFERWATCH_BROKER_URL")
        return Check("broker", "ok", f"{shown} answers PING")
    return Check("broker", "warn", f"{shown}: this doctor cannot probe that transport")


def routed_queues(celery_app: Any) -> dict[str, list[str]]:
    """``{queue: task names}`` for every queue a task of ``celery_app`` can be sent to: each registered
    task's route (``task_routes``, else ``task_default_queue``) and the beat schedule's ``options.queue``."""
    routed: dict[str, set[str]] = {}
    for name in celery_app.tasks:
        if name.startswith("celery."):  # Celery's built-ins (chord unlock, backend cleanup) are never sent here
            continue
        queue = celery_app.amqp.router.route({}, name).get("queue")
        routed.setdefault(getattr(queue, "name", queue) or celery_app.conf.task_default_queue, set()).add(name)
    for entry in (celery_app.conf.beat_schedule or {}).values():
        queue = (entry.get("options") or {}).get("queue")
        if queue:
            routed.setdefault(getattr(queue, "name", queue), set()).add(entry["task"])
    return {queue: sorted(tasks) for queue, tasks in sorted(routed.items())}


def consumed_queues(replies: dict[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
    """``{queue: worker names}`` from ``inspect().active_queues()``'s replies."""
    consumers: dict[str, set[str]] = {}
    for worker_name, queues in replies.items():
        for queue in queues or []:
            consumers.setdefault(str(queue.get("name")), set()).add(worker_name)
    return {queue: sorted(workers) for queue, workers in sorted(consumers.items())}


def judge_queues(routed: dict[str, list[str]], consumers: dict[str, list[str]] | None, timeout_s: float) -> Check:
    """The queues line: ``consumers`` is None when no worker answered within ``timeout_s``."""
    if consumers is None:
        return Check(
            "queues",
            "warn",
            f"no worker answered within {timeout_s:g}s (a solo worker busy with a batch answers only between "
            f"batches); start one with `waferwatch worker --queues {','.join(routed)}`",
        )
    missing = [queue for queue in routed if queue not in consumers]
    if missing:
        parts = [
            f"{queue} ({', '.join(routed[queue])}): start `waferwatch worker --queues {queue}` or add {queue} to a "
            "worker's --queues"
            for queue in missing
        ]
        return Check("queues", "fail", f"consumed by no live worker: {'; '.join(parts)}")
    consumed = "; ".join(f"{queue} by {', '.join(consumers[queue])}" for queue in routed)
    return Check("queues", "ok", f"every routed queue has a live consumer: {consumed}")


def check_queues(settings: Settings, broker_ok: bool, timeout_s: float = QUEUES_TIMEOUT_S) -> Check:
    """Every queue a task can be sent to (the app's routes and beat schedule) against what live workers
    consume (``inspect().active_queues()``); only asked when the broker check passed."""
    if not broker_ok:
        return Check("queues", "warn", "not checked: the broker is not ready (see above)")
    from worker.app import create_app

    celery_app = create_app(settings, set_as_current=False)
    try:
        routed = routed_queues(celery_app)
        replies = celery_app.control.inspect(timeout=timeout_s).active_queues()
    finally:
        celery_app.close()
    return judge_queues(routed, consumed_queues(replies) if replies else None, timeout_s)


def _store(settings: Settings) -> Any:
    from worker.storage import make_store

    return make_store(
        settings.storage,
        root=settings.storage_root,
        endpoint_url=settings.s3_endpoint_url,
        bucket=settings.s3_bucket if settings.storage == "s3" else None,
        region=settings.s3_region,
        access_key=settings.s3_access_key.get_secret_value() if settings.s3_access_key else None,
        secret_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
        connect_timeout_s=3.0,
        read_timeout_s=10.0,
        max_attempts=1,
        fast_reads=settings.s3_fast_reads,
    )


def check_bucket(settings: Settings) -> Check:
    prefixes = (settings.incoming_prefix, settings.nominal_prefix, settings.heatmap_prefix, settings.model_prefix)
    if settings.storage == "folder" and not Path(settings.storage_root).is_dir():
        return Check(
            "bucket",
            "fail",
            f"folder {settings.storage_root} does not exist; run `waferwatch demo` or set WAFERWATCH_STORAGE_ROOT",
        )
    try:
        store = _store(settings)
        found = []
        for prefix in prefixes:
            has_any = next(iter(store.list(prefix)), None) is not None
            found.append(f"{prefix} {'has objects' if has_any else 'empty'}")
    except Exception as exc:  # StorageUnavailableError and friends: the message names the bucket
        where = settings.s3_endpoint_url or "AWS"
        detail = f"{settings.s3_bucket} at {where} not readable ({exc}); check the WAFERWATCH_S3_* settings"
        return Check("bucket", "fail", detail)
    name = settings.storage_root if settings.storage == "folder" else f"s3://{settings.s3_bucket}"
    return Check("bucket", "ok", f"{name}: {', '.join(found)}")


def check_notifications(settings: Settings) -> Check:
    if settings.storage == "folder":
        return Check("events", "ok", f"folder storage: `waferwatch ingest` watches {settings.watch_dir}")
    try:
        store = _store(settings)
        client = store._client  # the boto3 client: notifications are S3-only, not part of ObjectStore
        config = client.get_bucket_notification_configuration(Bucket=settings.s3_bucket)
    except Exception as exc:  # MinIO/Ceph may not implement it; not a failure of waferwatch's setup
        return Check(
            "events",
            "warn",
            f"cannot read the bucket's notification configuration ({exc}); make sure ObjectCreated under "
            f"{settings.incoming_prefix} is announced to `waferwatch ingest` (docs/deploy.md)",
        )
    targets = [
        *config.get("QueueConfigurations", []),
        *config.get("TopicConfigurations", []),
        *config.get("LambdaFunctionConfigurations", []),
    ]
    covering = []
    for target in targets:
        rules = (target.get("Filter") or {}).get("Key", {}).get("FilterRules", [])
        prefix = next((rule["Value"] for rule in rules if rule.get("Name", "").lower() == "prefix"), "")
        if settings.incoming_prefix.startswith(prefix) and any("ObjectCreated" in e for e in target.get("Events", [])):
            covering.append(target.get("QueueArn") or target.get("TopicArn") or target.get("LambdaFunctionArn"))
    if covering:
        return Check("events", "ok", f"ObjectCreated under {settings.incoming_prefix} goes to {', '.join(covering)}")
    return Check(
        "events",
        "fail",
        f"no ObjectCreated notification covers {settings.incoming_prefix} (WAFERWATCH_INCOMING_PREFIX) in bucket "
        f"{settings.s3_bucket}: add an s3:ObjectCreated:* rule with prefix {settings.incoming_prefix} to the SQS "
        "queue of WAFERWATCH_SQS_QUEUE_URL or the webhook of `waferwatch ingest --source webhook` (docs/deploy.md); "
        "until then new images arrive only through the periodic reconcile",
    )


def _verify_in_store(store: Any, prefix: str) -> str:
    """Download ``prefix``'s manifest and check every listed file's sha256; returns the version."""
    from models.artifacts import MANIFEST

    manifest = json.loads(store.get(prefix + MANIFEST, max_bytes=64 * 1024 * 1024).data)
    for name, expected in sorted((manifest.get("files") or {}).items()):
        data = store.get(prefix + name, max_bytes=4 * 1024 * 1024 * 1024).data
        if hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(f"{prefix}{name} does not match its sha256 in the manifest; republish the model")
    return str(manifest["version"])


def check_model(settings: Settings, database_ok: bool) -> Check:
    if settings.model_dir is not None:
        from models import FoldEnsemble

        try:
            ensemble = FoldEnsemble.load(settings.model_dir, device="cpu")
        except Exception as exc:
            return Check("model", "fail", f"WAFERWATCH_MODEL_DIR {settings.model_dir}: {exc}")
        return Check("model", "ok", f"{ensemble.version} from {settings.model_dir}: loads, every hash matches")
    if not database_ok:
        return Check("model", "warn", "not checked: the database is not ready (see above)")
    from worker import repository
    from worker.db import make_engine, make_session_factory, session_scope

    engine = make_engine(settings.database_url, sqlite_begin="DEFERRED")
    try:
        with session_scope(make_session_factory(engine)) as session:
            row = repository.get_active_model_version(session)
            active = (row.id, row.artifact_uri) if row is not None else None
    finally:
        engine.dispose()
    if active is None:
        return Check("model", "fail", "no active model version; run `waferwatch demo` or train one and promote it")
    version, uri = active
    try:
        if uri and uri.startswith(("/", "file://")):
            from models import FoldEnsemble

            FoldEnsemble.load(Path(uri.removeprefix("file://")), device="cpu")
        else:
            prefix = uri.removeprefix(f"s3://{settings.s3_bucket}/")
            found = _verify_in_store(_store(settings), prefix if prefix.endswith("/") else prefix + "/")
            if found != version:
                raise ValueError(f"the artifact holds {found}, not {version}; fix the registry")
    except Exception as exc:
        return Check("model", "fail", f"active version {version} at {uri}: {exc}")
    return Check("model", "ok", f"active version {version} at {uri}: every file's hash matches")


def check_gpu(settings: Settings) -> Check:
    import torch

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return Check("gpu", "ok", f"{names}; device setting {settings.device}")
    if settings.device.startswith("cuda"):
        return Check("gpu", "fail", f"device is {settings.device} but CUDA is not available; set WAFERWATCH_DEVICE=cpu")
    return Check("gpu", "ok", "no GPU: scoring runs on the CPU (set WAFERWATCH_DEVICE=cuda on a GPU machine)")


def check_speed(settings: Settings) -> Check:
    """The compiled fast paths this install has: a missing one costs CPU per image, never a result."""
    from models.png_decoders import PNG_DECODER
    from worker.s3_reads import fast_reads_available

    status: Status = "ok"
    if PNG_DECODER == "wuffs":
        parts = ["PNGs decoded by Wuffs"]
    else:
        status = "warn"
        parts = [
            f"PNGs decoded by {PNG_DECODER or 'Pillow'}, about 1 ms more CPU per image than Wuffs: "
            "pip install 'waferwatch[fast-png]' (pywuffs builds with a C++ compiler)"
        ]
    if settings.storage == "s3":
        if not settings.s3_fast_reads:
            parts.append("S3 GETs through boto3 (WAFERWATCH_S3_FAST_READS=false; obstore takes a third of its CPU)")
        elif fast_reads_available():
            parts.append("S3 GETs through obstore")
        else:
            status = "warn"
            parts.append("S3 GETs through boto3: obstore is not installed (pip install obstore)")
    return Check("speed", status, "; ".join(parts))


def run_checks(settings: Settings) -> list[Check]:
    """Every check after the settings, each guarded so one broken service never hides the others."""
    checks: list[Check] = []

    def guarded(name: str, check: Callable[[], Check]) -> Check:
        try:
            return check()
        except Exception as exc:  # a doctor reports, it does not crash
            return Check(name, "fail", f"{type(exc).__name__}: {exc}")

    database = guarded("database", lambda: check_database(settings))
    checks.append(database)
    broker = guarded("broker", lambda: check_broker(settings))
    checks.append(broker)
    checks.append(guarded("queues", lambda: check_queues(settings, broker.status == "ok")))
    checks.append(guarded("bucket", lambda: check_bucket(settings)))
    checks.append(guarded("events", lambda: check_notifications(settings)))
    checks.append(guarded("model", lambda: check_model(settings, database.status == "ok")))
    checks.append(guarded("gpu", lambda: check_gpu(settings)))
    checks.append(guarded("speed", lambda: check_speed(settings)))
    return checks


@app.command()
def doctor() -> None:
    """Check the settings, database, broker, the queues live workers consume, bucket, event notifications,
    model, GPU and the compiled fast paths; one line each, saying what to do. Exit code 1 if a check failed."""
    settings_check, settings = check_settings()
    checks = [settings_check, *(run_checks(settings) if settings is not None else [])]
    out = Console(soft_wrap=True)
    for check in checks:
        out.print(f"{_MARK[check.status]} {check.name:<9} {escape(check.detail)}", highlight=False)
    if settings is not None and not any(path.is_file() for path in settings_files()[1:]):
        out.print(f"      (the demo's settings: `waferwatch --workdir runs/demo doctor` or {HOME_ENV}=runs/demo)")
    if any(check.status == "fail" for check in checks):
        raise typer.Exit(1)
