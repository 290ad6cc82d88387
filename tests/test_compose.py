"""docker-compose.yml without Docker: parse it, check its structure, and run what can run here.

Every service command must be a real ``waferwatch``/``celery`` subcommand (``--help`` through the
installed console script); commands that other issues are still adding (``worker``, ``ingest``,
``beat``, Flower) skip with a reason until they exist. The ``migrate`` command runs for real against a
throw-away PostgreSQL database.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
BIN = Path(sys.executable).parent
EXPECTED_SERVICES = {
    "postgres", "redis", "minio", "minio-init", "migrate", "ingest", "worker", "trainer", "beat", "flower",
}  # fmt: skip
ONE_SHOT = {"minio-init", "migrate"}
PENDING_SUBCOMMANDS = {"worker", "ingest", "beat"}  # written by the pipeline and retraining issues
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|ROOT_USER", re.IGNORECASE)
REQUIRED_VAR = re.compile(r"\$\{[A-Z0-9_]+:\?[^}]+\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    return command if isinstance(command, list) else str(command or "").split()


def _subcommand(argv: list[str]) -> list[str]:
    """The command words before the first option: ``waferwatch db upgrade`` → ``['db', 'upgrade']``."""
    words = []
    for token in argv[1:]:
        if token.startswith("-"):
            break
        words.append(token)
    return words


def _run(argv: list[str], env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    executable = BIN / argv[0]
    assert executable.exists(), f"{argv[0]} is not installed in {BIN}"
    return subprocess.run(
        [str(executable), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or {**os.environ},
        cwd=REPO_ROOT,
        check=False,
    )


def test_all_services_present(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= EXPECTED_SERVICES


def test_images_and_restart_policies(services: dict[str, dict[str, Any]]) -> None:
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    assert "--appendonly" in services["redis"]["command"]
    assert "yes" in services["redis"]["command"]
    for name, service in services.items():
        expected = "no" if name in ONE_SHOT else "unless-stopped"
        assert service.get("restart") == expected, name


def test_healthchecks_on_long_running_services(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT:
            continue
        check = service.get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"


def test_depends_on_conditions(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown service {dependency}"
            condition = spec["condition"]
            if dependency in ONE_SHOT:
                assert condition == "service_completed_successfully", (name, dependency)
            else:
                assert condition == "service_healthy", (name, dependency)
                assert "healthcheck" in services[dependency], dependency
    for name in ("ingest", "worker", "trainer", "beat"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_volumes_for_data(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    for name, path in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data"), ("minio", "/data")):
        volume = next(v for v in services[name]["volumes"] if v.endswith(":" + path))
        assert volume.split(":")[0] in compose["volumes"]


def test_gpu_reservation_on_worker(services: dict[str, dict[str, Any]]) -> None:
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert _command(services["worker"])[:4] == ["waferwatch", "worker", "--queues", "score,ingest"]
    assert _command(services["trainer"])[:4] == ["waferwatch", "worker", "--queues", "train"]


def test_no_literal_secrets(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        environment = service.get("environment") or {}
        for key, value in environment.items():
            if SECRET_NAME.search(key):
                assert REQUIRED_VAR.fullmatch(str(value)), f"{name}.{key} must be ${{VAR:?…}}, got {value!r}"
            for password in re.findall(r"://[^:/@]*:([^@]+)@", str(value)):
                assert REQUIRED_VAR.fullmatch(password), f"{name}.{key} has a literal password in a URL"
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    assert "basic-auth=admin:${FLOWER_PASSWORD:?" in text
    example = (REPO_ROOT / ".env.example").read_text(encoding="utf-8")
    for variable in set(re.findall(r"\$\{([A-Z0-9_]+):\?", text)):
        assert re.search(rf"^{variable}=", example, re.M), f"{variable} missing from .env.example"
    tracked = subprocess.run(["git", "ls-files", ".env"], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert tracked.stdout.strip() == "", ".env must never be committed"


def test_minio_notifications_target_the_ingest_webhook(services: dict[str, dict[str, Any]]) -> None:
    environment = services["minio"]["environment"]
    assert environment["MINIO_NOTIFY_WEBHOOK_ENDPOINT_WAFERWATCH"] == "http://ingest:8088/"
    assert REQUIRED_VAR.fullmatch(environment["MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_WAFERWATCH"])
    script = "\n".join(services["minio-init"]["command"])
    for prefix in ("incoming", "nominal", "heatmaps", "models"):
        assert prefix in script
    assert "arn:minio:sqs::WAFERWATCH:webhook" in services["minio-init"]["environment"]["ARN"]
    assert '"$$ARN"' in script
    assert "--prefix" in script and "--suffix" in script
    ingest = services["ingest"]
    assert _command(ingest)[:4] == ["waferwatch", "ingest", "--source", "webhook"]
    assert ingest["environment"]["WAFERWATCH_WEBHOOK_PORT"] == "8088"


def _service_names_with_command(services: dict[str, dict[str, Any]]) -> list[str]:
    return [name for name, service in services.items() if _command(service)[:1] in (["waferwatch"], ["celery"])]


@pytest.mark.parametrize("service_name", ["migrate", "ingest", "worker", "trainer", "beat", "flower"])
def test_service_command_exists(services: dict[str, dict[str, Any]], service_name: str) -> None:
    argv = _command(services[service_name])
    if argv[:2] == ["sh", "-c"]:  # migrate: `waferwatch db upgrade && waferwatch db create-reader ...`
        for step in argv[2].split("&&"):
            words = step.split()
            result = _run(["waferwatch", *_subcommand(words), "--help"])
            assert result.returncode == 0, result.stderr[-2000:]
            for option in (w for w in words if w.startswith("--")):
                assert option in result.stdout, f"{option} not accepted by {' '.join(_subcommand(words))}"
        return
    assert service_name in _service_names_with_command(services)
    if argv[0] == "celery":
        app_index = argv.index("-A") + 1
        probe = subprocess.run(
            [sys.executable, "-c", f"import {argv[app_index].split(':')[0]}"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if probe.returncode != 0:
            pytest.skip(f"{argv[app_index]} is not importable yet (the pipeline issue creates it)")
        result = _run([*argv[:3], *_subcommand(argv[2:]), "--help"])
        if result.returncode != 0 and "flower" in argv:
            pytest.skip("flower is in the optional `deploy` extra: pip install -e '.[deploy]'")
        assert result.returncode == 0, result.stderr[-2000:]
        return
    words = _subcommand(argv)
    result = _run(["waferwatch", *words, "--help"])
    missing = result.returncode != 0 and "No such command" in result.stderr + result.stdout
    if missing and words[0] in PENDING_SUBCOMMANDS:
        pytest.skip(f"`waferwatch {words[0]}` does not exist yet (another issue adds it)")
    assert result.returncode == 0, result.stderr[-2000:]
    for option in (token for token in argv if token.startswith("--")):
        assert option.split("=")[0] in result.stdout, f"{option} not accepted by waferwatch {' '.join(words)}"


def test_migrate_command_runs_against_postgres(
    services: dict[str, dict[str, Any]], pg_database_factory: Callable[[], str]
) -> None:
    from sqlalchemy import inspect

    from worker.db import current_revision, head_revision, make_engine

    url = pg_database_factory()
    env = {key: value for key, value in os.environ.items() if not key.startswith("WAFERWATCH_")}
    env["WAFERWATCH_DATABASE_URL"] = url.replace("postgresql+psycopg://", "postgresql://")  # as in the compose file
    argv = _command(services["migrate"])
    assert argv[:2] == ["sh", "-c"] and argv[2].startswith("waferwatch db upgrade && ")
    argv = ["waferwatch", "db", "upgrade"]  # the create-reader step: tests/deploy/test_services_as_user.py
    for _ in range(2):  # every `docker compose up` runs it again: must be idempotent
        result = _run(argv, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
    assert current_revision(url) == head_revision()
    engine = make_engine(url)
    try:
        views = set(inspect(engine).get_view_names())
    finally:
        engine.dispose()
    assert {"v_latest_inference", "v_defects_daily", "v_queue_lag_hourly"} <= views
