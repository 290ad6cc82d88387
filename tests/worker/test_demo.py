"""The embedded demo, run as a user runs it: a real worker process, SQLite, a folder bucket, a folder broker."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from worker.demo import DemoError, find_images


def test_demo_scores_dropped_images_and_summarises_from_sql(dacon_data: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAFERWATCH_")} | {"COLUMNS": "200"}
    command = [sys.executable, "-c", "from worker.cli import main; main()", "demo", "--data", str(dacon_data)]
    command += ["--workdir", str(workdir), "--limit", "4", "--interval-ms", "50", "--timeout", "150"]
    command += ["--train-limit", "20", "--coreset-ratio", "0.02", "--folds", "2", "--device", "cpu"]

    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)

    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    database = workdir / "waferwatch.db"
    assert f"sqlite3 {database}" in output
    assert "inferences: 4" in output and "slowest" in output
    with sqlite3.connect(database) as connection:
        rows = connection.execute(
            "SELECT i.key, i.status, i.lot, f.heatmap_key FROM images i JOIN inferences f ON f.image_id = i.id"
        ).fetchall()
        active = connection.execute("SELECT id FROM model_versions WHERE status = 'active'").fetchall()
    assert len(rows) == 4 and {row[1] for row in rows} == {"scored"} and {row[2] for row in rows} == {"lot-01"}
    assert all((workdir / "storage" / row[3]).is_file() for row in rows)
    assert len(active) == 1 and (workdir / "storage" / "models" / active[0][0] / "manifest.json").is_file()
    assert (workdir / "model" / "manifest.json").is_file()  # kept for the next run


def test_demo_says_what_it_expects_from_the_data_folder(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DemoError, match=r"test.csv.*train/ and\s+test/ folders|lacks test images"):
        find_images(tmp_path)
