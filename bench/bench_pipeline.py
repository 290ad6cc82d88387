"""Pipeline throughput and latency: moto S3 → SQS → ingest → Celery (Redis) → model → PostgreSQL.

Prints (not a test):

* images/s through the whole pipeline at a batch size of 32, divided by images/s of the model alone
  (``score_images`` on the same decoded images, batch 32), same machine, twice:

  - *backlog*: N images are uploaded while ingest is stopped (their notifications wait in SQS), then
    ingest starts; timed from then to the last committed row (its ``created_at``, not when a poll saw
    it). This is the pipeline's own rate: the uploads (the inspection tool's work, and moto's
    notification fan-out) are not on the clock.
  - *live*: N images are uploaded from this process while the pipeline runs, all on the same 2 cores.

* where the cores went during each run (worker, this process = moto + ingest + uploader, PostgreSQL,
  Redis, idle);
* p50/p95 time from upload to committed inference row at a light load (one image every 2 s by default);
* the worker's CPU per image by stage (fetch, hash, decode, resize, model, heatmap, database: each batch
  logs its own ``cpu`` accounting; "Celery + leases + rest" is the worker's whole process tree less those)
  and ingest's (the ingest thread's own CPU: SQS receive and delete, registration, enqueue);
* the same for a backlog of 2048² JPEGs made from the Dacon images (``--jpeg-size``; 0 skips it).

``--pinned`` makes the ratio meaningful on a small machine: a private PostgreSQL and Redis, moto, ingest
and the uploader share the first core; one worker process of one thread has the second; the model alone
runs on that second core too, in the same layout (backlog runs only). The last line is
``pinned_ratio=<x.xx> worker_cpu_outside_model_ms=<x.x> ingest_cpu_ms=<x.x>`` (``ratio=…`` unpinned), for
the PNG backlog.

Needs PostgreSQL (``WAFERWATCH_TEST_PG_ADMIN_URL``, default postgres@127.0.0.1:5432; a throw-away database is
created and dropped) and Redis on 127.0.0.1:6379 (database 14 is flushed). Starts its own moto server and a
``waferwatch worker --queues score`` subprocess (the product's default pool for the device). Usage:
``python bench/bench_pipeline.py [--pinned] [--images 300] [--train 60] [--worker-concurrency N --worker-threads T]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import psycopg
import redis
import torch
from moto.server import ThreadedMotoServer
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import CpuLedger, jpeg_payloads
from bench.magnetic_tile import DATASETS
from bench.private_servers import PinnedPostgres, PinnedRedis, pin_process_tree
from models import FoldEnsemble, PatchCoreConfig, decode_image
from models.datasets import read_image_csv
from worker.app import create_app, make_enqueue, workers_idle
from worker.cli.pipeline_cmds import default_pool, threads_per_process
from worker.db import make_engine, make_session_factory, session_scope, upgrade_database
from worker.demo import start_worker, stop_worker
from worker.ingest import build_source, make_ingestor, run_ingest
from worker.model_provider import publish_model
from worker.schema import Image, Inference
from worker.settings import Settings
from worker.storage import make_store

PG_ADMIN_URL = os.environ.get("WAFERWATCH_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BROKER_URL = "redis://127.0.0.1:6379/14"
BUCKET = "bench"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_rows(session_factory, prefix: str, expected: int, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with session_scope(session_factory) as session:
            done = session.scalar(
                select(func.count()).select_from(Image).where(Image.key.startswith(prefix), Image.status != "queued")
            )
        if done >= expected:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{prefix}: only {done} of {expected} images done after {timeout_s} s")


def _seconds_to_last_row(session_factory, prefix: str, started: datetime) -> float:  # type: ignore[no-untyped-def]
    """Seconds from ``started`` to the last inference row of ``prefix`` (its ``created_at``, stamped by the
    worker just before its batch commits): the run's end, without the polling interval of ``_wait_rows``."""
    with session_scope(session_factory) as session:
        last = session.scalar(
            select(func.max(Inference.created_at))
            .join(Image, Image.id == Inference.image_id)
            .where(Image.key.startswith(prefix))
        )
    return (last - started).total_seconds()


def _tree_rss_mib(pid: int) -> list[float]:
    """Resident memory (MiB) of a process and its children: the worker parent, then each scoring child."""
    import psutil

    root = psutil.Process(pid)
    return [process.memory_info().rss / 2**20 for process in (root, *root.children(recursive=True))]


