"""Registry history and the ``pooled`` image state.

Revision ID: 0005_registry_history
Revises: 0002_views
Create Date: 2026-12-01

* ``model_events``: the append-only history of the model registry (registered, built, rebuilt, gated,
  promoted, rolled back, retired, failed), with who did it, why, and the full gate record in ``details``.
* ``images.status`` gains ``pooled``, the terminal state of a nominal image that was read and decoded
  once and sits in the training pool (before, nominal images stayed ``queued`` forever).

Frozen like 0001: it does not import ``worker``. SQLite alters the CHECK constraint in batch mode.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005_registry_history"
down_revision: str | Sequence[str] | None = "0003_object_versions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
EVENTS = "'registered', 'built', 'rebuilt', 'gated', 'promoted', 'rolled back', 'retired', 'failed'"
OLD_STATUSES = "'queued', 'scored', 'failed', 'skipped', 'superseded'"
NEW_STATUSES = OLD_STATUSES + ", 'pooled'"


def _image_status_check(statuses: str) -> None:
    """Replace the CHECK on ``images.status``; SQLite rebuilds the table (batch mode).

    SQLite's ``ALTER TABLE ... RENAME`` re-parses the views that name the table (0002's views read
    ``images``) and fails while the copy is being swapped in; the legacy rename does not, and the views
    resolve again once ``images`` exists under its name.
    """
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        op.execute("PRAGMA legacy_alter_table = ON")
    with op.batch_alter_table("images") as batch:
        batch.drop_constraint(op.f("ck_images_status"), type_="check")
        batch.create_check_constraint(op.f("ck_images_status"), f"status IN ({statuses})")
    if sqlite:
        op.execute("PRAGMA legacy_alter_table = OFF")


def upgrade() -> None:
    op.create_table(
        "model_events",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("details", JSON, nullable=False),
        sa.CheckConstraint(f"event IN ({EVENTS})", name=op.f("ck_model_events_event")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_events")),
    )
    op.create_index("ix_model_events_model_version_at", "model_events", ["model_version", "at"])
    _image_status_check(NEW_STATUSES)


def downgrade() -> None:
    # A pooled image was a queued one before this revision.
    op.execute("UPDATE images SET status = 'queued' WHERE status = 'pooled'")
    _image_status_check(OLD_STATUSES)
    op.drop_index("ix_model_events_model_version_at", table_name="model_events")
    op.drop_table("model_events")
