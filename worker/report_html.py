"""One self-contained HTML page of the defect history: tables, SVG plots and heatmap thumbnails.

Everything is inline: the plots are SVG drawn here (no JavaScript, no CDN, no plotting library), the
thumbnails are heatmap overlays, shrunk with Pillow and embedded as base64 data URIs. The page opens from a
mail attachment or a file share on a machine with no network.

A thumbnail is drawn from the anomaly map stored in the inference row over the original image, the same
picture as ``waferwatch heatmap`` (:mod:`worker.overlays`); without the original, the coloured map alone.
Rows scored before maps were stored show their overlay object (``heatmap_key``) as before.

The module never touches storage: :func:`collect_page` takes a connection and two callables,
``load_image(record) -> bytes | None`` (the scored version of a top-anomalies record's image) and
``load_heatmap(key) -> bytes | None`` (an old overlay object), and :func:`render_page` takes plain data.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Final

from sqlalchemy import Connection

from worker.overlays import DEFAULT_INPUT_SIZE, input_sizes, record_map, render_map
from worker.report_registry import RegistrySection, collect_registry, registry_html
from worker.reports import (
    REPORTS,
    Histogram,
    ReportFilters,
    ReportResult,
    run_report,
    score_histograms,
    to_jsonable,
    top_anomalies,
)

__all__ = ["Page", "Thumbnail", "collect_page", "render_page"]

HeatmapLoader = Callable[[str], bytes | None]
ImageLoader = Callable[[Mapping[str, Any]], bytes | None]

THUMBNAIL_PX: Final = 224
MAX_TABLE_ROWS: Final = 500

# Colours: a colour-blind-safe pair (blue data, vermilion threshold/defects) on neutral greys.
BLUE: Final = "#0072b2"
RED: Final = "#d55e00"
GREY: Final = "#6b7280"
LIGHT: Final = "#e5e7eb"


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """One top anomaly: its key and score, and the PNG of its heatmap overlay (None if unavailable)."""

    key: str
    score: float
    threshold: float
    lot: str | None
    wafer: str | None
    tool: str | None
    model_version: str
    png: bytes | None


@dataclass(slots=True)
class Page:
    """Everything the page shows."""

    title: str
    generated_at: datetime
    filters: dict[str, Any]
    tables: list[ReportResult]
    daily: ReportResult
    histograms: dict[str, Histogram]
    thumbnails: list[Thumbnail] = field(default_factory=list)
    registry: RegistrySection | None = None  # the model registry section (worker.report_registry)


def _thumbnail_png(data: bytes, size: int = THUMBNAIL_PX) -> bytes | None:
    """``data`` shrunk to fit ``size`` pixels, as PNG; None if it is not an image Pillow can read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.thumbnail((size, size))
            out = io.BytesIO()
            image.convert("RGB").save(out, format="PNG", optimize=True)
            return out.getvalue()
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def _thumbnail_of(
    record: Mapping[str, Any],
    size: int,
    load_image: ImageLoader | None,
    load_heatmap: HeatmapLoader | None,
) -> bytes | None:
    """The thumbnail PNG of one top anomaly, or None when there is nothing to show.

    A stored map is drawn over the original image (``size``: the model's input side); without the
    original, the overlay object is used if ``heatmap_format=overlay`` also wrote one, else the coloured
    map alone (still where and how strongly). A row without a map shows its overlay object, as before maps.
    """
    stored = record_map(record)
    old = record["heatmap_key"]
    if stored is None:
        raw = load_heatmap(old) if load_heatmap and old else None
        return _thumbnail_png(raw) if raw else None
    original = load_image(record) if load_image else None
    rendered = render_map(
        stored, threshold=float(record["threshold"]), size=size, original=original, name=record["key"]
    )
    if not rendered.over_image and load_heatmap and old:
        raw = load_heatmap(old)
        thumbnail = _thumbnail_png(raw) if raw else None
        if thumbnail is not None:
            return thumbnail
    return _thumbnail_png(rendered.png)


