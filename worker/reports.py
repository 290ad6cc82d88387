"""Reports over the SQL views, and read-only execution of arbitrary SQL.

A report is one parametrized SELECT over one view (migration ``0002_views``), filtered by the options
the view has columns for: ``since``/``until`` (inclusive/exclusive, UTC) on its time column, ``lot``
and ``tool``. A filter the view cannot honour (``--lot`` on the per-model-version score distribution)
is refused rather than silently ignored. Results are plain columns and rows with Python values
(dates, timezone-aware datetimes, floats, bools) on both backends, so the CLI and
:mod:`worker.report_html` format them without knowing the database.

:func:`run_read_only_sql` runs one statement typed by a person. It is parsed first
(:mod:`worker.sql_guard`: one SELECT, nothing that writes, no ``COPY``, no server-file, program or admin
function), then run under the database's own guard:
PostgreSQL runs it in a ``READ ONLY`` transaction as a server-side prepared statement (which refuses
several statements in one string, so ``COMMIT; DELETE …`` cannot escape the transaction), with a
statement timeout; SQLite runs it with ``PRAGMA query_only`` and an authorizer that denies every
action but reading. A statement that writes raises :class:`ReadOnlyViolationError`. The connection is
opened for that statement and closed afterwards, so nothing it changed in the session survives.

Nothing here reads settings; callers pass a connection or a URL.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, Literal

from sqlalchemy import Connection, pool, text

from worker.sql_guard import refusal_reason

__all__ = [
    "REPORTS",
    "Histogram",
    "ReadOnlyViolationError",
    "ReportFilters",
    "ReportResult",
    "ReportSpec",
    "UnknownReportError",
    "UnsupportedFilterError",
    "parse_time",
    "report_names",
    "run_read_only_sql",
    "run_report",
    "score_histograms",
    "to_csv",
    "to_json",
    "to_jsonable",
    "top_anomalies",
]

Grain = Literal["day", "hour", "timestamp"]

DEFAULT_SQL_TIMEOUT_S: Final = 60.0
DEFAULT_MAX_ROWS: Final = 10_000


class UnknownReportError(ValueError):
    """A report name that is not in :data:`REPORTS`."""


class UnsupportedFilterError(ValueError):
    """A filter the report's view has no column for."""


class ReadOnlyViolationError(PermissionError):
    """A statement passed to :func:`run_read_only_sql` tried to change the database."""


@dataclass(frozen=True, slots=True)
class ReportSpec:
    """One report: the view it selects from, its filterable columns and how its values are typed."""

    name: str
    view: str
    title: str
    description: str
    order_by: str
    time_column: str | None = None
    grain: Grain | None = None
    has_lot: bool = False
    has_tool: bool = False
    day_columns: tuple[str, ...] = ()
    timestamp_columns: tuple[str, ...] = ()
    bool_columns: tuple[str, ...] = ()

    @property
    def filters(self) -> tuple[str, ...]:
        """The names of the filters this report accepts."""
        names = ("since", "until") if self.time_column else ()
        return names + (("lot",) if self.has_lot else ()) + (("tool",) if self.has_tool else ())


REPORTS: Final[dict[str, ReportSpec]] = {
    spec.name: spec
    for spec in (
        ReportSpec(
            name="latest-inference",
            view="v_latest_inference",
            title="Latest inference per image",
            description="the newest score of every image, with its key, lot, wafer and tool",
            order_by="scored_at DESC, image_id DESC",
            time_column="scored_at",
            grain="timestamp",
            has_lot=True,
            has_tool=True,
            timestamp_columns=("first_seen_at", "scored_at"),
            bool_columns=("is_anomalous",),
        ),
        ReportSpec(
            name="defects-daily",
            view="v_defects_daily",
            title="Defects per day, lot, wafer and tool",
            description="images scored, defects, defect rate, mean and p95 score (UTC days of first sight)",
            order_by="day, lot, wafer, tool",
            time_column="day",
            grain="day",
            has_lot=True,
            has_tool=True,
            day_columns=("day",),
        ),
        ReportSpec(
            name="score-distribution",
            view="v_score_distribution",
            title="Score distribution per model version",
            description="n, mean, stddev, p50/p95 score, threshold and anomaly rate of every model version",
            order_by="model_version",
        ),
        ReportSpec(
            name="review-agreement",
            view="v_review_agreement",
            title="Reviews against decisions",
            description="confirmed defects, false alarms, misses and agreements per model version (latest label)",
            order_by="model_version",
        ),
        ReportSpec(
            name="queue-lag",
            view="v_queue_lag_hourly",
            title="Queue lag per hour",
            description="seconds from first sight to first score: count, mean, p95, max per UTC hour",
            order_by="hour",
            time_column="hour",
            grain="hour",
            timestamp_columns=("hour",),
        ),
    )
}


