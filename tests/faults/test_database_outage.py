"""Issue 12, row 3: PostgreSQL down while batches wait.

A real solo worker scores against a private PostgreSQL cluster (``initdb`` + ``pg_ctl`` on a free port),
which is stopped (``-m immediate``, as in a crash) before a batch is sent and started again 12 s later.
Before the fix the task's 5 attempts (backoff 0.5 s doubling to 2 s, as here) were spent in about 5 s,
``record_gave_up`` wrote to the database that was down, and the message was acknowledged: the images
stayed ``queued`` with no failures row and this test failed. Now a batch retries transient errors for
``retry_total_s`` (60 s here, 900 s by default) and is never acknowledged while its images are in no
terminal state; once the database is back they are scored, exactly once.

The ``faults_long`` variant (``make faults``) is the issue's 25 s outage against a worker whose retry
budget (1 s) is spent while the database is still down: it must not ack either, and ends every image in
an explained state once the database is back.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.app import create_app, make_enqueue

try:
    from processes import PrivatePostgres, PrivateRedis, start_waferwatch, stop_process, wait_log
    from recovery_rig import Rig, make_rig
except ModuleNotFoundError:  # tests/faults became a package
    from tests.faults.processes import PrivatePostgres, PrivateRedis, start_waferwatch, stop_process, wait_log
    from tests.faults.recovery_rig import Rig, make_rig


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    workdir = Path(tempfile.mkdtemp(prefix="waferwatch-pg-"))  # not under pytest's root-only tmp folders
    server = PrivatePostgres(workdir)
    server.init()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def _outage(rig: Rig, postgres: PrivatePostgres, images: list[Path], *, outage_s: float) -> dict[int, tuple[str, int]]:
    """Warm the worker up, stop PostgreSQL, send a batch, start PostgreSQL after ``outage_s``, let it settle."""
    warm, batch = rig.register(images[:2], "warm"), rig.register(images[2:10], "outage")
    app = create_app(rig.settings(), set_as_current=False)
    log = rig.workdir / "worker.log"
    worker = start_waferwatch(rig.env, log, "worker", "--no-supervise", "--pool", "solo", "--queues", "score")
    try:
        wait_log(worker, log, "ready.")
        make_enqueue(app)(warm)
        rig.wait_settled(warm, timeout_s=90)
        rig.session_factory.kw["bind"].dispose()
        postgres.stop()
        make_enqueue(app)(batch)
        time.sleep(outage_s)
        postgres.start()
        rig.wait_settled(batch, timeout_s=90)
        assert worker.poll() is None, log.read_text(errors="replace")[-3000:]
    finally:
        stop_process(worker)
    return rig.statuses(warm + batch)


def test_batch_outlasts_a_database_outage_and_is_scored_once(
    tmp_path: Path,
    postgres: PrivatePostgres,
    redis_server: PrivateRedis,
    pipeline_model_dir: Path,
    dacon_test_images: list[Path],
) -> None:
    rig = make_rig(tmp_path, postgres.url, redis_server.url, pipeline_model_dir, retry_total_s="60")
    statuses = _outage(rig, postgres, dacon_test_images, outage_s=12)
    assert statuses == dict.fromkeys(statuses, ("scored", 1))
    assert sorted(rig.end_state().values()) == [["scored"]] * 10


@pytest.mark.faults_long
def test_retry_budget_spent_during_the_outage_never_acks_a_queued_batch(
    tmp_path: Path,
    postgres: PrivatePostgres,
    redis_server: PrivateRedis,
    pipeline_model_dir: Path,
    dacon_test_images: list[Path],
) -> None:
    rig = make_rig(tmp_path, postgres.url, redis_server.url, pipeline_model_dir, retry_total_s="1")
    statuses = _outage(rig, postgres, dacon_test_images, outage_s=25)
    assert all(status in ("scored", "failed") for status, _ in statuses.values()), statuses
    assert len(rig.end_state()) == 10  # each one explained: one inference, or failed with its failures row
