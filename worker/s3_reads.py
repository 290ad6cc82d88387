"""The scoring path's S3 GETs through obstore: a third of boto3's CPU per request.

A worker fetches every image it scores. boto3 spends about 1 ms of Python per GET on building, signing and
parsing the request (botocore's event hooks and shapes), which on a GPU host is a large share of the CPU
around the model; obstore (Rust's ``object_store``, kept by Development Seed) does the same request in
about 0.4 ms of the process's CPU, its I/O thread included, against boto3's 1.1 (``bench/bench_fetch.py``).

Only the plain success is taken here. Anything else, an error status, a changed ETag, a size over the
limit, a network failure, returns None and :class:`worker.storage.S3Store` makes the same request through
boto3, whose answer (the bytes, or the domain error: a missing key is permanent, a missing bucket or
throttling transient, a 412 an overwritten object) is exactly what it was before this module. So there is
one place where S3's failures are told apart, and an unusual server costs a second request, never a wrong
outcome. ``s3_fast_reads=false`` turns this path off.

obstore runs its requests on a tokio runtime whose threads do not survive ``fork()``: a child of a process
that has used it hangs on its first request. Celery's prefork pool forks its children from a parent that
never fetches images, so each child starts its own runtime; a child of a process that did use it (the
module keeps the pid that started the runtime) goes to boto3 for good.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

logger = logging.getLogger(__name__)

try:
    import obstore
    from obstore.store import S3Store as _ObstoreS3
except ImportError:  # pragma: no cover - obstore is a dependency; without it every GET goes through boto3
    obstore = None

__all__ = ["FastRead", "FastS3Reader", "fast_reads_available"]

#: The process whose obstore runtime has started (None: not yet). A forked child sees its parent's pid
#: here, not its own, and so never touches the runtime it inherited without threads.
_RUNTIME_PID: int | None = None
_RUNTIME_LOCK = threading.Lock()


def fast_reads_available() -> bool:
    """True when obstore is installed and usable in this process (not inherited across a fork)."""
    return obstore is not None and _RUNTIME_PID in (None, os.getpid())


def _note_runtime_started() -> None:
    global _RUNTIME_PID
    with _RUNTIME_LOCK:
        if _RUNTIME_PID is None:
            _RUNTIME_PID = os.getpid()


@dataclass(frozen=True, slots=True)
class FastRead:
    """A successful GET: the body and what S3 said of it."""

    data: bytes
    etag: str
    version_id: str | None


class FastS3Reader:
    """GETs of one bucket through obstore, with the settings of the boto3 client beside it.

    Credentials: the keys given, or else those boto3's own chain finds (environment, config files,
    instance roles), refreshed through the same botocore session, so both clients sign as the same user.
    """

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None,
        region: str | None,
        access_key: str | None,
        secret_key: str | None,
        boto3_session: Any,
        connect_timeout_s: float,
        read_timeout_s: float,
    ) -> None:
        self._bucket = bucket
        self._settings: dict[str, Any] = {
            "endpoint_url": endpoint_url,
            "region": region or "us-east-1",
            "access_key": access_key,
            "secret_key": secret_key,
            "connect_timeout_s": connect_timeout_s,
            "read_timeout_s": read_timeout_s,
        }
        self._boto3_session = boto3_session
        self._store: Any = None
        self._store_pid: int | None = None
        self._lock = threading.Lock()
        self.served = 0  # GETs answered here, and those handed back to boto3 (tests and logs read them)
        self.handed_back = 0

    def get(self, key: str, *, max_bytes: int, version_id: str | None, if_match: str | None) -> FastRead | None:
        """The object's bytes when S3 answers 200 with the expected ETag and at most ``max_bytes``; None
        for anything else (the caller asks boto3, which reports it)."""
        store = self._client()
        if store is None:
            return None
        options: dict[str, Any] = {}
        if version_id:
            options["version"] = version_id
        if if_match:
            options["if_match"] = f'"{if_match}"'
        try:
            result = obstore.get(store, key, options=options)
            meta = result.meta
            etag = (meta.get("e_tag") or "").strip().strip('"')
            size = int(meta.get("size") or 0)
            if (if_match and etag != if_match) or not 0 < size <= max_bytes:
                self.handed_back += 1
                return None
            data = bytes(result.bytes())
        except Exception as exc:  # any failure: boto3 repeats the request and reports it as before
            logger.debug("fast GET of %s/%s handed to boto3: %s", self._bucket, key, exc)
            self.handed_back += 1
            return None
        if len(data) != size:
            self.handed_back += 1
            return None
        self.served += 1
        return FastRead(data, etag, meta.get("version") or None)

    def _client(self) -> Any:
        """This process's obstore client, built on first use (None where the runtime is unusable)."""
        if not fast_reads_available():
            return None
        pid = os.getpid()
        with self._lock:
            if self._store is None or self._store_pid != pid:
                self._store = self._build()
                self._store_pid = pid
            _note_runtime_started()
            return self._store

    def _build(self) -> Any:
        settings = self._settings
        config: dict[str, Any] = {"region": settings["region"], "virtual_hosted_style_request": False}
        credential_provider = None
        if settings["access_key"] and settings["secret_key"]:
            config["access_key_id"] = settings["access_key"]
            config["secret_access_key"] = settings["secret_key"]
        else:
            from obstore.auth.boto3 import Boto3CredentialProvider

            try:
                credential_provider = Boto3CredentialProvider(self._boto3_session)
            except ValueError:  # no credentials anywhere: boto3's path says so, in its own words
                return None
        if settings["endpoint_url"]:
            config["endpoint"] = settings["endpoint_url"]
        client_options = {
            "allow_http": True,  # the endpoint URL says http or https; the server decides
            "connect_timeout": timedelta(seconds=settings["connect_timeout_s"]),
            "read_timeout": timedelta(seconds=settings["read_timeout_s"]),
        }
        # No retries here: a failure goes straight to boto3, whose retry policy is the configured one.
        return _ObstoreS3(
            self._bucket,
            config=config,
            client_options=client_options,
            retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=settings["read_timeout_s"])},
            credential_provider=credential_provider,
        )