def _score_share(
    model_dir: str, payloads: list[bytes], threads: int, device: str, cores: set[int] | None, start: Any, done: Any
) -> None:
    """One model-alone process: decode its share to the model's input size, load the model, wait for the
    others, score in batches of 32 with maps (decode and resize are the worker's work, not the model's)."""
    if cores:
        os.sched_setaffinity(0, cores)
    from models.threads import set_cpu_threads
    from worker.decode_budget import return_large_buffers_to_the_os

    return_large_buffers_to_the_os()  # the worker's allocator settings: the model at its own best, as there

    set_cpu_threads(threads)
    ensemble = FoldEnsemble.load(model_dir, device=device)
    images = [decode_image(p, size=ensemble.input_size) for p in payloads]
    ensemble.score_images(images[:2])  # warm-up
    start.wait()
    for chunk in range(0, len(images), 32):
        ensemble.score_images(images[chunk : chunk + 32], with_maps=True)
    done.put(time.perf_counter())


def _model_alone_processes(
    model_dir: Path, payloads: list[bytes], processes: int, threads: int, device: str, cores: set[int] | None = None
) -> float:
    """Wall seconds for ``processes`` model-only processes of ``threads`` threads (on ``cores``) to score
    ``payloads`` (split evenly): the model's throughput in the worker's own layout of processes and threads."""
    context = multiprocessing.get_context("spawn")
    start, done = context.Barrier(processes + 1), context.Queue()
    shares = [payloads[index::processes] for index in range(processes)]
    children = [
        context.Process(target=_score_share, args=(str(model_dir), share, threads, device, cores, start, done))
        for share in shares
    ]
    for child in children:
        child.start()
    start.wait()
    begin = time.perf_counter()
    finished = max(done.get(timeout=600) for _ in children)
    for child in children:
        child.join()
    return finished - begin


#: Stages of the worker's own accounting (``BatchResult.cpu``, logged per batch), in pipeline order;
#: ``fetch_io`` is obstore's I/O threads (the GETs' request work off the fetch threads, from ``CpuLedger``).
STAGES = ("fetch", "fetch_io", "hash", "decode", "resize", "model", "heatmap", "overlay", "database")


def _batch_cpu(log: Path, offset: int) -> tuple[dict[str, float], list[int]]:
    """CPU seconds per stage summed over the ``score_batch`` log lines after byte ``offset``, and the
    number of images each of those batches scored."""
    totals: dict[str, float] = {}
    scored: list[int] = []
    with log.open("rb") as handle:
        handle.seek(offset)
        for raw in handle:
            line = raw.decode(errors="replace")
            if "score_batch {" not in line:
                continue
            record = json.loads(line.split("score_batch ", 1)[1])
            scored.append(len(record.get("scored", [])))
            for stage, seconds in record.get("cpu", {}).items():
                totals[stage] = totals.get(stage, 0.0) + seconds
    return totals, scored


