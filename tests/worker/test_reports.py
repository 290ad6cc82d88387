"""Reports over the views, on real PostgreSQL and SQLite, with the history of ``report_history``.

The expected numbers are the ones constructed in ``tests/conftest.py``; percentiles are checked
against a plain-Python ``percentile_cont`` so both backends are held to PostgreSQL's definition.
"""

from __future__ import annotations

import json
import statistics
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text
from typer.testing import CliRunner

from worker.reports import (
    ReadOnlyViolationError,
    ReportFilters,
    UnknownReportError,
    UnsupportedFilterError,
    parse_time,
    run_read_only_sql,
    run_report,
    score_histograms,
    to_csv,
    top_anomalies,
)
from worker.schema import Base

MV2_SCORES = [0.2, 0.4, 0.7, 0.9, 0.65, 0.1, 0.1, 0.2, 0.3, 0.95, 0.05]


def percentile_cont(values: list[float], fraction: float) -> float:
    """PostgreSQL's percentile_cont: linear interpolation at position 1 + fraction * (n - 1)."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def _report(engine: Engine, name: str, **filters: object) -> list[dict[str, object]]:
    parsed = {key: parse_time(value) if key in ("since", "until") else value for key, value in filters.items()}
    with engine.connect() as connection:
        return run_report(connection, name, ReportFilters(**parsed)).records()  # type: ignore[arg-type]


def _daily_key(row: dict[str, object]) -> tuple[object, ...]:
    return (row["day"], row["lot"], row["wafer"], row["tool"], row["images"], row["defects"])


@pytest.mark.usefixtures("report_history")
def test_defects_daily_counts_rates_and_percentiles(db_engine: Engine) -> None:
    rows = _report(db_engine, "defects-daily")
    assert [_daily_key(row) for row in rows] == [
        (date(2026, 3, 2), "L1", "W1", "T1", 4, 2),
        (date(2026, 3, 3), "L1", "W2", "T2", 2, 1),
        (date(2026, 3, 3), "L2", "W1", "T1", 3, 0),
        (date(2026, 3, 5), "L3", "W7", "T2", 1, 1),
    ]
    assert [row["defect_rate"] for row in rows] == pytest.approx([0.5, 0.5, 0.0, 1.0])
    assert [row["mean_score"] for row in rows] == pytest.approx([0.55, 0.375, 0.2, 0.95])
    assert [row["p95_score"] for row in rows] == pytest.approx([0.87, 0.6225, 0.29, 0.95])


@pytest.mark.usefixtures("report_history")
@pytest.mark.parametrize(
    ("filters", "expected_days_lots"),
    [
        ({"since": "2026-03-04", "until": "2026-03-05"}, []),  # the gap: an empty range
        ({"lot": "L2"}, [(date(2026, 3, 3), "L2")]),  # the lot with no defects
        ({"tool": "T2"}, [(date(2026, 3, 3), "L1"), (date(2026, 3, 5), "L3")]),
        ({"since": "2026-03-03T12:00"}, [(date(2026, 3, 3), "L1"), (date(2026, 3, 3), "L2"), (date(2026, 3, 5), "L3")]),
        ({"until": "2026-03-03"}, [(date(2026, 3, 2), "L1")]),
        ({"since": "2026-03-02", "until": "2026-03-03", "lot": "L1", "tool": "T1"}, [(date(2026, 3, 2), "L1")]),
        ({"lot": "no-such-lot"}, []),
    ],
)
def test_defects_daily_filters(db_engine: Engine, filters: dict[str, str], expected_days_lots: list[tuple]) -> None:
    rows = _report(db_engine, "defects-daily", **filters)
    assert [(row["day"], row["lot"]) for row in rows] == expected_days_lots
    if filters.get("lot") == "L2":
        assert (rows[0]["images"], rows[0]["defects"], rows[0]["defect_rate"]) == (3, 0, 0.0)


@pytest.mark.usefixtures("report_history")
def test_latest_inference_takes_the_newest_score_per_image(db_engine: Engine) -> None:
    rows = _report(db_engine, "latest-inference")
    assert len(rows) == 11  # 10 incoming + 1 nominal scored; the queued image has no inference
    by_key = {row["key"]: row for row in rows}
    rescored = by_key["incoming/T1/L1/W1/a1.png"]
    assert (rescored["model_version"], rescored["score"], rescored["is_anomalous"]) == ("mv-2", 0.2, False)
    assert isinstance(rescored["scored_at"], datetime)
    assert rescored["scored_at"].tzinfo is not None
    assert rescored["scored_at"] == datetime(2026, 3, 2, 11, 0, tzinfo=UTC)
    assert by_key["incoming/T2/L3/W7/d1.png"]["is_anomalous"] is True
    l2 = _report(db_engine, "latest-inference", lot="L2", since="2026-03-03")
    assert sorted(row["key"] for row in l2) == [f"incoming/T1/L2/W1/c{i}.png" for i in (1, 2, 3)]


@pytest.mark.usefixtures("report_history")
def test_score_distribution_per_model_version(db_engine: Engine) -> None:
    rows = {row["model_version"]: row for row in _report(db_engine, "score-distribution")}
    assert set(rows) == {"mv-1", "mv-2"}
    mv1, mv2 = rows["mv-1"], rows["mv-2"]
    assert (mv1["n"], mv1["mean_score"], mv1["stddev_score"], mv1["p95_score"]) == (1, 0.1, None, 0.1)
    assert (mv1["threshold"], mv1["anomaly_rate"]) == (0.5, 0.0)
    assert mv2["n"] == len(MV2_SCORES)
    assert mv2["mean_score"] == pytest.approx(statistics.mean(MV2_SCORES))
    assert mv2["stddev_score"] == pytest.approx(statistics.stdev(MV2_SCORES))
    assert mv2["p50_score"] == pytest.approx(percentile_cont(MV2_SCORES, 0.5))
    assert mv2["p95_score"] == pytest.approx(percentile_cont(MV2_SCORES, 0.95))
    assert (mv2["min_score"], mv2["max_score"], mv2["threshold"]) == (0.05, 0.95, 0.6)
    assert mv2["anomaly_rate"] == pytest.approx(4 / 11)


@pytest.mark.usefixtures("report_history")
def test_review_agreement_counts_the_latest_label(db_engine: Engine) -> None:
    rows = {row["model_version"]: row for row in _report(db_engine, "review-agreement")}
    counts = ("reviewed", "confirmed_defects", "false_alarms", "misses", "confirmed_good", "agreements")
    assert tuple(rows["mv-2"][name] for name in counts) == (5, 1, 1, 1, 2, 3)
    assert rows["mv-2"]["agreement_rate"] == pytest.approx(0.6)
    assert tuple(rows["mv-1"][name] for name in counts) == (1, 0, 0, 0, 1, 1)


@pytest.mark.usefixtures("report_history")
def test_queue_lag_per_hour(db_engine: Engine) -> None:
    rows = _report(db_engine, "queue-lag")
    assert [row["hour"] for row in rows] == [
        datetime(2026, 3, 2, 10, tzinfo=UTC),
        datetime(2026, 3, 3, 10, tzinfo=UTC),
        datetime(2026, 3, 3, 12, tzinfo=UTC),
        datetime(2026, 3, 5, 10, tzinfo=UTC),
    ]
    assert [row["images"] for row in rows] == [4, 5, 1, 1]
    # a1 counts from its first score (mv-1 after 1 s), not the rescore an hour later
    assert [row["mean_lag_s"] for row in rows] == pytest.approx([2.5, 30.0, 2.0, 5.0], abs=1e-3)
    assert [row["p95_lag_s"] for row in rows] == pytest.approx([3.85, 54.0, 2.0, 5.0], abs=1e-3)
    assert [row["max_lag_s"] for row in rows] == pytest.approx([4.0, 60.0, 2.0, 5.0], abs=1e-3)
    window = _report(db_engine, "queue-lag", since="2026-03-03T10:30", until="2026-03-03T12:00")
    assert [row["hour"] for row in window] == [datetime(2026, 3, 3, 10, tzinfo=UTC)]


@pytest.mark.usefixtures("report_history")
def test_histograms_and_top_anomalies(db_engine: Engine) -> None:
    with db_engine.connect() as connection:
        histograms = score_histograms(connection, bins=10)
        assert {version: hist.n for version, hist in histograms.items()} == {"mv-1": 1, "mv-2": 11}
        mv2 = histograms["mv-2"]
        assert mv2.threshold == 0.6
        assert mv2.edges[0] <= 0.05 and mv2.edges[-1] >= 0.95
        assert sum(count for count, low in zip(mv2.counts, mv2.edges, strict=False) if low >= 0.6 - 1e-9) >= 3
        only_l2 = score_histograms(connection, ReportFilters(lot="L2"))
        assert {version: hist.n for version, hist in only_l2.items()} == {"mv-2": 3}
        top = top_anomalies(connection, limit=3)
    assert [record["key"].rsplit("/", 1)[-1] for record in top.records()] == ["d1.png", "a4.png", "a3.png"]


def test_reports_on_an_empty_database(db_engine: Engine) -> None:
    for name in ("latest-inference", "defects-daily", "score-distribution", "review-agreement", "queue-lag"):
        assert _report(db_engine, name) == []


def test_unknown_report_and_unsupported_filters(db_engine: Engine) -> None:
    with pytest.raises(UnknownReportError, match="defects-daily"):
        _report(db_engine, "defect")
    with pytest.raises(UnsupportedFilterError, match="--lot"):
        _report(db_engine, "score-distribution", lot="L1")
    with pytest.raises(UnsupportedFilterError, match="--tool"):
        _report(db_engine, "queue-lag", tool="T1")
    assert _report(db_engine, "v_defects_daily") == []  # view names work too
    with pytest.raises(ValueError, match="must be after"):
        ReportFilters(since=parse_time("2026-03-05"), until=parse_time("2026-03-01"))


def test_parse_time() -> None:
    now = datetime(2026, 3, 10, 12, tzinfo=UTC)
    assert parse_time("2026-03-01") == datetime(2026, 3, 1, tzinfo=UTC)
    assert parse_time("2026-03-01T05:00:00+02:00") == datetime(2026, 3, 1, 3, tzinfo=UTC)
    assert parse_time("7d", now=now) == datetime(2026, 3, 3, 12, tzinfo=UTC)
    assert parse_time("24h", now=now) == datetime(2026, 3, 9, 12, tzinfo=UTC)
    with pytest.raises(ValueError, match="cannot read time"):
        parse_time("last tuesday")


# --- read-only SQL --------------------------------------------------------------------------------

WRITES = [
    "INSERT INTO labels (image_id, verdict, author, created_at) VALUES (1, 'good', 'x', CURRENT_TIMESTAMP)",
    "UPDATE images SET lot = 'hacked'",
    "DELETE FROM images",
    "DROP TABLE labels",
    "DROP VIEW v_defects_daily",
    "CREATE TABLE evil (x INTEGER)",
    "CREATE VIEW evil AS SELECT 1 AS x",
    "WITH doomed AS (SELECT id FROM images) DELETE FROM images WHERE id IN (SELECT id FROM doomed)",
    "SELECT 1; DELETE FROM images",
]
PG_WRITES = [
    "WITH gone AS (DELETE FROM images RETURNING id) SELECT count(*) FROM gone",
    "WITH moved AS (UPDATE images SET lot = 'x' RETURNING id) SELECT * FROM moved",
    "COMMIT; DELETE FROM images",
    "SELECT nextval('images_id_seq')",
    "TRUNCATE images CASCADE",
]
SQLITE_WRITES = ["PRAGMA query_only = OFF", "ATTACH DATABASE ':memory:' AS other", "REINDEX"]


def _snapshot(engine: Engine) -> dict[str, object]:
    with engine.connect() as connection:
        counts = {
            table.name: connection.scalar(select(func.count()).select_from(table))
            for table in Base.metadata.sorted_tables
        }
        lots = sorted(str(lot) for lot in connection.scalars(text("SELECT lot FROM images")))
        views = connection.scalar(text("SELECT COUNT(*) FROM v_defects_daily"))
    return {"counts": counts, "lots": lots, "daily_rows": views}


@pytest.mark.usefixtures("report_history")
def test_read_only_sql_refuses_every_write(db_engine: Engine) -> None:
    url = db_engine.url.render_as_string(hide_password=False)
    before = _snapshot(db_engine)
    extra = PG_WRITES if db_engine.dialect.name == "postgresql" else SQLITE_WRITES
    for statement in WRITES + extra:
        with pytest.raises(ReadOnlyViolationError, match="refused"):
            run_read_only_sql(url, statement)
    assert _snapshot(db_engine) == before
    with db_engine.connect() as connection:
        tables = set(connection.dialect.get_table_names(connection))
    assert "evil" not in tables


@pytest.mark.usefixtures("report_history")
def test_read_only_sql_runs_queries(db_engine: Engine) -> None:
    url = db_engine.url.render_as_string(hide_password=False)
    result = run_read_only_sql(
        url,
        "SELECT lot, COUNT(*) AS n FROM images WHERE key LIKE 'incoming/%' AND key <> 'a:b' GROUP BY lot ORDER BY lot;",
    )
    assert result.columns == ["lot", "n"]
    assert result.rows == [("L1", 7), ("L2", 3), ("L3", 1)]
    cte = run_read_only_sql(url, "WITH d AS (SELECT * FROM v_defects_daily) SELECT SUM(defects) FROM d")
    assert cte.rows == [(4,)]
    limited = run_read_only_sql(url, "SELECT key FROM images ORDER BY key", max_rows=5)
    assert len(limited.rows) == 5
    assert limited.truncated
    assert to_csv(limited).splitlines()[0] == "key"


# --- CLI ------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("report_history")
def test_report_cli_formats(db_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.cli import app
    from worker.settings import get_settings

    monkeypatch.setenv("WAFERWATCH_BROKER_DIR", str(tmp_path / "broker"))
    get_settings.cache_clear()
    url = db_engine.url.render_as_string(hide_password=False)
    runner = CliRunner()

    result = runner.invoke(app, ["report", "defects-daily", "--url", url, "--format", "json", "--lot", "L2"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["filters"] == {"lot": "L2"}
    assert payload["rows"] == [
        {"day": "2026-03-03", "lot": "L2", "wafer": "W1", "tool": "T1", "images": 3, "defects": 0,
         "defect_rate": 0.0, "mean_score": pytest.approx(0.2), "p95_score": pytest.approx(0.29)}
    ]  # fmt: skip

    out = tmp_path / "daily.csv"
    result = runner.invoke(app, ["report", "defects-daily", "--url", url, "-f", "csv", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert lines[0] == "day,lot,wafer,tool,images,defects,defect_rate,mean_score,p95_score"
    assert len(lines) == 5

    result = runner.invoke(app, ["report", "queue-lag", "--url", url, "--lot", "L1"])
    assert result.exit_code != 0
    assert "cannot filter by --lot" in str(result.exception)

    result = runner.invoke(app, ["report", "sql", "SELECT COUNT(*) AS n FROM images", "--url", url, "-f", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"] == [{"n": 12}]
    result = runner.invoke(app, ["report", "sql", "DELETE FROM images", "--url", url])
    assert isinstance(result.exception, ReadOnlyViolationError)

    result = runner.invoke(app, ["report", "review-agreement", "--url", url])
    assert result.exit_code == 0, result.output
    assert "mv-2" in result.stdout

    result = runner.invoke(app, ["status", "--url", url, "--format", "json", "--ping-timeout", "0.5"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["active_model_version"] == "mv-2"
    assert status["queues"] == {"score": 0, "train": 0, "ingest": 0}
    assert set(status) >= {"workers", "images_seen", "inferences", "anomalies", "failures"}
    get_settings.cache_clear()


@pytest.mark.usefixtures("redis_client")  # starts the local Redis when it is down
def test_status_counts_redis_queues() -> None:
    import redis

    from worker.cli.report_cmds import queue_depths
    from worker.settings import Settings

    settings = Settings(broker_url="redis://127.0.0.1:6379/15")  # a database of its own
    client = redis.Redis.from_url(settings.broker_url)
    try:
        client.delete("score", "train", "ingest")
        client.rpush("score", "m1", "m2", "m3")
        client.rpush("train", "m1")
        assert queue_depths(settings) == {"score": 3, "train": 1, "ingest": 0}
    finally:
        client.delete("score", "train", "ingest")
        client.close()
