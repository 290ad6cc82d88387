"""Object versions: an images row scores exactly the bytes it registered (issue 12, rows 4 and 5).

Revision ID: 0003_object_versions
Revises: 0002_views
Create Date: 2026-12-01

* ``images.etag`` and ``images.version_id``: the ETag and the S3 version id of the object version a row
  stands for, kept apart (``etag_or_version`` holds one *or* the other and stays the unique key). Scoring
  reads by ``version_id`` on a versioned bucket, else with ``If-Match: etag``; reconciliation compares
  listed ETags with ``etag``. Existing rows get ``etag`` from ``etag_or_version`` where that looks like
  an ETag (32 hex digits, optionally ``-<parts>``); version ids never do (AWS: base64-ish, MinIO and moto:
  UUIDs, Ceph: mixed case).
* status ``superseded`` and ``images.superseded_by``: the object was overwritten before the row was
  scored; the row of the version that replaced it.
* ``v_latest_inference`` is one row per object key (its newest scored version, by registration order),
  no longer one per image row.

SQLite: the status CHECK changes, so ``images`` is copied and moved (batch mode). Its views must not
exist meanwhile (SQLite re-parses every view when the copy is renamed and fails on the missing table),
so all reporting views are dropped first and created again from 0002's definitions, except the one
that changes here. Like 0001 and 0002, this file does not import ``worker``.
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import op

revision: str = "0003_object_versions"
down_revision: str | Sequence[str] | None = "0002_views"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = "status IN ('queued', 'scored', 'failed', 'skipped')"
NEW_STATUSES = "status IN ('queued', 'scored', 'failed', 'skipped', 'superseded')"

PG_LATEST = """
SELECT DISTINCT ON (img.bucket, img.key)
    inf.image_id, img.bucket, img.key, img.lot, img.wafer, img.tool, img.kind, img.first_seen_at,
    inf.id AS inference_id, inf.model_version, inf.score, inf.threshold, inf.is_anomalous,
    inf.heatmap_key, inf.download_ms, inf.decode_ms, inf.model_ms, inf.created_at AS scored_at
FROM inferences AS inf
JOIN images AS img ON img.id = inf.image_id
ORDER BY img.bucket, img.key, img.id DESC, inf.created_at DESC, inf.id DESC
"""

SQLITE_LATEST = """
SELECT image_id, bucket, key, lot, wafer, tool, kind, first_seen_at, inference_id, model_version, score,
       threshold, is_anomalous, heatmap_key, download_ms, decode_ms, model_ms, scored_at
FROM (
    SELECT
        inf.image_id, img.bucket, img.key, img.lot, img.wafer, img.tool, img.kind, img.first_seen_at,
        inf.id AS inference_id, inf.model_version, inf.score, inf.threshold, inf.is_anomalous,
        inf.heatmap_key, inf.download_ms, inf.decode_ms, inf.model_ms, inf.created_at AS scored_at,
        ROW_NUMBER() OVER (
            PARTITION BY img.bucket, img.key ORDER BY img.id DESC, inf.created_at DESC, inf.id DESC
        ) AS newest
    FROM inferences AS inf
    JOIN images AS img ON img.id = inf.image_id
)
WHERE newest = 1
"""

# ETag-looking values of etag_or_version: 32 lowercase hex digits, optionally "-<number of parts>".
PG_LOOKS_LIKE_ETAG = "etag_or_version ~ '^[0-9a-f]{32}(-[0-9]+)?$'"
SQLITE_LOOKS_LIKE_ETAG = (
    "(length(etag_or_version) = 32 AND etag_or_version NOT GLOB '*[^0-9a-f]*') OR "
    "(length(etag_or_version) > 33 AND substr(etag_or_version, 1, 32) NOT GLOB '*[^0-9a-f]*' "
    "AND substr(etag_or_version, 33, 1) = '-' AND substr(etag_or_version, 34) NOT GLOB '*[^0-9]*')"
)


def _views_0002() -> ModuleType:
    """0002's view definitions (a frozen file, loaded by path: its name is not an identifier)."""
    path = Path(__file__).with_name("0002_views.py")
    spec = importlib.util.spec_from_file_location("_waferwatch_migration_0002_views", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}, which migration 0003_object_versions builds on")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _drop_views(names: Sequence[str]) -> None:
    for name in names:
        op.execute(f"DROP VIEW IF EXISTS {name}")


def _create_views(names: Sequence[str], definitions: dict[str, str]) -> None:
    for name in reversed(names):
        # text() reads ":name" as a bind parameter; "\\:" keeps colons (casts, '%H:00') literal.
        definition = definitions[name].strip().replace(":", "\\:")
        op.execute(sa.text(f"CREATE VIEW {name} AS {definition}"))


def _definitions(views: ModuleType, *, latest: bool) -> dict[str, str]:
    postgresql = op.get_bind().dialect.name == "postgresql"
    definitions = dict(views.PG_VIEWS if postgresql else views.SQLITE_VIEWS)
    if latest:
        definitions["v_latest_inference"] = PG_LATEST if postgresql else SQLITE_LATEST
    return definitions


def upgrade() -> None:
    views = _views_0002()
    _drop_views(views.VIEWS)
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("etag", sa.Text(), nullable=True))
        batch.add_column(sa.Column("version_id", sa.Text(), nullable=True))
        batch.add_column(sa.Column("superseded_by", sa.BigInteger(), nullable=True))
        batch.drop_constraint(op.f("ck_images_status"), type_="check")
        batch.create_check_constraint(op.f("ck_images_status"), NEW_STATUSES)
    looks_like_etag = PG_LOOKS_LIKE_ETAG if op.get_bind().dialect.name == "postgresql" else SQLITE_LOOKS_LIKE_ETAG
    op.execute(f"UPDATE images SET etag = etag_or_version WHERE etag IS NULL AND ({looks_like_etag})")
    _create_views(views.VIEWS, _definitions(views, latest=True))


def downgrade() -> None:
    views = _views_0002()
    _drop_views(views.VIEWS)
    # The old CHECK has no 'superseded': such rows become 'skipped', their reason says why.
    op.execute("UPDATE images SET status = 'skipped' WHERE status = 'superseded'")
    with op.batch_alter_table("images") as batch:
        batch.drop_constraint(op.f("ck_images_status"), type_="check")
        batch.create_check_constraint(op.f("ck_images_status"), OLD_STATUSES)
        batch.drop_column("superseded_by")
        batch.drop_column("version_id")
        batch.drop_column("etag")
    _create_views(views.VIEWS, _definitions(views, latest=False))
