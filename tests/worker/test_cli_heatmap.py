"""``waferwatch heatmap KEY`` through real subprocesses: a folder bucket, real rows on SQLite and PostgreSQL.

The rows are written with the repository functions the worker uses (register_image, ensure_model_version,
record_inference with an ``encode_map``'d map); every case checks the exit status and the written PNG.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from models.heatmap import LOW, encode_map, render_stored, scale_width
from models.images import decode_image
from worker import repository
from worker.db import session_scope
from worker.storage import FolderStore

WAFERWATCH = [sys.executable, "-c", "from worker.cli import main; main()"]
SIZE = 160  # the model version's input side (its manifest's image_size): not the 224 default
THRESHOLD = 0.5
GREY = (128, 128, 128)
HOT = (slice(20, 60), slice(100, 140))  # rows, columns of the hot square in the map (model pixels)


def waferwatch(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``waferwatch ARGS`` in ``cwd`` with no WAFERWATCH_* variable but ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WAFERWATCH_")}
    clean |= {"COLUMNS": "200", "TERM": "dumb"} | env
    return subprocess.run(
        [*WAFERWATCH, *args], cwd=cwd, env=clean, capture_output=True, text=True, timeout=120, check=False
    )


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _anomaly_map() -> np.ndarray:
    """Nominal (0.1, under the colour scale's start) everywhere but one hot square (2× the threshold)."""
    values = np.full((SIZE, SIZE), 0.1, dtype=np.float32)
    values[HOT] = 2 * THRESHOLD
    return values


class Scene:
    """A folder bucket and a database holding the rows every case of the test reads."""

    def __init__(self, root: Path, session_factory: sessionmaker[Session], database_url: str) -> None:
        root.mkdir()
        self.store = FolderStore(root)
        self.env = {"WAFERWATCH_DATABASE_URL": database_url, "WAFERWATCH_STORAGE": "folder"}
        self.env["WAFERWATCH_STORAGE_ROOT"] = str(root)
        # A 300×200 mid-grey photo: where the map is nominal the overlay keeps these pixels.
        self.photo = _png(Image.new("RGB", (300, 200), GREY))
        self.stored = encode_map(_anomaly_map())
        self.old_overlay = _png(Image.new("RGB", (264, 224), (10, 200, 30)))
        self.store.put("heatmaps/mv-1/w5.1.heatmap.png", self.old_overlay)
        with session_scope(session_factory) as session:
            repository.ensure_model_version(
                session,
                version="mv-1",
                manifest={"version": "mv-1", "config": {"image_size": SIZE, "tiles": 1}, "grid": [20, 20]},
                threshold=THRESHOLD,
                status="active",
            )
            self._scored(session, "incoming/lot1/w3.png", anomaly_map=self.stored)
            self._register(session, "incoming/lot1/w4.png")  # queued: not scored yet
            self._scored(session, "incoming/lot1/w5.png", heatmap_key="heatmaps/mv-1/w5.1.heatmap.png")
            self._scored(session, "incoming/lot1/w6.png", heatmap_key="heatmaps/mv-1/gone.heatmap.png")
            self._scored(session, "incoming/lot1/w7.png")  # scored with heatmaps=none: nothing at all

    def _register(self, session: Session, key: str) -> int:
        info = self.store.put(key, self.photo)
        image, _ = repository.register_image(
            session, bucket=self.store.bucket, key=key, etag=info.etag, size=info.size, metadata={"lot": "lot1"}
        )
        return image.id

    def _scored(self, session: Session, key: str, **stored: object) -> None:
        repository.record_inference(
            session,
            image_id=self._register(session, key),
            model_version="mv-1",
            score=2 * THRESHOLD,
            threshold=THRESHOLD,
            is_anomalous=True,
            fold_scores=[2 * THRESHOLD],
            **stored,  # type: ignore[arg-type]
        )


@pytest.fixture
def scene(tmp_path: Path, session_factory: sessionmaker[Session], db_url: str) -> Scene:
    return Scene(tmp_path / "bucket", session_factory, db_url)


def _pixel(path: Path, row: int, column: int) -> tuple[int, int, int]:
    with Image.open(path) as image:
        return image.convert("RGB").getpixel((column, row))  # type: ignore[return-value]


def test_heatmap_draws_the_stored_map_over_the_scored_image(scene: Scene, tmp_path: Path) -> None:
    out = tmp_path / "w3.png"
    done = waferwatch("heatmap", "incoming/lot1/w3.png", "--out", str(out), cwd=tmp_path, env=scene.env)

    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stderr and "overlay of incoming/lot1/w3.png by model version mv-1" in done.stderr
    with Image.open(out) as image:
        assert image.size == (SIZE + scale_width(SIZE), SIZE)  # the model's input size, plus the colour bar
    hot = _pixel(out, 40, 120)
    assert hot[0] > GREY[0] + 50 and hot[2] < hot[0] - 40  # the scale's hot yellow blended in where the map is hot
    assert _pixel(out, 140, 30) == GREY  # the photo itself where the map is nominal
    # The very picture the worker drew before maps were stored: the image as the model saw it, same scale.
    expected = render_stored(decode_image(scene.photo, size=SIZE), scene.stored, threshold=THRESHOLD, size=SIZE)
    assert out.read_bytes() == expected

    # Without --out: <stem>.heatmap.png in the current folder; --model-version picks that version's score.
    done = waferwatch("heatmap", "incoming/lot1/w3.png", "--model-version", "mv-1", cwd=tmp_path, env=scene.env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "w3.heatmap.png").read_bytes() == expected


def test_heatmap_of_a_row_from_before_maps_copies_its_overlay_object(scene: Scene, tmp_path: Path) -> None:
    out = tmp_path / "w5.png"
    done = waferwatch("heatmap", "incoming/lot1/w5.png", "-o", str(out), cwd=tmp_path, env=scene.env)

    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == scene.old_overlay
    assert "heatmaps/mv-1/w5.1.heatmap.png" in done.stderr


def test_heatmap_without_the_original_image_writes_the_map_alone(scene: Scene, tmp_path: Path) -> None:
    scene.store.delete("incoming/lot1/w3.png")
    out = tmp_path / "alone.png"
    done = waferwatch("heatmap", "incoming/lot1/w3.png", "--out", str(out), cwd=tmp_path, env=scene.env)

    assert done.returncode == 0, done.stderr
    assert "gone from storage" in done.stderr and "anomaly map alone" in done.stderr
    with Image.open(out) as image:
        assert image.size == (SIZE + scale_width(SIZE), SIZE)
    nominal = _pixel(out, 140, 30)
    assert nominal != GREY and sum(nominal) < 30  # the scale's darkest colour: no photo under the map
    assert sum(_pixel(out, 40, 120)) > 400  # the hot square, at the scale's top (light yellow)
    assert LOW * THRESHOLD > 0.1  # (why the nominal level is the darkest colour)


def test_heatmap_errors_name_the_key_or_option_and_exit_1(scene: Scene, tmp_path: Path) -> None:
    cases = {
        ("incoming/lot9/nope.png",): ["no image with key 'incoming/lot9/nope.png'", "waferwatch report"],
        ("incoming/lot1/w4.png",): ["incoming/lot1/w4.png is not scored", "'queued'"],
        ("incoming/lot1/w3.png", "--model-version", "mv-9"): [
            "--model-version mv-9 is no model version",
            "was scored by: mv-1",
        ],
        ("incoming/lot1/w6.png",): ["no stored map", "heatmaps/mv-1/gone.heatmap.png is gone", "rescore"],
        ("incoming/lot1/w7.png",): ["no heatmap stored for incoming/lot1/w7.png", "rescore"],
    }
    for args, expected in cases.items():
        out = tmp_path / "never.png"
        done = waferwatch("heatmap", *args, "--out", str(out), cwd=tmp_path, env=scene.env)
        assert done.returncode == 1, (args, done.stderr)
        assert "Traceback" not in done.stderr
        for text in expected:
            assert text in done.stderr, (args, done.stderr)
        assert not out.exists()

    done = waferwatch(
        "heatmap", "incoming/lot1/w3.png", "--out", str(tmp_path / "no" / "x.png"), cwd=tmp_path, env=scene.env
    )
    assert done.returncode == 2 and "--out" in done.stderr and "Traceback" not in done.stderr


def test_report_page_draws_thumbnails_from_stored_maps(scene: Scene, tmp_path: Path) -> None:
    """``report all --format html`` with the configured folder bucket: the row with a map gets a thumbnail
    drawn over its image, the old row its overlay object, the rows with neither say so."""
    out = tmp_path / "report.html"
    done = waferwatch("report", "all", "--format", "html", "--out", str(out), cwd=tmp_path, env=scene.env)

    assert done.returncode == 0, done.stderr
    document = out.read_text(encoding="utf-8")
    assert document.count('<img src="data:image/png;base64,') == 2  # w3 (stored map) and w5 (overlay object)
    assert 'alt="heatmap of incoming/lot1/w3.png"' in document
    assert 'alt="heatmap of incoming/lot1/w5.png"' in document
    assert document.count("no heatmap stored") == 2  # w6 (its object is gone) and w7 (nothing stored)
    assert "heatmaps/mv-1/gone.heatmap.png" in done.stderr  # the missing object is named
