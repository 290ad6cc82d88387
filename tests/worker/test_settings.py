"""Settings: embedded defaults, validation that refuses unsafe values, masking, key metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.settings import (
    DEFAULT_KEY_METADATA_REGEX,
    MASK,
    Settings,
    compile_key_metadata_regex,
    get_settings,
    mask_url,
    normalize_database_url,
    parse_key_metadata,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No WAFERWATCH_* variables and a CWD without a .env, so defaults are really the defaults."""
    for name in list(os.environ):
        if name.startswith("WAFERWATCH_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_defaults_are_the_embedded_mode() -> None:
    settings = Settings()
    assert settings.database_url == "sqlite:///var/waferwatch.db"
    assert settings.broker_is_filesystem
    assert settings.storage == "folder"
    assert settings.storage_root == Path("var/storage")
    assert settings.watch_dir == Path("var/storage/incoming")
    assert settings.batch_size == 32
    assert settings.s3_access_key is None


def test_defaults_create_nothing_until_used(tmp_path: Path) -> None:
    Settings()
    assert not (tmp_path / "var").exists()


def test_watch_dir_follows_storage_root() -> None:
    settings = Settings(storage_root=Path("/data/store"), incoming_prefix="in/")
    assert settings.watch_dir == Path("/data/store/in")
    assert Settings(watch_dir=Path("/x")).watch_dir == Path("/x")


def test_environment_and_dotenv_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("WAFERWATCH_BATCH_SIZE=8\nWAFERWATCH_DEVICE=cuda:1\n", encoding="utf-8")
    monkeypatch.setenv("WAFERWATCH_BATCH_SIZE", "16")  # the environment wins over .env
    settings = get_settings()
    assert settings.batch_size == 16
    assert settings.device == "cuda:1"
    assert get_settings() is settings


def test_importing_worker_modules_reads_no_settings() -> None:
    env = {**os.environ, "WAFERWATCH_BATCH_SIZE": "0"}  # invalid: only get_settings() may complain
    code = "import worker.settings, worker.db, worker.schema, worker.repository"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch_size", 0, "batch_size"),
        ("batch_size", 4096, "batch_size"),
        ("batch_wait_ms", -1, "batch_wait_ms"),
        ("task_max_attempts", 0, "task_max_attempts"),
        ("retry_backoff_s", 0, "retry_backoff_s"),
        ("watch_poll_s", -0.5, "watch_poll_s"),
        ("webhook_port", 70000, "webhook_port"),
        ("device", "gpu", "cuda:N"),
        ("device", "cuda:x", "cuda:N"),
        ("incoming_prefix", "incoming", "must end with '/'"),
        ("heatmap_prefix", "/heatmaps/", "must not start with '/'"),
        ("storage", "ftp", "storage"),
        ("database_url", "mysql://u@h/db", "SQLite or PostgreSQL"),
        ("database_url", "not a url", "not a SQLAlchemy URL"),
        ("broker_url", "localhost:6379", "scheme://"),
        ("key_metadata_regex", "(?P<lot>[", "not a valid regex"),
        ("key_metadata_regex", r"^([^/]+)/", "no named groups"),
        ("model_version", "v1/../../etc", "model_version"),
    ],
)
def test_unsafe_values_are_refused_with_clear_messages(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace("*", r"\*")):
        Settings(**{field: value})


def test_cross_field_rules() -> None:
    with pytest.raises(ValidationError, match="retry_backoff_max_s"):
        Settings(retry_backoff_s=10, retry_backoff_max_s=5)
    with pytest.raises(ValidationError, match="overlap"):
        Settings(incoming_prefix="data/", nominal_prefix="data/nominal/")
    with pytest.raises(ValidationError, match="both s3_access_key and s3_secret_key"):
        Settings(s3_access_key="AKIA")