def report_names() -> list[str]:
    """The report names, in display order."""
    return list(REPORTS)


def get_report(name: str) -> ReportSpec:
    """The report called ``name`` (``_`` and ``-`` are interchangeable, as is a ``v_`` view name)."""
    wanted = name.strip().lower().replace("_", "-")
    for spec in REPORTS.values():
        if wanted in (spec.name, spec.view.replace("_", "-"), spec.view.replace("_", "-")[2:]):
            return spec
    raise UnknownReportError(f"unknown report {name!r}; choose one of {', '.join(REPORTS)}")


@dataclass(frozen=True, slots=True)
class ReportFilters:
    """The common filters; ``since`` inclusive, ``until`` exclusive, both timezone-aware."""

    since: datetime | None = None
    until: datetime | None = None
    lot: str | None = None
    tool: str | None = None

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                raise ValueError(f"{name}={value!r} is naive; pass a timezone-aware datetime (parse_time does)")
        if self.since and self.until and self.until <= self.since:
            raise ValueError(f"until ({self.until.isoformat()}) must be after since ({self.since.isoformat()})")

    def given(self) -> dict[str, Any]:
        """The filters that are set, by name."""
        values = {"since": self.since, "until": self.until, "lot": self.lot, "tool": self.tool}
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True, slots=True)
class ReportResult:
    """Columns and rows of a report or a query, with the filters that produced it."""

    name: str
    title: str
    columns: list[str]
    rows: list[tuple[Any, ...]]
    filters: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False

    def records(self) -> list[dict[str, Any]]:
        """The rows as dictionaries keyed by column."""
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def column(self, name: str) -> list[Any]:
        """All values of one column."""
        index = self.columns.index(name)
        return [row[index] for row in self.rows]


