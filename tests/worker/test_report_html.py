"""The HTML report, rendered by a real headless Chromium: screenshot and rendered DOM.

Chromium comes from the Debian package ``chromium``. The test skips with the install command when the
binary is missing, unless ``WAFERWATCH_TEST_REQUIRE_CHROMIUM=1`` (set in CI) makes that a failure.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageStat
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session, sessionmaker

from models.heatmap import encode_map, scale_width
from worker.db import session_scope
from worker.report_html import collect_page, render_page
from worker.reports import ReportFilters, parse_time
from worker.schema import Inference

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="session")
def chromium() -> str:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    message = "headless Chromium is not installed: `apt-get update && apt-get install -y chromium`"
    if os.environ.get("WAFERWATCH_TEST_REQUIRE_CHROMIUM") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _chromium(binary: str, *args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    command = [
        binary,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _page(engine: Engine, history, filters: ReportFilters | None = None) -> str:
    with engine.connect() as connection:
        page = collect_page(connection, filters, load_heatmap=history.heatmaps.get)
    return render_page(page)


def test_page_is_self_contained(db_engine: Engine, report_history) -> None:
    document = _page(db_engine, report_history)
    assert "<script" not in document
    assert not re.search(r"""(src|href)=["']https?://""", document)
    assert document.count("<svg") == 4  # defect rate, lot bars, one histogram per model version
    assert document.count('<img src="data:image/png;base64,') == 4  # the four anomalies' heatmaps
    assert 'class="threshold"' in document


