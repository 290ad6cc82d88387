"""Real processes for the recovery tests: private Redis and PostgreSQL servers, ``waferwatch`` workers.

Every server here is this test's own (a free port, a temporary folder), so killing or restarting it never
touches the shared 127.0.0.1:5432 / :6379 instances; every process is stopped by the PID it was started
with. Workers run the product's own command line (``waferwatch worker``) with ``WAFERWATCH_*`` variables,
as in a deployment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from bench.private_servers import as_postgres_user, free_port, postgres_binary, redis_answers

__all__ = [
    "PrivatePostgres",
    "PrivateRedis",
    "free_port",
    "kill_pid",
    "start_waferwatch",
    "stop_process",
    "wait_for",
    "wait_log",
]


def wait_for(predicate: Callable[[], bool], timeout_s: float, *, interval_s: float = 0.25) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout_s`` passed (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def kill_pid(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Send ``sig`` to one process this test started (never by name)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


@dataclass
class PrivateRedis:
    """``redis-server`` on a free port, no persistence: a restart loses every message, as a crash can."""

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with (self.workdir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(command, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)
        if not wait_for(lambda: redis_answers(self.port), 15):
            pytest.fail(f"private redis did not start:\n{(self.workdir / 'redis.log').read_text()[-2000:]}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            kill_pid(self.process.pid)
            self.process.wait(timeout=10)


@dataclass
class PrivatePostgres:
    """A cluster of its own (``initdb`` + ``pg_ctl -o "-p N"``), trust authentication, on a free port."""

    workdir: Path
    port: int = field(default_factory=free_port)

    @staticmethod
    def binary(name: str) -> str:
        found = postgres_binary(name)
        if found is None:
            pytest.skip(f"{name} not found: the PostgreSQL outage test needs a private cluster")
        return found

    @property
    def data(self) -> Path:
        return self.workdir / "pgdata"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [self.binary("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync"],
            check=True,
            capture_output=True,
            **self._as_postgres(),
        )

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.workdir} -c fsync=off"
        subprocess.run(
            [
                self.binary("pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                str(self.workdir / "pg.log"),
                "-w",
                "start",
            ],
            check=True,
            capture_output=True,
            **self._as_postgres(),
        )

    def stop(self) -> None:
        """``pg_ctl stop -m immediate``: the server is gone at once, as in a crash."""
        subprocess.run(
            [self.binary("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
            check=False,
            capture_output=True,
            **self._as_postgres(),
        )

    def _as_postgres(self) -> dict[str, object]:
        return as_postgres_user(self.workdir, self.data)


def start_waferwatch(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """``waferwatch <args>`` with this environment less its ``WAFERWATCH_*`` variables, plus ``env``."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("WAFERWATCH_")}
    child_env.update(env)
    command = [sys.executable, "-c", "from worker.cli import main; main()", *args]
    with log.open("ab") as out:
        return subprocess.Popen(command, env=child_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait_log(
    process: subprocess.Popen[bytes], log: Path, text: str, timeout_s: float = 90.0, *, after: int = 0
) -> None:
    """Until ``text`` appears in ``log`` after byte ``after`` (fails if the process ends first)."""
    if not wait_for(lambda: text in log.read_text(errors="replace")[after:] or process.poll() is not None, timeout_s):
        pytest.fail(f"{text!r} not logged in {timeout_s} s:\n{log.read_text(errors='replace')[-3000:]}")
    if text not in log.read_text(errors="replace")[after:]:
        pytest.fail(f"process ended ({process.returncode}) before {text!r}:\n{log.read_text(errors='replace')[-3000:]}")


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    """SIGTERM, then SIGKILL to the process and its children (all started by this test)."""
    if process.poll() is None:
        try:
            children = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_pid(process.pid)
            process.wait(timeout=10)
        for child in children:
            kill_pid(child.pid)
