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

import contextlib
import errno
import hashlib
import logging
import os
import stat as stat_module
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol, runtime_checkable

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.utils import parse_timestamp

from worker.errors import (
    BadObjectError,
    ObjectChangedError,
    ObjectMissingError,
    StorageUnavailableError,
    WaferwatchError,
)
from worker.s3_reads import FastS3Reader, fast_reads_available

logger = logging.getLogger(__name__)

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


def parse_s3_timestamp(value: str | float) -> datetime:
    """The two timestamp forms S3 sends, parsed by the standard library; anything else by botocore.

    botocore parses every timestamp with dateutil: 0.08 ms for a GET's ``Last-Modified`` (RFC 1123) and
    0.06 ms for each key of a listing (ISO 8601), against 0.005 and 0.0001 here. Same aware UTC datetimes.
    """
    if isinstance(value, str):
        try:
            if value.endswith("GMT"):
                return parsedate_to_datetime(value)
            if value.endswith("Z") and "T" in value:
                return datetime.fromisoformat(value)
        except (TypeError, ValueError):
            pass
    return parse_timestamp(value)


_SESSION_LOCK = threading.Lock()
_SESSION: boto3.session.Session | None = None


def _boto3_session() -> boto3.session.Session:
    """One boto3 session for the process's S3 clients, with the fast timestamp parser installed."""
    global _SESSION
    with _SESSION_LOCK:
        if _SESSION is None:
            core = botocore.session.get_session()
            core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_s3_timestamp)
            _SESSION = boto3.session.Session(botocore_session=core)
        return _SESSION


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
        # No CRC32 of every body in Python (0.2 ms of a worker's CPU per GET): the worker hashes what it scores
        # (sha256) anyway, and S3-compatible servers that predate flexible checksums (older MinIO and Ceph
        # releases) reject the headers botocore >= 1.36 adds by default.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return _boto3_session().client(
        "s3",
        endpoint_url=endpoint_url or None,
        region_name=region or None,
        aws_access_key_id=access_key or None,
        aws_secret_access_key=secret_key or None,
        config=config,
    )


class S3Store:
    """An S3-compatible bucket (AWS, MinIO, Ceph RGW, moto) accessed through a boto3 client.

    ``fast_reader`` (:mod:`worker.s3_reads`) serves the plain successful GETs at a third of boto3's CPU;
    whatever it does not serve, boto3 fetches and reports.
    """

    def __init__(self, client: Any, bucket: str, *, fast_reader: FastS3Reader | None = None) -> None:
        self._client = client
        self._bucket = bucket
        self.fast_reader = fast_reader

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
        expected = normalize_etag(if_match)
        if self.fast_reader is not None:
            fast = self.fast_reader.get(key, max_bytes=max_bytes, version_id=version_id, if_match=expected or None)
            if fast is not None:
                return StoredObject(
                    key=key, etag=fast.etag, version_id=fast.version_id, size=len(fast.data), data=fast.data
                )
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Key": key}
        if version_id:
            kwargs["VersionId"] = version_id
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

_NAME_MAX_FALLBACK = 255
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
# Errors that say "this key can never be a file here": recorded as a permanent failure, never retried.
# Everything else (EACCES, ENOSPC, EIO, ESTALE, EROFS, an unmounted share ...) is the operator's to fix,
# so it is transient and the task retries, as for an S3 server that is down.
_PERMANENT_ERRNOS = frozenset(
    {errno.ENAMETOOLONG, errno.ELOOP, errno.EILSEQ, errno.EINVAL, errno.ENOTDIR, errno.EISDIR, errno.EFBIG}
)


def is_ignored_name(name: str) -> bool:
    """True for hidden files and temp/partial files that an uploader is still writing."""
    return name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES)


