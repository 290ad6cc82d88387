"""``waferwatch doctor`` against real services (issue 14): a moto bucket with and without its notification
rule, and a private Redis broker with real Celery workers consuming only some of the routed queues.

Every test runs the command as a subprocess and checks its exit code, as a user or a health check would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

try:
    from tests.faults.processes import PrivateRedis, start_waferwatch, stop_process, wait_log
except ModuleNotFoundError:  # run from inside tests/
    from faults.processes import PrivateRedis, start_waferwatch, stop_process, wait_log

WAFERWATCH = [sys.executable, "-c", "from worker.cli import main; main()"]


def doctor(env: dict[str, str], cwd: Path) -> tuple[int, dict[str, str]]:
    """Exit code and ``{check name: its line}`` of ``waferwatch doctor`` with only ``env``'s WAFERWATCH_* set."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WAFERWATCH_")}
    clean |= {"COLUMNS": "400", "TERM": "dumb"} | env
    done = subprocess.run(
        [*WAFERWATCH, "doctor"], cwd=cwd, env=clean, capture_output=True, text=True, timeout=300, check=False
    )
    lines = {line.split()[1]: line for line in done.stdout.splitlines() if line[:4] in ("ok  ", "warn", "FAIL")}
    assert "settings" in lines, done.stdout + done.stderr
    return done.returncode, lines


@pytest.fixture
def base_env(tmp_path: Path, pipeline_model_dir: Path) -> dict[str, str]:
    """Settings under which every check but the one a test varies passes: a migrated SQLite database, a
    folder broker that exists, a loadable model, the CPU."""
    broker = tmp_path / "broker"
    for folder in ("queue", "processed", "control"):
        (broker / folder).mkdir(parents=True)
    (tmp_path / "storage").mkdir()
    env = {
        "WAFERWATCH_DATABASE_URL": f"sqlite:///{tmp_path / 'results.db'}",
        "WAFERWATCH_STORAGE_ROOT": str(tmp_path / "storage"),
        "WAFERWATCH_BROKER_DIR": str(broker),
        "WAFERWATCH_MODEL_DIR": str(pipeline_model_dir),
        "WAFERWATCH_DEVICE": "cpu",
        "WAFERWATCH_CPU_THREADS": "1",
    }
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WAFERWATCH_")} | env
    upgrade = subprocess.run(
        [*WAFERWATCH, "db", "upgrade"], cwd=tmp_path, env=clean, capture_output=True, text=True, check=False
    )
    assert upgrade.returncode == 0, upgrade.stderr
    return env


# --- the bucket's notification rule ---------------------------------------------------------------------


def test_a_bucket_without_an_objectcreated_rule_for_incoming_fails_and_says_what_to_configure(
    s3_endpoint: str, base_env: dict[str, str], tmp_path: Path
) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="wafers")
    env = base_env | {
        "WAFERWATCH_STORAGE": "s3",
        "WAFERWATCH_S3_ENDPOINT_URL": s3_endpoint,
        "WAFERWATCH_S3_BUCKET": "wafers",
        "WAFERWATCH_S3_ACCESS_KEY": "testing",
        "WAFERWATCH_S3_SECRET_KEY": "testing",
    }

    code, lines = doctor(env, tmp_path)
    assert lines["bucket"].startswith("ok"), lines
    assert code == 1 and lines["events"].startswith("FAIL"), lines
    assert "incoming/" in lines["events"] and "WAFERWATCH_INCOMING_PREFIX" in lines["events"], lines["events"]
    assert "s3:ObjectCreated:*" in lines["events"], lines["events"]

    sqs = boto3.client("sqs", endpoint_url=s3_endpoint, region_name="us-east-1")
    queue_url = sqs.create_queue(QueueName="wafer-events")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket="wafers",
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": queue_arn,
                    "Events": ["s3:ObjectCreated:*"],
                    "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "incoming/"}]}},
                }
            ]
        },
    )
    code, lines = doctor(env, tmp_path)
    assert lines["events"].startswith("ok") and queue_arn in lines["events"], lines
    assert code == 0, lines  # the folder broker has no worker: the queues line warns, which does not fail


def test_doctor_names_the_fast_paths_this_install_has(
    s3_endpoint: str, base_env: dict[str, str], tmp_path: Path
) -> None:
    """A missing compiled fast path costs CPU, not results: the speed line says which are in use, and how
    to get the missing one."""
    from models.png_decoders import PNG_DECODER

    env = base_env | {
        "WAFERWATCH_STORAGE": "s3",
        "WAFERWATCH_S3_ENDPOINT_URL": s3_endpoint,
        "WAFERWATCH_S3_BUCKET": "wafers",
        "WAFERWATCH_S3_ACCESS_KEY": "testing",
        "WAFERWATCH_S3_SECRET_KEY": "testing",
    }

    _, lines = doctor(env, tmp_path)
    if PNG_DECODER == "wuffs":
        assert lines["speed"].startswith("ok") and "PNGs decoded by Wuffs" in lines["speed"], lines["speed"]
    else:
        assert lines["speed"].startswith("warn") and "waferwatch[fast-png]" in lines["speed"], lines["speed"]
    assert "S3 GETs through obstore" in lines["speed"], lines["speed"]

    _, lines = doctor(env | {"WAFERWATCH_S3_FAST_READS": "false"}, tmp_path)
    assert "S3 GETs through boto3 (WAFERWATCH_S3_FAST_READS=false" in lines["speed"], lines["speed"]


# --- which queues live workers consume ------------------------------------------------------------------


def test_doctor_names_a_routed_queue_no_live_worker_consumes(
    redis_server: PrivateRedis, base_env: dict[str, str], tmp_path: Path
) -> None:
    env = base_env | {"WAFERWATCH_BROKER_URL": redis_server.url, "WAFERWATCH_METRICS_PORT": "0"}

    code, lines = doctor(env, tmp_path)  # nobody listening: doctor cannot tell, so it warns
    assert lines["broker"].startswith("ok"), lines
    assert lines["queues"].startswith("warn") and "no worker answered" in lines["queues"], lines
    assert "waferwatch worker" in lines["queues"] and code == 0, lines

    workers: list[subprocess.Popen[bytes]] = []
    try:
        log = tmp_path / "score-worker.log"
        workers.append(
            start_waferwatch(env, log, "worker", "--no-supervise", "--pool", "solo", "--queues", "score", "-n", "s@%h")
        )
        wait_log(workers[-1], log, "ready.")
        code, lines = doctor(env, tmp_path)
        assert code == 1 and lines["queues"].startswith("FAIL"), lines
        queues = lines["queues"]
        assert "ingest" in queues and "waferwatch.reconcile" in queues and "waferwatch.redrive_leases" in queues
        assert "train" in queues and "waferwatch.check_retrain" in queues
        assert "`waferwatch worker --queues ingest`" in queues, queues
        assert "waferwatch.score_batch" not in queues, queues  # score has a consumer

        log = tmp_path / "other-worker.log"
        workers.append(
            start_waferwatch(
                env, log, "worker", "--no-supervise", "--pool", "solo", "--queues", "ingest,train", "-n", "o@%h"
            )
        )
        wait_log(workers[-1], log, "ready.")
        code, lines = doctor(env, tmp_path)
        assert lines["queues"].startswith("ok") and code == 0, lines
        assert all(name in lines["queues"] for name in ("score", "ingest", "train")), lines
    finally:
        for worker in workers:
            stop_process(worker)
