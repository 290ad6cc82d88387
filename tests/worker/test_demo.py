"""The embedded demo, run as a user runs it: a real worker process, SQLite, a folder bucket, a folder broker."""

from __future__ import annotations

import json
import os
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from worker.demo import DemoError, find_images

WAFERWATCH = [sys.executable, "-c", "from worker.cli import main; main()"]


def _run(command: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAFERWATCH_")} | {"COLUMNS": "200"}
    return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, check=False)


def test_demo_scores_dropped_images_and_summarises_from_sql(dacon_data: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    command = [*WAFERWATCH, "demo", "--data", str(dacon_data)]
    command += ["--workdir", str(workdir), "--limit", "4", "--interval-ms", "50", "--timeout", "150"]
    command += ["--train-limit", "20", "--coreset-ratio", "0.02", "--folds", "2", "--device", "cpu"]

    done = _run(command, tmp_path)

    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    database = workdir / "waferwatch.db"
    assert f"sqlite3 {database}" in output
    assert "inferences: 4" in output and "slowest" in output
    with sqlite3.connect(database) as connection:
        rows = connection.execute(
            "SELECT i.key, i.status, i.lot, f.heatmap_key, f.anomaly_map_png IS NOT NULL "
            "FROM images i JOIN inferences f ON f.image_id = i.id"
        ).fetchall()
        active = connection.execute("SELECT id FROM model_versions WHERE status = 'active'").fetchall()
    assert len(rows) == 4 and {row[1] for row in rows} == {"scored"} and {row[2] for row in rows} == {"lot-01"}
    # Every image has a heatmap: its map in the row, or (workers from before 0007) an overlay object.
    assert all(row[4] or (workdir / "storage" / row[3]).is_file() for row in rows)
    assert all(row[3] is None or (row[3].endswith(".heatmap.png") and ".png." not in row[3]) for row in rows)
    assert len(active) == 1 and (workdir / "storage" / "models" / active[0][0] / "manifest.json").is_file()
    assert (workdir / "model" / "manifest.json").is_file()  # kept for the next run
    # Output for people (item 9): the live table titled once, no spurious kombu warning.
    assert output.count("latest scores") == 1, output[-4000:]
    assert "No hostname was supplied" not in output
    # How to see a heatmap now (drawn on demand): the printed command for the top anomaly works.
    heatmap_lines = [line.strip() for line in output.splitlines() if line.strip().startswith("heatmap:")]
    assert len(heatmap_lines) == 1, output[-4000:]
    heatmap_command = heatmap_lines[0].removeprefix("heatmap:").split("#")[0].strip()
    assert heatmap_command.startswith(f"waferwatch --workdir {workdir} heatmap incoming/")
    drawn = _run([*WAFERWATCH, *shlex.split(heatmap_command)[1:]], tmp_path, timeout=120)
    assert drawn.returncode == 0, (heatmap_command, drawn.stderr)
    written = Path(shlex.split(heatmap_command)[-1])
    assert written.parent == workdir and written.read_bytes().startswith(b"\x89PNG")

    # The demo leads into the CLI (item 6): its settings file and the exact next commands, which work.
    assert (workdir / ".env").is_file()
    printed = [line.strip() for line in output.splitlines() if line.strip().startswith("waferwatch --workdir")]
    assert [line.split()[3] for line in printed] == ["report", "models", "status"], printed
    for line in [*printed, f"waferwatch --workdir {workdir} doctor"]:
        follow = _run([*WAFERWATCH, *shlex.split(line)[1:]], tmp_path, timeout=120)
        assert follow.returncode == 0, (line, follow.stdout, follow.stderr)
        assert "No hostname was supplied" not in follow.stderr
    assert (workdir / "report.html").stat().st_size > 1000
    assert not (tmp_path / "var").exists()

    # Same images and config: the model is reused. A run that cannot finish in time exits non-zero (item 1).
    again = _run(_replace(command, "--timeout", "1"), tmp_path)
    assert "reusing model" in again.stdout + again.stderr
    assert again.returncode == 1, (again.stdout + again.stderr)[-3000:]
    assert "not every image was accounted for" in again.stdout + again.stderr

    # Other training images (item 4): retrained, and it says why.
    other = _run(_replace(_replace(command, "--timeout", "1"), "--train-limit", "12"), tmp_path)
    assert "not reusing the model" in other.stdout + other.stderr and "other images" in other.stdout + other.stderr
    assert other.returncode == 1
    with (workdir / "model" / "manifest.json").open() as handle:
        assert len(json.load(handle)["training_images"]) == 12


def _replace(command: list[str], option: str, value: str) -> list[str]:
    changed = list(command)
    changed[changed.index(option) + 1] = value
    return changed


def test_demo_says_what_it_expects_from_the_data_folder(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DemoError, match=r"test.csv.*train/ and\s+test/ folders|lacks test images"):
        find_images(tmp_path)
