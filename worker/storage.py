"""Object storage behind one small protocol: S3-compatible servers or a local folder.

Inspection tools drop images into S3, MinIO, Ceph RGW or a plain directory.  The
pipeline only needs to fetch bytes (with a size limit), write artifacts, list a
prefix and check existence, so ``ObjectStore`` exposes just that, and both
implementations translate their native failures into the domain errors of
``worker.errors``: a missing key is ``ObjectMissingError`` (permanent), an empty
or oversized object ``BadObjectError`` (permanent), anything that smells of the
network or the server ``StorageUnavailableError`` (transient, retry).

``FolderStore`` mimics S3 semantics closely enough (MD5 ETags, keys as POSIX
paths, listings sorted by key, atomic writes) that the same task code and the
same ``images`` uniqueness rule (bucket, key, etag) work on both.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from worker.errors import (
    BadObjectError,
    ObjectChangedError,
    ObjectMissingError,
    StorageUnavailableError,
    WaferwatchError,
)

IGNORED_SUFFIXES: tuple[str, ...] = (".tmp", ".part")
"""File name endings of half-written files that must never be treated as objects."""

_MISSING_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchVersion"})
_BUCKET_MISSING_CODES = frozenset({"NoSuchBucket"})
_HASH_CHUNK_BYTES = 1 << 20
_BOTO_ERRORS = (BotoCoreError, ClientError, OSError)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """Metadata of one stored object, as listed or returned by ``head``."""

    key: str
    etag: str
    size: int
    last_modified: datetime
    version_id: str | None = None  # set by ``head`` on a versioned S3 bucket


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One fetched object: the bytes plus the identity (etag, version) they were read at."""

    key: str
    etag: str
    version_id: str | None
    size: int
    data: bytes


@runtime_checkable
class ObjectStore(Protocol):
    """What the pipeline needs from a bucket; implemented by ``S3Store`` and ``FolderStore``."""

    @property
    def bucket(self) -> str:
        """Bucket name recorded with every image (for a folder: its label)."""
        ...

    def get(
        self, key: str, *, max_bytes: int, version_id: str | None = None, if_match: str | None = None
    ) -> StoredObject:
        """Fetch an object's bytes, refusing empty objects and ones larger than ``max_bytes``.

        ``version_id`` reads that version (versioned buckets); ``if_match`` refuses, with
        ``ObjectChangedError``, an object whose ETag is no longer this one (it was overwritten).
        """
        ...

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> ObjectInfo:
        """Store ``data`` under ``key`` (overwriting) and return its metadata."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield the objects whose key starts with ``prefix``, sorted by key."""
        ...

    def head(self, key: str) -> ObjectInfo:
        """Return an object's metadata without reading its bytes."""
        ...

    def delete(self, key: str) -> None:
        """Remove an object; deleting a missing key is not an error (as in S3)."""
        ...

    def ensure_bucket(self) -> None:
        """Create the bucket (or directory) if it does not exist yet."""
        ...


def normalize_etag(etag: str | None) -> str:
    """Strip the quotes S3 puts around ETags so values compare equal across APIs and events."""
    return (etag or "").strip().strip('"')


def _check_size(key: str, size: int, max_bytes: int) -> None:
    """Refuse objects that cannot be images before any byte is downloaded."""
    if size <= 0:
        raise BadObjectError(f"object {key!r} is empty (0 bytes); the uploader must re-send it")
    if size > max_bytes:
        raise BadObjectError(
            f"object {key!r} is {size} bytes, above the limit of {max_bytes} bytes; "
            "raise the size limit or fix the uploader"
        )


# --------------------------------------------------------------------------- S3