def iter_folder_files(root: Path, prefix: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """Yield ``(key, stat)`` for every regular, non-ignored file under ``root``, sorted by key.

    Keys are POSIX paths relative to ``root``.  Hidden directories are skipped too.
    Files that vanish during the walk are skipped (they were deleted, not broken).
    Symbolic links below ``root`` are skipped as well, files and directories alike: the
    folder store never reads outside its root.  Sorting the full key list (not walking
    sorted directories) gives exactly S3's order, where ``a-b`` sorts before ``a/b``.
    """
    if not root.is_dir():
        raise StorageUnavailableError(f"folder store root {root} is not a directory; check that the share is mounted")
    start = root
    if "/" in prefix:
        start = root / prefix.rsplit("/", 1)[0]
        if not _plain_directory_below(root, start):
            return
    found: list[tuple[str, os.stat_result]] = []
    links: list[str] = []
    try:
        # followlinks=False: linked directories stay out; an unreadable folder is named in the log, not skipped
        # in silence (raising would stop every listing over one bad folder)
        for dirpath, dirnames, filenames in os.walk(start, onerror=_log_walk_error):
            base = Path(dirpath)
            links += [(base / d).relative_to(root).as_posix() for d in dirnames if (base / d).is_symlink()]
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if is_ignored_name(name):
                    continue
                path = base / name
                key = path.relative_to(root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    stat = path.lstat()
                except FileNotFoundError:
                    continue
                if stat_module.S_ISLNK(stat.st_mode):
                    links.append(key)
                elif stat_module.S_ISREG(stat.st_mode):
                    found.append((key, stat))
    except OSError as exc:
        raise StorageUnavailableError(f"cannot list folder store {root}: {exc}") from exc
    if links:
        logger.warning(
            "folder store %s: skipped %d symbolic link(s) (%s); copy the files into the folder instead",
            root,
            len(links),
            ", ".join(sorted(links)[:5]),
        )
    found.sort(key=lambda item: item[0])
    yield from found


def _log_walk_error(exc: OSError) -> None:
    logger.warning("folder store: cannot list %s (%s); its files are not seen until this is fixed", exc.filename, exc)


def _plain_directory_below(root: Path, path: Path) -> bool:
    """Whether every component of ``path`` below ``root`` is a real directory (no symbolic link)."""
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        try:
            if not stat_module.S_ISDIR(current.lstat().st_mode):
                return False
        except OSError:
            return False
    return True


class FolderStore:
    """A local (or network-mounted) directory standing in for a bucket.

    The directory *is* the bucket: keys are POSIX paths relative to ``root``; the
    bucket label recorded with images defaults to the directory name.

    ETags are the MD5 hex digest of the content, exactly what S3/MinIO return for
    single-part uploads.  ``mtime_ns + size`` would be cheaper but would change
    when a file is merely touched or copied, creating a new ``images`` row for
    identical bytes; MD5 keeps "same bytes = same image" on both backends.  The
    cost is bounded by caching digests per ``(key, size, mtime_ns)``.

    Every read and write stays inside ``root``: paths are opened one directory at a
    time from a descriptor of the root (``openat`` with ``O_NOFOLLOW``), so a symbolic
    link anywhere below the root (``incoming/x.png -> /etc/shadow``, ``heatmaps ->
    /etc``) is refused, not followed, with no window between a check and the open.
    Only ``root`` itself may be a link (it is the operator's mount point).  Every
    ``OSError`` becomes a domain error: a name that cannot exist on this file system
    (too long, a symbolic link, a file where a directory should be) is permanent
    (``BadObjectError``), so the image gets a failures row that says why; anything
    else (permissions, a full disk, a stale share) is ``StorageUnavailableError``.
    """

    def __init__(self, root: Path, *, bucket: str | None = None) -> None:
        self._root = Path(root)
        self._bucket = bucket or self._root.name
        self._etag_cache: dict[str, tuple[int, int, str]] = {}
        self._lock = threading.Lock()
        self._name_max: int | None = None

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
        """Read a file; the size comes from ``fstat`` before any byte is read.

        ``version_id`` is accepted for protocol compatibility; folders keep no versions. ``if_match`` is
        compared with the MD5 of the bytes read (the folder's ETag): ``ObjectChangedError`` if they differ.
        """
        parts = self._parts_for(key)
        with self._open_file(key, parts) as (handle, stat):
            _check_size(key, stat.st_size, max_bytes)
            try:
                data = handle.read(max_bytes + 1)
            except OSError as exc:
                raise self._translate("read", key, exc) from exc
        _check_size(key, len(data), max_bytes)
        etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if len(data) == stat.st_size:
            self._remember(key, stat, etag)
        if if_match and etag != normalize_etag(if_match):
            raise _changed(f"{self._bucket}/{key}", normalize_etag(if_match), etag)
        return StoredObject(key=key, etag=etag, version_id=None, size=len(data), data=data)

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> ObjectInfo:
        """Write atomically (hidden temp file + ``rename`` in the same directory) so watchers never see partial
        files; the directories are created one by one below the root, never through a link."""
        parts = self._parts_for(key)
        tmp = f".{uuid.uuid4().hex}.tmp"  # short: the key's own name may already be near the length limit
        with self._directory(key, parts, create=True) as parent:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=parent)
                try:
                    with os.fdopen(fd, "wb", closefd=False) as handle:
                        handle.write(data)
                    stat = os.fstat(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=parent)
                raise self._translate("write", key, exc) from exc
        etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
        self._remember(key, stat, etag)
        return ObjectInfo(key=key, etag=etag, size=len(data), last_modified=_mtime(stat))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Yield files under ``prefix`` sorted by key, skipping hidden and temp files and symbolic links."""
        for key, stat in iter_folder_files(self._root, prefix):
            etag = self._etag(key, stat)
            if etag is None:
                continue
            yield ObjectInfo(key=key, etag=etag, size=stat.st_size, last_modified=_mtime(stat))

    def head(self, key: str) -> ObjectInfo:
        """Return metadata; the MD5 is computed once per file version and cached."""
        parts = self._parts_for(key)
        with self._open_file(key, parts) as (handle, stat):
            etag = self._cached_etag(key, stat) or self._hash(key, handle, stat)
        return ObjectInfo(key=key, etag=etag, size=stat.st_size, last_modified=_mtime(stat))

    def delete(self, key: str) -> None:
        """Remove the file; a missing file is fine, as in S3. A link is removed itself, never its target."""
        parts = self._parts_for(key)
        try:
            with self._directory(key, parts, create=False) as parent:
                try:
                    os.unlink(parts[-1], dir_fd=parent)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise self._translate("delete", key, exc) from exc
        except ObjectMissingError:
            pass
        with self._lock:
            self._etag_cache.pop(key, None)

    def ensure_bucket(self) -> None:
        """Create the directory (and parents)."""
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailableError(f"cannot create folder store {self._root}: {exc}") from exc

    # --- paths: validated keys, directories opened one by one below the root ------------------------

    def _parts_for(self, key: str) -> tuple[str, ...]:
        """Split a key into path components, refusing keys that would escape the root or cannot be names."""
        parts = PurePosixPath(key).parts
        canonical = "/".join(parts) == key
        if (
            not parts
            or not canonical
            or key.startswith("/")
            or any(part in {"..", "."} for part in parts)
            or "\\" in key
            or "\x00" in key
        ):
            raise BadObjectError(f"key {key!r} is not a valid relative POSIX path inside the folder store")
        name_max = self._limit_name()
        for part in parts:
            try:
                size = len(os.fsencode(part))
            except UnicodeError as exc:
                raise BadObjectError(f"key {key!r} cannot be a file name on this system ({exc})") from exc
            if size > name_max:
                raise BadObjectError(
                    f"key {key[:80]!r}... cannot be a file in the folder store {self._root}: the name "
                    f"{part[:40]!r}... is too long ({size} bytes, above the file system's limit of {name_max}); "
                    "shorten the file name at the source (or use S3 storage, whose keys may be 1024 bytes)"
                )
        return parts

    def _limit_name(self) -> int:
        if self._name_max is None:
            try:
                self._name_max = int(os.pathconf(self._root, "PC_NAME_MAX"))
            except (OSError, ValueError):
                return _NAME_MAX_FALLBACK  # root not there yet: ask again next time
        return self._name_max

    @contextlib.contextmanager
    def _directory(self, key: str, parts: tuple[str, ...], *, create: bool) -> Iterator[int]:
        """A descriptor of the directory holding ``parts[-1]``, reached without following any link."""
        try:
            fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise StorageUnavailableError(
                f"folder store root {self._root} cannot be opened ({exc.strerror}); check that the share is mounted"
            ) from exc
        try:
            for part in parts[:-1]:
                if create:
                    try:
                        os.mkdir(part, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass
                    except OSError as exc:
                        raise self._translate("create a directory for", key, exc) from exc
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError as exc:
                    raise self._missing(key) from exc
                except OSError as exc:
                    if exc.errno == errno.ENOTDIR and _is_link(part, fd):  # Linux: O_DIRECTORY wins over ELOOP
                        exc = OSError(errno.ELOOP, os.strerror(errno.ELOOP), part)
                    elif exc.errno == errno.ENOTDIR and not create:
                        raise self._missing(key) from exc  # a file where a directory would be: no such key
                    raise self._translate("open the directory of", key, exc) from exc
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _open_file(self, key: str, parts: tuple[str, ...]) -> Iterator[tuple[BinaryIO, os.stat_result]]:
        """The open regular file of ``key`` and its ``fstat`` (a link, FIFO or device is refused, not opened)."""
        with self._directory(key, parts, create=False) as parent:
            try:
                fd = os.open(parts[-1], _OPEN_FLAGS, dir_fd=parent)
            except FileNotFoundError as exc:
                raise self._missing(key) from exc
            except OSError as exc:
                raise self._translate("open", key, exc) from exc
        with os.fdopen(fd, "rb") as handle:
            stat = os.fstat(fd)
            if stat_module.S_ISDIR(stat.st_mode):
                raise self._missing(key)
            if not stat_module.S_ISREG(stat.st_mode):
                raise BadObjectError(
                    f"{self._bucket}/{key} is not a regular file (a FIFO, socket or device); only files are scored"
                )
            yield handle, stat

    def _translate(self, action: str, key: str, exc: OSError) -> WaferwatchError:
        """An ``OSError`` as the domain error a task acts on (see the class docstring)."""
        where = f"{self._bucket}/{key} in {self._root}"
        if exc.errno == errno.ELOOP:
            return BadObjectError(
                f"cannot {action} {where}: the key is, or passes through, a symbolic link; the folder store "
                "only reads and writes inside its root, so copy the file in instead of linking it"
            )
        if exc.errno == errno.ENAMETOOLONG:
            return BadObjectError(
                f"cannot {action} {where}: the path is too long for the file system ({exc.strerror}); "
                "shorten the file name or the folders at the source"
            )
        if exc.errno in _PERMANENT_ERRNOS:
            return BadObjectError(
                f"cannot {action} {where}: {exc.strerror or exc} ({errno.errorcode.get(exc.errno or 0, exc.errno)}); "
                "the key cannot be a file in this folder, rename it at the source"
            )
        return StorageUnavailableError(f"cannot {action} {where}: {exc}; check the share, then retry")

    # --- ETags ------------------------------------------------------------------------------------

    def _etag(self, key: str, stat: os.stat_result) -> str | None:
        """MD5 of a listed file, cached per (size, mtime_ns); ``None`` if it vanished or became unreadable."""
        cached = self._cached_etag(key, stat)
        if cached is not None:
            return cached
        try:
            with self._open_file(key, self._parts_for(key)) as (handle, opened):
                return self._hash(key, handle, opened)
        except ObjectMissingError:
            return None
        except BadObjectError:
            return None  # replaced by a link or a FIFO since the listing: not an object any more

    def _cached_etag(self, key: str, stat: os.stat_result) -> str | None:
        with self._lock:
            cached = self._etag_cache.get(key)
        if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns):
            return cached[2]
        return None

    def _hash(self, key: str, handle: BinaryIO, stat: os.stat_result) -> str:
        digest = hashlib.md5(usedforsecurity=False)
        try:
            while chunk := handle.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
        except OSError as exc:
            raise self._translate("read", key, exc) from exc
        etag = digest.hexdigest()
        self._remember(key, stat, etag)
        return etag

    def _remember(self, key: str, stat: os.stat_result, etag: str) -> None:
        with self._lock:
            self._etag_cache[key] = (stat.st_size, stat.st_mtime_ns, etag)

    def _missing(self, key: str) -> WaferwatchError:
        if not self._root.is_dir():
            return StorageUnavailableError(
                f"folder store root {self._root} is missing; check that the share is mounted"
            )
        return ObjectMissingError(
            f"{self._bucket}/{key} does not exist in {self._root}; it was deleted or never written"
        )


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat_module.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


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
    fast_reads: bool = True,
) -> ObjectStore:
    """Build the store named by ``kind`` (``"s3"`` or ``"folder"``) from plain settings values.

    For ``"folder"`` the directory ``root`` is the bucket; ``bucket`` only overrides
    the label recorded with images (default: the directory name). ``fast_reads``: S3 GETs go through
    obstore first (:mod:`worker.s3_reads`).
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
        reader = None
        if fast_reads and fast_reads_available():
            reader = FastS3Reader(
                bucket=bucket,
                endpoint_url=endpoint_url,
                region=region,
                access_key=access_key,
                secret_key=secret_key,
                boto3_session=_boto3_session(),
                connect_timeout_s=connect_timeout_s,
                read_timeout_s=read_timeout_s,
            )
        return S3Store(client, bucket, fast_reader=reader)
    if normalized == "folder":
        if root is None:
            raise ValueError("make_store('folder') needs root, the directory that stands in for the bucket")
        return FolderStore(Path(root), bucket=bucket)
    raise ValueError(f"unknown storage kind {kind!r}; expected 's3' or 'folder'")
