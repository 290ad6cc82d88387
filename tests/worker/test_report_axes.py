"""Report axes read like a person drew them: round percentages, whole image counts."""

from __future__ import annotations

import re
from datetime import date

import pytest

from worker.report_html import defect_rate_svg, histogram_svg, nice_ticks
from worker.reports import Histogram


@pytest.mark.parametrize(
    ("top", "integer", "expected"),
    [
        (0.3, False, [0, 0.1, 0.2, 0.3]),
        (0.22, False, [0, 0.05, 0.1, 0.15, 0.2, 0.25]),
        (19, True, [0, 5, 10, 15, 20]),
        (3, True, [0, 1, 2, 3]),
        (9.5, True, [0, 2, 4, 6, 8, 10]),
    ],
)
def test_nice_ticks(top: float, integer: bool, expected: list[float]) -> None:
    assert nice_ticks(top, integer=integer) == pytest.approx(expected)


def _ticks(svg: str) -> list[str]:
    return re.findall(r'class="tick">([^<]+)</text>', svg)


def test_histogram_counts_are_whole_numbers() -> None:
    svg = histogram_svg(Histogram("v1", [0.0, 1.0, 2.0, 3.0, 4.0], [4, 19, 3, 0], 2.5))
    assert _ticks(svg)[:5] == ["0", "5", "10", "15", "20"]  # the y axis is drawn first; no 4.75 images


class _Daily:
    """The records of a defects-daily result: what defect_rate_svg reads."""

    def __init__(self, rows: list[tuple[date, int, int]]) -> None:
        self._rows = rows

    def records(self) -> list[dict[str, object]]:
        return [{"day": day, "defects": defects, "images": images} for day, defects, images in self._rows]


def test_defect_rate_axis_shows_round_percentages() -> None:
    svg = defect_rate_svg(_Daily([(date(2026, 3, 1), 3, 10), (date(2026, 3, 2), 1, 10)]))  # type: ignore[arg-type]
    percentages = [t for t in _ticks(svg) if t.endswith("%")]
    assert percentages == ["0%", "10%", "20%", "30%"], percentages
