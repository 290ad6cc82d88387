"""SQLAlchemy models of the results database, portable between PostgreSQL and SQLite.

The tables follow one image through the pipeline: ``images`` (one row per object version, created by
the event source before any task is sent), ``inferences`` (one row per image and model version),
``failures`` (the dead letter: one row per image, updated on repeat), ``model_versions`` (the
artifacts the workers may load, at most one ``active``) and ``labels`` (human verdicts for
retraining). Statuses are plain text guarded by CHECK constraints rather than native enums, so a new
status is a one-line migration on both backends.

The initial migration ``migrations/versions/0001_initial.py`` mirrors this file; a test compares the
migrated schema with these models, so change both together.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "IMAGE_KINDS",
    "IMAGE_STATUSES",
    "LABEL_VERDICTS",
    "MODEL_EVENTS",
    "MODEL_STATUSES",
    "Base",
    "Failure",
    "Image",
    "Inference",
    "Label",
    "ModelEvent",
    "ModelVersion",
    "UTCDateTime",
    "utcnow",
]

IMAGE_KINDS: Final = ("incoming", "nominal")
# ``superseded``: a newer version of the key was registered; ``pooled``: a nominal image that was read and
# decoded once and sits in the training pool. Both are terminal.
IMAGE_STATUSES: Final = ("queued", "scored", "failed", "skipped", "superseded", "pooled")
MODEL_STATUSES: Final = ("building", "candidate", "active", "retired", "failed")
LABEL_VERDICTS: Final = ("good", "defect")
# The registry's history (``model_events``), one row per thing that happened to a version.
MODEL_EVENTS: Final = ("registered", "built", "rebuilt", "gated", "promoted", "rolled back", "retired", "failed")

# Deterministic constraint names: Alembic's batch mode on SQLite and every downgrade need to refer to
# constraints by name, and unnamed ones differ between backends.
NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSON everywhere, JSONB on PostgreSQL (indexable, compact). BIGINT keys, but INTEGER on SQLite,
# where only ``INTEGER PRIMARY KEY`` is an auto-incrementing rowid alias.
JSONType = JSON().with_variant(JSONB(), "postgresql")
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC (the only kind of timestamp stored)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned timezone-aware.

    PostgreSQL's ``timestamptz`` does this natively; SQLite stores text without an offset, so values
    are converted to UTC on the way in and tagged UTC on the way out. Naive datetimes are refused
    rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: waferwatch stores timezone-aware UTC timestamps")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class Base(DeclarativeBase):
    """Declarative base holding the shared metadata (``Base.metadata`` is Alembic's target)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType}  # noqa: RUF012


class Image(Base):
    """One version of one object in the bucket; the anchor every other row points to."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("bucket", "key", "etag_or_version", name="uq_images_bucket_key_etag_or_version"),
        CheckConstraint(_in("kind", IMAGE_KINDS), name="kind"),
        CheckConstraint(_in("status", IMAGE_STATUSES), name="status"),
        Index("ix_images_status", "status"),
        Index("ix_images_lot", "lot"),
        Index("ix_images_wafer", "wafer"),
        Index("ix_images_tool", "tool"),
        Index("ix_images_first_seen_at", "first_seen_at"),
        Index(
            "ix_images_lease_until",
            "lease_until",
            postgresql_where=text("lease_until IS NOT NULL"),
            sqlite_where=text("lease_until IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    bucket: Mapped[str] = mapped_column(Text)
    key: Mapped[str] = mapped_column(Text)
    # S3 ETag or version id; '' when the source does not know it, so the unique key never has NULLs.
    etag_or_version: Mapped[str] = mapped_column(Text, default="", server_default="")
    size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    # ``metadata`` is reserved on declarative classes, hence the attribute name ``meta``.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    lot: Mapped[str | None] = mapped_column(Text)
    wafer: Mapped[str | None] = mapped_column(Text)
    tool: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16), default="incoming", server_default="incoming")
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    status: Mapped[str] = mapped_column(String(16), default="queued", server_default="queued")
    status_reason: Mapped[str | None] = mapped_column(Text)
    status_changed_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    # The object version this row stands for, kept apart (``etag_or_version`` holds one or the other):
    # scoring reads exactly these bytes (GET by ``version_id`` on a versioned bucket, else If-Match on
    # ``etag``) and reconciliation compares listed ETags with ``etag`` (migration 0003_object_versions).
    etag: Mapped[str | None] = mapped_column(Text)
    version_id: Mapped[str | None] = mapped_column(Text)
    # Status ``superseded``: the object was overwritten before this row was scored; the row of the
    # version that replaced it (no foreign key: image rows are never deleted by the pipeline).
    superseded_by: Mapped[int | None] = mapped_column(BigInteger)
    # The lease of the worker scoring this row (``worker.leases``, migration 0006_leases): a row still
    # ``queued`` whose lease expired is re-driven by ``waferwatch.redrive_leases``, ``redrives`` times so far.
    claimed_by: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime | None] = mapped_column()
    redrives: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    def __repr__(self) -> str:
        return f"Image(id={self.id!r}, bucket={self.bucket!r}, key={self.key!r}, status={self.status!r})"


class ModelVersion(Base):
    """A scoring artifact and its calibration; workers load the single ``active`` one."""

    __tablename__ = "model_versions"
    __table_args__ = (
        CheckConstraint(_in("status", MODEL_STATUSES), name="status"),
        # At most one active version: a unique index over the rows WHERE status = 'active'.
        Index(
            "uq_model_versions_one_active",
            "status",
            unique=True,
            postgresql_where=text("status = 'active'"),
            sqlite_where=text("status = 'active'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    artifact_uri: Mapped[str | None] = mapped_column(Text)
    threshold: Mapped[float | None] = mapped_column(Float)
    fold_thresholds: Mapped[list[float]] = mapped_column(JSONType, default=list)
    status: Mapped[str] = mapped_column(String(16), default="candidate", server_default="candidate")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    activated_at: Mapped[datetime | None] = mapped_column()
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    reason: Mapped[str | None] = mapped_column(Text)  # why a candidate was held back or a build failed
    stage: Mapped[str | None] = mapped_column(Text)  # build progress, e.g. "fold 3/5"

    def __repr__(self) -> str:
        return f"ModelVersion(id={self.id!r}, status={self.status!r})"


class Inference(Base):
    """The score of one image by one model version (unique on the pair, so redelivery is harmless)."""

    __tablename__ = "inferences"
    __table_args__ = (
        UniqueConstraint("image_id", "model_version", name="uq_inferences_image_id_model_version"),
        Index("ix_inferences_created_at", "created_at"),
        Index("ix_inferences_is_anomalous_created_at", "is_anomalous", "created_at"),
        Index("ix_inferences_model_version", "model_version"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("images.id", ondelete="CASCADE"))
    model_version: Mapped[str] = mapped_column(String(128), ForeignKey("model_versions.id"))
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    is_anomalous: Mapped[bool] = mapped_column(Boolean)
    fold_scores: Mapped[list[float]] = mapped_column(JSONType, default=list)
    heatmap_key: Mapped[str | None] = mapped_column(Text)
    # The anomaly map itself (migration 0007): an 8-bit grayscale PNG, level 0 = anomaly_map_low and
    # 255 = anomaly_map_high in score units; overlays are drawn from it on demand (models.heatmap).
    anomaly_map_png: Mapped[bytes | None] = mapped_column(LargeBinary)
    anomaly_map_low: Mapped[float | None] = mapped_column(Float)
    anomaly_map_high: Mapped[float | None] = mapped_column(Float)
    download_ms: Mapped[float | None] = mapped_column(Float)
    decode_ms: Mapped[float | None] = mapped_column(Float)
    model_ms: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())

    def __repr__(self) -> str:
        return (
            f"Inference(image_id={self.image_id!r}, model_version={self.model_version!r}, "
            f"score={self.score!r}, is_anomalous={self.is_anomalous!r})"
        )


# "Latest inference per image": image_id, then newest first.
Index("ix_inferences_image_id_created_at", Inference.image_id, Inference.created_at.desc())


class Failure(Base):
    """The dead letter of one image: the last error and how many attempts failed."""

    __tablename__ = "failures"

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("images.id", ondelete="CASCADE"), unique=True)
    error_type: Mapped[str] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    first_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    last_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())

    def __repr__(self) -> str:
        return f"Failure(image_id={self.image_id!r}, error_type={self.error_type!r}, attempts={self.attempts!r})"


class Label(Base):
    """A human verdict on an image, collected for retraining."""

    __tablename__ = "labels"
    __table_args__ = (
        CheckConstraint(_in("verdict", LABEL_VERDICTS), name="verdict"),
        Index("ix_labels_image_id", "image_id"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("images.id", ondelete="CASCADE"))
    verdict: Mapped[str] = mapped_column(String(16))
    author: Mapped[str] = mapped_column(Text)
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())

    def __repr__(self) -> str:
        return f"Label(image_id={self.image_id!r}, verdict={self.verdict!r}, author={self.author!r})"


class ModelEvent(Base):
    """One entry of the registry's append-only history: what happened to a version, when, by whom, why.

    Rows are only ever inserted: the state columns of ``model_versions`` say where a version is now, this
    table says how it got there (the gate record of every gate run, who promoted it and whether that
    overrode a failed gate, each rebuild that produced the same content again). ``model_version`` is not
    a foreign key: a failed build's id keeps its events after the build row is gone.
    """

    __tablename__ = "model_events"
    __table_args__ = (
        CheckConstraint(_in("event", MODEL_EVENTS), name="event"),
        Index("ix_model_events_model_version_at", "model_version", "at"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    model_version: Mapped[str] = mapped_column(String(128))
    event: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    actor: Mapped[str] = mapped_column(Text)  # a person (``--author``) or "scheduler"
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)

    def __repr__(self) -> str:
        return f"ModelEvent(model_version={self.model_version!r}, event={self.event!r}, actor={self.actor!r})"
