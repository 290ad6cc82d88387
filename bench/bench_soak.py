"""Soak under chaos: N images through moto S3 → SQS → ingest → Celery (Redis) → workers → PostgreSQL while
a seeded chaos loop kills a worker process every 20-40 s and restarts Redis once (issue 12).

Two runs on the same machine, each of ``--images`` images uploaded at once (a backlog):

* *calm*: no faults, for the reference throughput;
* *chaos*: ``random.Random(--seed)`` picks, every 20-40 s, one of the two workers and kills (SIGKILL) its
  Celery main process or its pool child; right after the first kill Redis is killed and restarted
  on the same port (with AOF, as docker-compose.yml runs it).

The workers are the product's ``waferwatch worker`` (each a supervisor around one Celery prefork process
with one child, one CPU thread), and ``waferwatch beat`` re-drives expired leases (``lease_s`` 60,
``redrive_interval_s`` 20: the defaults) and reconciles every 60 s (images queued > 120 s are re-sent:
what a Redis restart can drop within AOF's one-second window). Ingest runs in this process.

Prints, per run: images dropped (no terminal row at the end), images with exactly one inference,
duplicates (an image with more than one inference of the active version, or a key with more than one
row), failures by reason, the upload time, the time from the first upload to the last committed row and
images/s over it, and the chaos run's throughput ratio against the calm one. Goal: 0 lost, 0 duplicated, ratio >= 0.8.

Needs PostgreSQL (``WAFERWATCH_TEST_PG_ADMIN_URL``, default postgres@127.0.0.1:5432; a throw-away database
per run) and ``redis-server`` on PATH (a private one on a free port). Usage:
``python bench/bench_soak.py [--images 2000 | --long (10,000)] [--seed 12] [--train 20]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import psutil
import psycopg
from moto.server import ThreadedMotoServer
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.magnetic_tile import DATASETS
from models import FoldEnsemble, PatchCoreConfig
from models.datasets import read_image_csv
from worker.app import create_app, make_enqueue, workers_idle
from worker.db import make_engine, make_session_factory, session_scope, upgrade_database
from worker.ingest import build_source, make_ingestor, run_ingest
from worker.model_provider import publish_model
from worker.schema import Failure, Image, Inference
from worker.settings import Settings
from worker.storage import make_store

PG_ADMIN_URL = os.environ.get("WAFERWATCH_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BUCKET = "bench-soak"
TERMINAL = ("scored", "failed", "skipped", "superseded")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Redis:
    """A private ``redis-server`` with AOF (everysec), restartable on its port."""

    workdir: Path
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.workdir)]
        with (self.workdir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        time.sleep(0.5)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def _start(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("WAFERWATCH_")} | env
    command = [sys.executable, "-c", "from worker.cli import main; main()", *args]
    with log.open("ab") as out:
        return subprocess.Popen(command, env=child_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _victim(supervisor: subprocess.Popen[bytes], rng: random.Random) -> tuple[str, int] | None:
    """The Celery main process under ``supervisor`` or (at random) its pool child."""
    try:
        mains = [p for p in psutil.Process(supervisor.pid).children() if "--no-supervise" in p.cmdline()]
    except psutil.NoSuchProcess:
        return None
    if not mains:
        return None
    children = mains[0].children()
    if children and rng.random() < 0.5:
        return "child", children[0].pid
    return "main", mains[0].pid


def _chaos(
    workers: list[subprocess.Popen[bytes]],
    redis_server: Redis,
    rng: random.Random,
    stop: threading.Event,
    log: list[str],
) -> None:
    began = time.monotonic()
    kills = 0
    while not stop.wait(rng.uniform(20, 40)):
        worker = rng.choice(workers)
        victim = _victim(worker, rng)
        if victim is not None:
            os.kill(victim[1], signal.SIGKILL)
            kills += 1
            log.append(f"{time.monotonic() - began:6.1f} s: SIGKILL worker {workers.index(worker)} {victim[0]}")
        if kills == 1:  # once, early, so that even a short run sees it
            redis_server.kill()
            time.sleep(1.0)
            redis_server.start()
            log.append(f"{time.monotonic() - began:6.1f} s: Redis killed and restarted")


def _run(name: str, args: argparse.Namespace, model_dir: Path, payloads: list[bytes], chaos: bool) -> float:
    """One run; prints its figures and returns images/s (first upload → last committed row)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-soak-{name}-"))
    moto_port = _free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{moto_port}"
    redis_server = Redis(workdir)
    redis_server.start()
    db_name = f"waferwatch_soak_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{db_name}"')
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=db_name).render_as_string(False)
    processes: list[subprocess.Popen[bytes]] = []
    stop_chaos, stop_ingest = threading.Event(), threading.Event()
    engine = None
    try:
        upgrade_database(url)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        sqs = boto3.client("sqs", endpoint_url=endpoint)
        queue_url = sqs.create_queue(QueueName="soak-events", Attributes={"VisibilityTimeout": "30"})["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        s3.create_bucket(Bucket=BUCKET)
        rule = {"Key": {"FilterRules": [{"Name": "prefix", "Value": "incoming/"}]}}
        s3.put_bucket_notification_configuration(
            Bucket=BUCKET,
            NotificationConfiguration={
                "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"], "Filter": rule}]
            },
        )
        values = {
            "database_url": url,
            "broker_url": f"redis://127.0.0.1:{redis_server.port}/0",
            "storage": "s3",
            "s3_endpoint_url": endpoint,
            "s3_bucket": BUCKET,
            "sqs_queue_url": queue_url,
            "model_cache_dir": str(workdir / "cache"),
            "device": "cpu",
            "cpu_threads": "1",
            "batch_size": "16",
            "batch_wait_ms": "500",
            "reconcile_interval_s": "60",
            "reconcile_stale_after_s": "120",
        }
        settings = Settings(**values)  # type: ignore[arg-type]
        engine = make_engine(url)
        session_factory = make_session_factory(engine)
        store = make_store("s3", endpoint_url=endpoint, bucket=BUCKET, region="us-east-1")
        version = publish_model(store, session_factory, model_dir, model_prefix="models/").version
        env = {f"WAFERWATCH_{k.upper()}": v for k, v in values.items()}
        workers = [
            _start(env, workdir / f"worker-{i}.log", "worker", "--pool", "prefork", "--concurrency", "1")
            for i in range(args.workers)
        ]
        processes += workers
        processes.append(_start(env, workdir / "beat.log", "beat", "--schedule", str(workdir / "beat-schedule")))
        app = create_app(settings, set_as_current=False)
        ingestor = make_ingestor(
            settings, session_factory=session_factory, enqueue=make_enqueue(app), bucket=BUCKET, idle=workers_idle(app)
        )
        source = build_source("sqs", settings, ingestor, bucket=BUCKET, sqs_wait_time_s=1)
        ingest = threading.Thread(target=run_ingest, args=(source, ingestor, stop_ingest), daemon=True)
        ingest.start()
        s3.put_object(Bucket=BUCKET, Key="warmup/0.png", Body=payloads[0])  # outside incoming/: no event
        time.sleep(20)  # workers up (they load the model on their first batch)

        chaos_log: list[str] = []
        if chaos:
            thread = threading.Thread(
                target=_chaos,
                args=(workers, redis_server, random.Random(args.seed), stop_chaos, chaos_log),
                daemon=True,
            )
            thread.start()
        keys = [f"incoming/soak/{i:05d}.png" for i in range(args.images)]
        first_upload = time.monotonic()
        for index, key in enumerate(keys):
            s3.put_object(Bucket=BUCKET, Key=key, Body=payloads[index % len(payloads)])
        uploaded = time.monotonic()
        deadline = uploaded + args.timeout
        last_row_s = None
        while time.monotonic() < deadline:
            with session_scope(session_factory) as session:
                open_rows = session.scalar(
                    select(func.count()).select_from(Image).where(Image.key.in_(keys), Image.status == "queued")
                )
                rows = session.scalar(select(func.count(func.distinct(Image.key))).where(Image.key.in_(keys)))
            if rows == len(keys) and open_rows == 0:
                last_row_s = time.monotonic() - uploaded
                break
            time.sleep(1.0)
        stop_chaos.set()
        stop_ingest.set()
        ingest.join(timeout=30)  # before Redis goes: its last enqueue must not meet a dead broker
        with session_scope(session_factory) as session:
            per_image = dict(
                session.execute(
                    select(Image.id, func.count(Inference.id))
                    .outerjoin(Inference, (Inference.image_id == Image.id) & (Inference.model_version == version))
                    .where(Image.key.in_(keys))
                    .group_by(Image.id)
                ).all()
            )
            statuses = dict(session.execute(select(Image.id, Image.status).where(Image.key.in_(keys))).all())
            keys_seen = Counter(session.scalars(select(Image.key).where(Image.key.in_(keys))))
            failures = Counter(
                session.scalars(
                    select(Failure.error_type).join(Image, Image.id == Failure.image_id).where(Image.key.in_(keys))
                )
            )
        terminal_keys = set(keys_seen)
        lost = len(keys) - len(terminal_keys) + sum(1 for status in statuses.values() if status not in TERMINAL)
        exactly_one = sum(1 for count in per_image.values() if count == 1)
        duplicates = sum(1 for count in per_image.values() if count > 1) + sum(1 for c in keys_seen.values() if c > 1)
        drain = last_row_s if last_row_s is not None else float("nan")
        # Images/s over the whole run: the uploads overlap the scoring, and under chaos they can take longer
        # than the drain after them (a rate over the drain alone reads 11,000 images/s then).
        upload_s = uploaded - first_upload
        total = upload_s + drain
        rate = len(keys) / total if last_row_s else 0.0
        print(f"\n{name}: {len(keys)} images, {args.workers} workers (prefork 1 child, 1 thread each)")
        for line in chaos_log:
            print(f"  chaos {line}")
        print(f"  dropped (no terminal row): {lost}")
        print(f"  exactly one inference: {exactly_one}")
        print(f"  duplicates: {duplicates}")
        print(f"  failures by reason: {dict(sorted(failures.items())) or 'none'}")
        print(f"  uploads {upload_s:.1f} s; last upload → last committed row {drain:.1f} s")
        print(f"  first upload → last committed row: {total:.1f} s ({rate:.2f} images/s)")
        return rate
    finally:
        stop_chaos.set()
        stop_ingest.set()
        for process in reversed(processes):
            _stop(process)
        redis_server.kill()
        if engine is not None:
            engine.dispose()
        moto.stop()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--long", action="store_true", help="10,000 images")
    parser.add_argument("--seed", type=int, default=12, help="the chaos loop's random seed")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train", type=int, default=20, help="training images of the benchmark model")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds a run may take to drain")
    args = parser.parse_args()
    if args.long:
        args.images = 10_000
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    os.environ.update({"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"})
    data = DATASETS / "dacon-semiconductor"
    train = sorted(read_image_csv(data / "train.csv"), key=lambda r: r.id)[: args.train]
    payloads = [ref.path.read_bytes() for ref in sorted(read_image_csv(data / "test.csv"), key=lambda r: r.id)]
    print(f"training the benchmark model on {len(train)} images (coreset 2 %, 2 folds) …", flush=True)
    config = PatchCoreConfig(coreset_ratio=0.02, folds=2)
    ensemble = FoldEnsemble.fit([r.id for r in train], [r.path for r in train], config, device="cpu")
    model_dir = ensemble.save(Path(tempfile.mkdtemp(prefix="bench-soak-model-")) / "model")
    calm = _run("calm", args, model_dir, payloads, chaos=False)
    chaotic = _run("chaos", args, model_dir, payloads, chaos=True)
    print(f"\nthroughput ratio chaos / calm: {chaotic / calm:.2f}" if calm else "\ncalm run did not drain")


if __name__ == "__main__":
    main()
