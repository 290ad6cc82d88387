"""bench/gpu_check.sh refuses clearly, before installing anything: with no GPU visible, or an incomplete bundle."""

from __future__ import annotations

import os
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


def test_gpu_check_names_the_missing_part_of_a_bundle_and_how_to_build_it(tmp_path: Path) -> None:
    """An offline GPU box runs the check from a bundle; an incomplete one is refused before any install."""
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    (bundle / "datasets").mkdir()
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_BUNDLE": str(bundle)}
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert f"{bundle}/bench-cache is missing" in result.stderr
    assert "bench/gpu_bundle.py" in result.stderr
    assert "REHEARSAL" in result.stdout  # a CPU run never passes for a GPU one
    assert not (tmp_path / "out" / "install.log").exists()
