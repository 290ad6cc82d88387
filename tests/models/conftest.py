"""Fixtures over the real image sets in ../shared/datasets (configurable with WAFERWATCH_DATASETS)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.magnetic_tile import DATASETS, MagneticTileSplit, magnetic_tile_split, subsample
from models import FoldEnsemble, PatchCoreConfig


def _require(path: Path) -> Path:
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing on CI: the real-data tests must run there")
        pytest.skip(f"{path} not present on this machine (set WAFERWATCH_DATASETS)")
    return path


@pytest.fixture(scope="session")
def dacon_dir() -> Path:
    return _require(DATASETS / "dacon-semiconductor")


@pytest.fixture(scope="session")
def tile_split() -> MagneticTileSplit:
    _require(DATASETS / "magnetic-tile")
    return magnetic_tile_split()


@pytest.fixture(scope="session")
def small_config() -> PatchCoreConfig:
    """The default recipe at a small coreset ratio, so CI trains in seconds."""
    return PatchCoreConfig(coreset_ratio=0.02, batch_size=16)


@pytest.fixture(scope="session")
def tile_ensemble(tile_split: MagneticTileSplit, small_config: PatchCoreConfig) -> FoldEnsemble:
    """An ensemble trained on 120 real defect-free magnetic tiles."""
    train = subsample(tile_split.train, 120)
    return FoldEnsemble.fit([r.id for r in train], [r.path for r in train], small_config, device="cpu")
