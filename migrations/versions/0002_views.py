"""Reporting views: latest inference, defects per day, score distribution, review agreement, queue lag.

Revision ID: 0002_views
Revises: 0001
Create Date: 2026-12-01

The views are what people query (``waferwatch report``, ``psql``, ``sqlite3``); the tables stay the
pipeline's. Every view exists on both backends with the same columns and the same numbers:

* PostgreSQL uses ``DISTINCT ON`` and ``percentile_cont``.
* SQLite has neither, so "latest" is ``ROW_NUMBER()`` and a percentile is computed with window
  functions by the same rule as ``percentile_cont`` (linear interpolation between the ranks around
  ``1 + p * (n - 1)``); see :func:`_sqlite_percentile`. Standard deviations use ``sqrt``, one of
  SQLite's math functions (built in since 3.35 and enabled in Debian's and CPython's builds).

Times: days and hours are UTC. Days are dates on PostgreSQL and ``'YYYY-MM-DD'`` text on SQLite; hours
are ``timestamptz`` on PostgreSQL and ``'YYYY-MM-DD HH:00:00'`` text on SQLite (``worker.reports``
turns both into Python dates and datetimes).

Like 0001, this file is frozen: it does not import ``worker``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_views"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Dependents first: dropped in this order, created in reverse.
VIEWS = ("v_queue_lag_hourly", "v_review_agreement", "v_score_distribution", "v_defects_daily", "v_latest_inference")


def _sqlite_percentile(value: str, fraction: float) -> str:
    """``percentile_cont(fraction)`` of ``value`` in a GROUP BY over rows ranked by ``value``.

    The rows must carry ``rn`` (``ROW_NUMBER() OVER (PARTITION BY <group> ORDER BY value)``) and ``n``
    (``COUNT(*) OVER (PARTITION BY <group>)``). The position ``1 + fraction * (n - 1)`` lies between
    ranks ``lo`` and ``lo + 1``; the result interpolates linearly, as PostgreSQL does.
    """
    position = f"(1 + {fraction} * (n - 1))"
    low_rank = f"CAST({position} AS INTEGER)"
    low = f"MAX(CASE WHEN rn = {low_rank} THEN {value} END)"
    high = f"MAX(CASE WHEN rn = {low_rank} + 1 THEN {value} END)"
    weight = f"MAX({position} - {low_rank})"
    return f"({low} + {weight} * (COALESCE({high}, {low}) - {low}))"


# --- PostgreSQL -----------------------------------------------------------------------------------

PG_VIEWS = {
    "v_latest_inference": """
SELECT DISTINCT ON (inf.image_id)
    inf.image_id, img.bucket, img.key, img.lot, img.wafer, img.tool, img.kind, img.first_seen_at,
    inf.id AS inference_id, inf.model_version, inf.score, inf.threshold, inf.is_anomalous,
    inf.heatmap_key, inf.download_ms, inf.decode_ms, inf.model_ms, inf.created_at AS scored_at
FROM inferences AS inf
JOIN images AS img ON img.id = inf.image_id
ORDER BY inf.image_id, inf.created_at DESC, inf.id DESC
""",
    "v_defects_daily": """
SELECT
    (first_seen_at AT TIME ZONE 'UTC')::date AS day, lot, wafer, tool,
    COUNT(*) AS images,
    SUM(CASE WHEN is_anomalous THEN 1 ELSE 0 END) AS defects,
    CAST(SUM(CASE WHEN is_anomalous THEN 1 ELSE 0 END) AS DOUBLE PRECISION) / COUNT(*) AS defect_rate,
    AVG(score) AS mean_score,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY score) AS p95_score
FROM v_latest_inference
WHERE kind = 'incoming'
GROUP BY 1, lot, wafer, tool
""",
    "v_score_distribution": """
SELECT
    inf.model_version,
    COUNT(*) AS n,
    AVG(inf.score) AS mean_score,
    stddev_samp(inf.score) AS stddev_score,
    MIN(inf.score) AS min_score,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY inf.score) AS p50_score,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY inf.score) AS p95_score,
    MAX(inf.score) AS max_score,
    COALESCE(MAX(mv.threshold), MAX(inf.threshold)) AS threshold,
    CAST(SUM(CASE WHEN inf.is_anomalous THEN 1 ELSE 0 END) AS DOUBLE PRECISION) / COUNT(*) AS anomaly_rate
