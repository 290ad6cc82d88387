"""End to end on real components: moto S3 → SQS notifications → ingest → Celery on Redis → PostgreSQL.

One ``waferwatch worker`` subprocess (the product's default pool) serves the whole module; it reads its
configuration from ``WAFERWATCH_*`` variables exactly as in a deployment. Redis database 15 is the broker and is flushed
before and after. Each test uses its own keys, so tests share the bucket, the queue and the database.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from worker.app import create_app, make_enqueue, workers_idle
from worker.db import make_engine, make_session_factory, session_scope, upgrade_database
from worker.demo import start_worker, stop_worker
from worker.ingest import Ingestor, build_source, make_ingestor, run_ingest
from worker.model_provider import publish_model
from worker.schema import Failure, Image, Inference
from worker.settings import Settings
from worker.sources.sqs import SqsSource
from worker.storage import make_store

try:
    from tests.s3_server import free_port
except ModuleNotFoundError:  # pytest put tests/ itself on sys.path
    from s3_server import free_port

BROKER_URL = "redis://127.0.0.1:6379/15"
BUCKET = "fab-e2e"
AWKWARD_KEYS = [
    "incoming/plain.png",
    "incoming/with space/die 01.png",
    "incoming/plus+sign/a+b.png",
    "incoming/percent%25/100%.png",
    "incoming/unicode/wafer-é-ß-東京.png",
    "incoming/deep/lot-7/wafer-3/slot 2/x+y %z.png",
]


@dataclass
class Pipeline:
    settings: Settings
    env: dict[str, str]
    s3: Any
    sqs: Any
    queue_arn: str
    session_factory: sessionmaker[Session]
    redis: redis.Redis
    images: list[Path]

    def ingestor(self) -> Ingestor:
        app = create_app(self.settings, set_as_current=False)
        return make_ingestor(
            self.settings,
            session_factory=self.session_factory,
            enqueue=make_enqueue(app),
            bucket=BUCKET,
            idle=workers_idle(app),
        )

    def drain_sqs(self) -> None:
        """Ingest every pending notification (the same SqsSource and Ingestor as ``ingest --source sqs``)."""
        ingestor = self.ingestor()
        source = build_source("sqs", self.settings, ingestor, bucket=BUCKET, sqs_wait_time_s=1)
        assert isinstance(source, SqsSource)
        idle = 0
        while idle < 2:
            idle = idle + 1 if source.poll_once() == 0 else 0
        ingestor.close()

    def notifications(self, enabled: bool) -> None:
        config: dict[str, Any] = {}
        if enabled:
            config = {"QueueConfigurations": [{"QueueArn": self.queue_arn, "Events": ["s3:ObjectCreated:*"]}]}
        self.s3.put_bucket_notification_configuration(Bucket=BUCKET, NotificationConfiguration=config)

    def rows(self, keys: list[str]) -> dict[str, tuple[str, int]]:
        """key → (status, number of inferences)."""
        with session_scope(self.session_factory) as session:
            images = session.execute(select(Image.key, Image.status, Image.id).where(Image.key.in_(keys))).all()
            counts = {
                image_id: len(session.scalars(select(Inference.id).where(Inference.image_id == image_id)).all())
                for _, _, image_id in images
            }
        return {key: (status, counts[image_id]) for key, status, image_id in images}

    def wait_settled(self, keys: list[str], timeout_s: float = 90.0) -> dict[str, tuple[str, int]]:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.rows(keys)
            if len(rows) == len(keys) and all(status != "queued" for status, _ in rows.values()):
                return rows
            if time.monotonic() > deadline:
                pytest.fail(f"not settled after {timeout_s} s: {rows}")
            time.sleep(0.3)

    def wait_idle(self) -> None:
        """Until the score queue is empty and nothing is reserved (unacked) by the worker."""
        deadline = time.monotonic() + 60
        while self.redis.llen("score") or self.redis.hlen("unacked"):
            assert time.monotonic() < deadline, "worker did not become idle"
            time.sleep(0.3)
        time.sleep(1.5)


def _wait_worker_ready(process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while "ready." not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"worker did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def pipeline(
    s3_server: str,
    pg_database_factory: Callable[[], str],
    redis_client: redis.Redis,
    pipeline_model_dir: Path,
    dacon_test_images: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pipeline]:
    workdir = tmp_path_factory.mktemp("e2e")
    broker = redis.Redis.from_url(BROKER_URL)
    broker.flushdb()
    url = pg_database_factory()
    upgrade_database(url)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=s3_server, region_name="us-east-1")
    queue_name = f"fab-events-{uuid.uuid4().hex[:8]}"
    queue_url = sqs.create_queue(QueueName=queue_name, Attributes={"VisibilityTimeout": "5"})["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.create_bucket(Bucket=BUCKET)
    values = {
        "database_url": url,
        "broker_url": BROKER_URL,
        "storage": "s3",
        "s3_endpoint_url": s3_server,
        "s3_bucket": BUCKET,
        "sqs_queue_url": queue_url,
        "model_cache_dir": str(workdir / "cache"),
        "device": "cpu",
        "batch_size": "8",
        "batch_wait_ms": "200",
        "task_max_attempts": "2",
        "retry_backoff_s": "0.5",
        "redis_events_url": BROKER_URL,
        "metrics_port": str(free_port()),
    }
    settings = Settings(**values)  # type: ignore[arg-type]
    env = {f"WAFERWATCH_{name.upper()}": value for name, value in values.items()}
    engine = make_engine(url)
    session_factory = make_session_factory(engine)
    store = make_store("s3", endpoint_url=s3_server, bucket=BUCKET, region="us-east-1")
    publish_model(store, session_factory, pipeline_model_dir, model_prefix="models/")
    log = workdir / "worker.log"
    # The product's own command and pool defaults: on a CPU, prefork with one process per core (at most 4),
    # so with 2+ cores this also covers metrics summed over several children.
    process = start_worker(env, log, "--queues", "score,ingest")
    try:
        _wait_worker_ready(process, log)
        pipeline = Pipeline(settings, env, s3, sqs, queue_arn, session_factory, broker, dacon_test_images)
        pipeline.notifications(enabled=True)
        yield pipeline
    finally:
        stop_worker(process)
        engine.dispose()
        broker.flushdb()
        broker.close()


def test_awkward_keys_through_ingest_sqs_and_worker(pipeline: Pipeline) -> None:
    for key, path in zip(AWKWARD_KEYS, pipeline.images, strict=False):
        pipeline.s3.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
    ingestor = pipeline.ingestor()
    source = build_source("sqs", pipeline.settings, ingestor, bucket=BUCKET, sqs_wait_time_s=1)
    stop = threading.Event()
    thread = threading.Thread(target=run_ingest, args=(source, ingestor, stop), daemon=True)
    thread.start()
    try:
        rows = pipeline.wait_settled(AWKWARD_KEYS)
    finally:
        stop.set()
        thread.join(timeout=15)

    assert rows == dict.fromkeys(AWKWARD_KEYS, ("scored", 1))
    _assert_worker_metrics(pipeline, at_least=len(AWKWARD_KEYS))
    with session_scope(pipeline.session_factory) as session:
        heatmaps = session.execute(
            select(Image.key, Inference.anomaly_map_png, Inference.download_ms, Inference.model_ms)
            .join(Inference, Inference.image_id == Image.id)
            .where(Image.key.in_(AWKWARD_KEYS))
        ).all()
    assert len(heatmaps) == len(AWKWARD_KEYS)
    for _, anomaly_map_png, download_ms, model_ms in heatmaps:
        assert anomaly_map_png.startswith(b"\x89PNG")  # the map travels with its row, whatever the key
        assert download_ms is not None and model_ms > 0
    assert "Contents" not in pipeline.s3.list_objects_v2(Bucket=BUCKET, Prefix="heatmaps/")
    assert not thread.is_alive()


def _assert_worker_metrics(pipeline: Pipeline, *, at_least: int) -> None:
    """Scrape the worker's Prometheus endpoint right after a real scoring run."""
    url = f"http://127.0.0.1:{pipeline.settings.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    scored = sum(v for k, v in samples.items() if k.startswith("waferwatch_images_scored_total"))
    assert scored >= at_least, text
    stages = {k for k in samples if k.startswith("waferwatch_stage_seconds_count")}
    assert any('stage="model"' in k for k in stages) and any('stage="download"' in k for k in stages), stages
    assert any(k.startswith("waferwatch_batch_size_count") and v >= 1 for k, v in samples.items())
    assert any(k.startswith("waferwatch_active_model_info{") and v == 1 for k, v in samples.items()), text


