"""The obstore GET path (worker/s3_reads.py) against a moto server: it serves plain successes, and every
other answer is boto3's, exactly as without it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import boto3
import pytest

from worker.errors import BadObjectError, ObjectChangedError, ObjectMissingError, StorageUnavailableError
from worker.s3_reads import FastS3Reader
from worker.storage import S3Store, make_store

ROOT = Path(__file__).resolve().parents[2]
BODY = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


def _store(endpoint: str, bucket: str | None = None, **options: object) -> S3Store:
    store = make_store(
        "s3",
        endpoint_url=endpoint,
        bucket=bucket or f"fast-{uuid.uuid4().hex[:8]}",
        region="us-east-1",
        access_key="testing",
        secret_key="testing",
        **options,  # type: ignore[arg-type]
    )
    assert isinstance(store, S3Store)
    return store


def _reader(store: S3Store) -> FastS3Reader:
    assert store.fast_reader is not None, "make_store('s3') reads through obstore by default"
    return store.fast_reader


def test_plain_gets_are_served_by_obstore_with_boto3s_answer(s3_endpoint: str) -> None:
    fast = _store(s3_endpoint)
    fast.ensure_bucket()
    plain = _store(s3_endpoint, fast.bucket, fast_reads=False)
    assert plain.fast_reader is None
    info = fast.put("lot 1/wafer+1.png", BODY)

    got = fast.get("lot 1/wafer+1.png", max_bytes=len(BODY), if_match=info.etag)
    also = fast.get("lot 1/wafer+1.png", max_bytes=len(BODY))

    assert (_reader(fast).served, _reader(fast).handed_back) == (2, 0)
    expected = plain.get("lot 1/wafer+1.png", max_bytes=len(BODY), if_match=info.etag)
    assert got == also == expected
    assert isinstance(got.data, bytes)


def test_a_version_is_read_as_registered(s3_endpoint: str) -> None:
    store = _store(s3_endpoint)
    store.ensure_bucket()
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.put_bucket_versioning(Bucket=store.bucket, VersioningConfiguration={"Status": "Enabled"})
    first = client.put_object(Bucket=store.bucket, Key="a.png", Body=BODY)["VersionId"]
    client.put_object(Bucket=store.bucket, Key="a.png", Body=BODY[::-1])

    old = store.get("a.png", max_bytes=len(BODY), version_id=first)

    assert old.data == BODY and old.version_id == first
    assert _reader(store).served == 1


def test_everything_but_a_plain_success_is_reported_by_boto3(s3_endpoint: str) -> None:
    store = _store(s3_endpoint)
    store.ensure_bucket()
    info = store.put("a.png", BODY)
    store.put("empty.png", b"")
    reader = _reader(store)

    with pytest.raises(ObjectMissingError):
        store.get("missing.png", max_bytes=10_000)
    with pytest.raises(BadObjectError, match="above the limit"):
        store.get("a.png", max_bytes=len(BODY) - 1)
    with pytest.raises(BadObjectError, match="empty"):
        store.get("empty.png", max_bytes=10_000)
    store.put("a.png", BODY + b"more")
    with pytest.raises(ObjectChangedError):
        store.get("a.png", max_bytes=10 * len(BODY), if_match=info.etag)

    assert (reader.served, reader.handed_back) == (0, 4)


def test_a_missing_bucket_stays_transient(s3_endpoint: str) -> None:
    """S3 answers 404 for a missing bucket as for a missing key; only boto3's reading of the code keeps a
    misconfigured bucket from marking every image skipped."""
    store = _store(s3_endpoint, "never-created")

    with pytest.raises(StorageUnavailableError, match="bucket does not exist"):
        store.get("a.png", max_bytes=10)
    assert _reader(store).handed_back == 1


def test_an_unreachable_server_still_fails_fast_as_transient(closed_port_url: str) -> None:
    store = _store(closed_port_url, "wafers", connect_timeout_s=0.5, read_timeout_s=0.5, max_attempts=1)
    started = time.monotonic()

    with pytest.raises(StorageUnavailableError):
        store.get("a.png", max_bytes=1000)

    assert time.monotonic() - started < 5
    assert _reader(store).handed_back == 1


def test_credentials_from_boto3s_chain_are_used(s3_endpoint: str) -> None:
    """No keys in the settings: obstore signs with what boto3 finds (here the environment's)."""
    store = make_store("s3", endpoint_url=s3_endpoint, bucket=f"chain-{uuid.uuid4().hex[:8]}", region="us-east-1")
    assert isinstance(store, S3Store)
    store.ensure_bucket()
    store.put("a.png", BODY)

    assert store.get("a.png", max_bytes=len(BODY)).data == BODY
    assert _reader(store).served == 1


def test_a_child_forked_after_the_parent_used_obstore_reads_through_boto3(s3_endpoint: str) -> None:
    """obstore's runtime does not survive fork(): the child of a process that used it would hang on its
    first GET. Here the child must get its bytes (through boto3) within seconds."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from worker.storage import make_store
        store = make_store("s3", endpoint_url={s3_endpoint!r}, bucket="forked", region="us-east-1",
                           access_key="testing", secret_key="testing")
        store.ensure_bucket()
        store.put("a.png", b"payload")
        assert store.get("a.png", max_bytes=100).data == b"payload"
        assert store.fast_reader.served == 1
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)  # a hang ends the child with SIGALRM
            ok = store.get("a.png", max_bytes=100).data == b"payload" and store.fast_reader.served == 1
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
