"""Issue 12, row 1: ``kill -9`` of the worker's main process mid-batch.

A real ``waferwatch worker --no-supervise --pool solo`` (the GPU default, where the main process is the
scoring process) on a private Redis is killed by PID while its batch's rows are claimed; a second worker
and a real ``waferwatch beat`` take over. Before the fix the dead worker's message stayed in Redis's
``unacked`` hash until the 2-hour visibility timeout (reconcile only after 15-25 min): its images stayed
``queued`` and this test timed out. Now the lease on the rows expires (``lease_s`` 3 s here, 60 s by
default) and ``waferwatch.redrive_leases`` re-sends them: every image ends with exactly one inference.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from sqlalchemy import select

from worker.app import create_app, make_enqueue
from worker.db import session_scope
from worker.schema import Image

try:
    from processes import kill_pid, start_waferwatch, stop_process, wait_for, wait_log
    from recovery_rig import Rig
except ModuleNotFoundError:  # tests/faults became a package
    from tests.faults.processes import kill_pid, start_waferwatch, stop_process, wait_for, wait_log
    from tests.faults.recovery_rig import Rig


def _claimed(rig: Rig, ids: list[int]) -> list[int]:
    with session_scope(rig.session_factory) as session:
        return list(session.scalars(select(Image.id).where(Image.id.in_(ids), Image.claimed_by.is_not(None))))


def test_images_of_a_killed_worker_are_redriven_within_seconds(rig: Rig, dacon_test_images: list[Path]) -> None:
    first, second = rig.register(dacon_test_images[:8], "a"), rig.register(dacon_test_images[8:16], "b")
    app = create_app(rig.settings(), set_as_current=False)
    log_a, log_b, log_beat = (rig.workdir / name for name in ("worker-a.log", "worker-b.log", "beat.log"))
    worker_a = start_waferwatch(
        rig.env, log_a, "worker", "--no-supervise", "--pool", "solo", "--queues", "score,ingest"
    )
    processes = [worker_a]
    try:
        wait_log(worker_a, log_a, "ready.")
        make_enqueue(app)(first)
        make_enqueue(app)(second)
        assert wait_for(lambda: bool(_claimed(rig, first)), 60), "worker A never claimed its batch"
        kill_pid(worker_a.pid)  # mid-batch: claimed, the model is loading or scoring, nothing acked
        worker_a.wait(timeout=10)
        killed_at = time.monotonic()
        assert any(status == "queued" for status, _ in rig.statuses(first).values()), "batch finished before the kill"

        worker_b = start_waferwatch(
            rig.env, log_b, "worker", "--no-supervise", "--pool", "solo", "--queues", "score,ingest"
        )
        processes.append(worker_b)
        with tempfile.TemporaryDirectory() as beat_dir:
            beat = start_waferwatch(rig.env, log_beat, "beat", "--schedule", f"{beat_dir}/schedule")
            processes.append(beat)
            rig.wait_settled(first + second, timeout_s=120)
        recovered_s = time.monotonic() - killed_at
    finally:
        for process in reversed(processes):
            stop_process(process)

    assert rig.statuses(first + second) == dict.fromkeys(first + second, ("scored", 1))
    assert sorted(rig.end_state().values()) == [["scored"]] * 16
    # lease 3 s + redrive every 1 s + a fresh worker loading the model; the 2-hour visibility timeout is not it
    assert recovered_s < 90, recovered_s
    with session_scope(rig.session_factory) as session:
        redrives = dict(session.execute(select(Image.id, Image.redrives).where(Image.id.in_(first + second))).all())
        leased = session.scalars(select(Image.id).where(Image.lease_until.is_not(None))).all()
    assert {redrives[i] for i in first} == {1} and {redrives[i] for i in second} == {0}
    assert leased == []  # finished rows release their lease
