"""Reads and writes of the results database, one function per question or state change.

Every function takes the session as its first argument, runs inside the caller's unit of work
(:func:`worker.db.session_scope`) and never commits: the task or command decides when its work is
durable. Writes that may be repeated (a redelivered message, two event sources seeing one object,
two worker processes racing) are single ``INSERT ... ON CONFLICT`` statements or conditional UPDATEs,
so repeating them does no harm on PostgreSQL or SQLite.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol, TypeVar

from sqlalchemy import Select, Table, and_, bindparam, case, func, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from models.heatmap import StoredMap, stored_map_of
from worker.errors import PermanentError
from worker.schema import IMAGE_KINDS, MODEL_STATUSES, Failure, Image, Inference, ModelVersion, utcnow

__all__ = [
    "ImageSummary",
    "InferenceRow",
    "ObjectVersion",
    "Registration",
    "Summary",
    "UnknownModelVersionError",
    "ensure_model_version",
    "get_active_model_version",
    "get_image",
    "has_inference",
    "images_without_rows",
    "known_keys",
    "latest_inference",
    "mark_skipped",
    "mark_superseded",
    "record_failure",
    "record_inference",
    "record_inferences",
    "register_image",
    "register_images",
    "set_active_model_version",
    "set_image_sha256",
    "stored_map",
    "summary",
    "update_model_version",
    "versions_without_rows",
]

MAX_MESSAGE_CHARS: Final = 4000
METADATA_COLUMNS: Final = ("lot", "wafer", "tool")
_IN_CHUNK: Final = 500  # keeps IN (...) lists under SQLite's bound-parameter limit
_INSERT_CHUNK: Final = 200  # rows per multi-row INSERT: 200 × 14 columns stays under SQLite's 32766 parameters
_TIMING_FIELDS: Final = ("download_ms", "decode_ms", "model_ms")


class UnknownModelVersionError(PermanentError, LookupError):
    """A model version id that has no ``model_versions`` row (retrying won't create it)."""


def _insert(session: Session, table: Table) -> Any:
    """The dialect's INSERT construct, which has ``on_conflict_do_nothing``/``_do_update``.

    Built on the Table (not the mapped class) so ``values()`` keys are column names.
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"waferwatch supports PostgreSQL and SQLite, not {dialect!r}")


def _truncate(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- images --------------------------------------------------------------------------------------


def register_image(
    session: Session,
    *,
    bucket: str,
    key: str,
    etag: str | None,
    size: int | None,
    metadata: Mapping[str, str] | None = None,
    kind: str = "incoming",
    version_id: str | None = None,
    skip_reason: str | None = None,
) -> tuple[Image, bool]:
    """Return the ``images`` row of this object version, inserting it if new; ``created`` says which.

    An object version is its ``version_id`` on a versioned bucket, else its ``etag``; both are stored
    (scoring reads exactly that version, reconciliation compares ETags), and the one that identifies it
    is the unique key ``etag_or_version``. Safe to call any number of times, from any number of
    processes: the insert is ``ON CONFLICT DO NOTHING`` on (bucket, key, etag_or_version), and the row
    is then read back. On PostgreSQL a racing insert waits for the other transaction and then finds its
    row. A row registered before migration 0003 learns its ETag here (first writer wins). ``lot``,
    ``wafer`` and ``tool`` are copied out of ``metadata`` into indexed columns. ``skip_reason`` inserts
    the row as ``skipped`` with that reason (an object that is not a supported image: accounted for,
    never scored). A page of events goes through :func:`register_images` (this is its one-object case,
    plus the ORM load callers of a single row want).
    """
    item = ObjectVersion(
        bucket=bucket,
        key=key,
        etag=etag,
        size=size,
        metadata=metadata,
        kind=kind,
        version_id=version_id,
        skip_reason=skip_reason,
    )
    (registration,) = register_images(session, [item])
    image = session.get(Image, registration.image_id, populate_existing=True)
    if image is None:  # pragma: no cover - the row was inserted or found by this transaction
        raise LookupError(f"image {registration.image_id} vanished after registration")
    return image, registration.created


@dataclass(frozen=True, slots=True)
class ObjectVersion:
    """One object version to register; the arguments of :func:`register_image` as a value."""

    bucket: str
    key: str
    etag: str | None
    size: int | None
    metadata: Mapping[str, str] | None = None
    kind: str = "incoming"
    version_id: str | None = None
    skip_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Registration:
    """What :func:`register_images` learnt of one object version: its row id, status, and whether this
    call inserted it."""

    image_id: int
    status: str
    created: bool


_Triple = tuple[str, str, str]  # (bucket, key, etag_or_version): the unique key of an images row
_MAX_BIND_PARAMS: Final = 999  # SQLite's bound-parameter limit before 3.32 (newer ones allow 32766)


def register_images(session: Session, objects: Sequence[ObjectVersion]) -> list[Registration]:
    """Register many object versions (one event page) with a constant number of statements; one
    :class:`Registration` per object, in input order. Same semantics as :func:`register_image`.

    Per-object statements cost 2-3 round trips and an ORM load per image, most of ingest's CPU. Here:
    one multi-row ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` (SQLAlchemy's insertmanyvalues, which
    splits it by the dialect's parameter limit), one core SELECT of the rows that already existed and,
    only when one of them still lacks its ETag (registered before migration 0003), one UPDATE. Results
    are joined by the unique triple, never by position: RETURNING order is not guaranteed and conflicting
    rows return nothing. The same version twice in ``objects`` (SQS delivers at least once) gets one row,
    one id, and ``created`` on its first occurrence only, as repeated :func:`register_image` calls would.
    """
    for item in objects:
        if item.kind not in IMAGE_KINDS:
            raise ValueError(f"kind must be one of {IMAGE_KINDS}, got {item.kind!r} (key {item.key!r})")
    now = utcnow()
    triples = [_triple_of(item) for item in objects]
    first: dict[_Triple, ObjectVersion] = {}
    for triple, item in zip(triples, objects, strict=True):
        first.setdefault(triple, item)
    inserted = _insert_new(session, [_image_values(triple, item, now) for triple, item in first.items()])
    known = _known_rows(session, [triple for triple in first if triple not in inserted])
    _learn_etags(session, _etags_to_learn(triples, objects, first, inserted, known))
    return _registrations(triples, first, inserted, known)


def _triple_of(item: ObjectVersion) -> _Triple:
    """The unique key of an object version: its version id on a versioned bucket, else its ETag, else ''."""
    return (item.bucket, item.key, item.version_id or item.etag or "")


def _image_values(triple: _Triple, item: ObjectVersion, now: datetime) -> dict[str, Any]:
    """The ``images`` row of a new object version (column names, for the Table-level insert)."""
    meta = dict(item.metadata or {})
    return {
        "bucket": triple[0],
        "key": triple[1],
        "etag_or_version": triple[2],
        "etag": item.etag or None,
        "version_id": item.version_id or None,
        "size": item.size,
        "metadata": meta,
        "kind": item.kind,
        "first_seen_at": now,
        "status": "queued" if item.skip_reason is None else "skipped",
        "status_reason": None if item.skip_reason is None else _truncate(item.skip_reason),
        "status_changed_at": now,
        **{column: meta.get(column) or None for column in METADATA_COLUMNS},
    }


def _insert_new(session: Session, rows: list[dict[str, Any]]) -> dict[_Triple, int]:
    """Insert the rows that do not exist yet; the ids of those this statement inserted, by triple."""
    if not rows:
        return {}
    table = Image.__table__
    statement = (
        _insert(session, table)
        .on_conflict_do_nothing(index_elements=["bucket", "key", "etag_or_version"])
        .returning(table.c.id, table.c.bucket, table.c.key, table.c.etag_or_version)
    )
    result = session.execute(statement, rows)
    return {(bucket, key, version): image_id for image_id, bucket, key, version in result}


def _known_rows(session: Session, triples: list[_Triple]) -> dict[_Triple, tuple[int, str, str | None]]:
    """(id, status, etag) of existing rows by triple; chunked to stay under SQLite's parameter limit."""
    table = Image.__table__
    unique_key = tuple_(table.c.bucket, table.c.key, table.c.etag_or_version)
    query = select(table.c.id, table.c.bucket, table.c.key, table.c.etag_or_version, table.c.status, table.c.etag)
    found: dict[_Triple, tuple[int, str, str | None]] = {}
    per_chunk = _MAX_BIND_PARAMS // 3
    for start in range(0, len(triples), per_chunk):
        chunk = triples[start : start + per_chunk]
        for image_id, bucket, key, version, status, etag in session.execute(query.where(unique_key.in_(chunk))):
            found[(bucket, key, version)] = (image_id, status, etag)
    return found


def _etags_to_learn(
    triples: Sequence[_Triple],
    objects: Sequence[ObjectVersion],
    first: Mapping[_Triple, ObjectVersion],
    inserted: Mapping[_Triple, int],
    known: Mapping[_Triple, tuple[int, str, str | None]],
) -> dict[_Triple, str]:
    """The first ETag offered for each row that has none yet (first writer wins, as in :func:`register_image`).

    A row has none when it existed without one, or when this call inserted it from an occurrence without
    one and a later duplicate in the page carries it.
    """
    learned: dict[_Triple, str] = {}
    for triple, item in zip(triples, objects, strict=True):
        if not item.etag or triple in learned:
            continue
        row_has_no_etag = (triple in inserted and not first[triple].etag) or (
            triple in known and known[triple][2] is None
        )
        if row_has_no_etag:
            learned[triple] = item.etag
    return learned


def _learn_etags(session: Session, learned: Mapping[_Triple, str]) -> None:
    """One UPDATE (per chunk) giving each row its ETag, still only where it has none (a racing writer won)."""
    table = Image.__table__
    unique_key = tuple_(table.c.bucket, table.c.key, table.c.etag_or_version)
    items = list(learned.items())
    per_chunk = _MAX_BIND_PARAMS // 7  # 3 in the IN list, 4 in the CASE
    for start in range(0, len(items), per_chunk):
        chunk = items[start : start + per_chunk]
        etag = case(
            *(
                (and_(table.c.bucket == bucket, table.c.key == key, table.c.etag_or_version == version), value)
                for (bucket, key, version), value in chunk
            )
        )
        session.execute(
            update(table)
            .where(unique_key.in_([triple for triple, _ in chunk]), table.c.etag.is_(None))
            .values(etag=etag)
        )


def _registrations(
    triples: Sequence[_Triple],
    first: Mapping[_Triple, ObjectVersion],
    inserted: Mapping[_Triple, int],
    known: Mapping[_Triple, tuple[int, str, str | None]],
) -> list[Registration]:
    """One result per input object; ``created`` only on the first occurrence of an inserted triple."""
    results: list[Registration] = []
    reported: set[_Triple] = set()
    for triple in triples:
        if triple in inserted:
            status = "queued" if first[triple].skip_reason is None else "skipped"
            results.append(Registration(inserted[triple], status, created=triple not in reported))
        elif triple in known:
            image_id, status, _ = known[triple]
            results.append(Registration(image_id, status, created=False))
        else:  # ON CONFLICT skipped it, yet no row matches: only a concurrent delete does this
            raise LookupError(f"images row {triple} was neither inserted nor found (deleted concurrently?)")
        reported.add(triple)
    return results


def get_image(session: Session, *, image_id: int) -> Image | None:
    """The image with this id, or None."""
    return session.get(Image, image_id)


def set_image_sha256(session: Session, *, image_id: int, sha256: str) -> None:
    """Record the content hash once the bytes have been fetched (first writer wins)."""
    session.execute(update(Image).where(Image.id == image_id, Image.sha256.is_(None)).values(sha256=sha256))


def known_keys(session: Session, bucket: str, prefix: str = "") -> set[str]:
    """Keys under ``prefix`` in ``bucket`` that have at least one ``images`` row (for reconciliation)."""
    query = select(Image.key).where(Image.bucket == bucket).distinct()
    if prefix:
        query = query.where(Image.key.startswith(prefix, autoescape=True))
    return set(session.scalars(query))


def images_without_rows(session: Session, *, bucket: str, keys: Iterable[str]) -> list[str]:
    """The subset of ``keys`` (in their order, without repeats) that has no ``images`` row in ``bucket``.

    Used by reconciliation to find objects an event source missed; the lookup is chunked so a long
    listing stays within SQLite's parameter limit.
    """
    wanted = list(dict.fromkeys(keys))
    found: set[str] = set()
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = wanted[start : start + _IN_CHUNK]
        found.update(session.scalars(select(Image.key).where(Image.bucket == bucket, Image.key.in_(chunk))))
    return [key for key in wanted if key not in found]


class ListedObject(Protocol):
    """What reconciliation knows of a listed object (``worker.storage.ObjectInfo`` fits)."""

    @property
    def key(self) -> str: ...

    @property
    def etag(self) -> str: ...


_Listed = TypeVar("_Listed", bound=ListedObject)


def versions_without_rows(session: Session, *, bucket: str, objects: Iterable[_Listed]) -> list[_Listed]:
    """The listed objects (in their order, first of each key) whose *version* has no ``images`` row.

    A version is known when a row of its key has its ETag (``etag``, or ``etag_or_version`` for rows
    registered before the ETag had a column of its own). So an overwrite whose notification was lost
    shows up here although its key has rows. A key whose rows have no ETag at all (a source that sent
    none) cannot be compared and counts as known, as before. Chunked like :func:`images_without_rows`.
    """
    first_by_key: dict[str, _Listed] = {}
    for item in objects:
        first_by_key.setdefault(item.key, item)
    wanted = list(first_by_key.values())
    known: set[tuple[str, str]] = set()
    keys_without_etag: set[str] = set()
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = [item.key for item in wanted[start : start + _IN_CHUNK]]
        rows = session.execute(
            select(Image.key, Image.etag, Image.etag_or_version).where(Image.bucket == bucket, Image.key.in_(chunk))
        )
        for key, etag, etag_or_version in rows:
            if not etag and not etag_or_version:
                keys_without_etag.add(key)
            known.update((key, value) for value in (etag, etag_or_version) if value)
    return [item for item in wanted if (item.key, item.etag) not in known and item.key not in keys_without_etag]


def mark_superseded(
    session: Session,
    *,
    image_id: int,
    etag: str,
    version_id: str | None,
    size: int | None,
) -> tuple[Image, bool] | None:
    """The object of ``image_id`` was overwritten before it was scored: register the current version
    (``etag``/``version_id``/``size`` from a HEAD) and mark the old row ``superseded`` by it.

    Returns the new version's row and whether it was created (the caller enqueues it when it was), or
    None when the old row is gone or no longer ``queued`` (scored or recorded meanwhile: left alone).
    The new row copies the old one's bucket, key, kind and metadata (they come from the key).
    """
    old = session.get(Image, image_id, populate_existing=True)
    if old is None or old.status != "queued":
        return None
    new, created = register_image(
        session,
        bucket=old.bucket,
        key=old.key,
        etag=etag,
        version_id=version_id,
        size=size,
        metadata=old.meta,
        kind=old.kind,
    )
    if new.id == old.id:
        raise ValueError(f"image {image_id} cannot be superseded by itself (ETag {etag!r} is its own)")
    session.execute(
        update(Image)
        .where(Image.id == image_id, Image.status == "queued")
        .values(
            status="superseded",
            superseded_by=new.id,
            status_reason=_truncate(
                f"overwritten before it was scored: ETag {old.etag or old.etag_or_version!r} is now "
                f"{etag!r}; image {new.id} is the current version"
            ),
            status_changed_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    return new, created


def mark_skipped(session: Session, *, image_id: int, reason: str) -> None:
    """Mark an image as deliberately not scored (too large, not an image, ...) and say why."""
    session.execute(
        update(Image)
        .where(Image.id == image_id)
        .values(status="skipped", status_reason=_truncate(reason), status_changed_at=utcnow())
    )


# --- inferences and failures ---------------------------------------------------------------------


def record_inference(
    session: Session,
    *,
    image_id: int,
    model_version: str,
    score: float,
    threshold: float,
    is_anomalous: bool,
    fold_scores: Sequence[float],
    heatmap_key: str | None = None,
    timings: Mapping[str, float] | None = None,
    anomaly_map: StoredMap | None = None,
) -> bool:
    """Store the score of one image by one model version; False if it was already stored.

    Idempotent on (image_id, model_version), so a redelivered task writes nothing new. The image is
    marked ``scored`` either way (its ``status_changed_at`` kept when it already was). ``timings`` may
    hold ``download_ms``, ``decode_ms`` and ``model_ms``; ``anomaly_map`` is the stored map the overlay is
    drawn from on demand (:func:`models.heatmap.render_stored`).
    """
    row = InferenceRow(
        image_id=image_id,
        score=score,
        threshold=threshold,
        is_anomalous=is_anomalous,
        fold_scores=fold_scores,
        heatmap_key=heatmap_key,
        anomaly_map=anomaly_map,
        timings=timings or {},
    )
    return image_id in record_inferences(session, model_version=model_version, rows=[row])


@dataclass(frozen=True, slots=True)
class InferenceRow:
    """One image's score by a model version, as :func:`record_inferences` writes it."""

    image_id: int
    score: float
    threshold: float
    is_anomalous: bool
    fold_scores: Sequence[float]
    sha256: str | None = None
    heatmap_key: str | None = None
    anomaly_map: StoredMap | None = None
    timings: Mapping[str, float] = field(default_factory=dict)


def record_inferences(session: Session, *, model_version: str, rows: Sequence[InferenceRow]) -> set[int]:
    """:func:`record_inference` (its one-row case) and :func:`set_image_sha256` for a whole batch in two
    statements; returns
    the image ids whose inference is new (the others were stored before: a redelivery writes nothing new).

    One multi-row ``INSERT … ON CONFLICT DO NOTHING RETURNING image_id`` and one ``UPDATE`` executed for
    all rows at once (psycopg pipelines it): per image, a worker spent more CPU on three ORM statements
    than a GPU spends on the model.
    """
    if not rows:
        return set()
    now = utcnow()
    values = []
    for row in rows:
        unknown = set(row.timings) - set(_TIMING_FIELDS)
        if unknown:
            raise ValueError(f"unknown timing fields {sorted(unknown)}; expected some of {_TIMING_FIELDS}")
        values.append(
            {
                "image_id": row.image_id,
                "model_version": model_version,
                "score": float(row.score),
                "threshold": float(row.threshold),
                "is_anomalous": bool(row.is_anomalous),
                "fold_scores": [float(value) for value in row.fold_scores],
                "heatmap_key": row.heatmap_key,
                **_map_columns(row.anomaly_map),
                "created_at": now,
                **{name: (float(row.timings[name]) if name in row.timings else None) for name in _TIMING_FIELDS},
            }
        )
    created: set[int] = set()
    for begin in range(0, len(values), _INSERT_CHUNK):
        statement = (
            _insert(session, Inference.__table__)
            .values(values[begin : begin + _INSERT_CHUNK])
            .on_conflict_do_nothing(index_elements=["image_id", "model_version"])
            .returning(Inference.image_id)
        )
        created.update(session.execute(statement).scalars())
    images = Image.__table__
    scored = (
        images.update()
        .where(images.c.id == bindparam("row_id"))
        .values(
            sha256=func.coalesce(images.c.sha256, bindparam("row_sha256", type_=images.c.sha256.type)),
            status="scored",
            status_reason=None,
            status_changed_at=case((images.c.status == "scored", images.c.status_changed_at), else_=now),
        )
    )
    session.execute(scored, [{"row_id": row.image_id, "row_sha256": row.sha256} for row in rows])
    return created


def _map_columns(anomaly_map: StoredMap | None) -> dict[str, Any]:
    if anomaly_map is None:
        return {"anomaly_map_png": None, "anomaly_map_low": None, "anomaly_map_high": None}
    return {
        "anomaly_map_png": anomaly_map.png,
        "anomaly_map_low": float(anomaly_map.low),
        "anomaly_map_high": float(anomaly_map.high),
    }


def stored_map(inference: Inference) -> StoredMap | None:
    """The anomaly map stored with an inference row (None for rows scored before 0007, or without a map)."""
    return stored_map_of(inference.anomaly_map_png, inference.anomaly_map_low, inference.anomaly_map_high)


def has_inference(session: Session, *, image_id: int, model_version: str) -> bool:
    """Whether this image already has a score from this model version (skip work on redelivery)."""
    query = select(Inference.id).where(Inference.image_id == image_id, Inference.model_version == model_version)
    return session.execute(query.limit(1)).first() is not None


def latest_inference(session: Session, *, image_id: int) -> Inference | None:
    """The newest inference of an image, whatever the model version."""
    query = (
        select(Inference)
        .where(Inference.image_id == image_id)
        .order_by(Inference.created_at.desc(), Inference.id.desc())
        .limit(1)
    )
    return session.scalars(query).first()


def record_failure(session: Session, *, image_id: int, error_type: str, message: str) -> int:
    """Upsert the dead-letter row of an image and mark the image ``failed``; return the attempt count.

    The first failure inserts ``attempts = 1``; each repeat updates the error, ``last_at`` and
    increments ``attempts`` in the same statement, so concurrent failures never lose a count.
    """
    now = utcnow()
    message = _truncate(message)
    insert = _insert(session, Failure.__table__).values(
        image_id=image_id, error_type=error_type, message=message, attempts=1, first_at=now, last_at=now
    )
    statement = insert.on_conflict_do_update(
        index_elements=["image_id"],
        set_={
            "error_type": insert.excluded.error_type,
            "message": insert.excluded.message,
            "last_at": insert.excluded.last_at,
            "attempts": Failure.__table__.c.attempts + 1,
        },
    ).returning(Failure.attempts)
    attempts = session.execute(statement).scalar_one()
    session.execute(
        update(Image)
        .where(Image.id == image_id)
        .values(status="failed", status_reason=_truncate(f"{error_type}: {message}"), status_changed_at=now)
    )
    return int(attempts)


# --- model versions ------------------------------------------------------------------------------


def ensure_model_version(
    session: Session,
    *,
    version: str,
    manifest: Mapping[str, Any] | None = None,
    artifact_uri: str | None = None,
    threshold: float | None = None,
    fold_thresholds: Sequence[float] = (),
    status: str = "candidate",
    metrics: Mapping[str, Any] | None = None,
) -> tuple[ModelVersion, bool]:
    """Return the ``model_versions`` row for ``version``, inserting it if missing; ``created`` says which.

    An existing row is returned unchanged (use :func:`update_model_version` to change it), so two
    processes registering the same artifact agree. ``status="active"`` on a new row goes through
    :func:`set_active_model_version`, which retires the previous active version.
    """
    if status not in MODEL_STATUSES:
        raise ValueError(f"status must be one of {MODEL_STATUSES}, got {status!r}")
    statement = (
        _insert(session, ModelVersion.__table__)
        .values(
            id=version,
            manifest=dict(manifest or {}),
            artifact_uri=artifact_uri,
            threshold=None if threshold is None else float(threshold),
            fold_thresholds=[float(value) for value in fold_thresholds],
            status="candidate" if status == "active" else status,
            created_at=utcnow(),
            metrics=dict(metrics or {}),
        )
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(ModelVersion.id)
    )
    created = session.execute(statement).scalar_one_or_none() is not None
    if created and status == "active":
        return set_active_model_version(session, version), True
    row = session.get(ModelVersion, version, populate_existing=True)
    if row is None:  # only if another transaction deleted it in between
        raise UnknownModelVersionError(f"model version {version!r} vanished while being registered")
    return row, created


_UNSET: Final = object()


def update_model_version(
    session: Session,
    *,
    version: str,
    status: str | None = None,
    stage: str | object | None = _UNSET,
    reason: str | object | None = _UNSET,
    metrics: Mapping[str, Any] | None = None,
    manifest: Mapping[str, Any] | None = None,
    artifact_uri: str | None = None,
    threshold: float | None = None,
    fold_thresholds: Sequence[float] | None = None,
) -> ModelVersion:
    """Change fields of a model version (build progress, held-back reason, metrics, artifact).

    Use :func:`set_active_model_version` to activate; this refuses ``status="active"`` so the
    one-active rule has a single way in. ``stage``/``reason`` may be set to None explicitly.
    """
    if status == "active":
        raise ValueError("activate a model version with set_active_model_version()")
    if status is not None and status not in MODEL_STATUSES:
        raise ValueError(f"status must be one of {MODEL_STATUSES}, got {status!r}")
    row = session.get(ModelVersion, version, populate_existing=True)
    if row is None:
        raise UnknownModelVersionError(f"model version {version!r} does not exist")
    if status is not None:
        row.status = status
    if stage is not _UNSET:
        row.stage = stage  # type: ignore[assignment]
    if reason is not _UNSET:
        row.reason = reason  # type: ignore[assignment]
    if metrics is not None:
        row.metrics = dict(metrics)
    if manifest is not None:
        row.manifest = dict(manifest)
    if artifact_uri is not None:
        row.artifact_uri = artifact_uri
    if threshold is not None:
        row.threshold = float(threshold)
    if fold_thresholds is not None:
        row.fold_thresholds = [float(value) for value in fold_thresholds]
    session.flush()
    return row


def get_active_model_version(session: Session) -> ModelVersion | None:
    """The model version workers should score with, or None before the first activation."""
    return session.scalars(select(ModelVersion).where(ModelVersion.status == "active")).first()


def set_active_model_version(session: Session, version: str) -> ModelVersion:
    """Make ``version`` the only active model version, retiring the previous one in the same transaction.

    The retire runs before the activate, so the partial unique index (one ``active`` row) holds after
    each statement. If two transactions activate concurrently, one commits and the other fails on
    that index (an ``IntegrityError``, safe to retry). Activating the active version is a no-op.

    Raises:
        UnknownModelVersionError: no such version.
    """
    row = session.get(ModelVersion, version, populate_existing=True)
    if row is None:
        raise UnknownModelVersionError(f"model version {version!r} does not exist")
    if row.status == "active":
        return row
    now = utcnow()
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.status == "active", ModelVersion.id != version)
        .values(status="retired")
        .execution_options(synchronize_session="fetch")
    )
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.id == version)
        .values(status="active", activated_at=now, reason=None)
        .execution_options(synchronize_session="fetch")
    )
    session.refresh(row)
    return row


# --- reporting -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageSummary:
    """One image in a summary: where it is and how long its scoring took."""

    image_id: int
    key: str
    score: float
    is_anomalous: bool
    total_ms: float
    download_ms: float | None
    decode_ms: float | None
    model_ms: float | None


@dataclass(frozen=True, slots=True)
class Summary:
    """Counts for a report (the demo's SQL summary): images by status, inferences, anomalies, failures."""

    images_by_status: dict[str, int] = field(default_factory=dict)
    inferences: int = 0
    anomalies: int = 0
    failures: int = 0
    failed_attempts: int = 0
    anomalies_by_lot: dict[str, int] = field(default_factory=dict)
    slowest: list[ImageSummary] = field(default_factory=list)

    @property
    def images(self) -> int:
        """All registered images."""
        return sum(self.images_by_status.values())


def _timing_total() -> Any:
    return (
        func.coalesce(Inference.download_ms, 0.0)
        + func.coalesce(Inference.decode_ms, 0.0)
        + func.coalesce(Inference.model_ms, 0.0)
    )


def summary(session: Session, *, model_version: str | None = None, slowest: int = 5) -> Summary:
    """Counts by image status, inferences and anomalies (optionally for one model version), the
    number of dead-lettered images, anomalies per lot and the ``slowest`` images by total time.
    """
    by_status = dict(session.execute(select(Image.status, func.count()).group_by(Image.status)).all())

    def _scoped(query: Select[Any]) -> Select[Any]:
        return query if model_version is None else query.where(Inference.model_version == model_version)

    inferences = session.scalar(_scoped(select(func.count()).select_from(Inference))) or 0
    anomalies = session.scalar(_scoped(select(func.count()).select_from(Inference).where(Inference.is_anomalous))) or 0
    failures, failed_attempts = session.execute(
        select(func.count(), func.coalesce(func.sum(Failure.attempts), 0)).select_from(Failure)
    ).one()
    lot = func.coalesce(Image.lot, "")
    by_lot_rows = session.execute(
        _scoped(
            select(lot, func.count())
            .select_from(Inference)
            .join(Image, Image.id == Inference.image_id)
            .where(Inference.is_anomalous)
            .group_by(lot)
        )
    ).all()
    total = _timing_total().label("total_ms")
    slow_rows = session.execute(
        _scoped(
            select(
                Image.id,
                Image.key,
                Inference.score,
                Inference.is_anomalous,
                total,
                Inference.download_ms,
                Inference.decode_ms,
                Inference.model_ms,
            )
            .join(Image, Image.id == Inference.image_id)
            .order_by(total.desc(), Inference.id)
            .limit(max(slowest, 0))
        )
    ).all()
    return Summary(
        images_by_status={status: int(count) for status, count in by_status.items()},
        inferences=int(inferences),
        anomalies=int(anomalies),
        failures=int(failures),
        failed_attempts=int(failed_attempts),
        anomalies_by_lot={name: int(count) for name, count in by_lot_rows},
        slowest=[
            ImageSummary(
                image_id=row[0],
                key=row[1],
                score=float(row[2]),
                is_anomalous=bool(row[3]),
                total_ms=float(row[4]),
                download_ms=row[5],
                decode_ms=row[6],
                model_ms=row[7],
            )
            for row in slow_rows
        ],
    )
