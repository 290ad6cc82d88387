"""Event sources against real components: moto S3->SQS, real HTTP, real Redis, a real directory."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis

from worker.errors import EventSubmitError
from worker.events import ObjectEvent
from worker.sources.folder import FolderWatcher
from worker.sources.redis_list import RedisListSource
from worker.sources.sqs import SqsSource
from worker.sources.webhook import WebhookServer, make_webhook_server

AWKWARD_KEYS = [
    "plain.png",
    "with space/die 01.png",
    "plus+sign/a+b.png",
    "percent%25/100%.png",
    "unicode/wafer-é-ß-東京.png",
    "deep/lot-7/wafer-3/slot 2/x+y %z.tif",
]


class Recorder:
    """A submit callback that records what it was given, or fails on demand."""

    def __init__(self, *, fail: bool = False) -> None:
        self.batches: list[list[ObjectEvent]] = []
        self.fail = fail

    def __call__(self, events: list[ObjectEvent]) -> None:
        if self.fail:
            raise RuntimeError("database is down")
        self.batches.append(list(events))

    @property
    def keys(self) -> list[str]:
        return [event.key for batch in self.batches for event in batch]


# ------------------------------------------------------------------------------------ SQS


@pytest.fixture
def s3_to_sqs(s3_endpoint: str) -> tuple[Any, Any, str, str]:
    """A bucket whose ObjectCreated notifications go to an SQS queue with a 1 s visibility timeout."""
    kwargs = {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}
    s3 = boto3.client("s3", **kwargs)
    sqs = boto3.client("sqs", **kwargs)
    queue_url = sqs.create_queue(QueueName="fab-events", Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.create_bucket(Bucket="fab-images")
    s3.put_bucket_notification_configuration(
        Bucket="fab-images",
        NotificationConfiguration={"QueueConfigurations": [{"QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*"]}]},
    )
    return s3, sqs, queue_url, "fab-images"


def _queue_depth(sqs: Any, queue_url: str) -> int:
    attributes = sqs.get_queue_attributes(
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(attributes["ApproximateNumberOfMessagesNotVisible"])


def _drain(source: SqsSource, *, polls: int = 10) -> None:
    for _ in range(polls):
        source.poll_once()


def test_sqs_source_decodes_awkward_keys_and_skips_test_event(s3_to_sqs: tuple[Any, Any, str, str]) -> None:
    s3, sqs, queue_url, bucket = s3_to_sqs
    peek = sqs.receive_message(QueueUrl=queue_url, VisibilityTimeout=0)["Messages"]
    assert [json.loads(message["Body"])["Event"] for message in peek] == ["s3:TestEvent"]
    etags = {key: s3.put_object(Bucket=bucket, Key=key, Body=key.encode())["ETag"].strip('"') for key in AWKWARD_KEYS}
    recorder = Recorder()
    source = SqsSource(queue_url, client=sqs, submit=recorder, wait_time_s=0, visibility_timeout_s=1)

    _drain(source)

    assert sorted(recorder.keys) == sorted(AWKWARD_KEYS)
    for batch in recorder.batches:
        for event in batch:
            assert event.bucket == bucket
            assert event.etag == etags[event.key]
            assert event.size == len(event.key.encode())
            assert event.event_name.startswith("ObjectCreated:")
    assert _queue_depth(sqs, queue_url) == 0


def test_sqs_source_submits_a_received_page_at_once(s3_to_sqs: tuple[Any, Any, str, str]) -> None:
    """Five notifications received together are one submit (one transaction, one enqueue), not five."""
    s3, sqs, queue_url, bucket = s3_to_sqs
    _drain(SqsSource(queue_url, client=sqs, submit=Recorder(), wait_time_s=0), polls=2)  # moto's TestEvent
    keys = [f"incoming/page/{index}.png" for index in range(5)]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"png")
    recorder = Recorder()
    source = SqsSource(queue_url, client=sqs, submit=recorder, wait_time_s=1, visibility_timeout_s=1)

    submitted = source.poll_once()

    assert submitted == 5
    assert len(recorder.batches) == 1
    assert sorted(event.key for event in recorder.batches[0]) == keys
    assert _queue_depth(sqs, queue_url) == 0


def test_sqs_message_is_kept_when_submit_raises_and_redelivered(s3_to_sqs: tuple[Any, Any, str, str]) -> None:
    s3, sqs, queue_url, bucket = s3_to_sqs
    # Consume moto's s3:TestEvent first so the next receive holds the object event.
    _drain(SqsSource(queue_url, client=sqs, submit=Recorder(), wait_time_s=0), polls=2)
    s3.put_object(Bucket=bucket, Key="retry me.png", Body=b"png")
    failing = SqsSource(queue_url, client=sqs, submit=Recorder(fail=True), wait_time_s=0, visibility_timeout_s=1)

    with pytest.raises(EventSubmitError, match="redelivered") as caught:
        failing.poll_once()

    assert isinstance(caught.value.__cause__, RuntimeError)
    assert _queue_depth(sqs, queue_url) == 1
    time.sleep(1.2)  # the visibility timeout expires, the message is visible again
    recorder = Recorder()
    SqsSource(queue_url, client=sqs, submit=recorder, wait_time_s=1).poll_once()
    assert recorder.keys == ["retry me.png"]
    assert _queue_depth(sqs, queue_url) == 0


def test_sqs_unparseable_message_is_deleted_without_submit(s3_endpoint: str) -> None:
    sqs = boto3.client("sqs", endpoint_url=s3_endpoint, region_name="us-east-1")
    queue_url = sqs.create_queue(QueueName="junk")["QueueUrl"]
    sqs.send_message(QueueUrl=queue_url, MessageBody="this is { not json")
    recorder = Recorder()

    handled = SqsSource(queue_url, client=sqs, submit=recorder, wait_time_s=0).poll_once()

    assert handled == 0
    assert recorder.batches == []
    assert _queue_depth(sqs, queue_url) == 0


# -------------------------------------------------------------------------------- webhook

MINIO_WEBHOOK_BODY = {
    "EventName": "s3:ObjectCreated:Put",
    "Key": "wafers/lot 1/a+b.png",
    "Records": [
        {
            "eventVersion": "2.0",
            "eventSource": "minio:s3",
            "eventTime": "2024-05-02T08:15:30.123Z",
            "eventName": "s3:ObjectCreated:Put",
            "s3": {
                "bucket": {"name": "wafers"},
                "object": {"key": "lot+1%2Fa%2Bb.png", "size": 12, "eTag": "0123abcd"},
            },
        }
    ],
}


@pytest.fixture
def webhook() -> Iterator[tuple[WebhookServer, Recorder]]:
    """A running webhook server on 127.0.0.1 (a free port) with token ``s3cret`` and a 4 KiB body limit.

    The small limit keeps the oversized test body inside socket buffers, so the client reads
    the 413 instead of a connection reset.
    """
    recorder = Recorder()
    server = make_webhook_server("127.0.0.1", 0, "s3cret", recorder, max_body_bytes=4096)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, recorder
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _post(url: str, body: bytes, token: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_webhook_right_token_submits(webhook: tuple[WebhookServer, Recorder]) -> None:
    server, recorder = webhook

    status = _post(server.url + "/minio", json.dumps(MINIO_WEBHOOK_BODY).encode(), "s3cret")

    assert status == 200
    assert recorder.keys == ["lot 1/a+b.png"]


@pytest.mark.parametrize("token", ["wrong", None, ""])
def test_webhook_wrong_or_missing_token_is_401_and_nothing_submitted(
    webhook: tuple[WebhookServer, Recorder], token: str | None
) -> None:
    server, recorder = webhook

    status = _post(server.url + "/minio", json.dumps(MINIO_WEBHOOK_BODY).encode(), token)

    assert status == 401
    assert recorder.batches == []


def test_webhook_bad_json_is_400(webhook: tuple[WebhookServer, Recorder]) -> None:
    server, recorder = webhook

    assert _post(server.url, b"{not json", "s3cret") == 400
    assert recorder.batches == []


def test_webhook_failed_submit_is_503_so_minio_retries(webhook: tuple[WebhookServer, Recorder]) -> None:
    server, recorder = webhook
    recorder.fail = True

    assert _post(server.url, json.dumps(MINIO_WEBHOOK_BODY).encode(), "s3cret") == 503


def test_webhook_body_limit_and_health(webhook: tuple[WebhookServer, Recorder]) -> None:
    server, recorder = webhook

    assert _post(server.url, b"x" * (server.max_body_bytes + 1), "s3cret") == 413
    with urllib.request.urlopen(server.url + "/health", timeout=5) as response:
        assert response.status == 200
    head = urllib.request.Request(server.url + "/health", method="HEAD")
    with urllib.request.urlopen(head, timeout=5) as response:
        assert response.status == 200
    assert recorder.batches == []


# ---------------------------------------------------------------------------------- Redis


def _access_element(key: str, *, bucket: str = "wafers") -> str:
    """One list element exactly as MinIO's Redis target writes it in ``access`` format."""
    record = {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "eventTime": "2024-05-02T08:15:30.123Z",
        "eventName": "s3:ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 3, "eTag": "e1"}},
    }
    return json.dumps([{"Event": [record], "EventTime": "2024-05-02T08:15:30.123Z"}])