def test_page_in_headless_chromium(db_engine: Engine, report_history, chromium: str, tmp_path: Path) -> None:
    html_file = tmp_path / "report.html"
    html_file.write_text(_page(db_engine, report_history), encoding="utf-8")
    screenshot = tmp_path / "report.png"

    shot = _chromium(
        chromium,
        f"--screenshot={screenshot}",
        "--window-size=1280,2000",
        html_file.as_uri(),
        profile=tmp_path / "profile-shot",
    )
    assert screenshot.is_file(), shot.stderr[-2000:]
    with Image.open(screenshot) as image:
        assert image.size == (1280, 2000)
        grey = image.convert("L")
        assert ImageStat.Stat(grey).stddev[0] > 20  # not a blank page
        colours = image.convert("RGB").resize((320, 500)).getcolors(maxcolors=1_000_000)
        assert colours is not None and len(colours) > 50  # plots and heatmaps, not just text on white
    keep = os.environ.get("WAFERWATCH_TEST_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(screenshot, keep)

    dom = _chromium(chromium, "--dump-dom", html_file.as_uri(), profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = dom.stdout
    for heading in ("Defect rate", "Score distributions", "Top anomalies", "Tables"):
        assert f">{heading}</h2>" in rendered
    for title in ("Defects per day, lot, wafer and tool", "Queue lag per hour", "Reviews against decisions"):
        assert title in rendered
    assert rendered.count("<svg") == 4
    assert rendered.count("<img") == 4
    daily = re.search(r'data-report="defects-daily">(.*?)</table>', rendered, re.S)
    assert daily is not None
    assert daily.group(1).count("<tr>") == 1 + 4  # header + the four day/lot/wafer/tool rows
    assert "incoming/T2/L3/W7/d1.png" in rendered
    assert "threshold 0.6" in rendered


def test_page_for_an_empty_range(db_engine: Engine, report_history, chromium: str, tmp_path: Path) -> None:
    filters = ReportFilters(since=parse_time("2026-03-04"), until=parse_time("2026-03-05"))
    html_file = tmp_path / "empty.html"
    html_file.write_text(_page(db_engine, report_history, filters), encoding="utf-8")
    dom = _chromium(chromium, "--dump-dom", html_file.as_uri(), profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "no scored images in this range" in dom.stdout
    assert "no anomalies in this range" in dom.stdout
    assert "<img" not in dom.stdout


def test_missing_heatmaps_and_bad_bytes(db_engine: Engine, report_history) -> None:
    keys = sorted(report_history.heatmaps)
    broken = {keys[0]: b"not a png"}
    with db_engine.connect() as connection:
        page = collect_page(connection, load_heatmap=broken.get, top_n=2)
    assert [thumb.png for thumb in page.thumbnails] == [None, None]
    assert render_page(page).count("no heatmap stored") == 2


def _store_map_only(session_factory: sessionmaker[Session], image_id: int) -> None:
    """Turn one anomalous row into what the worker writes since 0007: a stored map, no overlay object."""
    values = np.full((224, 224), 0.1, dtype=np.float32)
    values[20:80, 120:200] = 1.5  # hot: 2.5× mv-2's threshold of 0.6
    stored = encode_map(values)
    with session_scope(session_factory) as session:
        session.execute(
            update(Inference)
            .where(Inference.image_id == image_id, Inference.model_version == "mv-2")
            .values(
                heatmap_key=None,
                anomaly_map_png=stored.png,
                anomaly_map_low=stored.low,
                anomaly_map_high=stored.high,
            )
        )


def test_a_row_with_only_a_stored_map_gets_a_thumbnail(
    db_engine: Engine, session_factory: sessionmaker[Session], report_history
) -> None:
    d1 = report_history.image_ids["d1"]
    _store_map_only(session_factory, d1)
    buffer = io.BytesIO()
    Image.new("RGB", (300, 300), (128, 128, 128)).save(buffer, format="PNG")
    photo = buffer.getvalue()
    asked: list[dict] = []

    def load_image(record) -> bytes | None:
        asked.append(dict(record))
        return photo

    with db_engine.connect() as connection:
        drawn = collect_page(connection, load_heatmap=report_history.heatmaps.get, load_image=load_image, top_n=2)
        alone = collect_page(connection, load_heatmap=report_history.heatmaps.get, top_n=2)  # original unavailable

    # Only the row with a map asks for its original image, at the version that was scored.
    assert [(r["image_id"], r["bucket"], r["key"]) for r in asked] == [(d1, "fab", "incoming/T2/L3/W7/d1.png")]
    assert asked[0]["version_id"] is None and asked[0]["anomaly_map_png"] is not None
    by_key = {thumb.key: thumb for thumb in drawn.thumbnails}
    over_photo = by_key["incoming/T2/L3/W7/d1.png"].png
    map_alone = {thumb.key: thumb for thumb in alone.thumbnails}["incoming/T2/L3/W7/d1.png"].png
    assert over_photo is not None and map_alone is not None
    assert by_key["incoming/T1/L1/W1/a4.png"].png is not None  # the old row keeps its overlay object
    with Image.open(io.BytesIO(over_photo)) as image:
        assert image.width <= 224 and image.height <= 224
        rgb = image.convert("RGB")
        scale = image.width / (224 + scale_width(224))  # the overlay with its colour bar, shrunk to fit
        nominal = rgb.getpixel((round(40 * scale), round(180 * scale)))
        hot = rgb.getpixel((round(160 * scale), round(50 * scale)))
    assert max(abs(channel - 128) for channel in nominal) <= 2  # the photo where the map is nominal
    assert hot[0] > 180 and hot[2] < hot[0] - 40  # the hot colour where the map exceeds the threshold
    with Image.open(io.BytesIO(map_alone)) as image:
        assert sum(image.convert("RGB").getpixel((round(40 * scale), round(180 * scale)))) < 30  # no photo
    assert render_page(drawn).count('<img src="data:image/png;base64,') == 2


def test_cli_writes_the_html_page(db_engine: Engine, report_history, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from worker.cli import app

    out = tmp_path / "page.html"
    url = db_engine.url.render_as_string(hide_password=False)
    result = CliRunner().invoke(app, ["report", "all", "--url", url, "--lot", "L1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    document = out.read_text(encoding="utf-8")
    assert "filters: lot = L1" in document
    assert document.count("<svg") >= 3
    assert "incoming/T1/L1/W1/a4.png" in document
    assert "incoming/T2/L3/W7/d1.png" not in document  # lot L3