@dataclass
class Run:
    """One timed backlog: images/s, the worker's CPU by stage and ingest's CPU, per image."""

    name: str
    images: int
    seconds: float
    worker_cpu_s: float
    stage_cpu_s: dict[str, float]
    ingest_cpu_s: float
    ledger: str
    batches: list[int]

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    def per_image_ms(self, seconds: float) -> float:
        return 1000.0 * seconds / self.images

    @property
    def outside_model_ms(self) -> float:
        """Worker CPU per image outside the model: the whole worker process tree (Celery included) less
        the model's own thread time."""
        return self.per_image_ms(self.worker_cpu_s - self.stage_cpu_s.get("model", 0.0))

    def stage_lines(self) -> list[str]:
        staged = sum(self.stage_cpu_s.values())
        parts = [
            f"{stage} {self.per_image_ms(self.stage_cpu_s[stage]):.2f}" for stage in STAGES if stage in self.stage_cpu_s
        ]
        other = self.per_image_ms(self.worker_cpu_s - staged)
        sizes = f"{len(self.batches)} batches, {self.images / max(1, len(self.batches)):.1f} images each"
        return [
            f"  {sizes}",
            f"  worker CPU per image (ms): {', '.join(parts)}, Celery + leases + rest {other:.2f}",
            f"  worker CPU outside the model: {self.outside_model_ms:.2f} ms/image; "
            f"ingest (registration + enqueue + SQS client): {self.per_image_ms(self.ingest_cpu_s):.2f} ms/image",
            f"  {self.ledger}",
        ]


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--images", type=int, default=300, help="images per run (the 100 Dacon test images, repeated under new keys)"
    )
    parser.add_argument("--train", type=int, default=60, help="training images for the benchmark model")
    parser.add_argument("--latency-images", type=int, default=20)
    parser.add_argument(
        "--latency-interval", type=float, default=2.0, help="seconds between uploads at light load (below capacity)"
    )
    parser.add_argument(
        "--worker-concurrency", type=int, default=None, help="worker processes (default: the product's)"
    )
    parser.add_argument("--worker-threads", type=int, default=None, help="OMP_NUM_THREADS of each worker process")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto: the worker's and the model-alone device")
    parser.add_argument("--backbone", default=PatchCoreConfig().backbone)
    parser.add_argument("--weights", default=None, help="'random' to time torchvision backbones offline")
    parser.add_argument("--coreset-ratio", type=float, default=PatchCoreConfig().coreset_ratio)
    parser.add_argument(
        "--pinned",
        action="store_true",
        help="moto, ingest, PostgreSQL and Redis (private instances) on the first core, one worker process of "
        "one thread on the second, the model alone on that core too; backlog runs only",
    )
    parser.add_argument("--model-chunk", type=int, default=None, help="the worker's model_chunk (default: its own)")
    parser.add_argument(
        "--jpeg-size", type=int, default=2048, help="also run a backlog of JPEGs this many pixels square (0: skip)"
    )
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    # SIGTERM (timeout, kill) runs the clean-up below: the worker, moto and the private servers are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    data = DATASETS / "dacon-semiconductor"
    train = sorted(read_image_csv(data / "train.csv"), key=lambda r: r.id)[: args.train]
    tests = sorted(read_image_csv(data / "test.csv"), key=lambda r: r.id)
    payloads = [ref.path.read_bytes() for ref in tests]
    workdir = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    os.environ.update({"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"})
    service_cores: set[int] | None = None
    worker_cores: set[int] | None = None
    if args.pinned:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            raise SystemExit(f"--pinned needs two cores; this process may run on {cores}")
        service_cores, worker_cores = {cores[0]}, {cores[1]}

    print(f"training the benchmark model on {len(train)} images …", flush=True)
    config = PatchCoreConfig(backbone=args.backbone, weights_path=args.weights, coreset_ratio=args.coreset_ratio)
    ensemble = FoldEnsemble.fit([r.id for r in train], [r.path for r in train], config, device=args.device)
    model_dir = ensemble.save(workdir / "model")
    ensemble = FoldEnsemble.load(model_dir, device=args.device)  # what the worker will load (hashes verified)
    jpegs = jpeg_payloads(payloads, args.jpeg_size) if args.jpeg_size else []

    servers: list[PinnedPostgres | PinnedRedis] = []
    pg_admin_url, broker_url = PG_ADMIN_URL, BROKER_URL
    if service_cores is not None:
        postgres = PinnedPostgres(Path(tempfile.mkdtemp(prefix="bench-pg-")), service_cores).start()
        servers.append(postgres)
        valkey = PinnedRedis(workdir / "redis", service_cores).start()
        servers.append(valkey)
        pg_admin_url, broker_url = postgres.admin_url, valkey.url
        pin_process_tree(os.getpid(), service_cores)  # this process: moto, ingest, the uploader
        print(
            f"pinned: services and this process on core {sorted(service_cores)}, "
            f"the worker on core {sorted(worker_cores or ())}"
        )

    port = _free_port()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log would cost CPU per request
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    db_name = f"waferwatch_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{db_name}"')
    url = make_url(pg_admin_url).set(drivername="postgresql+psycopg", database=db_name).render_as_string(False)
    broker = redis.Redis.from_url(broker_url)
    broker.flushdb()
    worker: subprocess.Popen[bytes] | None = None
    engine = None
    try:
        upgrade_database(url)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        sqs = boto3.client("sqs", endpoint_url=endpoint)
        queue_url = sqs.create_queue(QueueName="bench-events")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        s3.create_bucket(Bucket=BUCKET)
        s3.put_bucket_notification_configuration(
            Bucket=BUCKET,
            NotificationConfiguration={
                "QueueConfigurations": [
                    {  # as deployed (docs/deploy.md): heatmap and model writes raise no events
                        "QueueArn": arn,
                        "Events": ["s3:ObjectCreated:*"],
                        "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "incoming/"}]}},
                    }
                ]
            },
        )
        values = {
            "database_url": url,
            "broker_url": broker_url,
            "storage": "s3",
            "s3_endpoint_url": endpoint,
            "s3_bucket": BUCKET,
            "sqs_queue_url": queue_url,
            "model_cache_dir": str(workdir / "cache"),
            "device": args.device,
            "batch_size": "32",
            "batch_wait_ms": "500",
        }
        if args.model_chunk:
            values["model_chunk"] = str(args.model_chunk)
        settings = Settings(**values)  # type: ignore[arg-type]
        engine = make_engine(url)
        session_factory = make_session_factory(engine)
        store = make_store("s3", endpoint_url=endpoint, bucket=BUCKET, region="us-east-1")
        publish_model(store, session_factory, model_dir, model_prefix="models/")
        env = {f"WAFERWATCH_{k.upper()}": v for k, v in values.items()}
        worker_args = ["--queues", "score"]  # the product's default pool for the device unless overridden
        concurrency, threads_each = args.worker_concurrency, args.worker_threads
        if worker_cores is not None:
            concurrency, threads_each = concurrency or 1, threads_each or 1
        if concurrency:
            worker_args += ["--concurrency", str(concurrency)]
        if threads_each:
            env["OMP_NUM_THREADS"] = str(threads_each)
            env["WAFERWATCH_CPU_THREADS"] = str(threads_each)
        worker_log = workdir / "worker.log"
        worker = start_worker(env, worker_log, *worker_args)
        if worker_cores is not None:
            os.sched_setaffinity(worker.pid, worker_cores)  # before it forks its pool; all of it re-pinned below
        celery_app = create_app(settings)
        enqueue = make_enqueue(celery_app)

        def start_ingest() -> tuple[threading.Event, threading.Thread, list[float]]:
            ingestor = make_ingestor(
                settings,
                session_factory=session_factory,
                enqueue=enqueue,
                bucket=BUCKET,
                idle=workers_idle(celery_app),
            )
            source = build_source("sqs", settings, ingestor, bucket=BUCKET, sqs_wait_time_s=1)
            stop = threading.Event()
            cpu: list[float] = []

            def ingest() -> None:
                run_ingest(source, ingestor, stop)
                cpu.append(time.thread_time())  # this thread's CPU: receive, register, enqueue, delete

            thread = threading.Thread(target=ingest, daemon=True)
            thread.start()
            return stop, thread, cpu

        stop, ingest, _ = start_ingest()
        s3.put_object(Bucket=BUCKET, Key="incoming/warmup/0.png", Body=payloads[-1])
        _wait_rows(session_factory, "incoming/warmup/", 1, 180)  # worker started, model loaded
        if worker_cores is not None:
            pin_process_tree(worker.pid, worker_cores)

        n = args.images
        batch_payloads = [payloads[index % len(payloads)] for index in range(n)]
        live: Run | None = None
        if worker_cores is None:
            ledger = CpuLedger(worker.pid)
            offset = worker_log.stat().st_size
            started = datetime.now(UTC)
            for index in range(n):
                s3.put_object(Bucket=BUCKET, Key=f"incoming/live/{index:04d}.png", Body=batch_payloads[index])
            _wait_rows(session_factory, "incoming/live/", n, 600)
            live_s = _seconds_to_last_row(session_factory, "incoming/live/", started)
            spent = ledger.spent()
            stages, batches = _batch_cpu(worker_log, offset)
            stages["fetch_io"] = spent[0]["worker_io"]
            live = Run("live", n, live_s, spent[0]["worker"], stages, 0.0, ledger.report(spent), batches)
        stop.set()
        ingest.join(timeout=15)

        def backlog(name: str, sources: list[bytes], suffix: str) -> Run:
            """Upload ``n`` images with ingest stopped, then time ingest + scoring from the start of ingest."""
            for index in range(n):
                body = sources[index % len(sources)]
                s3.put_object(Bucket=BUCKET, Key=f"incoming/{name}/{index:04d}{suffix}", Body=body)
            time.sleep(1.0)  # moto's notifications are in the queue
            ledger = CpuLedger(worker.pid)
            offset = worker_log.stat().st_size
            started = datetime.now(UTC)
            stop, thread, ingest_cpu = start_ingest()
            _wait_rows(session_factory, f"incoming/{name}/", n, 900)
            seconds = _seconds_to_last_row(session_factory, f"incoming/{name}/", started)
            spent = ledger.spent()
            stop.set()
            thread.join(timeout=15)
            stages, batches = _batch_cpu(worker_log, offset)
            stages["fetch_io"] = spent[0]["worker_io"]
            ingest_s = ingest_cpu[0] if ingest_cpu else 0.0
            return Run(name, n, seconds, spent[0]["worker"], stages, ingest_s, ledger.report(spent), batches)

        runs = [backlog("backlog", batch_payloads, ".png")]
        if jpegs:
            runs.append(backlog(f"jpeg{args.jpeg_size}", jpegs, ".jpg"))
        worker_rss = _tree_rss_mib(worker.pid)

        if worker_cores is None:
            images = [decode_image(p, size=ensemble.input_size) for p in batch_payloads]
            timings: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(3):  # the median of three passes: these machines are noisy
                for with_maps in (True, False):
                    begin = time.perf_counter()
                    for chunk in range(0, n, 32):
                        ensemble.score_images(images[chunk : chunk + 32], with_maps=with_maps)
                    timings[with_maps].append(time.perf_counter() - begin)
            processes = args.worker_concurrency or default_pool(args.device, "score")[1]
            threads = args.worker_threads or threads_per_process("prefork", processes) or torch.get_num_threads()
        else:
            processes, threads = 1, 1
        split_s = statistics.median(
            _model_alone_processes(model_dir, batch_payloads, processes, threads, args.device, worker_cores)
            for _ in range(3)
        )

        stop, ingest, _ = start_ingest()
        uploaded: dict[str, datetime] = {}
        for index in range(args.latency_images):
            key = f"incoming/latency/{index:04d}.png"
            uploaded[key] = datetime.now(UTC)
            s3.put_object(Bucket=BUCKET, Key=key, Body=payloads[index])
            time.sleep(args.latency_interval)
        _wait_rows(session_factory, "incoming/latency/", args.latency_images, 120)
        with session_scope(session_factory) as session:
            created = dict(
                session.execute(
                    select(Image.key, Inference.created_at)
                    .join(Inference, Inference.image_id == Image.id)
                    .where(Image.key.startswith("incoming/latency/"))
                ).all()
            )
        latencies = sorted((created[key] - uploaded[key]).total_seconds() for key in uploaded)
        stop.set()
        ingest.join(timeout=15)

        split_rate = n / split_s
        model_rate = split_rate
        print()
        if worker_cores is None:
            with_maps_rate = n / statistics.median(timings[True])
            plain_rate = n / statistics.median(timings[False])
            model_rate = max(with_maps_rate, split_rate)
            print(f"model alone, one process, batch 32, with maps: {with_maps_rate:.2f} images/s")
            print(f"model alone, one process, batch 32, no maps:   {plain_rate:.2f} images/s")
        layout = f"{processes} process(es) × {threads} thread(s)"
        where = f" on core {sorted(worker_cores)}" if worker_cores else ""
        print(f"model alone, {layout}{where} (the worker's layout), with maps: {split_rate:.2f} images/s")
        for run in ([live] if live else []) + runs:
            print(
                f"pipeline, {run.name}: {run.images} images in {run.seconds:.1f} s = {run.rate:.2f} images/s (batch 32)"
            )
            print(f"  ratio pipeline / model alone (with maps): {run.rate / model_rate:.3f}")
            for line in run.stage_lines():
                print(line)
        print("worker resident memory (parent, then children): " + ", ".join(f"{m:.0f} MiB" for m in worker_rss))
        p95 = statistics.quantiles(latencies, n=20)[-1] if len(latencies) >= 2 else latencies[0]
        print(
            f"upload → committed row at 1 image / {args.latency_interval:g} s ({len(latencies)} images): "
            f"p50 {statistics.median(latencies):.2f} s, p95 {p95:.2f} s, max {latencies[-1]:.2f} s"
        )
        png = runs[0]
        label = "pinned_ratio" if worker_cores else "ratio"
        print(
            f"{label}={png.rate / model_rate:.2f} worker_cpu_outside_model_ms={png.outside_model_ms:.1f} "
            f"ingest_cpu_ms={png.per_image_ms(png.ingest_cpu_s):.1f}"
        )
    finally:
        if worker is not None:
            stop_worker(worker)
        if engine is not None:
            engine.dispose()
        broker.flushdb()
        moto.stop()
        with psycopg.connect(pg_admin_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
