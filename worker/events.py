"""Parse S3-style bucket notifications (AWS, MinIO, Ceph RGW) into ``ObjectEvent`` values.

Every source (SQS, webhook, Redis list) receives the same event record shape
wrapped in a different envelope, so one parser unwraps them all:

* AWS S3 -> SQS: ``{"Records": [...]}``; the first message after configuring a
  bucket is ``{"Event": "s3:TestEvent", ...}`` and carries no object.
* S3 -> SNS -> SQS (no raw delivery): ``{"Type": "Notification", "Message": "<json>"}``.
* MinIO webhook: ``{"EventName": "s3:ObjectCreated:Put", "Key": "bucket/key", "Records": [...]}``.
* MinIO Redis/``access`` format: each list element is ``[{"Event": [...], "EventTime": "..."}]``.
* Ceph RGW: ``{"Records": [...]}`` with ``eventSource: ceph:s3``, ``size`` possibly a
  string and ``versionId`` possibly ``""``.

Object keys in records are URL-encoded the ``application/x-www-form-urlencoded``
way (a space is ``+``, a literal ``+`` is ``%2B``), hence ``unquote_plus``.
Only ``ObjectCreated:*`` events are returned: deletes, ACL changes and
replication events do not create work.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote_plus

from worker.errors import BadEventError

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
"""Suffixes accepted by ``filter_events`` when the caller does not name any (and scored by the worker:
Pillow decodes them all; animated GIF/WebP and multi-page TIFF give their first frame)."""

_EXCERPT_CHARS = 200
_MAX_ENVELOPE_DEPTH = 4
_CREATED_PREFIX = "ObjectCreated:"


@dataclass(frozen=True, slots=True)
class ObjectEvent:
    """One object that was created (or overwritten) in a bucket.

    ``key`` is decoded (a real object key); ``etag`` has no quotes; ``event_name``
    has no ``s3:`` prefix (``ObjectCreated:Put``) whichever server sent it.
    """

    bucket: str
    key: str
    etag: str | None
    version_id: str | None
    size: int | None
    event_name: str
    event_time: datetime | None


def parse_notification(body: str | bytes | dict[str, Any] | list[Any]) -> list[ObjectEvent]:
    """Return the ``ObjectCreated`` events of one notification message, deduplicated, in order.

    Raises ``BadEventError`` (permanent) when the body is not JSON or not a known
    notification shape; a test event or a message with only non-create events
    yields ``[]``.
    """
    payload = _load(body) if isinstance(body, str | bytes) else body
    records = _records(payload, body, depth=0)
    events: list[ObjectEvent] = []
    seen: set[tuple[str, str, str | None, str | None]] = set()
    for record in records:
        event = _event_from_record(record, body)
        if event is None:
            continue
        identity = (event.bucket, event.key, event.etag, event.version_id)
        if identity in seen:
            continue
        seen.add(identity)
        events.append(event)
    return events


def filter_events(
    events: Iterable[ObjectEvent],
    *,
    prefixes: Sequence[str] = (),
    suffixes: Sequence[str] | None = None,
) -> list[ObjectEvent]:
    """Keep events whose key starts with one of ``prefixes`` and ends with one of ``suffixes``.

    An empty ``prefixes`` accepts every key.  ``suffixes=None`` means the default
    image suffixes (``DEFAULT_IMAGE_SUFFIXES``); an empty sequence accepts any
    suffix.  Suffixes compare case-insensitively (tools write ``.PNG`` and ``.png``).
    """
    wanted_suffixes = DEFAULT_IMAGE_SUFFIXES if suffixes is None else tuple(suffixes)
    lowered = tuple(suffix.lower() for suffix in wanted_suffixes)
    wanted_prefixes = tuple(prefixes)
    kept: list[ObjectEvent] = []
    for event in events:
        if wanted_prefixes and not event.key.startswith(wanted_prefixes):
            continue
        if lowered and not event.key.lower().endswith(lowered):
            continue
        kept.append(event)
    return kept


def unsupported_type_reason(key: str, suffixes: Sequence[str] = DEFAULT_IMAGE_SUFFIXES) -> str | None:
    """Why the object ``key`` is not scored (its name has no image suffix), or None when it is an image.

    Ingest and reconciliation register such an object under ``incoming/`` as ``skipped`` with this
    reason, so every dropped object is accounted for in SQL instead of vanishing.
    """
    lowered = tuple(suffix.lower() for suffix in suffixes)
    if not lowered or key.lower().endswith(lowered):
        return None
    name = key.rsplit("/", 1)[-1]
    suffix = name[name.rfind(".") :].lower() if "." in name.lstrip(".") else ""
    what = f"type {suffix!r}" if suffix else "a name without a file suffix"
    return (
        f"unsupported file {what}: only {', '.join(lowered)} are scored; "
        "convert it to one of these, or add its suffix to the image suffixes if Pillow reads it"
    )


def excerpt(body: object, limit: int = _EXCERPT_CHARS) -> str:
    """A short, single-line preview of a message body for error messages and logs."""
    if isinstance(body, bytes):
        text = body.decode("utf-8", errors="replace")
    elif isinstance(body, str):
        text = body
    else:
        text = repr(body)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _load(body: str | bytes) -> Any:
    """Decode JSON, turning every decoding failure into a ``BadEventError``."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadEventError(
            f"notification body is not valid JSON ({exc}); body starts with: {excerpt(body)!r}"
        ) from exc


