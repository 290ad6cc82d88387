"""Pipeline throughput and latency: moto S3 → SQS → ingest → Celery (Redis) → model → PostgreSQL.

Prints (not a test):

* images/s through the whole pipeline at a batch size of 32, divided by images/s of the model alone
  (``score_images`` on the same decoded images, batch 32), same machine, twice:

  - *backlog*: N images are uploaded while ingest is stopped (their notifications wait in SQS), then
    ingest starts; timed from then to the last committed row. This is the pipeline's own rate: the
    uploads (the inspection tool's work, and moto's notification fan-out) are not on the clock.
  - *live*: N images are uploaded from this process while the pipeline runs, all on the same 2 cores.

* where the cores went during each run (worker, this process = moto + ingest + uploader, PostgreSQL,
  Redis, idle);
* p50/p95 time from upload to committed inference row at a light load (one image every 2 s by default).

Needs PostgreSQL (``WAFERWATCH_TEST_PG_ADMIN_URL``, default postgres@127.0.0.1:5432; a throw-away database is
created and dropped) and Redis on 127.0.0.1:6379 (database 14 is flushed). Starts its own moto server and a
``waferwatch worker --queues score`` subprocess (the product's default pool for the device). Usage:
``python bench/bench_pipeline.py [--images 300] [--train 60] [--worker-concurrency N --worker-threads T]``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
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

from bench.common import CpuLedger
from bench.magnetic_tile import DATASETS
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


def _tree_rss_mib(pid: int) -> list[float]:
    """Resident memory (MiB) of a process and its children: the worker parent, then each scoring child."""
    import psutil

    root = psutil.Process(pid)
    return [process.memory_info().rss / 2**20 for process in (root, *root.children(recursive=True))]


def _score_share(model_dir: str, payloads: list[bytes], threads: int, device: str, start: Any, done: Any) -> None:
    """One model-alone process: decode its share, load the model, wait for the others, score in batches of 32."""
    from models.threads import set_cpu_threads

    set_cpu_threads(threads)
    ensemble = FoldEnsemble.load(model_dir, device=device)
    images = [decode_image(p) for p in payloads]
    ensemble.score_images(images[:2])  # warm-up
    start.wait()
    for chunk in range(0, len(images), 32):
        ensemble.score_images(images[chunk : chunk + 32], with_maps=True)
    done.put(time.perf_counter())


def _model_alone_processes(model_dir: Path, payloads: list[bytes], processes: int, threads: int, device: str) -> float:
    """Wall seconds for ``processes`` model-only processes of ``threads`` threads to score ``payloads`` (split
    evenly): the model's throughput in the worker's own layout of processes and threads."""
    context = multiprocessing.get_context("spawn")
    start, done = context.Barrier(processes + 1), context.Queue()
    shares = [payloads[index::processes] for index in range(processes)]
    children = [
        context.Process(target=_score_share, args=(str(model_dir), share, threads, device, start, done))
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


def main() -> None:
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
    args = parser.parse_args()
    data = DATASETS / "dacon-semiconductor"
    train = sorted(read_image_csv(data / "train.csv"), key=lambda r: r.id)[: args.train]
    tests = sorted(read_image_csv(data / "test.csv"), key=lambda r: r.id)
    payloads = [ref.path.read_bytes() for ref in tests]
    workdir = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    os.environ.update({"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"})

    print(f"training the benchmark model on {len(train)} images …", flush=True)
    config = PatchCoreConfig(backbone=args.backbone, weights_path=args.weights, coreset_ratio=args.coreset_ratio)
    ensemble = FoldEnsemble.fit([r.id for r in train], [r.path for r in train], config, device=args.device)
    model_dir = ensemble.save(workdir / "model")
    ensemble = FoldEnsemble.load(model_dir, device=args.device)  # what the worker will load (hashes verified)

    port = _free_port()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log would cost CPU per request
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    endpoint = f"http://127.0.0.1:{port}"
    db_name = f"waferwatch_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{db_name}"')
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=db_name).render_as_string(False)
    broker = redis.Redis.from_url(BROKER_URL)
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
            "broker_url": BROKER_URL,
            "storage": "s3",
            "s3_endpoint_url": endpoint,
            "s3_bucket": BUCKET,
            "sqs_queue_url": queue_url,
            "model_cache_dir": str(workdir / "cache"),
            "device": args.device,
            "batch_size": "32",
            "batch_wait_ms": "500",
        }
        settings = Settings(**values)  # type: ignore[arg-type]
        engine = make_engine(url)
        session_factory = make_session_factory(engine)
        store = make_store("s3", endpoint_url=endpoint, bucket=BUCKET, region="us-east-1")
        publish_model(store, session_factory, model_dir, model_prefix="models/")
        env = {f"WAFERWATCH_{k.upper()}": v for k, v in values.items()}
        worker_args = ["--queues", "score"]  # the product's default pool for the device unless overridden
        if args.worker_concurrency:
            worker_args += ["--concurrency", str(args.worker_concurrency)]
        if args.worker_threads:
            env["OMP_NUM_THREADS"] = str(args.worker_threads)
        worker = start_worker(env, workdir / "worker.log", *worker_args)
        celery_app = create_app(settings)
        enqueue = make_enqueue(celery_app)

        def start_ingest() -> tuple[threading.Event, threading.Thread]:
            ingestor = make_ingestor(
                settings,
                session_factory=session_factory,
                enqueue=enqueue,
                bucket=BUCKET,
                idle=workers_idle(celery_app),
            )
            source = build_source("sqs", settings, ingestor, bucket=BUCKET, sqs_wait_time_s=1)
            stop = threading.Event()
            thread = threading.Thread(target=run_ingest, args=(source, ingestor, stop), daemon=True)
            thread.start()
            return stop, thread

        stop, ingest = start_ingest()
        s3.put_object(Bucket=BUCKET, Key="incoming/warmup/0.png", Body=payloads[-1])
        _wait_rows(session_factory, "incoming/warmup/", 1, 180)  # worker started, model loaded

        n = args.images
        batch_payloads = [payloads[index % len(payloads)] for index in range(n)]
        ledger = CpuLedger(worker.pid)
        started = time.perf_counter()
        for index in range(n):
            s3.put_object(Bucket=BUCKET, Key=f"incoming/live/{index:04d}.png", Body=batch_payloads[index])
        _wait_rows(session_factory, "incoming/live/", n, 600)
        live_s = time.perf_counter() - started
        live_cpu = ledger.report()

        stop.set()
        ingest.join(timeout=15)
        for index in range(n):
            s3.put_object(Bucket=BUCKET, Key=f"incoming/backlog/{index:04d}.png", Body=batch_payloads[index])
        ledger = CpuLedger(worker.pid)
        started = time.perf_counter()
        stop, ingest = start_ingest()
        _wait_rows(session_factory, "incoming/backlog/", n, 600)
        backlog_s = time.perf_counter() - started
        backlog_cpu = ledger.report()
        worker_rss = _tree_rss_mib(worker.pid)

        images = [decode_image(p) for p in batch_payloads]
        timings: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(3):  # the median of three passes: these machines are noisy
            for with_maps in (True, False):
                begin = time.perf_counter()
                for chunk in range(0, n, 32):
                    ensemble.score_images(images[chunk : chunk + 32], with_maps=with_maps)
                timings[with_maps].append(time.perf_counter() - begin)
        processes = args.worker_concurrency or default_pool(args.device, "score")[1]
        threads = args.worker_threads or threads_per_process("prefork", processes) or torch.get_num_threads()
        split_s = statistics.median(
            _model_alone_processes(model_dir, batch_payloads, processes, threads, args.device) for _ in range(3)
        )

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

        with_maps_rate = n / statistics.median(timings[True])
        plain_rate = n / statistics.median(timings[False])
        split_rate = n / split_s
        model_rate = max(with_maps_rate, split_rate)
        print(f"\nmodel alone, one process, batch 32, with maps: {with_maps_rate:.2f} images/s")
        print(f"model alone, one process, batch 32, no maps:   {plain_rate:.2f} images/s")
        print(
            f"model alone, {processes} processes × {threads} thread(s) (the worker's layout): {split_rate:.2f} images/s"
        )
        for name, seconds, cpu in (("backlog", backlog_s, backlog_cpu), ("live", live_s, live_cpu)):
            rate = n / seconds
            print(f"pipeline, {name}: {n} images in {seconds:.1f} s = {rate:.2f} images/s (batch 32)")
            print(f"  ratio pipeline / best model alone (with maps): {rate / model_rate:.3f}")
            print(f"  {cpu}")
        print("worker resident memory (parent, then children): " + ", ".join(f"{m:.0f} MiB" for m in worker_rss))
        p95 = statistics.quantiles(latencies, n=20)[-1] if len(latencies) >= 2 else latencies[0]
        print(
            f"upload → committed row at 1 image / {args.latency_interval:g} s ({len(latencies)} images): "
            f"p50 {statistics.median(latencies):.2f} s, p95 {p95:.2f} s, max {latencies[-1]:.2f} s"
        )
    finally:
        if worker is not None:
            stop_worker(worker)
        if engine is not None:
            engine.dispose()
        broker.flushdb()
        moto.stop()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