def collect_page(
    connection: Connection,
    filters: ReportFilters | None = None,
    *,
    reports: Sequence[str] | None = None,
    load_heatmap: HeatmapLoader | None = None,
    load_image: ImageLoader | None = None,
    top_n: int = 8,
    title: str = "waferwatch defect report",
    now: datetime | None = None,
) -> Page:
    """Query everything the page needs. ``reports`` are the tables to include (default: all).

    Filters a report cannot apply are dropped for that report only (the page shows which applied).
    Thumbnails: see :func:`_thumbnail_of` (``load_image`` and ``load_heatmap`` may be None: no storage).
    """
    filters = filters or ReportFilters()
    tables: list[ReportResult] = []
    for name in reports or list(REPORTS):
        spec = REPORTS[name]
        given = filters.given()
        applicable = ReportFilters(**{key: value for key, value in given.items() if key in spec.filters})
        tables.append(run_report(connection, name, applicable, limit=MAX_TABLE_ROWS))
    daily = run_report(connection, "defects-daily", filters)
    histograms = score_histograms(connection, filters)
    thumbnails: list[Thumbnail] = []
    records = top_anomalies(connection, filters, limit=top_n).records()
    sizes = input_sizes(connection, [record["model_version"] for record in records if record_map(record)])
    for record in records:
        thumbnails.append(
            Thumbnail(
                key=record["key"],
                score=float(record["score"]),
                threshold=float(record["threshold"]),
                lot=record["lot"],
                wafer=record["wafer"],
                tool=record["tool"],
                model_version=record["model_version"],
                png=_thumbnail_of(
                    record, sizes.get(record["model_version"], DEFAULT_INPUT_SIZE), load_image, load_heatmap
                ),
            )
        )
    registry = collect_registry(connection)
    return Page(title, now or datetime.now(UTC), filters.given(), tables, daily, histograms, thumbnails, registry)


# --- SVG -----------------------------------------------------------------------------------------

_W, _H = 560, 270
_LEFT, _RIGHT, _TOP, _BOTTOM = 56, 20, 34, 48


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _svg(body: list[str], label: str, width: int = _W, height: int = _H) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{_e(label)}" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" class="plot">'
        f'<title>{_e(label)}</title><text x="12" y="20" class="plot-title">{_e(label)}</text>{"".join(body)}</svg>'
    )


def nice_ticks(y_max: float, *, integer: bool = False, max_ticks: int = 6) -> list[float]:
    """Grid values from 0 to the first "round" value ≥ ``y_max``: steps of 1, 2, 2.5 or 5 × 10^k (whole
    numbers only when ``integer``, for image counts), at most ``max_ticks`` values. So a 30% axis reads
    0/10/20/30% rather than 0/8/15/22/30%, and a count axis never shows 4.75 images."""
    y_max = max(float(y_max), 1.0 if integer else 1e-12)
    raw = y_max / (max_ticks - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, float(math.ceil(step)))
    count = math.ceil(y_max / step - 1e-9)
    return [round(i * step, 12) for i in range(count + 1)]


def _tick_text(value: float, *, percent: bool) -> str:
    if percent:
        return f"{value * 100:.4g}%"
    return f"{value:.0f}" if float(value).is_integer() else _fmt(value)


