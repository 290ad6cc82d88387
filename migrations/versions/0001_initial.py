"""Initial schema: images, model_versions, inferences, failures, labels.

Revision ID: 0001
Revises:
Create Date: 2026-11-28

Written to be frozen: it does not import worker.schema (which will keep changing), so column types are
spelled out here. tests/migrations checks that the result matches the models on both backends.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # INTEGER PRIMARY KEY is SQLite's rowid


def _timestamp(name: str, *, nullable: bool = False, now: bool = True) -> sa.Column:
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        server_default=sa.func.now() if now else None,
        nullable=nullable,
    )


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("bucket", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("etag_or_version", sa.Text(), server_default="", nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("lot", sa.Text(), nullable=True),
        sa.Column("wafer", sa.Text(), nullable=True),
        sa.Column("tool", sa.Text(), nullable=True),
        sa.Column("kind", sa.String(length=16), server_default="incoming", nullable=False),
        _timestamp("first_seen_at"),
        sa.Column("status", sa.String(length=16), server_default="queued", nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        _timestamp("status_changed_at"),
        sa.CheckConstraint("kind IN ('incoming', 'nominal')", name=op.f("ck_images_kind")),
        sa.CheckConstraint(
            "status IN ('queued', 'scored', 'failed', 'skipped')", name=op.f("ck_images_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_images")),
        sa.UniqueConstraint(
            "bucket", "key", "etag_or_version", name=op.f("uq_images_bucket_key_etag_or_version")
        ),
    )
    op.create_index("ix_images_first_seen_at", "images", ["first_seen_at"])
    op.create_index("ix_images_lot", "images", ["lot"])
    op.create_index("ix_images_status", "images", ["status"])
    op.create_index("ix_images_tool", "images", ["tool"])
    op.create_index("ix_images_wafer", "images", ["wafer"])

    op.create_table(
        "model_versions",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("manifest", JSON, nullable=False),
        sa.Column("artifact_uri", sa.Text(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("fold_thresholds", JSON, nullable=False),
        sa.Column("status", sa.String(length=16), server_default="candidate", nullable=False),
        _timestamp("created_at"),
        _timestamp("activated_at", nullable=True, now=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("stage", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('building', 'candidate', 'active', 'retired', 'failed')",
            name=op.f("ck_model_versions_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
    )
    # At most one active model version (a partial unique index; both backends support WHERE).
    op.create_index(
        "uq_model_versions_one_active",
        "model_versions",
        ["status"],
        unique=True,
        postgresql_where=sa.text("status = 'active'"),
        sqlite_where=sa.text("status = 'active'"),
    )

    op.create_table(
        "failures",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("image_id", sa.BigInteger(), nullable=False),
        sa.Column("error_type", sa.Text(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="1", nullable=False),
        _timestamp("first_at"),
        _timestamp("last_at"),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_failures_image_id_images"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_failures")),
        sa.UniqueConstraint("image_id", name=op.f("uq_failures_image_id")),
    )

    op.create_table(
        "inferences",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("image_id", sa.BigInteger(), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("is_anomalous", sa.Boolean(), nullable=False),
        sa.Column("fold_scores", JSON, nullable=False),
        sa.Column("heatmap_key", sa.Text(), nullable=True),
        sa.Column("download_ms", sa.Float(), nullable=True),
        sa.Column("decode_ms", sa.Float(), nullable=True),
        sa.Column("model_ms", sa.Float(), nullable=True),
        _timestamp("created_at"),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_inferences_image_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["model_version"],
            ["model_versions.id"],
            name=op.f("fk_inferences_model_version_model_versions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inferences")),
        sa.UniqueConstraint("image_id", "model_version", name=op.f("uq_inferences_image_id_model_version")),
    )
    op.create_index("ix_inferences_created_at", "inferences", ["created_at"])
    op.create_index(
        "ix_inferences_image_id_created_at", "inferences", ["image_id", sa.text("created_at DESC")]
    )
    op.create_index("ix_inferences_is_anomalous_created_at", "inferences", ["is_anomalous", "created_at"])
    op.create_index("ix_inferences_model_version", "inferences", ["model_version"])

    op.create_table(
        "labels",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("image_id", sa.BigInteger(), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("author", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        _timestamp("created_at"),
        sa.CheckConstraint("verdict IN ('good', 'defect')", name=op.f("ck_labels_verdict")),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_labels_image_id_images"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_labels")),
    )
    op.create_index("ix_labels_image_id", "labels", ["image_id"])


def downgrade() -> None:
    op.drop_index("ix_labels_image_id", table_name="labels")
    op.drop_table("labels")
    op.drop_index("ix_inferences_model_version", table_name="inferences")
    op.drop_index("ix_inferences_is_anomalous_created_at", table_name="inferences")
    op.drop_index("ix_inferences_image_id_created_at", table_name="inferences")
    op.drop_index("ix_inferences_created_at", table_name="inferences")
    op.drop_table("inferences")
    op.drop_table("failures")
    op.drop_index("uq_model_versions_one_active", table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_index("ix_images_wafer", table_name="images")
    op.drop_index("ix_images_tool", table_name="images")
    op.drop_index("ix_images_status", table_name="images")
    op.drop_index("ix_images_lot", table_name="images")
    op.drop_index("ix_images_first_seen_at", table_name="images")
    op.drop_table("images")
