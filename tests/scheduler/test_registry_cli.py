"""The registry's command line through real subprocesses (exit codes included), on SQLite and a folder bucket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from worker import repository
from worker.db import make_engine, make_session_factory, session_scope, upgrade_database
from worker.schema import Image, ModelVersion


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from worker.cli import main; main()", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    url = f"sqlite:///{tmp_path / 'waferwatch.db'}"
    upgrade_database(url)
    (tmp_path / "bucket").mkdir()  # the folder store opens an existing root (a mounted share), never creates it
    env = {key: value for key, value in os.environ.items() if not key.startswith("WAFERWATCH_")}
    env.update(
        {
            "WAFERWATCH_DATABASE_URL": url,
            "WAFERWATCH_STORAGE": "folder",
            "WAFERWATCH_STORAGE_ROOT": str(tmp_path / "bucket"),
            "WAFERWATCH_S3_BUCKET": "fab",
            "COLUMNS": "80",
        }
    )
    return env


def _flat(text: str) -> str:
    """Rich wraps messages at the terminal width (80 here): compare them with whitespace collapsed."""
    return " ".join(text.split())


def _factory(env: dict[str, str]):
    return make_session_factory(make_engine(env["WAFERWATCH_DATABASE_URL"]))


def test_models_register_verifies_uploads_and_pools_the_training_images(
    cli_env: dict[str, str], pipeline_model_dir: Path, dacon_data: Path, tmp_path: Path
) -> None:
    version = json.loads((pipeline_model_dir / "manifest.json").read_text())["version"]
    result = _cli(cli_env, "models", "promote", version, "--author", "kim")
    assert result.returncode == 1 and "models register DIR" in _flat(result.stderr)  # nothing brings it in yet

    tampered = tmp_path / "tampered"
    shutil.copytree(pipeline_model_dir, tampered)
    bank = tampered / "fold_0.safetensors"
    bank.write_bytes(bank.read_bytes()[:-8] + b"\0" * 8)
    result = _cli(cli_env, "models", "register", str(tampered))
    assert result.returncode == 1 and "is not a valid model directory" in _flat(result.stderr)

    result = _cli(cli_env, "models", "register", str(pipeline_model_dir), "--images", str(dacon_data / "train.csv"),
                  "--activate", "--author", "kim", "--reason", "first model of line 3")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{version} active (new)" in _flat(result.stderr)
    assert "20 training images in the pool" in _flat(result.stderr)
    bucket = Path(cli_env["WAFERWATCH_STORAGE_ROOT"])  # the folder is the bucket
    assert (bucket / "models" / version / "manifest.json").is_file()
    assert len(list((bucket / "nominal" / version).glob("*.png"))) == 20
    factory = _factory(cli_env)
    with session_scope(factory) as session:
        images = session.scalars(select(Image)).all()
        assert len(images) == 20 and {(i.kind, i.status) for i in images} == {("nominal", "pooled")}
        assert session.get(ModelVersion, version).status == "active"

    show = _cli(cli_env, "models", "show", version)
    assert show.returncode == 0, show.stderr
    history = json.loads(show.stdout)["history"]
    assert [(e["event"], e["actor"]) for e in history] == [("registered", "kim"), ("promoted", "kim")]
    assert history[0]["details"]["training_images_uploaded"] == 20
    assert history[1]["reason"] == "first model of line 3" and history[1]["details"]["how"] == "register"


def test_models_list_never_truncates_ids_and_promote_over_a_failed_gate_needs_force(
    cli_env: dict[str, str],
) -> None:
    long_id = "candidate-" + "0123456789abcdef" * 4
    held = {"gate": {"passed": False, "reasons": ["synthetic_recall 0.1000 < bound 0.3000"]}}
    factory = _factory(cli_env)
    with session_scope(factory) as session:
        repository.ensure_model_version(session, version="v1", artifact_uri="models/v1/", status="active")
        repository.ensure_model_version(session, version=long_id, artifact_uri="models/c/", metrics=held)
        repository.update_model_version(session, version=long_id, reason="gate: synthetic_recall " + "x" * 200)

    listing = _cli(cli_env, "models", "list")
    assert listing.returncode == 0, listing.stderr
    assert long_id in listing.stdout  # whole, on one line, at 80 columns

    refused = _cli(cli_env, "models", "promote", long_id, "--author", "lee")
    assert refused.returncode == 1 and "--force" in _flat(refused.stderr)
    forced = _cli(cli_env, "models", "promote", long_id, "--author", "lee", "--force", "--reason", "line 3 tonight")
    assert forced.returncode == 0, forced.stderr
    assert "(gate overridden)" in _flat(forced.stderr)
    data = json.loads(_cli(cli_env, "models", "show", long_id).stdout)
    assert data["status"] == "active" and data["reason"].startswith("gate overridden by lee: line 3 tonight")
    promoted = data["history"][-1]
    assert promoted["event"] == "promoted" and promoted["actor"] == "lee"
    assert promoted["details"]["gate_overridden"] is True
    assert promoted["details"]["gate_reasons"] == ["synthetic_recall 0.1000 < bound 0.3000"]