FROM inferences AS inf
LEFT JOIN model_versions AS mv ON mv.id = inf.model_version
GROUP BY inf.model_version
""",
    "v_review_agreement": """
WITH latest_label AS (
    SELECT DISTINCT ON (image_id) image_id, verdict
    FROM labels
    ORDER BY image_id, created_at DESC, id DESC
)
SELECT
    inf.model_version,
    COUNT(*) AS reviewed,
    SUM(CASE WHEN lab.verdict = 'defect' AND inf.is_anomalous THEN 1 ELSE 0 END) AS confirmed_defects,
    SUM(CASE WHEN lab.verdict = 'good' AND inf.is_anomalous THEN 1 ELSE 0 END) AS false_alarms,
    SUM(CASE WHEN lab.verdict = 'defect' AND NOT inf.is_anomalous THEN 1 ELSE 0 END) AS misses,
    SUM(CASE WHEN lab.verdict = 'good' AND NOT inf.is_anomalous THEN 1 ELSE 0 END) AS confirmed_good,
    SUM(CASE WHEN (lab.verdict = 'defect') = inf.is_anomalous THEN 1 ELSE 0 END) AS agreements,
    CAST(SUM(CASE WHEN (lab.verdict = 'defect') = inf.is_anomalous THEN 1 ELSE 0 END) AS DOUBLE PRECISION)
        / COUNT(*) AS agreement_rate
FROM inferences AS inf
JOIN latest_label AS lab ON lab.image_id = inf.image_id
GROUP BY inf.model_version
""",
    "v_queue_lag_hourly": """
WITH first_score AS (
    SELECT img.first_seen_at, MIN(inf.created_at) AS scored_at
    FROM images AS img
    JOIN inferences AS inf ON inf.image_id = img.id
    GROUP BY img.id, img.first_seen_at
), lag AS (
    SELECT date_trunc('hour', first_seen_at, 'UTC') AS hour,
           EXTRACT(EPOCH FROM (scored_at - first_seen_at))::double precision AS lag_s
    FROM first_score
)
SELECT
    hour,
    COUNT(*) AS images,
    AVG(lag_s) AS mean_lag_s,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY lag_s) AS p95_lag_s,
    MAX(lag_s) AS max_lag_s
FROM lag
GROUP BY hour
""",
}

# --- SQLite ---------------------------------------------------------------------------------------

SQLITE_VIEWS = {
    "v_latest_inference": """
SELECT image_id, bucket, key, lot, wafer, tool, kind, first_seen_at, inference_id, model_version, score,
       threshold, is_anomalous, heatmap_key, download_ms, decode_ms, model_ms, scored_at
FROM (
    SELECT
        inf.image_id, img.bucket, img.key, img.lot, img.wafer, img.tool, img.kind, img.first_seen_at,
        inf.id AS inference_id, inf.model_version, inf.score, inf.threshold, inf.is_anomalous,
        inf.heatmap_key, inf.download_ms, inf.decode_ms, inf.model_ms, inf.created_at AS scored_at,
        ROW_NUMBER() OVER (PARTITION BY inf.image_id ORDER BY inf.created_at DESC, inf.id DESC) AS newest
    FROM inferences AS inf
    JOIN images AS img ON img.id = inf.image_id
)
WHERE newest = 1
""",
    "v_defects_daily": f"""
SELECT
    day, lot, wafer, tool,
    COUNT(*) AS images,
    SUM(CASE WHEN is_anomalous THEN 1 ELSE 0 END) AS defects,
    CAST(SUM(CASE WHEN is_anomalous THEN 1 ELSE 0 END) AS REAL) / COUNT(*) AS defect_rate,
    AVG(score) AS mean_score,
    {_sqlite_percentile("score", 0.95)} AS p95_score
FROM (
    SELECT date(first_seen_at) AS day, lot, wafer, tool, score, is_anomalous,
           ROW_NUMBER() OVER (PARTITION BY date(first_seen_at), lot, wafer, tool ORDER BY score) AS rn,
           COUNT(*) OVER (PARTITION BY date(first_seen_at), lot, wafer, tool) AS n
    FROM v_latest_inference
    WHERE kind = 'incoming'
)
GROUP BY day, lot, wafer, tool
""",
    "v_score_distribution": f"""
