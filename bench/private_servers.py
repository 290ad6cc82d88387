"""A benchmark's own PostgreSQL and Redis, started on chosen cores, stopped by PID.

The pinned pipeline benchmark puts every server on one core and the worker on another, so the shared
127.0.0.1:5432 / :6379 instances (which tests and other sessions use) are never re-pinned: these are
throw-away ones on free ports. The recovery tests (``tests/faults/processes.py``) build their restartable
servers from the same pieces (:func:`free_port`, :func:`redis_answers`, :func:`postgres_binary`,
:func:`as_postgres_user`); these fail with a plain exception instead of a test outcome.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "PinnedPostgres",
    "PinnedRedis",
    "as_postgres_user",
    "free_port",
    "pin_process_tree",
    "postgres_binary",
    "redis_answers",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pin_process_tree(pid: int, cores: set[int]) -> int:
    """Every thread of ``pid`` and its descendants on ``cores`` (``sched_setaffinity`` is per thread, so
    threads started before a process was pinned keep their old mask otherwise); returns threads pinned."""
    import psutil

    pinned = 0
    root = psutil.Process(pid)
    for process in (root, *root.children(recursive=True)):
        try:
            for thread in process.threads():
                os.sched_setaffinity(thread.id, cores)
                pinned += 1
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return pinned


def redis_answers(port: int) -> bool:
    """Whether a Redis server on 127.0.0.1:``port`` answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def postgres_binary(name: str) -> str | None:
    """``initdb``, ``pg_ctl``…: on PATH, else in Debian's /usr/lib/postgresql/<version>/bin; None if absent."""
    found = shutil.which(name) or next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    return None if found is None else str(found)


def as_postgres_user(*paths: Path) -> dict[str, object]:
    """``subprocess`` arguments that run the PostgreSQL tools as the ``postgres`` user when we are root
    (initdb refuses root), owning ``paths`` that exist; nothing otherwise."""
    if os.geteuid() != 0:
        return {}
    import pwd

    user = pwd.getpwnam("postgres")
    for path in paths:
        if path.exists():
            shutil.chown(path, user.pw_uid, user.pw_gid)
    return {"user": user.pw_uid, "group": user.pw_gid, "cwd": paths[0]}


def _on(cores: set[int]) -> Callable[[], None]:
    return lambda: os.sched_setaffinity(0, cores)


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {timeout_s:.0f} s")
        time.sleep(0.1)


class PinnedRedis:
    """``redis-server`` on a free port and ``cores``, nothing persisted."""

    def __init__(self, workdir: Path, cores: set[int]) -> None:
        self.workdir, self.cores, self.port = workdir, cores, free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PinnedRedis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with (self.workdir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_on(self.cores)
            )
        _wait(lambda: redis_answers(self.port), 15, f"redis-server on port {self.port} (log: {self.workdir})")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class PinnedPostgres:
    """A cluster of its own (``initdb`` + ``pg_ctl``) on a free port and ``cores``, trust auth, fsync off."""

    def __init__(self, workdir: Path, cores: set[int]) -> None:
        self.workdir, self.cores, self.port = workdir, cores, free_port()

    @staticmethod
    def binary(name: str) -> str:
        found = postgres_binary(name)
        if found is None:
            raise RuntimeError(f"{name} not found: the pinned benchmark starts a PostgreSQL cluster of its own")
        return found

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> PinnedPostgres:
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = self.workdir / "pgdata"
        as_postgres = self._as_postgres()
        subprocess.run(
            [self.binary("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
            check=True,
            capture_output=True,
            **as_postgres,
        )
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.workdir} -c fsync=off"
        subprocess.run(
            [self.binary("pg_ctl"), "-D", str(data), "-o", options, "-l", str(self.workdir / "pg.log"), "-w", "start"],
            check=True,
            capture_output=True,
            preexec_fn=_on(self.cores),
            **as_postgres,
        )
        return self

    def stop(self) -> None:
        """Stop the cluster at once and delete its folder (it holds nothing worth keeping)."""
        subprocess.run(
            [self.binary("pg_ctl"), "-D", str(self.workdir / "pgdata"), "-m", "immediate", "-w", "stop"],
            check=False,
            capture_output=True,
            **self._as_postgres(),
        )
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _as_postgres(self) -> dict[str, object]:
        return as_postgres_user(self.workdir, self.workdir / "pgdata")