def test_redis_source_submits_and_acknowledges(redis_client: redis.Redis, redis_list_key: str) -> None:
    redis_client.rpush(redis_list_key, _access_element("a+1.png"), _access_element("b%2B2.png"))
    recorder = Recorder()
    source = RedisListSource(redis_client, redis_list_key, submit=recorder)

    assert source.poll_once(timeout_s=0.1) == 1
    assert source.poll_once(timeout_s=0.1) == 1
    assert source.poll_once(timeout_s=0.1) == 0

    assert recorder.keys == ["a 1.png", "b+2.png"]
    assert redis_client.llen(redis_list_key) == 0
    assert redis_client.llen(source.processing_key) == 0


def test_redis_element_stays_in_processing_list_when_submit_raises(
    redis_client: redis.Redis, redis_list_key: str
) -> None:
    element = _access_element("keep.png")
    redis_client.rpush(redis_list_key, element)
    failing = RedisListSource(redis_client, redis_list_key, submit=Recorder(fail=True))

    with pytest.raises(EventSubmitError):
        failing.poll_once(timeout_s=0.1)

    assert redis_client.lrange(failing.processing_key, 0, -1) == [element.encode()]
    assert failing.recover() == 1
    recorder = Recorder()
    RedisListSource(redis_client, redis_list_key, submit=recorder).poll_once(timeout_s=0.1)
    assert recorder.keys == ["keep.png"]
    assert redis_client.llen(failing.processing_key) == 0


