"""Issue 12, row 12: the solo pool (the GPU default) ignored ``task_time_limit``.

A real ``waferwatch worker --no-supervise --pool solo`` scores from an S3 endpoint that accepts
connections and never answers (a hung call; boto3 would wait its 30 s read timeout, and retry).
``task_time_limit_s`` is 3 s. Before the fix the task simply ran on (the worker was still alive after
20 s and this test failed); now the watchdog thread ends the process with exit code 70 within a few
seconds of the limit, and the expired lease re-drives the batch's image.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from worker.db import session_scope
from worker.leases import redrive_expired
from worker.schema import Image
from worker.watchdog import WATCHDOG_EXIT_CODE

try:
    from processes import PrivateRedis, start_waferwatch, stop_process, wait_for, wait_log
    from recovery_rig import Rig, make_rig
except ModuleNotFoundError:  # tests/faults became a package
    from tests.faults.processes import PrivateRedis, start_waferwatch, stop_process, wait_for, wait_log
    from tests.faults.recovery_rig import Rig, make_rig


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An endpoint whose TCP connections are accepted by the kernel (backlog) and never answered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.fixture
def rig(tmp_path: Path, pg_database_factory: Callable[[], str], pipeline_model_dir: Path) -> Iterator[Rig]:
    redis_server = PrivateRedis(tmp_path / "redis")
    redis_server.start()
    yield make_rig(tmp_path, pg_database_factory(), redis_server.url, pipeline_model_dir)
    redis_server.kill()


def test_solo_worker_hung_in_a_call_exits_70_and_its_image_is_redriven(
    rig: Rig, black_hole: str, dacon_test_images: list[Path], pipeline_model_dir: Path
) -> None:
    ids = rig.register(dacon_test_images[:1], "hung")
    from worker.app import create_app, make_enqueue

    app = create_app(rig.settings(), set_as_current=False)
    env = {
        **rig.env,
        "WAFERWATCH_STORAGE": "s3",
        "WAFERWATCH_S3_ENDPOINT_URL": black_hole,
        "WAFERWATCH_S3_BUCKET": rig.store.bucket,
        "WAFERWATCH_MODEL_DIR": str(pipeline_model_dir),  # the model loads from disk; the image fetch hangs
        "WAFERWATCH_TASK_TIME_LIMIT_S": "3",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
    }
    log = rig.workdir / "worker.log"
    worker = start_waferwatch(env, log, "worker", "--no-supervise", "--pool", "solo", "--queues", "score")
    try:
        wait_log(worker, log, "ready.")
        make_enqueue(app)(ids)
        sent = time.monotonic()
        assert wait_for(lambda: worker.poll() is not None, 20), "the hung solo worker was never stopped"
        exited_s = time.monotonic() - sent
    finally:
        stop_process(worker)

    assert worker.returncode == WATCHDOG_EXIT_CODE, log.read_text(errors="replace")[-3000:]
    assert "watchdog: task waferwatch.score_batch" in log.read_text(errors="replace")
    assert exited_s < 15, exited_s
    with session_scope(rig.session_factory) as session:
        status, lease_until = session.execute(select(Image.status, Image.lease_until).where(Image.id == ids[0])).one()
    assert status == "queued" and lease_until is not None  # claimed by the worker that hung
    sent_again: list[list[int]] = []
    assert wait_for(
        lambda: bool(redrive_expired(rig.session_factory, enqueue=sent_again.append, max_redrives=5).redriven), 10
    )
    assert sent_again == [ids]