def _axes(ticks: list[float], y_label: str, *, percent: bool = False) -> list[str]:
    """Frame, horizontal grid lines at ``ticks`` (from :func:`nice_ticks`; the last is the top of the plot)
    with their labels, and the y-axis title."""
    plot_h = _H - _TOP - _BOTTOM
    top = ticks[-1]
    parts = []
    for value in ticks:
        y = _TOP + plot_h - plot_h * value / top
        text = _tick_text(value, percent=percent)
        parts.append(f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="{LIGHT}"/>')
        parts.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{text}</text>')
    parts.append(
        f'<text x="14" y="{_TOP + plot_h / 2:.1f}" transform="rotate(-90 14 {_TOP + plot_h / 2:.1f})" '
        f'text-anchor="middle" class="axis">{_e(y_label)}</text>'
    )
    parts.append(f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{_TOP + plot_h}" y2="{_TOP + plot_h}" stroke="{GREY}"/>')
    return parts


def _empty_svg(label: str, message: str) -> str:
    return _svg(
        [f'<text x="{_W / 2}" y="{_H / 2}" text-anchor="middle" class="empty">{_e(message)}</text>'],
        label,
        height=80,
    )


def defect_rate_svg(daily: ReportResult) -> str:
    """Defect rate per UTC day over all lots/tools in ``daily`` (a ``defects-daily`` result)."""
    label = "Defect rate per day (UTC, all selected lots and tools)"
    per_day: dict[date, list[int]] = {}
    for record in daily.records():
        counts = per_day.setdefault(record["day"], [0, 0])
        counts[0] += int(record["defects"])
        counts[1] += int(record["images"])
    if not per_day:
        return _empty_svg(label, "no scored images in this range")
    days = sorted(per_day)
    rates = [per_day[day][0] / per_day[day][1] for day in days]
    ticks = nice_ticks(max(0.05, max(rates)))
    y_max = ticks[-1]
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    span = max((days[-1] - days[0]).days, 1)  # x is the calendar: a day without images is a gap

    def x_of(day: date) -> float:
        return _LEFT + (plot_w * (day - days[0]).days / span if len(days) > 1 else plot_w / 2)

    points = [(x_of(day), _TOP + plot_h - plot_h * rate / y_max) for day, rate in zip(days, rates, strict=True)]
    body = _axes(ticks, "defect rate", percent=True)
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    body.append(f'<polyline points="{path}" fill="none" stroke="{BLUE}" stroke-width="2"/>')
    every = max(1, math.ceil(len(days) / 8))
    for i, ((x, y), day, rate) in enumerate(zip(points, days, rates, strict=True)):
        defects, images = per_day[day]
        body.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{BLUE}">'
            f"<title>{day.isoformat()}: {defects}/{images} = {rate:.1%}</title></circle>"
        )
        if i % every == 0 or i == len(days) - 1:
            anchor = "start" if i == 0 and len(days) > 1 else "end" if i and i == len(days) - 1 else "middle"
            body.append(
                f'<text x="{x:.1f}" y="{_TOP + plot_h + 18}" text-anchor="{anchor}" class="tick">'
                f"{day.isoformat()}</text>"
            )
    return _svg(body, label)


def histogram_svg(histogram: Histogram) -> str:
    """Score histogram of one model version with its threshold as a dashed vertical line."""
    label = f"Scores of model {histogram.model_version} (n = {histogram.n})"
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    low, high = histogram.edges[0], histogram.edges[-1]
    ticks = nice_ticks(max(histogram.counts) or 1, integer=True)
    y_max = ticks[-1]
    body = _axes(ticks, "images")
    bar_w = plot_w / len(histogram.counts)
    for i, count in enumerate(histogram.counts):
        if not count:
            continue
        bar_h = plot_h * count / y_max
        x = _LEFT + i * bar_w
        lo, hi = histogram.edges[i], histogram.edges[i + 1]
        above = histogram.threshold is not None and lo >= histogram.threshold
        body.append(
            f'<rect x="{x + 1:.1f}" y="{_TOP + plot_h - bar_h:.1f}" width="{max(bar_w - 2, 1):.1f}" '
            f'height="{bar_h:.1f}" fill="{RED if above else BLUE}" opacity="0.85">'
            f"<title>{_fmt(lo)}–{_fmt(hi)}: {count}</title></rect>"
        )
    for value in (low, (low + high) / 2, high):
        x = _LEFT + plot_w * (value - low) / (high - low)
        body.append(
            f'<text x="{x:.1f}" y="{_TOP + plot_h + 18}" text-anchor="middle" class="tick">{_fmt(value)}</text>'
        )
    body.append(
        f'<text x="{_LEFT + plot_w / 2:.1f}" y="{_H - 8}" text-anchor="middle" class="axis">anomaly score</text>'
    )
    if histogram.threshold is not None:
        x = _LEFT + plot_w * (histogram.threshold - low) / (high - low)
        body.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_TOP - 4}" y2="{_TOP + plot_h}" stroke="{RED}" '
            f'stroke-width="2" stroke-dasharray="6 4" class="threshold"/>'
        )
        anchor = "end" if x > _LEFT + plot_w * 0.8 else "start"
        dx = -6 if anchor == "end" else 6
        body.append(
            f'<text x="{x + dx:.1f}" y="{_TOP + 8}" text-anchor="{anchor}" class="threshold-label">'
            f"threshold {_fmt(histogram.threshold)}</text>"
        )
    return _svg(body, label)


def lot_bars_svg(daily: ReportResult, *, max_lots: int = 20) -> str:
    """Defect rate per lot (all days and tools in ``daily``), highest first, with defects/images labels."""
    label = "Defect rate per lot"
    per_lot: dict[str, list[int]] = {}
    for record in daily.records():
        counts = per_lot.setdefault(record["lot"] or "(no lot)", [0, 0])
        counts[0] += int(record["defects"])
        counts[1] += int(record["images"])
    if not per_lot:
        return _empty_svg(label, "no scored images in this range")
    lots = sorted(per_lot, key=lambda lot: (-per_lot[lot][0] / per_lot[lot][1], lot))[:max_lots]
    row_h, label_w, right = 26, 150, 120
    height = _TOP + row_h * len(lots) + 16
    plot_w = _W - label_w - right
    body = []
    for i, lot in enumerate(lots):
        defects, images = per_lot[lot]
        rate = defects / images
        y = _TOP + i * row_h
        body.append(f'<text x="{label_w - 8}" y="{y + 17}" text-anchor="end" class="tick">{_e(lot)}</text>')
        body.append(f'<rect x="{label_w}" y="{y + 4}" width="{plot_w}" height="{row_h - 8}" fill="{LIGHT}"/>')
        if defects:
            body.append(
                f'<rect x="{label_w}" y="{y + 4}" width="{max(plot_w * rate, 2):.1f}" height="{row_h - 8}" '
                f'fill="{RED}"><title>{_e(lot)}: {defects}/{images}</title></rect>'
            )
        body.append(
            f'<text x="{label_w + plot_w + 8}" y="{y + 17}" class="tick">{rate:.1%} ({defects}/{images})</text>'
        )
    return _svg(body, label, height=height)


