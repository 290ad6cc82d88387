"""Each compose service's command, run here as a non-root user laid out like the image's, with the
environment compose gives it, until it reaches its ready state (issue 14: "tests that stand in for Docker").

The layout comes from the Dockerfile's runtime stage (:func:`compose_model.runtime_layout`), rebased under a
temporary root: the WORKDIR (``/app``) exists, owned by root unless the Dockerfile hands it to the user; the
directories it creates for the user (``install -d -o USER``) and copies owned by the user (``TORCH_HOME``)
are the user's; the user's home is its own. A throwaway user (``useradd``, so the tests need root and skip
otherwise) runs each command through ``setpriv`` in that WORKDIR, so a path the image's user could not
write fails here the same way (before the fix: beat could not create ``var/``, the worker and trainer no
``var/model-cache``).

The environment is the service's ``environment`` in docker-compose.yml, interpolated with ``.env.example``
and with the hosts pointed at the stand-ins: the local PostgreSQL (a throw-away database; the local server
trusts the ``postgres`` user, so the URL's credentials are replaced), Redis database 11 (no password there)
and the moto S3 server of ``tests/conftest.py`` as the bucket. Ports that compose fixes (8088, 9100) are
moved to free ones, and so are the same ports in the service's health check, which is run as the user.
The worker gets ``WAFERWATCH_DEVICE=cpu`` (no GPU here) except in the test of its CUDA start-up check.
Processes are started in their own session and killed by process group; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
import redis
from compose_model import REPO_ROOT, RuntimeLayout, env_example, load_compose, runtime_layout, service_command
from compose_model import service_environment as compose_environment
from sqlalchemy import select
from sqlalchemy.engine import make_url

from worker.settings import normalize_database_url

BROKER_URL = "redis://127.0.0.1:6379/11"  # a database no other test uses
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.timeout(900)


@dataclass
class ImageUser:
    """A throwaway user and the image's directory layout under ``root``."""

    name: str
    uid: int
    gid: int
    root: Path
    layout: RuntimeLayout
    bin_dir: Path = VENV_BIN  # where `waferwatch` and `python` are found (the image's /opt/venv/bin)
    library_path: str | None = None  # LD_LIBRARY_PATH for an interpreter copied out of a private folder

    def path(self, image_path: str) -> Path:
        """Where ``image_path`` of the image lives here."""
        return self.root / image_path.lstrip("/")

    @property
    def workdir(self) -> Path:
        return self.path(self.layout.workdir)

    def argv(self, command: list[str]) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--", *command]


