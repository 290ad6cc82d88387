"""``waferwatch worker`` asked for CUDA where torch sees no GPU: one line and exit 1, before consuming anything.

Runs as the current user (the non-root variant lives in test_services_as_user.py), so it also runs where
the tests are not root. Without this check a GPU worker started on a host whose driver is too old for the
torch build (or with no GPU reserved) looked healthy and failed every batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.device import device_problem

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def no_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_worker_refuses_cuda_without_a_gpu_in_one_line(no_gpu: None, device: str, tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("WAFERWATCH_")}
    env.update(WAFERWATCH_DEVICE=device, WAFERWATCH_BROKER_URL="redis://127.0.0.1:6379/11")
    result = subprocess.run(
        [str(BIN / "waferwatch"), "worker", "--queues", "score,ingest"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"worker: {device_problem(device)}"], result.stderr
    assert f"WAFERWATCH_DEVICE={device} but torch" in lines[0] and "WAFERWATCH_DEVICE=cpu" in lines[0]
    assert not (tmp_path / "var").exists(), "nothing is created before the check"


def test_cpu_and_auto_need_no_gpu() -> None:
    assert device_problem("cpu") is None
    assert device_problem("auto") is None
