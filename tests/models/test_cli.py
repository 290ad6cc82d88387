"""The model commands end to end through the real console script and Typer app."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from worker.cli import app

runner = CliRunner()
FAST = ["--coreset-ratio", "0.02", "--folds", "2", "--batch-size", "8"]


@pytest.fixture(scope="module")
def mini_dacon(tmp_path_factory, dacon_dir) -> Path:
    """A competition-shaped folder: 8 train and 5 test images, CSV paths relative to the CSVs."""
    root = tmp_path_factory.mktemp("dacon")
    for part, count in (("train", 8), ("test", 5)):
        (root / part).mkdir()
        rows = []
        for source in sorted((dacon_dir / part).glob("*.png"))[:count]:
            shutil.copy(source, root / part / source.name)
            rows.append([source.stem, f"./{part}/{source.name}"])
        header = ["id", "img_path", "label"] if part == "train" else ["id", "img_path"]
        with (root / f"{part}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            # test.csv deliberately not sorted: the submission must keep its order
            for row in rows if part == "train" else rows[::-1]:
                writer.writerow([*row, 0] if part == "train" else row)
    return root


@pytest.fixture(scope="module")
def trained(mini_dacon, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "m"
    result = runner.invoke(app, ["train", "--images", str(mini_dacon / "train.csv"), "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_a_model_directory(trained):
    manifest = json.loads((trained / "manifest.json").read_text())
    assert len(manifest["training_images"]) == 8 and len(manifest["folds"]) == 2


def test_score_json_heatmaps_and_bad_files(trained, mini_dacon, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    heatmaps = tmp_path / "heat"
    result = runner.invoke(
        app,
        [
            "score",
            "--model",
            str(trained),
            str(mini_dacon / "test"),
            str(bad),
            "--format",
            "json",
            "--heatmaps",
            str(heatmaps),
        ],
    )
    assert result.exit_code == 2  # one unreadable file: reported, others scored
    rows = json.loads(result.stdout)
    scored = [r for r in rows if "score" in r]
    assert len(scored) == 5 and {r["id"] for r in rows if "error" in r} == {"broken"}
    assert all(len(r["fold_scores"]) == 2 and r["label"] == int(r["score"] > r["threshold"]) for r in scored)
    assert sorted(p.name for p in heatmaps.iterdir()) == sorted(f"{r['id']}.heatmap.png" for r in scored)


def test_score_csv_format(trained, mini_dacon):
    result = runner.invoke(app, ["score", "--model", str(trained), str(mini_dacon / "test"), "--format", "csv"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line]
    assert lines[0].split(",")[:4] == ["id", "score", "threshold", "label"] and len(lines) == 6


def test_dacon_submission_keeps_test_csv_order(mini_dacon, tmp_path):
    out, scores = tmp_path / "submission.csv", tmp_path / "scores.csv"
    result = runner.invoke(app, ["dacon", "--data", str(mini_dacon), "--out", str(out), "--scores", str(scores), *FAST])
    assert result.exit_code == 0, result.output
    with (mini_dacon / "test.csv").open() as handle:
        expected_ids = [row["id"] for row in csv.DictReader(handle)]
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["id"] for r in rows] == expected_ids and {r["label"] for r in rows} <= {"0", "1"}
    with scores.open() as handle:
        detail = list(csv.DictReader(handle))
    assert [d["id"] for d in detail] == expected_ids
    for d, r in zip(detail, rows, strict=True):
        assert int(float(d["score"]) > float(d["threshold"])) == int(r["label"]) == int(d["label"])
        # the default score aggregate is the mean of the fold scores
        assert float(d["score"]) == pytest.approx((float(d["fold0"]) + float(d["fold1"])) / 2, rel=1e-9)


def test_evaluate_reports_metrics(trained, tile_split, tmp_path):
    good, bad, masks = tmp_path / "good", tmp_path / "bad", tmp_path / "masks"
    for folder in (good, bad, masks):
        folder.mkdir()
    for ref in tile_split.test_good[:3]:
        shutil.copy(ref.path, good / ref.path.name)
    for ref in tile_split.test_bad[:3]:
        shutil.copy(ref.path, bad / ref.path.name)
        shutil.copy(tile_split.masks[ref.id], masks / tile_split.masks[ref.id].name)
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--model",
            str(trained),
            "--good",
            str(good),
            "--bad",
            str(bad),
            "--masks",
            str(masks),
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_good"] == 3 and report["n_bad"] == 3
    assert 0.0 <= report["image_auroc"] <= 1.0 and 0.0 <= report["pixel_auroc"] <= 1.0


def test_errors_are_one_line_unless_debug(tmp_path):
    command = [sys.executable, "-c", "from worker.cli import main; main()"]
    plain = subprocess.run([*command, "score", "--model", str(tmp_path), "x.png"], capture_output=True, text=True)
    assert plain.returncode == 1
    assert "ArtifactError" in plain.stderr and "manifest.json is missing" in plain.stderr
    assert "Traceback" not in plain.stderr
    debug = subprocess.run(
        [*command, "--debug", "score", "--model", str(tmp_path), "x.png"], capture_output=True, text=True
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr
