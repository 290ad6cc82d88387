"""Issue 12, row 2: Redis killed while a task is unacknowledged.

In 2 of 4 runs the Celery main process then exits ``Unrecoverable error: AttributeError("'NoneType'
object has no attribute 'hostname'")`` (kombu's Redis transport, celery/celery#9250), and a bare
``waferwatch worker`` stayed dead. The test makes that outcome certain: with a batch claimed, it kills
the private Redis (no persistence: the messages are gone, as after a crash without AOF) and the Celery
main process by PID, then starts Redis again on the same port. Before the fix ``waferwatch worker`` *was*
the Celery main process, so nothing scored again and the test failed; now ``waferwatch worker`` is a
supervisor that restarts Celery with backoff, and the batch whose message Redis lost is re-sent by the
lease redrive (``waferwatch beat``): every image ends with exactly one inference.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import psutil
from sqlalchemy import select

from worker.app import create_app, make_enqueue
from worker.db import session_scope
from worker.schema import Image

try:
    from processes import PrivateRedis, kill_pid, start_waferwatch, stop_process, wait_for, wait_log
    from recovery_rig import Rig
except ModuleNotFoundError:  # tests/faults became a package
    from tests.faults.processes import PrivateRedis, kill_pid, start_waferwatch, stop_process, wait_for, wait_log
    from tests.faults.recovery_rig import Rig


def _celery_main_process(worker_pid: int) -> int:
    """The process running Celery: the supervisor's child, or (without a supervisor) the command itself."""
    children = [p for p in psutil.Process(worker_pid).children() if "--no-supervise" in p.cmdline()]
    return children[0].pid if children else worker_pid


def test_worker_comes_back_after_redis_restart_and_its_lost_batch_is_redriven(
    rig: Rig, redis_server: PrivateRedis, dacon_test_images: list[Path]
) -> None:
    # 60 images in one task: the worker scores 8 in 0.2 s, so a short batch could finish between two polls
    # and never be seen in flight (the kill below is meant to lose it mid-batch).
    before, during = rig.register(dacon_test_images[:4], "before"), rig.register(dacon_test_images[4:64], "during")
    app = create_app(rig.settings(), set_as_current=False)
    log, beat_log = rig.workdir / "worker.log", rig.workdir / "beat.log"
    worker = start_waferwatch(rig.env, log, "worker", "--pool", "solo", "--queues", "score,ingest")
    processes = [worker]
    try:
        wait_log(worker, log, "ready.")
        make_enqueue(app)(before)
        rig.wait_settled(before, timeout_s=90)

        celery_pid = _celery_main_process(worker.pid)
        make_enqueue(app)(during)
        with session_scope(rig.session_factory) as session:
            claimed = select(Image.id).where(Image.id.in_(during), Image.claimed_by.is_not(None))
            seen = wait_for(lambda: bool(session.scalars(claimed).all()), 30, interval_s=0.02)
            assert seen, "the batch was never claimed"
        logged = len(log.read_text(errors="replace"))
        redis_server.kill()
        kill_pid(celery_pid)  # what kombu's AttributeError does to it in half of the runs
        redis_server.start()

        wait_log(worker, log, "ready.", timeout_s=90, after=logged)  # a new Celery process under the supervisor
        assert worker.poll() is None
        assert _celery_main_process(worker.pid) not in (celery_pid, worker.pid)
        with tempfile.TemporaryDirectory() as beat_dir:
            beat = start_waferwatch(rig.env, beat_log, "beat", "--schedule", f"{beat_dir}/schedule")
            processes.append(beat)
            rig.wait_settled(during, timeout_s=90)
    finally:
        for process in reversed(processes):
            stop_process(process)

    assert worker.returncode == 0  # SIGTERM: a warm shutdown of the child, and the supervisor's own exit 0
    assert rig.statuses(before + during) == dict.fromkeys(before + during, ("scored", 1))
    assert sorted(rig.end_state().values()) == [["scored"]] * 64
    assert "supervisor: worker exited with signal SIGKILL; restarting" in log.read_text(errors="replace")
