"""Leases on images: who is scoring a row, until when, and how often it was re-driven.

Revision ID: 0006_leases
Revises: 0005_registry_history
Create Date: 2026-12-02

A worker claims the rows of its batch (``claimed_by``, ``lease_until``) and renews the lease while it
scores them; the ``waferwatch.redrive_leases`` beat task re-enqueues rows whose lease expired while they
were still ``queued`` (the worker died or hung) and counts it in ``redrives``. Without it, the message of
a killed worker came back only after Redis's visibility timeout (2 h). The partial index keeps the
redrive scan to the few leased rows.

Frozen like 0001: it does not import ``worker``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_leases"
down_revision: str | Sequence[str] | None = "0005_registry_history"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("claimed_by", sa.Text(), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("redrives", sa.Integer(), server_default="0", nullable=False))
    op.create_index(
        "ix_images_lease_until",
        "images",
        ["lease_until"],
        postgresql_where=sa.text("lease_until IS NOT NULL"),
        sqlite_where=sa.text("lease_until IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_images_lease_until", table_name="images")
    # SQLite rebuilds the table to drop columns; as in 0005, the legacy rename keeps 0002's views valid.
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        op.execute("PRAGMA legacy_alter_table = ON")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("redrives")
        batch.drop_column("lease_until")
        batch.drop_column("claimed_by")
    if sqlite:
        op.execute("PRAGMA legacy_alter_table = OFF")
