"""Fixtures shared by the recovery tests: a private Redis per test, and the rig that runs against it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

try:
    from processes import PrivateRedis
    from recovery_rig import Rig, make_rig
except ModuleNotFoundError:  # tests/faults became a package
    from tests.faults.processes import PrivateRedis
    from tests.faults.recovery_rig import Rig, make_rig


@pytest.fixture
def rig(
    tmp_path: Path, pg_database_factory: Callable[[], str], redis_server: PrivateRedis, pipeline_model_dir: Path
) -> Rig:
    """A worker environment on a fresh PostgreSQL database and the private Redis, batches of 8."""
    return make_rig(tmp_path, pg_database_factory(), redis_server.url, pipeline_model_dir, batch_size="8")
