"""bench/gpu_check.sh refuses clearly, before installing anything, where no GPU is visible."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_exits_2_and_says_why_without_a_gpu(tmp_path: Path) -> None:
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        pytest.skip("a GPU is visible here: the check would run for real")
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "no NVIDIA GPU visible" in result.stderr
    assert not (tmp_path / "out" / "install.log").exists()  # refused before make install