def test_duplicate_notification_adds_no_row(pipeline: Pipeline) -> None:
    key = "incoming/dup/twice.png"
    pipeline.s3.put_object(Bucket=BUCKET, Key=key, Body=pipeline.images[10].read_bytes())
    queue_url = pipeline.settings.sqs_queue_url
    messages = pipeline.sqs.receive_message(
        QueueUrl=queue_url, MaxNumberOfMessages=10, VisibilityTimeout=0, WaitTimeSeconds=2
    )
    bodies = [m["Body"] for m in messages.get("Messages", []) if "twice.png" in m["Body"]]
    assert bodies, "moto sent no notification"
    pipeline.sqs.send_message(QueueUrl=queue_url, MessageBody=bodies[0])  # the same event again

    pipeline.drain_sqs()
    assert pipeline.wait_settled([key]) == {key: ("scored", 1)}
    pipeline.drain_sqs()  # nothing left, and a late duplicate would change nothing
    pipeline.wait_idle()
    assert pipeline.rows([key]) == {key: ("scored", 1)}


def test_corrupt_zero_byte_and_deleted_objects_are_recorded_without_retry_loops(pipeline: Pipeline) -> None:
    corrupt, empty, deleted = "incoming/bad/corrupt.png", "incoming/bad/zero.png", "incoming/bad/deleted.png"
    truncated = pipeline.images[11].read_bytes()[:2000]
    pipeline.s3.put_object(Bucket=BUCKET, Key=corrupt, Body=truncated)
    pipeline.s3.put_object(Bucket=BUCKET, Key=empty, Body=b"")
    pipeline.s3.put_object(Bucket=BUCKET, Key=deleted, Body=pipeline.images[12].read_bytes())
    pipeline.s3.delete_object(Bucket=BUCKET, Key=deleted)

    pipeline.drain_sqs()
    rows = pipeline.wait_settled([corrupt, empty, deleted])
    pipeline.wait_idle()

    assert rows == {corrupt: ("failed", 0), empty: ("failed", 0), deleted: ("skipped", 0)}
    with session_scope(pipeline.session_factory) as session:
        failures = session.execute(
            select(Image.key, Failure.error_type, Failure.attempts).join(Failure, Failure.image_id == Image.id)
        ).all()
    recorded = {
        key: (error_type, attempts) for key, error_type, attempts in failures if key.startswith("incoming/bad/")
    }
    assert recorded == {corrupt: ("bad_image", 1), empty: ("BadObjectError", 1)}