# --- HTML ----------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px 32px; color: #111827;
       background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #e5e7eb;
       padding-bottom: 4px; } h3 { font-size: 15px; margin: 16px 0 4px; }
.meta { color: #6b7280; font-size: 13px; margin-bottom: 12px; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.plot { background: #fafafa; border: 1px solid #e5e7eb; border-radius: 6px; max-width: 100%; height: auto; }
.plot .tick { font-size: 11px; fill: #374151; }
.plot .plot-title { font-size: 13px; font-weight: 600; fill: #111827; } .plot .axis { font-size: 12px; fill: #374151; }
.plot .empty { font-size: 14px; fill: #6b7280; } .plot .threshold-label { font-size: 12px; fill: #d55e00; }
table { border-collapse: collapse; font-size: 12px; margin: 4px 0 8px; }
th, td { border: 1px solid #e5e7eb; padding: 3px 8px; text-align: left; white-space: nowrap; }
th { background: #f3f4f6; position: sticky; top: 0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
.empty-table { color: #6b7280; font-style: italic; }
.thumbs { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 12px; }
figure { margin: 0; border: 1px solid #e5e7eb; border-radius: 6px; padding: 8px; background: #fafafa; }
figure img { width: 100%; height: auto; image-rendering: auto; display: block; }
figure .missing { height: 160px; display: flex; align-items: center; justify-content: center; color: #6b7280;
       background: #f3f4f6; }
figcaption { font-size: 12px; margin-top: 6px; word-break: break-all; } .score { color: #d55e00; font-weight: 600; }
"""


def _cell(value: Any) -> str:
    if value is None:
        return "<td></td>"
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    if isinstance(value, datetime):
        return f"<td>{_e(value.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S'))}</td>"
    return f"<td>{_e(to_jsonable(value))}</td>"


def table_html(result: ReportResult) -> str:
    """A report as an HTML table, under its title (with a note when it is empty or cut short)."""
    parts = [f'<h3 id="{_e(result.name)}">{_e(result.title)}</h3>']
    if not result.rows:
        parts.append('<p class="empty-table">no rows for these filters</p>')
        return "".join(parts)
    head = "".join(f"<th>{_e(column)}</th>" for column in result.columns)
    body = "".join("<tr>" + "".join(_cell(value) for value in row) + "</tr>" for row in result.rows)
    parts.append(f'<table class="report" data-report="{_e(result.name)}"><thead><tr>{head}</tr></thead>')
    parts.append(f"<tbody>{body}</tbody></table>")
    if len(result.rows) >= MAX_TABLE_ROWS or result.truncated:
        parts.append(f'<p class="meta">first {len(result.rows)} rows shown</p>')
    return "".join(parts)


def _thumbnail_html(thumb: Thumbnail) -> str:
    where = " · ".join(f"{name} {value}" for name, value in (("lot", thumb.lot), ("wafer", thumb.wafer)) if value)
    if thumb.png:
        encoded = base64.b64encode(thumb.png).decode("ascii")
        picture = f'<img src="data:image/png;base64,{encoded}" alt="heatmap of {_e(thumb.key)}">'
    else:
        picture = '<div class="missing">no heatmap stored</div>'
    return (
        f"<figure>{picture}<figcaption><span class='score'>{thumb.score:.4g}</span> "
        f"(threshold {thumb.threshold:.4g}, {_e(thumb.model_version)})<br>{_e(thumb.key)}"
        f"{'<br>' + _e(where) if where else ''}</figcaption></figure>"
    )


def render_page(page: Page) -> str:
    """The whole page as one HTML string (UTF-8, no external resources)."""
    filters = ", ".join(f"{name} = {to_jsonable(value)}" for name, value in page.filters.items()) or "none"
    histograms = [histogram_svg(hist) for _, hist in sorted(page.histograms.items())]
    thumbs = "".join(_thumbnail_html(thumb) for thumb in page.thumbnails)
    sections = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(page.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(page.title)}</h1>",
        f'<p class="meta">generated {page.generated_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")} · '
        f"filters: {_e(filters)}</p>",
        '<h2 id="trends">Defect rate</h2><div class="plots">',
        defect_rate_svg(page.daily),
        lot_bars_svg(page.daily),
        "</div>",
        '<h2 id="scores">Score distributions</h2><div class="plots">',
        "".join(histograms) or _empty_svg("Scores", "no inferences in this range"),
        "</div>",
        '<h2 id="anomalies">Top anomalies</h2>',
        f'<div class="thumbs">{thumbs}</div>' if thumbs else '<p class="empty-table">no anomalies in this range</p>',
        registry_html(page.registry) if page.registry is not None else "",
        '<h2 id="tables">Tables</h2>',
        *(table_html(table) for table in page.tables),
        "</body></html>",
    ]
    return "\n".join(sections)