def make_s3_client(
    *,
    endpoint_url: str | None,
    region: str | None,
    access_key: str | None,
    secret_key: str | None,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 30.0,
    max_attempts: int = 3,
) -> Any:
    """Build a boto3 S3 client suited to MinIO/Ceph/moto as well as AWS.

    Path-style addressing because self-hosted servers rarely have wildcard DNS for
    virtual-hosted buckets; short connect timeouts and the ``standard`` retry mode
    so an unreachable server surfaces as ``StorageUnavailableError`` in seconds and
    the task-level retry (with its own backoff) takes over.
    """
    config = Config(
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        s3={"addressing_style": "path"},
        signature_version="s3v4",
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or None,
        region_name=region or None,
        aws_access_key_id=access_key or None,
        aws_secret_access_key=secret_key or None,
        config=config,
    )


class S3Store:
    """An S3-compatible bucket (AWS, MinIO, Ceph RGW, moto) accessed through a boto3 client."""

    def __init__(self, client: Any, bucket: str) -> None:
        self._client = client
        self._bucket = bucket

    @property
    def bucket(self) -> str:
        """The S3 bucket name."""
        return self._bucket

    def get(
        self, key: str, *, max_bytes: int, version_id: str | None = None, if_match: str | None = None
    ) -> StoredObject:
        """Fetch ``key``; the size is checked from ``ContentLength`` before the body is read.

        ``if_match`` is sent as ``If-Match``: the server answers 412 instead of the bytes of a newer
        version. The ETag of the answer is compared too, for servers that ignore the header.
        """
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": key}
        if version_id:
            kwargs["VersionId"] = version_id
        expected = normalize_etag(if_match)
        if expected:
            kwargs["IfMatch"] = f'"{expected}"'
        try:
            response = self._client.get_object(**kwargs)
        except ClientError as exc:
            if expected and _error_code(exc) == "PreconditionFailed":
                raise _changed(f"{self._bucket}/{key}", expected, None) from exc
            raise _translate("get", f"{self._bucket}/{key}", exc) from exc
        except _BOTO_ERRORS as exc:
            raise _translate("get", f"{self._bucket}/{key}", exc) from exc
        body = response["Body"]
        etag = normalize_etag(response.get("ETag"))
        if expected and etag != expected:
            body.close()
            raise _changed(f"{self._bucket}/{key}", expected, etag)
        try:
            size = int(response.get("ContentLength", 0))
            _check_size(key, size, max_bytes)
            data = self._read_body(key, body, max_bytes)
        finally:
            body.close()
        # The stream can deliver more than announced only if the server lies; never trust it.
        _check_size(key, len(data), max_bytes)
        return StoredObject(
            key=key,
            etag=etag,
            version_id=response.get("VersionId") or None,
            size=len(data),
            data=data,
        )

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> ObjectInfo:
        """Upload ``data`` in one request (artifacts and test images are small)."""
        response = self._call(
            "put",
            key,
            self._client.put_object,
            Bucket=self._bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
        )
        return ObjectInfo(
            key=key,
            etag=normalize_etag(response.get("ETag")),
            size=len(data),
            last_modified=datetime.now(UTC),
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Page through ``ListObjectsV2``; S3 already returns keys in UTF-8 byte (= key) order."""
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self._bucket, Prefix=prefix)
        iterator = iter(pages)
        while True:
            page = self._call("list", prefix, next, iterator, None)
            if page is None:
                return
            for item in page.get("Contents", []):
                yield ObjectInfo(
                    key=item["Key"],
                    etag=normalize_etag(item.get("ETag")),
                    size=int(item.get("Size", 0)),
                    last_modified=item["LastModified"],
                )

    def head(self, key: str) -> ObjectInfo:
        """Return metadata via ``HeadObject`` (whose 404 carries no body, only the code)."""
        response = self._call("head", key, self._client.head_object, Bucket=self._bucket, Key=key)
        return ObjectInfo(
            key=key,
            etag=normalize_etag(response.get("ETag")),
            size=int(response.get("ContentLength", 0)),
            last_modified=response["LastModified"],
            version_id=response.get("VersionId") or None,
        )

    def delete(self, key: str) -> None:
        """Delete ``key``; S3 answers success for missing keys too."""
        self._call("delete", key, self._client.delete_object, Bucket=self._bucket, Key=key)

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (used by setup commands and tests, not by tasks)."""
        try:
            self._client.head_bucket(Bucket=self._bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in {"404", "NoSuchBucket", "NotFound"}:
                raise _translate("head bucket", self._bucket, exc) from exc
        except _BOTO_ERRORS as exc:
            raise _translate("head bucket", self._bucket, exc) from exc
        kwargs: dict[str, Any] = {"Bucket": self._bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as exc:
            if _error_code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise _translate("create bucket", self._bucket, exc) from exc
        except _BOTO_ERRORS as exc:
            raise _translate("create bucket", self._bucket, exc) from exc

    def _call(self, action: str, key: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one client call and turn botocore failures into domain errors."""
        try:
            return func(*args, **kwargs)
        except _BOTO_ERRORS as exc:
            raise _translate(action, f"{self._bucket}/{key}", exc) from exc

    def _read_body(self, key: str, body: Any, max_bytes: int) -> bytes:
        """Read at most ``max_bytes + 1`` bytes so a lying ``ContentLength`` cannot exhaust memory."""
        try:
            return body.read(max_bytes + 1)
        except _BOTO_ERRORS as exc:
            raise _translate("read", f"{self._bucket}/{key}", exc) from exc


def _error_code(exc: Exception) -> str:
    """The S3 error code of a ``ClientError`` (``NoSuchKey``, ``404``, ``SlowDown``...)."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _changed(where: str, expected: str, current: str | None) -> ObjectChangedError:
    """The error for an object whose ETag is no longer the registered one."""
    now = f"now {current!r}" if current else "a newer version"
    return ObjectChangedError(
        f"{where} was overwritten since it was registered (ETag {expected!r}, {now}); "
        "the registered bytes are gone -- the current version is registered and scored instead",
        expected_etag=expected,
        current_etag=current,
    )


def _translate(action: str, where: str, exc: BotoCoreError | ClientError | OSError) -> WaferwatchError:
    """Map a boto/botocore exception to the domain error a task can act on.

    Only "the object is not there" is permanent.  A missing bucket, denied access or
    throttling are configuration or capacity problems an operator fixes, so they are
    transient: the message is kept and retried instead of recording thousands of
    images as failed.
    """
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _MISSING_CODES:
            return ObjectMissingError(
                f"{where} does not exist ({code}); it was deleted or never written -- nothing to score"
            )
        if code in _BUCKET_MISSING_CODES:
            return StorageUnavailableError(
                f"{action} {where}: the bucket does not exist; check the bucket setting "
                "or run ensure_bucket, then retry"
            )
        if code == "InvalidObjectState":
            return BadObjectError(f"{where} is archived ({code}); restore it before scoring")
        return StorageUnavailableError(
            f"{action} {where} failed with {code or 'an error'} (HTTP {status}); "
            "check the storage server, credentials and permissions, then retry"
        )
    if isinstance(exc, BotoCoreError):
        return StorageUnavailableError(
            f"{action} {where}: storage unreachable ({type(exc).__name__}: {exc}); "
            "check the endpoint URL and that the server is up"
        )
    return StorageUnavailableError(f"{action} {where}: network error ({exc}); retry later")


# ----------------------------------------------------------------------- folder


def is_ignored_name(name: str) -> bool:
    """True for hidden files and temp/partial files that an uploader is still writing."""
    return name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES)


def iter_folder_files(root: Path, prefix: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """Yield ``(key, stat)`` for every regular, non-ignored file under ``root``, sorted by key.

    Keys are POSIX paths relative to ``root``.  Hidden directories are skipped too.
    Files that vanish during the walk are skipped (they were deleted, not broken).
    Sorting the full key list (not walking sorted directories) gives exactly S3's
    order, where ``a-b`` sorts before ``a/b``.
    """
    if not root.is_dir():
        raise StorageUnavailableError(f"folder store root {root} is not a directory; check that the share is mounted")
    start = root
    if "/" in prefix:
        start = root / prefix.rsplit("/", 1)[0]
        if not start.is_dir():
            return
    found: list[tuple[str, os.stat_result]] = []
    try:
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            base = Path(dirpath)
            for name in filenames:
                if is_ignored_name(name):
                    continue
                path = base / name
                key = path.relative_to(root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                if path.is_file():
                    found.append((key, stat))
    except OSError as exc:
        raise StorageUnavailableError(f"cannot list folder store {root}: {exc}") from exc
    found.sort(key=lambda item: item[0])
    yield from found


class FolderStore:
    """A local (or network-mounted) directory standing in for a bucket.

    The directory *is* the bucket: keys are POSIX paths relative to ``root``; the
    bucket label recorded with images defaults to the directory name.

    ETags are the MD5 hex digest of the content, exactly what S3/MinIO return for
    single-part uploads.  ``mtime_ns + size`` would be cheaper but would change
    when a file is merely touched or copied, creating a new ``images`` row for
    identical bytes; MD5 keeps "same bytes = same image" on both backends.  The
    cost is bounded by caching digests per ``(key, size, mtime_ns)``.
    """

    def __init__(self, root: Path, *, bucket: str | None = None) -> None:
        self._root = Path(root)
        self._bucket = bucket or self._root.name
        self._etag_cache: dict[str, tuple[int, int, str]] = {}
        self._lock = threading.Lock()

    @property
    def bucket(self) -> str:
        """The bucket label (the directory name unless overridden)."""
        return self._bucket

    @property
    def root(self) -> Path:
        """The directory holding the objects."""
        return self._root

    def get(
        self, key: str, *, max_bytes: int, version_id: str | None = None, if_match: str | None = None
    ) -> StoredObject:
        """Read a file; the size comes from ``stat`` before any byte is read.

        ``version_id`` is accepted for protocol compatibility; folders keep no versions. ``if_match`` is
        compared with the MD5 of the bytes read (the folder's ETag): ``ObjectChangedError`` if they differ.
        """
        path = self._path_for(key)
        stat = self._stat(key, path)
        _check_size(key, stat.st_size, max_bytes)
        try:
            with path.open("rb") as handle:
                data = handle.read(max_bytes + 1)
        except FileNotFoundError as exc:
            raise self._missing(key) from exc
        except OSError as exc:
            raise StorageUnavailableError(f"cannot read {path}: {exc}; check the share, then retry") from exc
        _check_size(key, len(data), max_bytes)
        etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if len(data) == stat.st_size:
            self._remember(key, stat, etag)
        if if_match and etag != normalize_etag(if_match):
            raise _changed(f"{self._bucket}/{key}", normalize_etag(if_match), etag)
        return StoredObject(key=key, etag=etag, version_id=None, size=len(data), data=data)

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> ObjectInfo:
        """Write atomically (hidden temp file + ``os.replace``) so watchers never see partial files."""
        path = self._path_for(key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            tmp.replace(path)
            stat = path.stat()
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageUnavailableError(f"cannot write {path}: {exc}; check the share, then retry") from exc
        etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
        self._remember(key, stat, etag)
        return ObjectInfo(key=key, etag=etag, size=len(data), last_modified=_mtime(stat))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield files under ``prefix`` sorted by key, skipping hidden and temp files."""
        for key, stat in iter_folder_files(self._root, prefix):
            etag = self._etag(key, self._root / key, stat)
            if etag is None:
                continue
            yield ObjectInfo(key=key, etag=etag, size=stat.st_size, last_modified=_mtime(stat))

    def head(self, key: str) -> ObjectInfo:
        """Return metadata; the MD5 is computed once per file version and cached."""
        path = self._path_for(key)
        stat = self._stat(key, path)
        etag = self._etag(key, path, stat)
        if etag is None:
            raise self._missing(key)
        return ObjectInfo(key=key, etag=etag, size=stat.st_size, last_modified=_mtime(stat))

    def delete(self, key: str) -> None:
        """Remove the file; a missing file is fine, as in S3."""
        path = self._path_for(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageUnavailableError(f"cannot delete {path}: {exc}; check the share, then retry") from exc
        with self._lock:
            self._etag_cache.pop(key, None)

    def ensure_bucket(self) -> None:
        """Create the directory (and parents)."""
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailableError(f"cannot create folder store {self._root}: {exc}") from exc

    def _path_for(self, key: str) -> Path:
        """Resolve a key to a path, refusing keys that would escape the root."""
        parts = PurePosixPath(key).parts
        canonical = "/".join(parts) == key
        if not canonical or key.startswith("/") or any(part in {"..", "."} for part in parts) or "\\" in key:
            raise BadObjectError(f"key {key!r} is not a valid relative POSIX path inside the folder store")
        return self._root.joinpath(*parts)

    def _stat(self, key: str, path: Path) -> os.stat_result:
        """``stat`` a file, telling a missing file apart from an unmounted share."""
        try:
            stat = path.stat()
        except FileNotFoundError as exc:
            if not self._root.is_dir():
                raise StorageUnavailableError(
                    f"folder store root {self._root} is missing; check that the share is mounted"
                ) from exc
            raise self._missing(key) from exc
        except OSError as exc:
            raise StorageUnavailableError(f"cannot stat {path}: {exc}; check the share, then retry") from exc
        if not path.is_file():
            raise self._missing(key)
        return stat

    def _etag(self, key: str, path: Path, stat: os.stat_result) -> str | None:
        """MD5 of the file, cached per (size, mtime_ns); ``None`` if it vanished meanwhile."""
        with self._lock:
            cached = self._etag_cache.get(key)
        if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns):
            return cached[2]
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with path.open("rb") as handle:
                while chunk := handle.read(_HASH_CHUNK_BYTES):
                    digest.update(chunk)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageUnavailableError(f"cannot read {path}: {exc}; check the share, then retry") from exc
        etag = digest.hexdigest()
        self._remember(key, stat, etag)
        return etag

    def _remember(self, key: str, stat: os.stat_result, etag: str) -> None:
        with self._lock:
            self._etag_cache[key] = (stat.st_size, stat.st_mtime_ns, etag)

    def _missing(self, key: str) -> ObjectMissingError:
        return ObjectMissingError(
            f"{self._bucket}/{key} does not exist in {self._root}; it was deleted or never written"
        )


def _mtime(stat: os.stat_result) -> datetime:
    return datetime.fromtimestamp(stat.st_mtime_ns / 1e9, tz=UTC)


# ---------------------------------------------------------------------- factory


def make_store(
    kind: str,
    *,
    root: Path | None = None,
    endpoint_url: str | None = None,
    bucket: str | None = None,
    region: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 30.0,
    max_attempts: int = 3,
) -> ObjectStore:
    """Build the store named by ``kind`` (``"s3"`` or ``"folder"``) from plain settings values.

    For ``"folder"`` the directory ``root`` is the bucket; ``bucket`` only overrides
    the label recorded with images (default: the directory name).
    """
    normalized = kind.strip().lower()
    if normalized == "s3":
        if not bucket:
            raise ValueError("make_store('s3') needs a bucket name")
        client = make_s3_client(
            endpoint_url=endpoint_url,
            region=region,
            access_key=access_key,
            secret_key=secret_key,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            max_attempts=max_attempts,
        )
        return S3Store(client, bucket)
    if normalized == "folder":
        if root is None:
            raise ValueError("make_store('folder') needs root, the directory that stands in for the bucket")
        return FolderStore(Path(root), bucket=bucket)
    raise ValueError(f"unknown storage kind {kind!r}; expected 's3' or 'folder'")