def test_reconcile_finds_an_object_whose_notification_never_came(pipeline: Pipeline) -> None:
    key = "incoming/lost/no-event.png"
    pipeline.notifications(enabled=False)
    try:
        pipeline.s3.put_object(Bucket=BUCKET, Key=key, Body=pipeline.images[13].read_bytes())
    finally:
        pipeline.notifications(enabled=True)
    pipeline.drain_sqs()
    assert pipeline.rows([key]) == {}

    env = {k: v for k, v in os.environ.items() if not k.startswith("WAFERWATCH_")} | pipeline.env
    command = [sys.executable, "-c", "from worker.cli import main; main()", "reconcile"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["registered"]["incoming"] == 1
    assert pipeline.wait_settled([key]) == {key: ("scored", 1)}


def _minio_record(key: str, etag: str, size: int) -> dict[str, Any]:
    from urllib.parse import quote_plus

    return {
        "eventName": "s3:ObjectCreated:Put",
        "s3": {"bucket": {"name": BUCKET}, "object": {"key": quote_plus(key, safe="/"), "eTag": etag, "size": size}},
    }


def test_webhook_and_redis_sources_are_wired_to_the_same_pipeline(pipeline: Pipeline, free_tcp_port: int) -> None:
    pipeline.notifications(enabled=False)
    try:
        uploaded = {}
        for key, path in (
            ("incoming/hook/a b.png", pipeline.images[14]),
            ("incoming/redis/c+d.png", pipeline.images[15]),
        ):
            data = path.read_bytes()
            etag = pipeline.s3.put_object(Bucket=BUCKET, Key=key, Body=data)["ETag"].strip('"')
            uploaded[key] = (etag, len(data))
    finally:
        pipeline.notifications(enabled=True)
    settings = pipeline.settings.model_copy(
        update={
            "webhook_port": free_tcp_port,
            "webhook_token": SecretStr("s3cret"),
            "redis_events_key": f"ww-e2e:{uuid.uuid4().hex}",
        }
    )
    stop = threading.Event()
    threads = []
    for name in ("webhook", "redis"):
        ingestor = pipeline.ingestor()
        source = build_source(name, settings, ingestor, bucket=BUCKET)
        threads.append(threading.Thread(target=run_ingest, args=(source, ingestor, stop), daemon=True))
    for thread in threads:
        thread.start()
    try:
        hook_key = "incoming/hook/a b.png"
        body = json.dumps(
            {"EventName": "s3:ObjectCreated:Put", "Records": [_minio_record(hook_key, *uploaded[hook_key])]}
        )

        def post(token: str) -> int:
            request = urllib.request.Request(
                f"http://127.0.0.1:{free_tcp_port}/",
                data=body.encode(),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                method="POST",
            )
            for _ in range(50):
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        return response.status
                except urllib.error.HTTPError as exc:
                    return exc.code
                except urllib.error.URLError:
                    time.sleep(0.1)  # not listening yet
            raise AssertionError("webhook never came up")

        assert post("wrong") == 401
        assert pipeline.rows([hook_key]) == {}
        assert post("s3cret") == 200

        redis_key = "incoming/redis/c+d.png"
        element = [{"Event": [_minio_record(redis_key, *uploaded[redis_key])], "EventTime": "2026-01-01T00:00:00Z"}]
        pipeline.redis.rpush(settings.redis_events_key, json.dumps(element))

        assert pipeline.wait_settled([hook_key, redis_key]) == {hook_key: ("scored", 1), redis_key: ("scored", 1)}
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=15)
        pipeline.redis.delete(settings.redis_events_key, f"{settings.redis_events_key}:processing")