@pytest.fixture(scope="module")
def image_user() -> Iterator[ImageUser]:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a throwaway user (useradd) and runs each service as that user")
    for tool in ("useradd", "userdel", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    layout = runtime_layout()
    root = Path(tempfile.mkdtemp(prefix="waferwatch-image-"))
    root.chmod(0o755)  # the user must reach its folders; mkdtemp makes 0700
    name = f"ww{uuid.uuid4().hex[:8]}"
    home = root / layout.home.lstrip("/")
    home.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["useradd", "--create-home", "--home-dir", str(home), "--shell", "/usr/sbin/nologin", "--user-group", name],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    entry = pwd.getpwnam(name)
    user = ImageUser(name, entry.pw_uid, entry.pw_gid, root, layout)
    try:
        user.workdir.mkdir(parents=True, exist_ok=True)  # WORKDIR creates it, owned by root
        for folder in layout.owned_dirs:
            path = user.path(folder)
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, user.uid, user.gid)
        _give_an_interpreter(user)
        yield user
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _can_run_the_venv(user: ImageUser, bin_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    version = tuple(sys.version_info[:3])
    probe = f"import sys; assert sys.version_info[:3] == {version!r}, sys.version; import redis, worker.cli"
    return subprocess.run(
        user.argv([str(bin_dir / "python"), "-c", probe]), env=env, cwd="/", capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


def _give_an_interpreter(user: ImageUser) -> None:
    """Make sure the user runs this venv's interpreter, as the image's user runs /opt/venv's.

    Where the interpreter lives in a folder the user cannot enter (a pyenv build under /root), it is linked
    (hard links: no copy) to ``<root>/opt/python`` without its site-packages, and ``<root>/opt/venv`` is a
    venv on it whose site-packages adds this venv's. The packages are the same files either way.
    """
    env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "HOME": "/"}
    if _can_run_the_venv(user, VENV_BIN, env).returncode == 0:
        return
    base = Path(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    python = user.root / "opt" / "python"

    def skip_site_packages(folder: str, names: list[str]) -> set[str]:
        if Path(folder) == base / "lib" / version:
            return {name for name in names if name in ("site-packages", "test") or name.startswith("config-")}
        return set()

    try:
        shutil.copytree(base, python, symlinks=True, copy_function=os.link, ignore=skip_site_packages)
    except OSError as exc:
        pytest.skip(f"the venv's interpreter under {base} is not reachable by another user and cannot be linked: {exc}")
    venv = user.root / "opt" / "venv"
    site = venv / "lib" / version / "site-packages"
    site.mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "bin" / "python").symlink_to(python / "bin" / Path(sys.executable).resolve().name)
    (venv / "pyvenv.cfg").write_text(f"home = {python / 'bin'}\ninclude-system-site-packages = false\n")
    shared = next(
        path for path in map(Path, sys.path) if path.name == "site-packages" and path.is_relative_to(sys.prefix)
    )
    (site / "shared-venv.pth").write_text(f"import site; site.addsitedir({str(shared)!r})\n")
    for script in ("waferwatch", "celery"):
        module = "worker.cli" if script == "waferwatch" else "celery.__main__"
        (venv / "bin" / script).write_text(
            f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom {module} import main\nsys.exit(main())\n"
        )
        (venv / "bin" / script).chmod(0o755)
    user.bin_dir = venv / "bin"
    user.library_path = str(python / "lib")
    env.update(PATH=f"{user.bin_dir}:/usr/bin:/bin", LD_LIBRARY_PATH=user.library_path)
    probe = _can_run_the_venv(user, user.bin_dir, env)
    if probe.returncode != 0:
        pytest.skip(f"the throwaway user cannot run this venv's interpreter: {probe.stderr[-500:]}")


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]


