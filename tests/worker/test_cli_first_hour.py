"""A new user's first hour with the command line (issue 11), through real ``waferwatch`` subprocesses.

Every test checks the exit status of the process, not only its output: scripts and cron rely on it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from models import PatchCoreConfig

WAFERWATCH = [sys.executable, "-c", "from worker.cli import main; main()"]


def waferwatch(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``waferwatch ARGS`` in ``cwd`` with no WAFERWATCH_* variable but ``env``, at 80 columns."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WAFERWATCH_")}
    clean |= {"COLUMNS": "80", "TERM": "dumb"} | (env or {})
    return subprocess.run(
        [*WAFERWATCH, *args], cwd=cwd, env=clean, capture_output=True, text=True, timeout=timeout, check=False
    )


def error_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


@pytest.fixture
def few_images(dacon_data: Path, tmp_path: Path) -> Path:
    """Three real Dacon test images renamed to long, realistic ids."""
    folder = tmp_path / "images"
    folder.mkdir()
    for index, source in enumerate(sorted((dacon_data / "test").glob("*.png"))[:3]):
        shutil.copy(source, folder / f"tool-07_lot-2026-0042_wafer-19_die-{index:04d}_TEST.png")
    return folder


@pytest.fixture
def migrated_workdir(tmp_path: Path) -> Path:
    """A work folder with a .env (as the demo writes) naming a migrated SQLite database and a folder bucket."""
    workdir = tmp_path / "work"
    (workdir / "storage").mkdir(parents=True)
    (workdir / ".env").write_text(
        f"WAFERWATCH_DATABASE_URL=sqlite:///{workdir / 'results.db'}\n"
        f"WAFERWATCH_STORAGE_ROOT={workdir / 'storage'}\n"
        f"WAFERWATCH_BROKER_DIR={workdir / 'broker'}\n",
        encoding="utf-8",
    )
    done = waferwatch("--workdir", str(workdir), "db", "upgrade", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return workdir


# --- item 1: exit codes -----------------------------------------------------------------------------


def test_score_exits_2_when_an_input_is_missing(pipeline_model_dir: Path, tmp_path: Path) -> None:
    done = waferwatch("score", "--model", str(pipeline_model_dir), "missing.png", "--format", "json", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert json.loads(done.stdout)[0]["id"] == "missing" and "error" in json.loads(done.stdout)[0]


def test_usage_errors_exit_2_and_name_the_option(tmp_path: Path) -> None:
    done = waferwatch(
        "train", "--images", str(tmp_path), "--out", str(tmp_path / "m"), "--coreset-ratio", "5", cwd=tmp_path
    )
    assert done.returncode == 2
    assert "--coreset-ratio" in done.stderr and "Traceback" not in done.stderr
    unknown = waferwatch("no-such-command", cwd=tmp_path)
    assert unknown.returncode == 2


def test_shell_completion_is_installed(tmp_path: Path) -> None:
    # Typer detects the shell from the parent process, as when a user types it in bash ("; true": no exec).
    line = shlex.join([*WAFERWATCH, "--show-completion"]) + "; true"
    script = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "_WAFERWATCH_COMPLETE=complete_bash" in script.stdout, script.stderr
    env = {"_WAFERWATCH_COMPLETE": "complete_bash", "COMP_WORDS": "waferwatch doc", "COMP_CWORD": "1"}
    completed = waferwatch(cwd=tmp_path, env=env)
    assert completed.returncode == 0 and completed.stdout.split() == ["doctor"]


# --- item 2: train --out over an existing model -------------------------------------------------------


def test_train_refuses_an_existing_model_before_training(few_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "manifest.json").write_text("{}", encoding="utf-8")
    (out / "fold_4.safetensors").write_bytes(b"old")
    done = waferwatch("train", "--images", str(few_images), "--out", str(out), "--folds", "2", cwd=tmp_path)
    assert done.returncode == 2
    assert "--overwrite" in done.stderr and "training on" not in done.stderr
    assert (out / "fold_4.safetensors").read_bytes() == b"old"


# --- item 5: one default ----------------------------------------------------------------------------


def test_demo_and_commands_take_the_model_defaults_from_the_config(tmp_path: Path) -> None:
    from worker.cli.model_cmds import model_config
    from worker.demo import DemoOptions

    assert DemoOptions(data=tmp_path, workdir=tmp_path).config == PatchCoreConfig()
    assert model_config() == PatchCoreConfig()
    assert model_config(coreset_ratio=0.5) == PatchCoreConfig(coreset_ratio=0.5)
    help_text = waferwatch("train", "--help", cwd=tmp_path, env={"COLUMNS": "200"}).stdout
    assert f"(default: {PatchCoreConfig().coreset_ratio})" in help_text


# --- item 6: the database other commands read ---------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("report", "all", "--format", "html", "--out", "r.html"),
        ("report", "sql", "SELECT 1"),
        ("models", "list"),
        ("status",),
    ],
)
def test_reading_commands_refuse_a_missing_database_and_create_nothing(tmp_path: Path, args: tuple[str, ...]) -> None:
    done = waferwatch(*args, cwd=tmp_path)
    assert done.returncode == 1
    lines = error_lines(done)
    assert len(lines) == 1 and "waferwatch db upgrade" in lines[0] and "--workdir" in lines[0], done.stderr
    assert not (tmp_path / "var").exists()


def test_an_unmigrated_database_is_refused(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "empty.db").close()
    env = {"WAFERWATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}"}
    done = waferwatch("models", "list", cwd=tmp_path, env=env)
    assert done.returncode == 1 and "never migrated" in done.stderr and len(error_lines(done)) == 1


def test_workdir_and_waferwatch_home_read_the_work_folder_settings(migrated_workdir: Path, tmp_path: Path) -> None:
    listed = waferwatch("--workdir", str(migrated_workdir), "models", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    config = waferwatch("config", "--format", "json", cwd=tmp_path, env={"WAFERWATCH_HOME": str(migrated_workdir)})
    assert json.loads(config.stdout)["database_url"] == f"sqlite:///{migrated_workdir / 'results.db'}"
    missing = waferwatch("--workdir", str(tmp_path / "nowhere"), "status", cwd=tmp_path)
    assert missing.returncode == 2 and "--workdir" in missing.stderr


def test_status_offers_only_the_formats_it_prints(tmp_path: Path) -> None:
    help_text = waferwatch("status", "--help", cwd=tmp_path, env={"COLUMNS": "200"}).stdout
    assert "table" in help_text and "html" not in help_text
    assert waferwatch("status", "--format", "html", cwd=tmp_path).returncode == 2


# --- item 7: masks beside images --------------------------------------------------------------------


def test_train_and_score_take_suffix_when_masks_share_the_folder(
    pipeline_model_dir: Path, few_images: Path, tmp_path: Path
) -> None:
    for image in few_images.glob("*.png"):
        Image.new("L", (64, 64)).save(image.with_suffix(".jpg"))  # a "mask" with the image's stem
    train = waferwatch("train", "--images", str(few_images), "--out", str(tmp_path / "m"), cwd=tmp_path)
    assert train.returncode == 2 and "--suffix .jpg or --suffix .png" in train.stderr
    score = waferwatch(
        "score",
        "--model",
        str(pipeline_model_dir),
        str(few_images),
        "--suffix",
        ".png",
        "--format",
        "json",
        cwd=tmp_path,
    )
    assert score.returncode == 0, score.stderr
    assert sorted(row["id"] for row in json.loads(score.stdout)) == sorted(p.stem for p in few_images.glob("*.png"))


# --- item 8: every error one line, before any work ------------------------------------------------------


def test_evaluate_validates_its_folders_before_loading_the_model(few_images: Path, tmp_path: Path) -> None:
    not_a_model = tmp_path / "no-model"  # loading it would fail: the options must fail first
    empty = tmp_path / "empty"
    empty.mkdir()
    done = waferwatch(
        "evaluate", "--model", str(not_a_model), "--good", str(empty), "--bad", str(few_images), cwd=tmp_path
    )
    assert done.returncode == 2 and "--good" in done.stderr and "holds no images" in done.stderr
    assert "empty input array" not in done.stderr
    masks = tmp_path / "masks"
    masks.mkdir()
    done = waferwatch(
        "evaluate", "--model", str(not_a_model), "--good", str(few_images), "--bad", str(few_images),
        "--masks", str(masks), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2 and "--masks" in done.stderr
    assert "tool-07_lot-2026-0042_wafer-19_die-0000_TEST.png" in done.stderr  # names the image


@pytest.mark.parametrize("command", ["score", "evaluate"])
def test_a_misspelt_format_is_refused_before_any_work(few_images: Path, tmp_path: Path, command: str) -> None:
    args = [str(few_images)] if command == "score" else ["--good", str(few_images), "--bad", str(few_images)]
    done = waferwatch(command, "--model", str(tmp_path / "no-model"), *args, "--format", "tabel", cwd=tmp_path)
    assert done.returncode == 2 and "--format" in done.stderr and "manifest" not in done.stderr


# --- item 9: output for people ------------------------------------------------------------------------


def test_score_table_keeps_ids_whole_and_heatmaps_match_the_pipeline(
    pipeline_model_dir: Path, few_images: Path, tmp_path: Path
) -> None:
    from models import FoldEnsemble, load_image_file
    from worker.scoring import heatmap_png

    heatmaps = tmp_path / "heat"
    done = waferwatch(
        "score", "--model", str(pipeline_model_dir), str(few_images), "--heatmaps", str(heatmaps), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    ids = sorted(p.stem for p in few_images.glob("*.png"))
    assert all(image_id in done.stdout for image_id in ids), done.stdout
    assert "…" not in done.stdout
    assert sorted(p.name for p in heatmaps.iterdir()) == [f"{i}.heatmap.png" for i in ids]
    ensemble = FoldEnsemble.load(pipeline_model_dir, device="cpu")
    image = load_image_file(few_images / f"{ids[0]}.png")
    result = ensemble.score_images([image], [ids[0]], with_maps=True)[0]
    pipeline_png = heatmap_png(image, result.anomaly_map, threshold=result.threshold)
    from io import BytesIO

    with Image.open(heatmaps / f"{ids[0]}.heatmap.png") as written, Image.open(BytesIO(pipeline_png)) as stored:
        assert written.size == stored.size


def test_models_list_keeps_versions_whole_at_80_columns(migrated_workdir: Path, tmp_path: Path) -> None:
    from worker import repository
    from worker.db import make_engine, make_session_factory, session_scope

    engine = make_engine(f"sqlite:///{migrated_workdir / 'results.db'}")
    versions = ["9c5cca0f1e2d3c4b", "0a1b2c3d4e5f6a7b-candidate-build"]
    with session_scope(make_session_factory(engine)) as session:
        for version in versions:
            repository.ensure_model_version(
                session, version=version, artifact_uri=f"models/{version}/", threshold=55.8137, fold_thresholds=[1.0]
            )
    engine.dispose()
    done = waferwatch("--workdir", str(migrated_workdir), "models", "list", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert all(version in done.stdout for version in versions), done.stdout


def test_status_prints_no_spurious_kombu_warning(migrated_workdir: Path, tmp_path: Path) -> None:
    done = waferwatch("--workdir", str(migrated_workdir), "status", "--ping-timeout", "0.2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "No hostname was supplied" not in done.stderr


# --- doctor -------------------------------------------------------------------------------------------


def test_doctor_says_what_to_do_and_fails_when_something_is_missing(tmp_path: Path, migrated_workdir: Path) -> None:
    bare = waferwatch("doctor", cwd=tmp_path)
    assert bare.returncode == 1
    database = next(line for line in bare.stdout.splitlines() if " database " in line)
    assert database.startswith("FAIL") and "waferwatch db upgrade" in database
    assert not (tmp_path / "var").exists()
    ready = waferwatch("--workdir", str(migrated_workdir), "doctor", cwd=tmp_path)
    lines = {
        line.split()[1]: line.split()[0] for line in ready.stdout.splitlines() if line[:4] in ("ok  ", "warn", "FAIL")
    }
    assert lines["settings"] == lines["database"] == lines["bucket"] == lines["gpu"] == "ok", ready.stdout
    assert lines["model"] == "FAIL" and ready.returncode == 1  # no active model yet: it says to run the demo
    assert "no active model version" in ready.stdout
