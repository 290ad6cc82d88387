"""The anomaly map of a score in its own row, instead of a rendered overlay object per image.

Revision ID: 0007_anomaly_maps
Revises: 0006_leases
Create Date: 2026-12-03

Encoding a 224² RGB overlay PNG and uploading it cost the worker about 9 ms of CPU per image, more than
the model on a GPU. The map itself is a few kB as an 8-bit grayscale PNG (``anomaly_map_png``, level 0 =
``anomaly_map_low``, 255 = ``anomaly_map_high``, in score units); overlays are drawn from it when someone
looks (``waferwatch heatmap``, the HTML report). Rows scored before keep their ``heatmap_key`` object.

Frozen like 0001: it does not import ``worker``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_anomaly_maps"
down_revision: str | Sequence[str] | None = "0006_leases"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("inferences") as batch:
        batch.add_column(sa.Column("anomaly_map_png", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("anomaly_map_low", sa.Float(), nullable=True))
        batch.add_column(sa.Column("anomaly_map_high", sa.Float(), nullable=True))


def downgrade() -> None:
    # SQLite rebuilds the table to drop columns; as in 0005, the legacy rename keeps 0002's views valid.
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        op.execute("PRAGMA legacy_alter_table = ON")
    with op.batch_alter_table("inferences") as batch:
        batch.drop_column("anomaly_map_high")
        batch.drop_column("anomaly_map_low")
        batch.drop_column("anomaly_map_png")
    if sqlite:
        op.execute("PRAGMA legacy_alter_table = OFF")
