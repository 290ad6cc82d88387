"""ObjectStore contract tests, run against a moto S3 server and a local folder alike."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import dateutil.parser
import pytest
from botocore.utils import parse_timestamp

from worker.errors import (
    BadObjectError,
    ObjectMissingError,
    PermanentError,
    StorageUnavailableError,
    TransientError,
)
from worker.storage import FolderStore, ObjectStore, S3Store, make_s3_client, make_store, parse_s3_timestamp

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture(params=["s3", "folder"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    """An empty bucket on either backend, built through the public factory."""
    if request.param == "s3":
        endpoint_url = request.getfixturevalue("s3_endpoint")
        built = make_store(
            "s3",
            endpoint_url=endpoint_url,
            bucket=f"wafers-{uuid.uuid4().hex[:8]}",
            region="us-east-1",
            access_key="testing",
            secret_key="testing",
        )
    else:
        built = make_store("folder", root=tmp_path / "wafers")
    built.ensure_bucket()
    built.ensure_bucket()  # idempotent
    yield built


def test_put_then_get_round_trips_with_md5_etag(store: ObjectStore) -> None:
    info = store.put("lot 1/wafer+1.png", PNG_BYTES, content_type="image/png")

    fetched = store.get("lot 1/wafer+1.png", max_bytes=len(PNG_BYTES))

    expected_etag = hashlib.md5(PNG_BYTES, usedforsecurity=False).hexdigest()
    assert fetched.data == PNG_BYTES
    assert fetched.size == len(PNG_BYTES)
    assert fetched.etag == info.etag == expected_etag
    assert '"' not in fetched.etag
    assert store.head("lot 1/wafer+1.png").etag == expected_etag


def test_list_is_sorted_by_key_and_filtered_by_prefix(store: ObjectStore) -> None:
    keys = ["b/2.png", "a/1.png", "a-b/3.png", "a/0/deep.png", "c.png", "a/é.png"]
    for key in keys:
        store.put(key, PNG_BYTES)

    listed = [info.key for info in store.list()]
    under_a = [info.key for info in store.list("a/")]

    assert listed == sorted(keys)
    assert under_a == ["a/0/deep.png", "a/1.png", "a/é.png"]
    assert all(info.size == len(PNG_BYTES) for info in store.list())


def test_missing_key_is_a_permanent_object_missing_error(store: ObjectStore) -> None:
    with pytest.raises(ObjectMissingError) as caught:
        store.get("nope.png", max_bytes=1000)
    assert isinstance(caught.value, PermanentError)

    with pytest.raises(ObjectMissingError):
        store.head("nope.png")


def test_too_large_object_is_refused(store: ObjectStore) -> None:
    store.put("big.png", PNG_BYTES)

    with pytest.raises(BadObjectError, match="above the limit"):
        store.get("big.png", max_bytes=len(PNG_BYTES) - 1)


def test_empty_object_is_refused(store: ObjectStore) -> None:
    store.put("empty.png", b"")

    with pytest.raises(BadObjectError, match="empty"):
        store.get("empty.png", max_bytes=1000)


def test_delete_removes_and_is_idempotent(store: ObjectStore) -> None:
    store.put("x.png", PNG_BYTES)

    store.delete("x.png")
    store.delete("x.png")

    with pytest.raises(ObjectMissingError):
        store.get("x.png", max_bytes=10_000)
    assert list(store.list()) == []


def test_s3_store_unreachable_server_fails_fast_as_transient(closed_port_url: str) -> None:
    client = make_s3_client(
        endpoint_url=closed_port_url,
        region="us-east-1",
        access_key="testing",
        secret_key="testing",
        connect_timeout_s=0.5,
        read_timeout_s=0.5,
        max_attempts=1,
    )
    down = S3Store(client, "wafers")
    started = time.monotonic()

    with pytest.raises(StorageUnavailableError) as caught:
        down.get("a.png", max_bytes=1000)

    assert isinstance(caught.value, TransientError)
    assert time.monotonic() - started < 5
    with pytest.raises(StorageUnavailableError):
        list(down.list())


def test_s3_store_missing_bucket_is_transient(s3_endpoint: str) -> None:
    client = make_s3_client(endpoint_url=s3_endpoint, region="us-east-1", access_key="t", secret_key="t")

    with pytest.raises(StorageUnavailableError, match="bucket does not exist"):
        S3Store(client, "never-created").get("a.png", max_bytes=10)


def test_s3_requests_carry_no_flexible_checksum_headers(s3_endpoint: str) -> None:
    """Neither the PUT nor the GET asks for a CRC (headers older MinIO/Ceph refuse; CPU the worker spends
    per image); the bytes still round-trip and are hashed by the worker itself."""
    client = make_s3_client(endpoint_url=s3_endpoint, region="us-east-1", access_key="t", secret_key="t")
    bucket = f"checksums-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    sent: list[dict[str, str]] = []
    client.meta.events.register("before-send.s3.*", lambda request, **_: sent.append(dict(request.headers)))
    store = S3Store(client, bucket)

    store.put("a.png", b"x" * 1000)
    assert store.get("a.png", max_bytes=10_000).data == b"x" * 1000

    assert len(sent) == 2
    for headers in sent:
        assert not [name for name in headers if name.lower().startswith("x-amz-checksum")], headers
        assert headers.get("x-amz-checksum-mode") is None


@pytest.mark.parametrize(
    "value",
    [
        "Sun, 06 Dec 2026 20:41:47 GMT",
        "Mon, 01 Jan 2024 00:00:00 GMT",
        "2026-12-06T20:41:47.000Z",
        "2026-12-06T20:41:47.123456Z",
        "2026-12-06T20:41:47+01:00",
        "1700000000",
        1700000000,
    ],
)
def test_the_fast_timestamp_parser_agrees_with_botocores(value: str | int) -> None:
    parsed = parse_s3_timestamp(value)

    assert parsed == parse_timestamp(value)
    assert parsed.utcoffset() is not None, "aware, as botocore's"


def test_s3_clients_parse_timestamps_without_dateutil(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's client parses ``Last-Modified`` (a GET's header, RFC 1123) and a listing's ISO 8601 dates
    with the standard library (botocore's dateutil parser costs 0.08 ms a GET); the values are botocore's."""
    plain = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
    )
    bucket = f"times-{uuid.uuid4().hex[:8]}"
    plain.create_bucket(Bucket=bucket)
    plain.put_object(Bucket=bucket, Key="a.png", Body=PNG_BYTES)
    expected_get = plain.get_object(Bucket=bucket, Key="a.png")["LastModified"]
    expected_listed = plain.list_objects_v2(Bucket=bucket)["Contents"][0]["LastModified"]
    ours = make_s3_client(endpoint_url=s3_endpoint, region="us-east-1", access_key="t", secret_key="t")

    original, caller = dateutil.parser.parse, threading.get_ident()

    def refuse(*args: object, **kwargs: object) -> object:
        if threading.get_ident() == caller:  # moto serves from threads of this process and uses dateutil
            raise AssertionError("dateutil parsed a timestamp of the worker's client")
        return original(*args, **kwargs)

    monkeypatch.setattr(dateutil.parser, "parse", refuse)
    got = ours.get_object(Bucket=bucket, Key="a.png")["LastModified"]
    listed = ours.list_objects_v2(Bucket=bucket)["Contents"][0]["LastModified"]

    assert got == expected_get and got.utcoffset() is not None
    assert listed == expected_listed and listed.utcoffset() is not None


def test_folder_store_ignores_temp_and_hidden_files(tmp_path: Path) -> None:
    store = FolderStore(tmp_path)
    store.put("ok.png", PNG_BYTES)
    (tmp_path / "half.png.part").write_bytes(b"x")
    (tmp_path / "upload.tmp").write_bytes(b"x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "z.png").write_bytes(b"x")

    assert [info.key for info in store.list()] == ["ok.png"]
    assert store.bucket == tmp_path.name


def test_folder_store_refuses_keys_escaping_root(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "bucket")
    store.ensure_bucket()

    with pytest.raises(BadObjectError):
        store.get("../secret.png", max_bytes=10)


def test_folder_store_unmounted_root_is_transient(tmp_path: Path) -> None:
    store = FolderStore(tmp_path / "not-mounted")

    with pytest.raises(StorageUnavailableError):
        store.get("a.png", max_bytes=10)
    with pytest.raises(StorageUnavailableError):
        list(store.list())


def test_make_store_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown storage kind"):
        make_store("ftp")