@pytest.fixture
def broker(redis_client: redis.Redis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(BROKER_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def bucket(s3_endpoint: str, services: dict[str, dict[str, Any]]) -> str:
    """The compose bucket on the emptied moto server, with minio-init's prefixes (minio-init's job)."""
    name = compose_environment(services["worker"], env_example())["WAFERWATCH_S3_BUCKET"]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=name)
    for prefix in ("incoming", "nominal", "heatmaps", "models"):
        s3.put_object(Bucket=name, Key=f"{prefix}/.keep", Body=b"\n")
    return name


def container_environment(
    service: dict[str, Any], user: ImageUser, *, database_url: str, s3_endpoint: str, **overrides: str
) -> dict[str, str]:
    """What the container's process would see, with the stand-ins for postgres, redis and minio."""
    variables = {**env_example(), "POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": "5432", "REDIS_HOST": "127.0.0.1",
                 "REDIS_PORT": "6379", "S3_ENDPOINT_URL": s3_endpoint}  # fmt: skip
    env = compose_environment(service, variables)
    database = make_url(normalize_database_url(env["WAFERWATCH_DATABASE_URL"]))
    assert (database.host, database.port) == ("127.0.0.1", 5432), "the database host comes from POSTGRES_HOST"
    env["WAFERWATCH_DATABASE_URL"] = database_url  # the local server's trusted user and a throw-away database
    broker_url = urlsplit(env["WAFERWATCH_BROKER_URL"])
    assert (broker_url.hostname, broker_url.port) == ("127.0.0.1", 6379), "the broker host comes from REDIS_HOST"
    env["WAFERWATCH_BROKER_URL"] = BROKER_URL  # the local Redis has no password
    assert env["WAFERWATCH_S3_ENDPOINT_URL"] == s3_endpoint
    for key, value in user.layout.env.items():
        if key != "PATH":
            env[key] = str(user.path(value)) if value.startswith("/") else value
    if user.library_path:
        env["LD_LIBRARY_PATH"] = user.library_path
    env.update(
        PATH=f"{user.bin_dir}:/usr/bin:/bin",  # the image's /opt/venv/bin
        HOME=str(user.path(user.layout.home)),
        USER=user.name,
        LANG="C.UTF-8",
        PYTHONPATH=str(REPO_ROOT),  # this checkout's code, as the image installs it
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.update(overrides)
    return env


@contextmanager
def running(user: ImageUser, argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` as the user in the WORKDIR, in a session of its own; killed (its process group) afterwards."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            user.argv(argv), env=env, cwd=user.workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield process
        finally:
            _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError):  # prefork children may outlive the parent by a moment
            os.killpg(process.pid, signal.SIGKILL)
        return


def run_as(
    user: ImageUser, argv: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        user.argv(argv), env=env, cwd=user.workdir, capture_output=True, text=True, timeout=timeout, check=False
    )


def wait_for(
    condition: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, what: str, timeout_s: float = 180
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"{what}: the process exited ({process.returncode}):\n{_tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout_s} s:\n{_tail(log)}")
        time.sleep(0.5)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"


def healthcheck(service: dict[str, Any], ports: dict[int, int]) -> list[str]:
    """The service's health check as argv (``CMD`` form), with compose's fixed ports moved to ``ports``."""
    test = [str(word) for word in service["healthcheck"]["test"]]
    assert test[0] == "CMD", f"a CMD health check runs without a shell: {test}"
    argv = test[1:]
    for fixed, port in ports.items():
        assert any(f":{fixed}/" in word for word in argv), (fixed, argv)
        argv = [word.replace(f":{fixed}/", f":{port}/") for word in argv]
    return argv


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def owned_files(folder: Path, uid: int) -> list[Path]:
    files = [path for path in folder.rglob("*") if path.is_file()]
    assert all(path.stat().st_uid == uid for path in files), [(p, p.stat().st_uid) for p in files]
    return files


# --- postgres init and migrate: the database roles (issue 12, row 9) ----------------------------


@dataclass
class DatabaseRoles:
    """A fresh database set up as the postgres service's init scripts set up ``waferwatch``, with role
    names of its own (roles are global to the shared server): ``names`` maps each role compose names to
    the role made here."""

    database: str
    admin_url: str  # the local server's administrator, in the fresh database
    names: dict[str, str]

    def url(self, compose_url: str) -> str:
        """``compose_url`` (a URL of docker-compose.yml) pointed at this database and its roles."""
        url = make_url(normalize_database_url(compose_url))
        assert url.username in self.names, f"{compose_url} logs in as {url.username}, a role nobody creates"
        assert (url.host, url.port) == ("127.0.0.1", 5432), "the database host comes from POSTGRES_HOST"
        url = url.set(drivername="postgresql", username=self.names[url.username], database=self.database)
        return url.render_as_string(hide_password=False)  # as compose writes it (libpq's form)


def _compose_variables(s3_endpoint: str) -> dict[str, str]:
    return {**env_example(), "POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": "5432", "REDIS_HOST": "127.0.0.1",
            "REDIS_PORT": "6379", "S3_ENDPOINT_URL": s3_endpoint}  # fmt: skip


def _init_scripts(postgres: dict[str, Any]) -> list[Path]:
    """The files the postgres service mounts into /docker-entrypoint-initdb.d, in the image's order."""
    for volume in postgres.get("volumes") or []:
        source, _, target = volume.partition(":")
        if target.split(":")[0] == "/docker-entrypoint-initdb.d":
            return sorted((REPO_ROOT / source).iterdir())
    pytest.fail("the postgres service mounts nothing into /docker-entrypoint-initdb.d")


def _scram_password_is(verifier: str | None, password: str) -> bool:
    """Whether a ``SCRAM-SHA-256$iterations:salt$StoredKey:ServerKey`` verifier was made from ``password``
    (the local server trusts every login, so the passwords themselves are checked here)."""
    import base64
    import hashlib
    import hmac
    import re

    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", verifier or "")
    if not match:
        return False
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(match[2]), int(match[1]))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return hashlib.sha256(client_key).digest() == base64.b64decode(match[3])


@pytest.fixture
def database_roles(
    services: dict[str, dict[str, Any]], pg_database_factory: Callable[[], str]
) -> Iterator[DatabaseRoles]:
    """Runs the postgres service's init scripts as the image does (psql as POSTGRES_USER in POSTGRES_DB, the
    service's environment) in a fresh database; drops the database and the roles made for it afterwards."""
    import psycopg

    postgres = compose_environment(services["postgres"], env_example())
    migrate = compose_environment(services["migrate"], env_example())
    suffix = uuid.uuid4().hex[:10]
    names = {
        postgres.get("POSTGRES_USER", "postgres"): "",  # the local server's administrator, below
        postgres["WAFERWATCH_APP_ROLE"]: f"ww_app_{suffix}",
        migrate["WAFERWATCH_READER_ROLE"]: f"ww_reader_{suffix}",
    }
    admin_url = pg_database_factory()
    database, administrator = make_url(admin_url).database, make_url(admin_url).username
    assert database and administrator
    names[postgres.get("POSTGRES_USER", "postgres")] = administrator
    libpq_admin = make_url(admin_url).set(drivername="postgresql").render_as_string(hide_password=False)
    env = {**postgres, "WAFERWATCH_APP_ROLE": names[postgres["WAFERWATCH_APP_ROLE"]],
           "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGHOST": "127.0.0.1", "PGPORT": "5432"}  # fmt: skip
    try:
        for script in _init_scripts(services["postgres"]):
            assert script.suffix == ".sql", f"{script}: only .sql init scripts are run here"
            result = subprocess.run(
                ["psql", "-v", "ON_ERROR_STOP=1", "--username", administrator, "--no-password", "--no-psqlrc",
                 "--dbname", database, "-f", str(script)],
                env=env, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert result.returncode == 0, f"{script.name}: {result.stdout}{result.stderr}"
        yield DatabaseRoles(database=database, admin_url=libpq_admin, names=names)
    finally:
        with psycopg.connect(make_url(libpq_admin).set(database="postgres").render_as_string(hide_password=False),
                             autocommit=True) as connection:  # fmt: skip
            connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            for role in sorted(set(names.values()) - {administrator}):
                connection.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_the_services_role_migrates_and_reports_run_as_the_reader_as_the_image_user(
    image_user: ImageUser, services: dict[str, dict[str, Any]], database_roles: DatabaseRoles, s3_endpoint: str
) -> None:
    """postgres's init script, then migrate's commands as the image user, then ``waferwatch report sql`` in
    the worker's environment: the services' role is no superuser and owns the tables, migrate exits 0 (twice:
    every ``up`` runs it), the reader may SELECT but the server refuses it (and the services' role) a
    program."""
    import psycopg

    from worker.db import current_revision, head_revision
    from worker.reader_role import privilege_warnings

    variables = _compose_variables(s3_endpoint)
    roles = database_roles
    app_role = roles.names[compose_environment(services["postgres"], env_example())["WAFERWATCH_APP_ROLE"]]
    migrate = compose_environment(services["migrate"], variables)
    reader = roles.names[migrate["WAFERWATCH_READER_ROLE"]]
    app_url = roles.url(migrate["WAFERWATCH_DATABASE_URL"])
    report_url = roles.url(migrate["WAFERWATCH_REPORT_DATABASE_URL"])
    assert make_url(app_url).username == app_role and make_url(report_url).username == reader

    with psycopg.connect(roles.admin_url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolpassword FROM pg_authid WHERE rolname = %s", (app_role,)
        ).fetchone()
        assert row is not None, f"the init script made no role {app_role}"
        assert row[:3] == (False, False, False), f"{app_role}: superuser, createrole, createdb = {row[:3]}"
        assert _scram_password_is(row[3], make_url(app_url).password or ""), "the role's password is not the URL's"
        owner = admin.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (roles.database,))
        assert owner.fetchone() == (app_role,)

    urls = {key: roles.url(value) for key, value in migrate.items() if value.startswith("postgresql://")}
    env = container_environment(
        services["migrate"], image_user, database_url=app_url, s3_endpoint=s3_endpoint,
        **{**urls, "WAFERWATCH_READER_ROLE": reader},
    )  # fmt: skip
    argv = service_command(services["migrate"], variables)
    for _ in range(2):  # every `docker compose up` runs it again
        result = run_as(image_user, argv, env)
        assert result.returncode == 0, result.stdout + result.stderr
    assert current_revision(normalize_database_url(app_url)) == head_revision()

    with psycopg.connect(roles.admin_url, autocommit=True) as admin:
        owners = {r[0] for r in admin.execute("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")}
        assert owners == {app_role}, "the migrations ran as another role"
        verifier = admin.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (reader,)).fetchone()
        assert verifier and _scram_password_is(verifier[0], make_url(report_url).password or "")
    assert privilege_warnings(report_url) == []
    for url in (app_url, report_url):  # the server itself refuses a program to both roles
        with psycopg.connect(url, autocommit=True) as connection, pytest.raises(psycopg.errors.InsufficientPrivilege):
            connection.execute("COPY (SELECT 1) TO PROGRAM 'true'")

    worker = compose_environment(services["worker"], variables)
    report_env = container_environment(
        services["worker"], image_user, database_url=roles.url(worker["WAFERWATCH_DATABASE_URL"]),
        s3_endpoint=s3_endpoint, WAFERWATCH_REPORT_DATABASE_URL=roles.url(worker["WAFERWATCH_REPORT_DATABASE_URL"]),
        WAFERWATCH_DEVICE="cpu",
    )  # fmt: skip
    selected = run_as(image_user, ["waferwatch", "report", "sql", "SELECT count(*) AS images FROM images"], report_env)
    assert selected.returncode == 0, selected.stdout + selected.stderr
    assert "images" in selected.stdout and "more than a reader" not in selected.stderr, selected.stderr
    refused = run_as(image_user, ["waferwatch", "report", "sql", "COPY (SELECT 1) TO PROGRAM 'true'"], report_env)
    assert refused.returncode != 0 and "refused" in refused.stderr, refused.stdout + refused.stderr


# --- ingest --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def database(pg_database_factory: Callable[[], str]) -> str:
    from worker.db import upgrade_database

    url = pg_database_factory()
    upgrade_database(url)
    return url


def test_ingest_answers_health_as_the_image_user(
    image_user: ImageUser,
    services: dict[str, dict[str, Any]],
    database: str,
    s3_endpoint: str,
    bucket: str,
    broker: redis.Redis,
    free_tcp_port: int,
    tmp_path: Path,
) -> None:
    service = services["ingest"]
    compose_port = int(compose_environment(service, env_example())["WAFERWATCH_WEBHOOK_PORT"])
    metrics_port = _free_port()
    env = container_environment(
        service, image_user, database_url=database, s3_endpoint=s3_endpoint,
        WAFERWATCH_WEBHOOK_PORT=str(free_tcp_port), WAFERWATCH_METRICS_PORT=str(metrics_port),
    )  # fmt: skip
    check = healthcheck(service, {compose_port: free_tcp_port})
    log = tmp_path / "ingest.log"
    with running(image_user, service_command(service, env_example()), env, log) as process:
        wait_for(lambda: run_as(image_user, check, env, timeout=30).returncode == 0, process, log, "ingest /health")


# --- worker --------------------------------------------------------------------------------------


def test_worker_asked_for_cuda_without_a_gpu_says_so_in_one_line(
    image_user: ImageUser, services: dict[str, dict[str, Any]], database: str, s3_endpoint: str
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the worker would start")
    service = services["worker"]
    env = container_environment(service, image_user, database_url=database, s3_endpoint=s3_endpoint)
    assert env["WAFERWATCH_DEVICE"] == "cuda"
    result = run_as(image_user, service_command(service, env_example()), env, timeout=180)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("worker: WAFERWATCH_DEVICE=cuda but torch"), lines[0]
    assert "driver >=" in lines[0] and "WAFERWATCH_DEVICE=cpu" in lines[0]


@contextmanager
def cpu_worker(
    image_user: ImageUser, service: dict[str, Any], database: str, s3_endpoint: str, log: Path
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], list[str]]]:
    """The service's worker command on the CPU, with its health check moved to a free metrics port."""
    compose_port = int(compose_environment(service, env_example())["WAFERWATCH_METRICS_PORT"])
    port = _free_port()
    env = container_environment(
        service, image_user, database_url=database, s3_endpoint=s3_endpoint,
        WAFERWATCH_DEVICE="cpu", WAFERWATCH_METRICS_PORT=str(port), WAFERWATCH_BATCH_SIZE="4",
    )  # fmt: skip
    check = healthcheck(service, {compose_port: port})
    with running(image_user, service_command(service, env_example()), env, log) as process:
        wait_for(lambda: run_as(image_user, check, env, timeout=30).returncode == 0, process, log, "worker /metrics")
        yield process, env, check


def test_worker_answers_its_liveness_check_as_the_image_user(
    image_user: ImageUser,
    services: dict[str, dict[str, Any]],
    database: str,
    s3_endpoint: str,
    bucket: str,
    broker: redis.Redis,
    tmp_path: Path,
) -> None:
    log = tmp_path / "worker.log"
    with cpu_worker(image_user, services["worker"], database, s3_endpoint, log) as (process, _, _):
        wait_for(lambda: "ready." in _tail(log), process, log, "worker ready")
        assert process.poll() is None


def test_worker_loads_the_bucket_model_into_its_cache_and_scores(
    image_user: ImageUser,
    services: dict[str, dict[str, Any]],
    database: str,
    s3_endpoint: str,
    bucket: str,
    broker: redis.Redis,
    pipeline_model_dir: Path,
    dacon_test_images: list[Path],
    tmp_path: Path,
) -> None:
    """The worker downloads ``models/<version>/`` into ``var/model-cache`` (relative to WORKDIR), which the
    image's user must be able to create; then a score batch writes one inference."""
    from worker import repository
    from worker.app import create_app, make_enqueue
    from worker.db import make_engine, make_session_factory, session_scope
    from worker.model_provider import publish_model
    from worker.schema import Inference
    from worker.settings import Settings
    from worker.storage import make_store

    engine = make_engine(database)
    session_factory = make_session_factory(engine)
    store = make_store("s3", endpoint_url=s3_endpoint, bucket=bucket, region="us-east-1")
    published = publish_model(store, session_factory, pipeline_model_dir, model_prefix="models/")
    data = dacon_test_images[0].read_bytes()
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    etag = s3.put_object(Bucket=bucket, Key="incoming/T1/L1/W1/first.png", Body=data)["ETag"].strip('"')
    with session_scope(session_factory) as session:
        image, _ = repository.register_image(
            session, bucket=bucket, key="incoming/T1/L1/W1/first.png", etag=etag, size=len(data), kind="incoming"
        )
        image_id = image.id
    log = tmp_path / "worker.log"
    app = create_app(Settings(broker_url=BROKER_URL), set_as_current=False)
    try:
        with cpu_worker(image_user, services["worker"], database, s3_endpoint, log) as (process, _, _):
            make_enqueue(app)([image_id])

            def scored() -> bool:
                with session_scope(session_factory) as session:
                    return session.scalars(select(Inference).where(Inference.image_id == image_id)).first() is not None

            wait_for(scored, process, log, "the image scored", timeout_s=300)
        cache = image_user.workdir / "var" / "model-cache" / published.version
        assert (cache / "manifest.json").is_file(), _tail(log)
        assert owned_files(cache, image_user.uid)
    finally:
        engine.dispose()


# --- beat ----------------------------------------------------------------------------------------


def test_beat_writes_its_schedule_as_the_image_user(
    image_user: ImageUser,
    services: dict[str, dict[str, Any]],
    database: str,
    s3_endpoint: str,
    broker: redis.Redis,
    tmp_path: Path,
) -> None:
    service = services["beat"]
    env = container_environment(service, image_user, database_url=database, s3_endpoint=s3_endpoint)
    log = tmp_path / "beat.log"
    var = image_user.workdir / "var"
    for volume in service.get("volumes") or []:  # the state that must survive is on a volume
        assert volume.split(":")[1] == image_user.layout.workdir.rstrip("/") + "/var", volume
    with running(image_user, service_command(service, env_example()), env, log) as process:
        wait_for(lambda: any(var.glob("celerybeat-schedule*")), process, log, "beat's schedule file")
        time.sleep(2)
        assert process.poll() is None, _tail(log)
    assert owned_files(var, image_user.uid)


# --- trainer -------------------------------------------------------------------------------------


def test_trainer_builds_and_saves_a_model_as_the_image_user(
    image_user: ImageUser,
    services: dict[str, dict[str, Any]],
    pg_database_factory: Callable[[], str],
    s3_endpoint: str,
    bucket: str,
    broker: redis.Redis,
    dacon_data: Path,
    tmp_path: Path,
) -> None:
    """Six nominal images in the bucket and one ``check_retrain``: the trainer builds a small model (test
    knobs: threshold 6, 2 folds, coreset 2 %) and saves it under ``var/model-cache/<version>``."""
    from scheduler.tasks import CHECK_RETRAIN
    from worker import repository
    from worker.app import create_app
    from worker.db import make_engine, make_session_factory, session_scope, upgrade_database
    from worker.schema import ModelVersion
    from worker.settings import Settings

    url = pg_database_factory()
    upgrade_database(url)
    engine = make_engine(url)
    session_factory = make_session_factory(engine)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    # 12 drops: the gate's held-out slice (a hash of the key) keeps some out of the pool, 6 trigger a build.
    for index, path in enumerate(sorted((dacon_data / "train").glob("*.png"))[:12]):
        key = f"nominal/T1/L0/W0/{index:02d}.png"
        data = path.read_bytes()
        etag = s3.put_object(Bucket=bucket, Key=key, Body=data)["ETag"].strip('"')
        with session_scope(session_factory) as session:
            repository.register_image(session, bucket=bucket, key=key, etag=etag, size=len(data), kind="nominal")
    service = services["trainer"]
    compose_port = int(compose_environment(service, env_example())["WAFERWATCH_METRICS_PORT"])
    port = _free_port()
    env = container_environment(
        service, image_user, database_url=url, s3_endpoint=s3_endpoint, WAFERWATCH_METRICS_PORT=str(port),
        WAFERWATCH_RETRAIN_THRESHOLD="6", WAFERWATCH_REBUILD_CHUNK_SIZE="6",
        WAFERWATCH_REBUILD_CONFIG='{"coreset_ratio": 0.02, "folds": 2}',
    )  # fmt: skip
    assert "WAFERWATCH_DEVICE" not in env or env["WAFERWATCH_DEVICE"] in ("auto", "cpu")
    check = healthcheck(service, {compose_port: port})
    log = tmp_path / "trainer.log"
    app = create_app(Settings(broker_url=BROKER_URL), set_as_current=False)
    cache = image_user.workdir / "var" / "model-cache"
    try:
        with running(image_user, service_command(service, env_example()), env, log) as process:
            wait_for(
                lambda: run_as(image_user, check, env, timeout=30).returncode == 0, process, log, "trainer /metrics"
            )
            app.send_task(CHECK_RETRAIN)

            def saved() -> bool:
                with session_scope(session_factory) as session:
                    rows = session.scalars(select(ModelVersion)).all()
                failed = [row for row in rows if row.status == "failed"]
                if failed:
                    pytest.fail(f"build failed: {failed[0].reason}\n{_tail(log)}")
                return any((cache / row.id / "manifest.json").is_file() for row in rows if row.status != "building")

            wait_for(saved, process, log, "a model saved in var/model-cache", timeout_s=600)
        assert owned_files(cache, image_user.uid)
    finally:
        engine.dispose()