def test_redis_source_run_stops_on_event(redis_client: redis.Redis, redis_list_key: str) -> None:
    stop = threading.Event()
    recorder = Recorder()
    source = RedisListSource(redis_client, redis_list_key, submit=recorder, poll_timeout_s=0.1)
    worker = threading.Thread(target=source.run, args=(stop,), daemon=True)
    worker.start()
    redis_client.rpush(redis_list_key, _access_element("live.png"))
    deadline = time.monotonic() + 5
    while not recorder.keys and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    worker.join(timeout=5)

    assert recorder.keys == ["live.png"]
    assert not worker.is_alive()


# --------------------------------------------------------------------------------- folder


class FakeClock:
    """A monotonic clock the test advances explicitly, so stability is deterministic."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_folder_watcher_waits_for_stable_file_and_emits_once(tmp_path: Path) -> None:
    clock = FakeClock()
    recorder = Recorder()
    watcher = FolderWatcher(tmp_path, submit=recorder, prefix="", stable_after_s=1.0, clock=clock)
    target = tmp_path / "lot 1" / "wafer.png"
    target.parent.mkdir()
    target.write_bytes(b"first half ")

    assert watcher.poll_once() == 0  # first sighting
    with target.open("ab") as handle:
        handle.write(b"second half")
    clock.now += 5
    assert watcher.poll_once() == 0  # size changed: sighting restarts
    clock.now += 0.5
    assert watcher.poll_once() == 0  # unchanged, but not for stable_after_s yet
    clock.now += 1.0
    assert watcher.poll_once() == 1
    clock.now += 10
    assert watcher.poll_once() == 0  # emitted once only

    assert len(recorder.batches) == 1
    (event,) = recorder.batches[0]
    assert (event.bucket, event.key, event.size) == (tmp_path.name, "lot 1/wafer.png", 22)
    assert event.etag == hashlib.md5(b"first half second half", usedforsecurity=False).hexdigest()


def test_folder_watcher_ignores_temp_files_filters_prefix_and_sorts(tmp_path: Path) -> None:
    clock = FakeClock()
    recorder = Recorder()
    watcher = FolderWatcher(tmp_path, submit=recorder, prefix="in/", bucket_name="fab", stable_after_s=0, clock=clock)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ["in/b.png", "in/a.png", "in/sub/c.png", "in/x.png.part", "in/y.tmp", "in/.z.png", "out.png"]:
        (tmp_path / name).write_bytes(b"data")

    watcher.poll_once()
    clock.now += 1
    assert watcher.poll_once() == 3

    assert recorder.keys == ["in/a.png", "in/b.png", "in/sub/c.png"]
    assert {event.bucket for event in recorder.batches[0]} == {"fab"}


def test_folder_watcher_offers_again_after_failed_submit(tmp_path: Path) -> None:
    clock = FakeClock()
    recorder = Recorder(fail=True)
    watcher = FolderWatcher(tmp_path, submit=recorder, stable_after_s=0, clock=clock)
    (tmp_path / "a.png").write_bytes(b"data")
    watcher.poll_once()
    clock.now += 1

    with pytest.raises(EventSubmitError):
        watcher.poll_once()
    recorder.fail = False
    assert watcher.poll_once() == 1
    assert recorder.keys == ["a.png"]
