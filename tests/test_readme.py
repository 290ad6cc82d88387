"""The README tells a new user what the tool does: how to reach the CLI, the demo's data, every option."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _help(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAFERWATCH_")} | {"COLUMNS": "200"}
    command = [sys.executable, "-c", "from worker.cli import main; main()", *args, "--help"]
    return subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout


def test_readme_says_how_to_reach_the_cli_and_the_demos_data() -> None:
    assert "source .venv/bin/activate" in README
    assert "--workdir runs/demo" in README and "WAFERWATCH_HOME" in README
    assert "runs/demo/.env" in README
    assert "waferwatch doctor" in README and "--install-completion" in README


def test_readme_lists_every_train_option() -> None:
    text = _help("train")
    options = sorted(set(re.findall(r"^│\s+\*?\s*(--[a-z][a-z-]+)", text, flags=re.MULTILINE)) - {"--help"})
    assert "--images" in options and "--batch-size" in options
    missing = [option for option in options if option not in README]
    assert not missing, f"README does not mention {missing}"


def test_readme_mentions_align_only_where_it_exists() -> None:
    for line in README.splitlines():
        if "--align" in line:
            assert "bench_" in line or "--align" in _help("train"), f"--align is no CLI option: {line}"


def test_readme_training_times_name_their_machine() -> None:
    lines = README.splitlines()
    timed = [i for i, line in enumerate(lines) if "training" in line.lower() and re.search(r"\d s\b", line)]
    assert timed
    for i in timed:
        context = " ".join(lines[max(0, i - 12) : i + 1])
        assert "CPU-core development machine" in context, f"no machine named for: {lines[i]}"