SELECT
    model_version,
    COUNT(*) AS n,
    AVG(score) AS mean_score,
    CASE WHEN COUNT(*) > 1
         THEN sqrt(MAX(0.0, (SUM(score * score) - SUM(score) * SUM(score) / COUNT(*)) / (COUNT(*) - 1)))
    END AS stddev_score,
    MIN(score) AS min_score,
    {_sqlite_percentile("score", 0.5)} AS p50_score,
    {_sqlite_percentile("score", 0.95)} AS p95_score,
    MAX(score) AS max_score,
    COALESCE(MAX(model_threshold), MAX(threshold)) AS threshold,
    CAST(SUM(CASE WHEN is_anomalous THEN 1 ELSE 0 END) AS REAL) / COUNT(*) AS anomaly_rate
FROM (
    SELECT inf.model_version, inf.score, inf.threshold, inf.is_anomalous, mv.threshold AS model_threshold,
           ROW_NUMBER() OVER (PARTITION BY inf.model_version ORDER BY inf.score) AS rn,
           COUNT(*) OVER (PARTITION BY inf.model_version) AS n
    FROM inferences AS inf
    LEFT JOIN model_versions AS mv ON mv.id = inf.model_version
)
GROUP BY model_version
""",
    "v_review_agreement": """
WITH latest_label AS (
    SELECT image_id, verdict
    FROM (
        SELECT image_id, verdict,
               ROW_NUMBER() OVER (PARTITION BY image_id ORDER BY created_at DESC, id DESC) AS newest
        FROM labels
    )
    WHERE newest = 1
)
SELECT
    inf.model_version,
    COUNT(*) AS reviewed,
    SUM(CASE WHEN lab.verdict = 'defect' AND inf.is_anomalous THEN 1 ELSE 0 END) AS confirmed_defects,
    SUM(CASE WHEN lab.verdict = 'good' AND inf.is_anomalous THEN 1 ELSE 0 END) AS false_alarms,
    SUM(CASE WHEN lab.verdict = 'defect' AND NOT inf.is_anomalous THEN 1 ELSE 0 END) AS misses,
    SUM(CASE WHEN lab.verdict = 'good' AND NOT inf.is_anomalous THEN 1 ELSE 0 END) AS confirmed_good,
    SUM(CASE WHEN (lab.verdict = 'defect') = (inf.is_anomalous != 0) THEN 1 ELSE 0 END) AS agreements,
    CAST(SUM(CASE WHEN (lab.verdict = 'defect') = (inf.is_anomalous != 0) THEN 1 ELSE 0 END) AS REAL)
        / COUNT(*) AS agreement_rate
FROM inferences AS inf
JOIN latest_label AS lab ON lab.image_id = inf.image_id
GROUP BY inf.model_version
""",
    "v_queue_lag_hourly": f"""
SELECT
    hour,
    COUNT(*) AS images,
    AVG(lag_s) AS mean_lag_s,
    {_sqlite_percentile("lag_s", 0.95)} AS p95_lag_s,
    MAX(lag_s) AS max_lag_s
FROM (
    SELECT hour, lag_s,
           ROW_NUMBER() OVER (PARTITION BY hour ORDER BY lag_s) AS rn,
           COUNT(*) OVER (PARTITION BY hour) AS n
    FROM (
        SELECT strftime('%Y-%m-%d %H:00:00', img.first_seen_at) AS hour,
               (julianday(MIN(inf.created_at)) - julianday(img.first_seen_at)) * 86400.0 AS lag_s
        FROM images AS img
        JOIN inferences AS inf ON inf.image_id = img.id
        GROUP BY img.id, img.first_seen_at
    )
)
GROUP BY hour
""",
}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    definitions = PG_VIEWS if dialect == "postgresql" else SQLITE_VIEWS
    for name in reversed(VIEWS):
        # text() reads ":name" as a bind parameter; "\\:" keeps colons (casts, '%H:00') literal.
        definition = definitions[name].strip().replace(":", "\\:")
        op.execute(sa.text(f"CREATE VIEW {name} AS {definition}"))


def downgrade() -> None:
    for name in VIEWS:
        op.execute(f"DROP VIEW IF EXISTS {name}")