def test_bare_postgres_urls_get_the_psycopg_driver() -> None:
    assert normalize_database_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_database_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_database_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert Settings(database_url="postgresql://u@h/db").database_url == "postgresql+psycopg://u@h/db"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:pw@h/db", f"postgresql://u:{MASK}@h/db"),
        ("postgresql+psycopg://u:p%40ss@h:5432/db", f"postgresql+psycopg://u:{MASK}@h:5432/db"),
        ("redis://:s3cret@redis:6379/0", f"redis://:{MASK}@redis:6379/0"),
        ("amqp://guest:guest@rabbit//", f"amqp://guest:{MASK}@rabbit//"),
        ("postgresql://h/db?user=u&password=pw", f"postgresql://h/db?user=u&password={MASK}"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("sqlite:///var/waferwatch.db", "sqlite:///var/waferwatch.db"),
        ("filesystem://", "filesystem://"),
        ("not a url", "not a url"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_masked_settings_hide_every_secret() -> None:
    settings = Settings(
        database_url="postgresql://waferwatch:db-password@db/waferwatch",
        broker_url="redis://:broker-password@redis:6379/0",
        redis_events_url="redis://user:events-password@redis:6379/1",
        s3_access_key="access-key-id",
        s3_secret_key="secret-access-key",
        webhook_token="webhook-token",
    )
    masked = settings.masked()
    dumped = json.dumps(masked)
    for secret in ("db-password", "broker-password", "events-password", "access-key-id", "secret-access-key"):
        assert secret not in dumped
    assert "webhook-token" not in dumped
    assert masked["s3_secret_key"] == MASK
    assert masked["database_url"] == f"postgresql+psycopg://waferwatch:{MASK}@db/waferwatch"
    assert masked["storage_root"] == "var/storage"
    assert masked["s3_endpoint_url"] is None


def test_filesystem_broker_options_make_their_folders(tmp_path: Path) -> None:
    settings = Settings(broker_dir=tmp_path / "broker")
    options = settings.broker_transport_options()
    # Producers write to data_folder_out and workers read data_folder_in: the same folder.
    assert options["data_folder_in"] == options["data_folder_out"]
    for name in ("data_folder_in", "processed_folder", "control_folder"):
        assert Path(options[name]).is_dir()
        assert Path(options[name]).is_relative_to(tmp_path / "broker")


def test_redis_broker_gets_a_visibility_timeout_longer_than_a_task() -> None:
    assert Settings(broker_url="redis://localhost:6379/0").broker_transport_options() == {"visibility_timeout": 7200}
    long_tasks = Settings(broker_url="redis://localhost:6379/0", task_time_limit_s=10_000)
    assert long_tasks.broker_transport_options()["visibility_timeout"] > 10_000


# --- key metadata ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (
            "incoming/TOOL-01/LOT123/W07/img_0001.png",
            {"tool": "TOOL-01", "lot": "LOT123", "wafer": "W07", "filename": "img_0001.png"},
        ),
        ("incoming/TOOL-01/LOT123/img.png", {"tool": "TOOL-01", "lot": "LOT123", "filename": "img.png"}),
        ("incoming/img.png", {"filename": "img.png"}),
        ("img.png", {"filename": "img.png"}),
        (
            "incoming/etch tool 3/lot 42/wafer 7/scan 1.png",
            {"tool": "etch tool 3", "lot": "lot 42", "wafer": "wafer 7", "filename": "scan 1.png"},
        ),
        (
            "incoming/도구/ロット/wafer-ä/画像 1.png",
            {"tool": "도구", "lot": "ロット", "wafer": "wafer-ä", "filename": "画像 1.png"},
        ),
        (
            "incoming/T1/L1/W1/extra/deeper/img.png",
            {"tool": "T1", "lot": "L1", "wafer": "W1", "filename": "img.png"},
        ),
        ("nominal/T1/L1/W1/ref.png", {"tool": "T1", "lot": "L1", "wafer": "W1", "filename": "ref.png"}),
        ("incoming//T1//img.png", {"filename": "img.png"}),
    ],
)
def test_default_key_regex_on_awkward_keys(key: str, expected: dict[str, str]) -> None:
    assert Settings().key_metadata(key) == expected


def test_only_the_first_matching_prefix_is_stripped() -> None:
    pattern = compile_key_metadata_regex(DEFAULT_KEY_METADATA_REGEX)
    metadata = parse_key_metadata("incoming/incoming/L1/img.png", pattern, strip_prefixes=("incoming/", "nominal/"))
    assert metadata == {"tool": "incoming", "lot": "L1", "filename": "img.png"}
    nested = parse_key_metadata("site-a/incoming/T/L/W/f.png", pattern, strip_prefixes=("site-a/incoming/",))
    assert nested == {"tool": "T", "lot": "L", "wafer": "W", "filename": "f.png"}


def test_custom_regex_returns_only_non_empty_groups() -> None:
    pattern = r"lot=(?P<lot>[^/]*)/wafer=(?P<wafer>[^/]*)/(?P<step>step\d+)?"
    assert parse_key_metadata("lot=A1/wafer=/x.png", pattern) == {"lot": "A1"}
    assert parse_key_metadata("lot=A1/wafer=3/step2.png", pattern) == {
        "lot": "A1",
        "wafer": "3",
        "step": "step2",
    }
    assert parse_key_metadata("unrelated.png", pattern) == {}


@pytest.mark.parametrize(
    ("device", "queues", "cores", "expected", "threads"),
    [
        ("cpu", "score,ingest", 2, ("prefork", 2), 1),  # one scoring process per core, the cores split
        ("cpu", "score", 16, ("prefork", 4), 4),  # at most 4 models in memory
        ("cpu", "score", 1, ("prefork", 1), None),
        ("cpu", "train", 16, ("prefork", 1), None),  # a build gets every core
        ("cpu", "score,train", 16, ("prefork", 1), None),
        ("cuda", "score", 16, ("threads", 2), None),  # nothing forked after CUDA; two batches in flight
        ("cuda:1", "score", 16, ("threads", 2), None),
        ("cuda", "score,train", 16, ("solo", 1), None),  # never two builds at once
    ],
)
def test_worker_pool_defaults(device, queues, cores, expected, threads):
    from worker.cli.pipeline_cmds import default_pool, threads_per_process

    pool = default_pool(device, queues, cores=cores)
    assert pool == expected
    assert threads_per_process(*pool, cores=cores) == threads
