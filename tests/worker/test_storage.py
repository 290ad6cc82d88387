"""ObjectStore contract tests, run against a moto S3 server and a local folder alike."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.errors import (
    BadObjectError,
    ObjectMissingError,
    PermanentError,
    StorageUnavailableError,
    TransientError,
)
from worker.storage import FolderStore, ObjectStore, S3Store, make_s3_client, make_store

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