# --- time parsing and binding --------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+)\s*([mhdw])$")
_UNITS: Final = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(value: str, *, now: datetime | None = None) -> datetime:
    """Parse ``2026-03-01``, an ISO datetime (naive means UTC) or ``30m``/``24h``/``7d``/``2w`` ago.

    Raises:
        ValueError: the text is none of these.
    """
    text_value = value.strip()
    match = _RELATIVE.match(text_value.lower())
    if match:
        now = now or datetime.now(UTC)
        return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        parsed = datetime.fromisoformat(text_value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(
            f"cannot read time {value!r}; use YYYY-MM-DD, an ISO datetime or a relative 30m/24h/7d/2w"
        ) from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _floor_hour(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _bind_time(dialect: str, grain: Grain, value: datetime, *, upper: bool) -> Any:
    """The parameter for comparing ``value`` with a view's time column of this grain.

    Day and hour buckets are kept when they overlap [since, until). SQLite stores times as text
    (``YYYY-MM-DD HH:MM:SS.ffffff``, UTC), so it gets strings in the same format.
    """
    value = value.astimezone(UTC)
    if grain == "day":
        day = (value - timedelta(microseconds=1)).date() if upper else value.date()
        return day.isoformat() if dialect == "sqlite" else day
    if grain == "hour" and not upper:
        value = _floor_hour(value)
    if dialect == "sqlite":
        return value.strftime("%Y-%m-%d %H:%M:%S" if grain == "hour" else "%Y-%m-%d %H:%M:%S.%f")
    return value


def _where(spec: ReportSpec, filters: ReportFilters, dialect: str) -> tuple[list[str], dict[str, Any]]:
    unsupported = sorted(set(filters.given()) - set(spec.filters))
    if unsupported:
        accepted = ", ".join(f"--{name}" for name in spec.filters) or "no filters"
        raise UnsupportedFilterError(
            f"report {spec.name!r} cannot filter by {', '.join('--' + n for n in unsupported)} "
            f"({spec.view} has no such column); it accepts {accepted}"
        )
    clauses: list[str] = []
    params: dict[str, Any] = {}
    if spec.time_column and spec.grain:
        if filters.since is not None:
            clauses.append(f"{spec.time_column} >= :since")
            params["since"] = _bind_time(dialect, spec.grain, filters.since, upper=False)
        if filters.until is not None:
            operator = "<=" if spec.grain == "day" else "<"
            clauses.append(f"{spec.time_column} {operator} :until")
            params["until"] = _bind_time(dialect, spec.grain, filters.until, upper=True)
    if filters.lot is not None:
        clauses.append("lot = :lot")
        params["lot"] = filters.lot
    if filters.tool is not None:
        clauses.append("tool = :tool")
        params["tool"] = filters.tool
    return clauses, params


# --- value normalisation -------------------------------------------------------------------------


def _to_datetime(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    parsed = datetime.fromisoformat(str(value))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _to_date(value: Any) -> date | None:
    if value is None or (isinstance(value, date) and not isinstance(value, datetime)):
        return value
    return date.fromisoformat(str(value)[:10])


def _normalize(spec: ReportSpec, columns: Sequence[str], row: Sequence[Any]) -> tuple[Any, ...]:
    values: list[Any] = []
    for column, value in zip(columns, row, strict=True):
        if column in spec.day_columns:
            value = _to_date(value)
        elif column in spec.timestamp_columns:
            value = _to_datetime(value)
        elif column in spec.bool_columns and value is not None:
            value = bool(value)
        elif isinstance(value, Decimal):
            value = float(value)
        values.append(value)
    return tuple(values)


# --- reports -------------------------------------------------------------------------------------


def run_report(
    connection: Connection,
    name: str,
    filters: ReportFilters | None = None,
    *,
    limit: int | None = None,
) -> ReportResult:
    """Run the report ``name`` on ``connection`` and return its columns and rows.

    Raises:
        UnknownReportError: no such report.
        UnsupportedFilterError: a filter the report's view has no column for.
    """
    spec = get_report(name)
    filters = filters or ReportFilters()
    clauses, params = _where(spec, filters, connection.dialect.name)
    sql = f"SELECT * FROM {spec.view}"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += f" ORDER BY {spec.order_by}"
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        sql += " LIMIT :limit"
        params["limit"] = limit
    result = connection.execute(text(sql), params)
    columns = list(result.keys())
    rows = [_normalize(spec, columns, row) for row in result]
    return ReportResult(spec.name, spec.title, columns, rows, filters.given())


def top_anomalies(connection: Connection, filters: ReportFilters | None = None, *, limit: int = 8) -> ReportResult:
    """The highest-scoring anomalous images (latest inference each), for thumbnails in the HTML page.

    Besides the view's columns, each row carries what drawing its overlay needs: the stored anomaly map
    (``anomaly_map_png``, ``_low``, ``_high``; NULL for rows scored before maps were stored, which have
    ``heatmap_key`` instead) and the scored object version (``bucket``, ``version_id``, ``etag``). The view
    predates the map columns, so the few chosen rows are joined back to their inference and image.
    """
    spec = REPORTS["latest-inference"]
    filters = filters or ReportFilters()
    clauses, params = _where(spec, filters, connection.dialect.name)
    clauses.append("is_anomalous = :anomalous")
    params["anomalous"] = True
    params["limit"] = limit
    sql = (
        "SELECT best.image_id, best.key, best.lot, best.wafer, best.tool, best.model_version, best.score, "
        "best.threshold, best.heatmap_key, best.scored_at, best.bucket, img.version_id, img.etag, "
        "inf.anomaly_map_png, inf.anomaly_map_low, inf.anomaly_map_high "
        "FROM (SELECT image_id, inference_id, bucket, key, lot, wafer, tool, model_version, score, threshold, "
        f"heatmap_key, scored_at FROM {spec.view} WHERE {' AND '.join(clauses)} "
        "ORDER BY score DESC, image_id LIMIT :limit) AS best "
        "JOIN inferences AS inf ON inf.id = best.inference_id JOIN images AS img ON img.id = best.image_id "
        "ORDER BY best.score DESC, best.image_id"
    )
    result = connection.execute(text(sql), params)
    columns = list(result.keys())
    rows = [_normalize(spec, columns, row) for row in result]
    return ReportResult("top-anomalies", "Top anomalies", columns, rows, filters.given())


@dataclass(frozen=True, slots=True)
class Histogram:
    """Score counts in equal-width bins over [``edges[0]``, ``edges[-1]``], and the version's threshold."""

    model_version: str
    edges: list[float]
    counts: list[int]
    threshold: float | None

    @property
    def n(self) -> int:
        """The number of scores counted."""
        return sum(self.counts)


def _histogram(model_version: str, scores: Sequence[float], threshold: float | None, bins: int) -> Histogram:
    """Equal-width bins spanning the scores and the threshold (so the threshold line is on the plot)."""
    points = [*scores, *([threshold] if threshold is not None else [])]
    low, high = min(points), max(points)
    if math.isclose(low, high):
        low, high = low - 0.5, high + 0.5
    width = (high - low) / bins
    counts = [0] * bins
    for score in scores:
        counts[min(int((score - low) / width), bins - 1)] += 1
    return Histogram(model_version, [low + i * width for i in range(bins + 1)], counts, threshold)


def score_histograms(
    connection: Connection, filters: ReportFilters | None = None, *, bins: int = 20
) -> dict[str, Histogram]:
    """Histograms of every inference's score, one per model version, with the version's threshold.

    Unlike the ``score-distribution`` view this reads the scores themselves, so all filters apply
    (``since``/``until`` on the inference time).
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    filters = filters or ReportFilters()
    dialect = connection.dialect.name
    clauses, params = ["1 = 1"], {}
    if filters.since is not None:
        clauses.append("inf.created_at >= :since")
        params["since"] = _bind_time(dialect, "timestamp", filters.since, upper=False)
    if filters.until is not None:
        clauses.append("inf.created_at < :until")
        params["until"] = _bind_time(dialect, "timestamp", filters.until, upper=True)
    for name in ("lot", "tool"):
        if getattr(filters, name) is not None:
            clauses.append(f"img.{name} = :{name}")
            params[name] = getattr(filters, name)
    sql = (
        "SELECT inf.model_version, inf.score, COALESCE(mv.threshold, inf.threshold) AS threshold "
        "FROM inferences AS inf JOIN images AS img ON img.id = inf.image_id "
        "LEFT JOIN model_versions AS mv ON mv.id = inf.model_version "
        f"WHERE {' AND '.join(clauses)} ORDER BY inf.model_version"
    )
    scores: dict[str, list[float]] = {}
    thresholds: dict[str, float | None] = {}
    for version, score, threshold in connection.execute(text(sql), params):
        scores.setdefault(version, []).append(float(score))
        thresholds[version] = None if threshold is None else float(threshold)
    return {version: _histogram(version, values, thresholds[version], bins) for version, values in scores.items()}


# --- read-only SQL -------------------------------------------------------------------------------

# sqlite3 authorizer actions that only read (everything else is denied).
_SQLITE_READ_ACTIONS: Final = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)


def _sqlite_authorizer(action: int, *_args: Any) -> int:
    return sqlite3.SQLITE_OK if action in _SQLITE_READ_ACTIONS else sqlite3.SQLITE_DENY


def _refusal(exc: Exception) -> bool:
    """Whether ``exc`` is the database refusing a write (or a second statement) under the guard."""
    message = str(exc).lower()
    return getattr(exc, "sqlstate", None) == "25006" or any(
        marker in message
        for marker in (
            "read-only transaction",  # PostgreSQL: cannot execute DELETE in a read-only transaction
            "readonly database",  # SQLite query_only: attempt to write a readonly database
            "not authorized",  # SQLite authorizer denied a non-read action
            "multiple commands",  # PostgreSQL: cannot insert multiple commands into a prepared statement
            "one statement at a time",  # sqlite3
        )
    )


def _execute_guarded(connection: Connection, statement: str, timeout_s: float) -> Any:
    """Execute ``statement`` on the DBAPI cursor of ``connection`` under the dialect's read-only guard."""
    driver = connection.connection.driver_connection
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.exec_driver_sql("SET TRANSACTION READ ONLY")
        connection.exec_driver_sql(f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}")
        cursor = driver.cursor()
        cursor.execute(statement, prepare=True)  # a server-side prepared statement holds one command
        return cursor
    if dialect == "sqlite":
        connection.exec_driver_sql("PRAGMA query_only = ON")
        driver.set_authorizer(_sqlite_authorizer)
        try:
            cursor = driver.cursor()
            cursor.execute(statement)
            return cursor
        finally:
            driver.set_authorizer(None)  # later statements (the rollback) are the guard's own
    raise NotImplementedError(f"read-only SQL on {dialect!r} is not supported")


def run_read_only_sql(
    url: str,
    sql: str,
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    timeout_s: float = DEFAULT_SQL_TIMEOUT_S,
) -> ReportResult:
    """Run one statement that only reads, on its own connection, and return at most ``max_rows`` rows.

    Raises:
        ReadOnlyViolationError: the statement would change the database (or is several statements).
        sqlalchemy.exc.DBAPIError, sqlite3.Error, psycopg.Error: any other database error (syntax,
            unknown column, statement timeout).
    """
    from worker.db import make_engine

    statement = sql.strip().rstrip(";").strip()
    if not statement:
        raise ValueError("no SQL given")
    engine = make_engine(url, sqlite_begin="DEFERRED", poolclass=pool.NullPool)
    reason = refusal_reason(statement, engine.dialect.name)
    if reason is not None:
        engine.dispose()
        raise ReadOnlyViolationError(f"refused: `report sql` only reads, and {reason}")
    try:
        with engine.connect() as connection:
            try:
                cursor = _execute_guarded(connection, statement, timeout_s)
            except Exception as exc:
                if _refusal(exc):
                    raise ReadOnlyViolationError(
                        f"refused: `report sql` only reads, and this would change the database or run "
                        f"several statements ({str(exc).strip()})"
                    ) from exc
                raise
            if cursor.description is None:
                raise ReadOnlyViolationError("refused: the statement returned no rows; `report sql` runs queries only")
            columns = [column[0] for column in cursor.description]
            rows = [tuple(row) for row in cursor.fetchmany(max_rows + 1)]
            connection.rollback()
    finally:
        engine.dispose()
    truncated = len(rows) > max_rows
    return ReportResult("sql", "SQL query", columns, rows[:max_rows], {}, truncated)


# --- output formats ------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """A JSON-ready value: ISO times and dates, floats for decimals, text for bytes."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_csv(result: ReportResult) -> str:
    """The result as CSV with a header row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(result.columns)
    for row in result.rows:
        writer.writerow(["" if value is None else to_jsonable(value) for value in row])
    return buffer.getvalue()


def to_json(result: ReportResult) -> str:
    """The result as a JSON object: name, filters, columns and rows as objects."""
    payload = {
        "report": result.name,
        "title": result.title,
        "filters": {name: to_jsonable(value) for name, value in result.filters.items()},
        "columns": result.columns,
        "rows": [{column: to_jsonable(value) for column, value in record.items()} for record in result.records()],
        "truncated": result.truncated,
    }
    return json.dumps(payload, indent=2)