def _records(payload: Any, body: object, *, depth: int) -> list[dict[str, Any]]:
    """Unwrap the envelopes (SNS, MinIO access list) down to a flat list of event records."""
    if depth > _MAX_ENVELOPE_DEPTH:
        raise BadEventError(f"notification nests envelopes too deeply; body starts with: {excerpt(body)!r}")
    if isinstance(payload, list):
        records: list[dict[str, Any]] = []
        for item in payload:
            records.extend(_records(item, body, depth=depth + 1))
        return records
    if not isinstance(payload, dict):
        raise BadEventError(
            f"notification is a JSON {type(payload).__name__}, not an object; body starts with: {excerpt(body)!r}"
        )
    event_field = payload.get("Event")
    if isinstance(event_field, str) and event_field.removeprefix("s3:") == "TestEvent":
        return []
    sns_type = payload.get("Type")
    if isinstance(sns_type, str) and ("TopicArn" in payload or sns_type == "Notification"):
        return _sns_records(payload, body, depth=depth)
    if "Records" in payload:
        return _record_list(payload["Records"], body)
    # MinIO access format element: {"Event": [records...], "EventTime": "..."}
    if isinstance(event_field, list):
        return _record_list(event_field, body)
    # A bare record (some gateways forward records one by one).
    if "s3" in payload and "eventName" in payload:
        return [payload]
    raise BadEventError(
        f"notification has no 'Records' and is not a known envelope; body starts with: {excerpt(body)!r}"
    )


def _sns_records(payload: dict[str, Any], body: object, *, depth: int) -> list[dict[str, Any]]:
    """Unwrap an SNS envelope; subscription confirmations carry no object events."""
    if payload.get("Type") != "Notification":
        logger.info("ignoring SNS %s message (not a notification)", payload.get("Type"))
        return []
    message = payload.get("Message")
    if isinstance(message, str):
        return _records(_load(message), body, depth=depth + 1)
    if isinstance(message, dict | list):
        return _records(message, body, depth=depth + 1)
    raise BadEventError(f"SNS notification has no usable 'Message'; body starts with: {excerpt(body)!r}")


def _record_list(records: Any, body: object) -> list[dict[str, Any]]:
    if records is None:
        return []
    if not isinstance(records, list) or not all(isinstance(item, dict) for item in records):
        raise BadEventError(f"'Records' is not a list of objects; body starts with: {excerpt(body)!r}")
    return records


def _event_from_record(record: dict[str, Any], body: object) -> ObjectEvent | None:
    """Build an ``ObjectEvent`` from one record, or ``None`` for non-create events."""
    raw_name = record.get("eventName")
    if not isinstance(raw_name, str):
        raise BadEventError(f"event record without 'eventName'; body starts with: {excerpt(body)!r}")
    event_name = raw_name.removeprefix("s3:")
    if not event_name.startswith(_CREATED_PREFIX):
        return None
    try:
        s3 = record["s3"]
        bucket = s3["bucket"]["name"]
        obj = s3["object"]
        raw_key = obj["key"]
    except (KeyError, TypeError) as exc:
        raise BadEventError(
            f"{event_name} record lacks s3.bucket.name or s3.object.key ({exc!r}); body starts with: {excerpt(body)!r}"
        ) from exc
    if not isinstance(bucket, str) or not bucket or not isinstance(raw_key, str) or not raw_key:
        raise BadEventError(f"{event_name} record has an empty bucket or key; body starts with: {excerpt(body)!r}")
    etag = obj.get("eTag") or obj.get("etag") or None
    return ObjectEvent(
        bucket=bucket,
        key=unquote_plus(raw_key),
        etag=str(etag).strip('"') if etag else None,
        version_id=str(obj["versionId"]) if obj.get("versionId") else None,
        size=_parse_size(obj.get("size"), body),
        event_name=event_name,
        event_time=_parse_time(record.get("eventTime")),
    )


def _parse_size(value: Any, body: object) -> int | None:
    """Sizes are numbers in AWS/MinIO records and strings in Ceph's."""
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise BadEventError(f"object size {value!r} is not an integer; body starts with: {excerpt(body)!r}") from exc


def _parse_time(value: Any) -> datetime | None:
    """Parse the ISO-8601 event time; it is informational, so an odd format yields ``None``."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        logger.debug("unparseable eventTime %r kept as None", value)
        return None
