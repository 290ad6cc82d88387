"""The one configuration object of waferwatch, read from ``WAFERWATCH_*`` variables and ``.env``.

Every field has a default, and the defaults describe the *embedded* mode: SQLite, a local folder as
object storage and kombu's filesystem broker, all under ``var/`` in the current directory, so one
machine runs the whole pipeline with no external service. Deployments override the URLs.

Settings are read once, through :func:`get_settings`, at entry points only (the CLI, the Celery app,
Alembic's ``env.py``) and then passed down as arguments: nothing reads the environment at import time,
and importing this module has no side effects (directories are created when they are used).
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote_plus

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "DEFAULT_KEY_METADATA_REGEX",
    "HOME_ENV",
    "MASK",
    "Settings",
    "compile_key_metadata_regex",
    "get_settings",
    "mask_url",
    "normalize_database_url",
    "parse_key_metadata",
    "settings_files",
]

MASK = "***"
#: A work folder whose ``.env`` is read after the current directory's (``waferwatch --workdir DIR`` sets it).
HOME_ENV = "WAFERWATCH_HOME"

# Keys look like ``<tool>/<lot>/<wafer>/<file>`` once the kind prefix (``incoming/``) is stripped.
# Every directory group is optional and greedy from the left, so shallower keys still match with the
# deeper groups missing, and deeper keys keep the first three levels and the file name.
DEFAULT_KEY_METADATA_REGEX = (
    r"^(?:(?P<tool>[^/]+)/)?(?:(?P<lot>[^/]+)/)?(?:(?P<wafer>[^/]+)/)?(?:.*/)?(?P<filename>[^/]+)$"
)

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
# A query/fragment parameter is secret when its name contains one of these (case-insensitive); see mask_url.
_SECRET_PARAMETER = re.compile(r"pass|pwd|token|signature|^sig$|credential|secret|key|auth", re.IGNORECASE)
# Where one setting holds several URLs (kombu: "sentinel://:pw@h1:26379;sentinel://:pw@h2:26379").
_HOSTS_AFTER_AT = re.compile(r"[\w.\-%\[\]:,~]*(?=[/?#]|$)")
_MULTI_URL_SPLIT = re.compile(r";(?=[A-Za-z][A-Za-z0-9+.\-]*://)")
_REDIS_SCHEMES = ("redis://", "rediss://", "redis+socket://", "sentinel://")


def normalize_database_url(url: str) -> str:
    """Return ``url`` with an explicit psycopg 3 driver for PostgreSQL.

    SQLAlchemy maps a bare ``postgresql://`` to psycopg2, which waferwatch does not install, and
    Heroku-style ``postgres://`` is not recognised at all; both are rewritten to ``postgresql+psycopg``.
    """
    url = url.strip()
    for bare in ("postgres://", "postgresql://"):
        if url.startswith(bare):
            return "postgresql+psycopg://" + url[len(bare) :]
    return url


def mask_url(url: str) -> str:
    """Return ``url`` with every secret in it replaced by ``***``; strings that are not URLs are unchanged.

    The rule, so that a new kind of secret needs no new code: the password of the user-info, and the value
    of every query or fragment parameter whose name contains ``pass``, ``pwd``, ``token``, ``signature``,
    ``credential``, ``secret``, ``key`` or ``auth``, or is ``sig`` (``sslpassword``, ``X-Amz-Signature``,
    ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``access_token``, ``sig`` of an Azure SAS ...), in every
    URL of a multi-host string (kombu's ``sentinel://:pw@h1;sentinel://:pw@h2``). A user-info password
    containing ``@``, ``/``, ``?`` or ``#`` unencoded is still masked whole; when in doubt more is masked,
    never less. Everything else is kept byte for byte, so the result still shows which host and database a
    setting points at.
    """
    if "://" not in url:
        return url
    return ";".join(_mask_one_url(part) for part in _MULTI_URL_SPLIT.split(url))


def _mask_one_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    ats = [index for index, char in enumerate(rest) if char == "@"]
    if ats:
        # The user-info ends at the last "@" that is followed by a host list (then /, ?, # or the end):
        # passwords with unencoded "@", "/", "?" or "#" stay inside it; a query "@" at worst masks more.
        at = next((index for index in reversed(ats) if _HOSTS_AFTER_AT.match(rest, index + 1)), ats[-1])
        userinfo, tail = rest[:at], rest[at:]
        if ":" in userinfo:
            userinfo = f"{userinfo.split(':', 1)[0]}:{MASK}"
    else:
        userinfo, tail = "", rest
    tail = _mask_parameters(tail)
    return f"{scheme}://{userinfo}{tail}"


def _mask_parameters(tail: str) -> str:
    """Mask secret-named parameters of the query (after the first ``?``) and of the fragment (after ``#``)."""
    before_fragment, hash_sign, fragment = tail.partition("#")
    location, question, query = before_fragment.partition("?")
    if question:
        query = _mask_pairs(query)
    if hash_sign and "=" in fragment:
        fragment = _mask_pairs(fragment)
    return f"{location}{question}{query}{hash_sign}{fragment}"


def _mask_pairs(pairs: str) -> str:
    masked = []
    for pair in pairs.split("&"):
        name, equals, _value = pair.partition("=")
        if equals and _SECRET_PARAMETER.search(unquote_plus(name)):
            masked.append(f"{name}={MASK}")
        else:
            masked.append(pair)
    return "&".join(masked)


def compile_key_metadata_regex(pattern: str) -> re.Pattern[str]:
    """Compile a key-metadata regex, refusing one that cannot extract anything.

    Raises:
        ValueError: the syntax is invalid or the regex has no named group.
    """
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"key_metadata_regex {pattern!r} is not a valid regex: {exc}") from exc
    if not compiled.groupindex:
        raise ValueError(
            f"key_metadata_regex {pattern!r} has no named groups; use (?P<lot>...) style groups "
            "so metadata such as tool, lot and wafer can be extracted from object keys"
        )
    return compiled


def parse_key_metadata(
    key: str, pattern: re.Pattern[str] | str, *, strip_prefixes: tuple[str, ...] = ()
) -> dict[str, str]:
    """Extract metadata from an object key with the named groups of ``pattern``.

    The first of ``strip_prefixes`` that the key starts with is removed before matching, so one regex
    serves ``incoming/`` and ``nominal/`` keys. Only groups that matched a non-empty string are
    returned; a key the regex does not match yields ``{}`` rather than an error, because an oddly
    named object should still be scored.
    """
    compiled = compile_key_metadata_regex(pattern) if isinstance(pattern, str) else pattern
    relative = key
    for prefix in strip_prefixes:
        if prefix and key.startswith(prefix):
            relative = key[len(prefix) :]
            break
    match = compiled.search(relative)
    if match is None:
        return {}
    return {name: value for name, value in match.groupdict().items() if value}


def _check_prefix(name: str, value: str) -> str:
    if not value.endswith("/"):
        raise ValueError(f"{name} must end with '/', got {value!r}")
    if value.startswith("/"):
        raise ValueError(f"{name} must not start with '/' (object keys are relative), got {value!r}")
    if value == "/":
        raise ValueError(f"{name} must not be just '/'")
    return value


class Settings(BaseSettings):
    """Effective configuration; see the module docstring for the embedded defaults."""

    model_config = SettingsConfigDict(
        env_prefix="WAFERWATCH_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # --- results database and broker -------------------------------------------------------------
    database_url: str = "sqlite:///var/waferwatch.db"
    # `waferwatch report sql` connects here: a read-only role (`waferwatch db create-reader`); None: database_url
    report_database_url: str | None = None
    broker_url: str = "filesystem://"
    broker_dir: Path = Path("var/broker")
    redis_visibility_timeout_s: int = Field(7200, ge=60)

    # --- object storage --------------------------------------------------------------------------
    storage: Literal["folder", "s3"] = "folder"
    storage_root: Path = Path("var/storage")
    s3_endpoint_url: str | None = None
    s3_bucket: str = Field("waferwatch", min_length=3, max_length=63)
    s3_region: str = "us-east-1"
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    # Image GETs through obstore first (a third of boto3's CPU per request); anything but a plain success is
    # fetched and reported by boto3 as before. false: boto3 alone (worker/s3_reads.py).
    s3_fast_reads: bool = True
    incoming_prefix: str = "incoming/"
    nominal_prefix: str = "nominal/"
    heatmap_prefix: str = "heatmaps/"
    # Which scored images get a heatmap: their anomaly map is stored in the inference row (an 8-bit 56² PNG of
    # about 2.5 kB, 0.2 ms to encode); overlays are drawn from it on demand (`waferwatch heatmap`, reports).
    heatmaps: Literal["all", "anomalous", "none"] = "all"
    # "overlay" also writes the rendered overlay PNG to heatmap_prefix (heatmap_key), as before 0007, for
    # viewers that read the bucket: about 9 ms of worker CPU and 75 kB of storage per image more.
    heatmap_format: Literal["map", "overlay"] = "map"
    model_prefix: str = "models/"
    key_metadata_regex: str = DEFAULT_KEY_METADATA_REGEX

    # --- model and scoring -----------------------------------------------------------------------
    model_dir: Path | None = None
    model_version: str | None = None
    device: str = "auto"
    batch_size: int = Field(32, ge=1, le=1024)
    batch_wait_ms: int = Field(500, ge=0, le=60_000)
    flush_when_idle: bool = True  # send a partial batch at once when no score task is waiting (low latency)
    max_image_pixels: int = Field(64_000_000, ge=1)
    max_object_bytes: int = Field(200 * 1024 * 1024, ge=1)
    model_cache_dir: Path = Path("var/model-cache")  # bucket artifacts (models/<version>/) are downloaded here
    model_check_interval_s: float = Field(0.0, ge=0)  # 0: look up the active version at every batch
    cpu_threads: int | None = Field(None, ge=1, le=1024)  # torch/faiss threads per scoring process (None: all)
    fetch_threads: int = Field(8, ge=1, le=128)  # parallel downloads and heatmap uploads within one batch
    # Images per model call within a batch; None: 8 on a CPU (the model starts while the rest decode), the
    # whole batch on a GPU.
    model_chunk: int | None = Field(None, ge=1, le=1024)

    # --- task behaviour --------------------------------------------------------------------------
    task_max_attempts: int = Field(5, ge=1, le=100)  # attempts of the retraining tasks (scheduler/)
    retry_backoff_s: float = Field(2.0, gt=0)
    retry_backoff_max_s: float = Field(60.0, gt=0)
    # A scoring batch retries transient (database, storage) errors for this long after its first attempt,
    # so an outage of minutes is outlasted instead of being spent in a few quick retries.
    retry_total_s: float = Field(900.0, ge=0)
    task_time_limit_s: int = Field(1800, ge=1)
    reconcile_stale_after_s: int = Field(900, ge=1)  # re-enqueue images still 'queued' after this long
    # Leases (worker/leases.py): a worker holds the rows of its batch for lease_s, renewed while it scores;
    # beat re-drives rows whose lease expired every redrive_interval_s; a row re-driven max_redrives times
    # gets a failures row instead. A dead worker's images are re-driven within lease_s + redrive_interval_s.
    lease_s: float = Field(60.0, ge=1)
    redrive_interval_s: float = Field(20.0, gt=0)
    max_redrives: int = Field(5, ge=0, le=1000)

    # --- retraining (scheduler/) -----------------------------------------------------------------
    retrain_threshold: int = Field(50, ge=1)  # new training-pool images since the last build that start one
    retrain_check_interval_s: float = Field(300.0, gt=0)  # how often beat counts them
    nightly_retrain_time: str = Field("02:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$")  # HH:MM in the zone below
    nightly_retrain_zone: str = "UTC"  # IANA zone of nightly_retrain_time, e.g. Asia/Seoul (the fab's clock)
    reconcile_interval_s: float = Field(600.0, gt=0)  # beat's reconciliation scan
    rebuild_chunk_size: int = Field(64, ge=1)  # images per feature-extraction task
    rebuild_lease_s: int = Field(7200, ge=60)  # a build with no progress for this long is declared failed
    rebuild_config: dict[str, Any] = Field(default_factory=dict)  # PatchCoreConfig overrides (JSON)
    result_backend_url: str | None = None  # chords need one; None: the Redis broker, or file:// under broker_dir
    gate_auroc_margin: float = Field(0.02, ge=0, le=1)  # candidate AUROC may be this much below active
    gate_f1_margin: float = Field(0.05, ge=0, le=1)  # candidate F1 may be this much below active
    # of held-out nominal/good images flagged: the default model targets 15% (flags 10–13% on the labelled sets)
    gate_max_nominal_flag_rate: float = Field(0.25, ge=0, le=1)
    gate_nominal_sample: int = Field(200, ge=1)  # recent nominal/good images for the threshold check
    gate_max_labelled: int = Field(500, ge=1)  # most recent labelled images the gate scores
    # The independent gate (scheduler/gate.py): held-out slice, minimum counts, absolute floors.
    gate_holdout_fraction: float = Field(0.2, ge=0, lt=1)  # nominal/good keys (by hash) kept out of training
    gate_min_holdout: int = Field(10, ge=1)  # held-out nominal images needed for the nominal checks
    gate_min_labels: int = Field(10, ge=1)  # labelled images of each class needed before labels count
    gate_min_defect_recall: float = Field(0.5, ge=0, le=1)  # floor: flagged share of labelled defects
    gate_synthetic: bool = True  # synthetic anomalies from held-out images (label-free check)
    gate_min_synthetic_recall: float = Field(0.3, ge=0, le=1)  # floor: flagged share of synthetic anomalies
    # candidate's held-out nominal vs synthetic-anomaly AUROC may be this much below the active version's
    gate_synthetic_auroc_margin: float = Field(0.05, ge=0, le=1)
    gate_synthetic_margin: float = Field(0.15, ge=0, le=1)  # candidate synthetic recall may be this much below

    # --- observability ---------------------------------------------------------------------------
    metrics_port: int = Field(0, ge=0, le=65535)  # Prometheus /metrics of worker and ingest; 0: off

    # --- event sources ---------------------------------------------------------------------------
    sqs_queue_url: str | None = None
    sqs_endpoint_url: str | None = None  # None: the S3 endpoint (MinIO, moto and LocalStack serve both)
    webhook_host: str = "127.0.0.1"
    webhook_port: int = Field(8088, ge=1, le=65535)
    webhook_token: SecretStr | None = None
    redis_events_url: str | None = None
    redis_events_key: str = Field("waferwatch:events", min_length=1)
    watch_dir: Path | None = None  # None: <storage_root>/<incoming_prefix>, the folder storage's inbox
    watch_poll_s: float = Field(1.0, gt=0)

    # --- validators ------------------------------------------------------------------------------
    @field_validator("nightly_retrain_zone")
    @classmethod
    def _check_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"nightly_retrain_zone {value!r} is not an IANA time zone; use a name such as Asia/Seoul or UTC"
            ) from exc
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        value = normalize_database_url(value)
        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"database_url {mask_url(value)!r} is not a SQLAlchemy URL: {exc}") from exc
        backend = url.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"database_url must be SQLite or PostgreSQL, got backend {backend!r}")
        return value

    @field_validator("report_database_url")
    @classmethod
    def _check_report_database_url(cls, value: str | None) -> str | None:
        return None if value is None or not value.strip() else normalize_database_url(value)

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError(f"broker_url must look like 'scheme://...', got {mask_url(value)!r}")
        return value

    @field_validator("incoming_prefix", "nominal_prefix", "heatmap_prefix", "model_prefix")
    @classmethod
    def _check_prefixes(cls, value: str, info: Any) -> str:
        return _check_prefix(info.field_name, value)

    @field_validator("key_metadata_regex")
    @classmethod
    def _check_key_regex(cls, value: str) -> str:
        compile_key_metadata_regex(value)
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_RE.match(value):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
        return value

    @field_validator("model_version")
    @classmethod
    def _check_model_version(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,127}", value):
            raise ValueError(
                f"model_version must be 1-128 characters of letters, digits, '.', '_' or '-', got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.retry_backoff_max_s < self.retry_backoff_s:
            raise ValueError(
                f"retry_backoff_max_s ({self.retry_backoff_max_s}) must be >= retry_backoff_s ({self.retry_backoff_s})"
            )
        if self.lease_s > 600:
            raise ValueError(
                f"lease_s ({self.lease_s}) must be at most 600: a dead worker's images wait that long to be re-driven"
            )
        prefixes = {
            "incoming_prefix": self.incoming_prefix,
            "nominal_prefix": self.nominal_prefix,
            "heatmap_prefix": self.heatmap_prefix,
            "model_prefix": self.model_prefix,
        }
        names = list(prefixes)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                a, b = prefixes[first], prefixes[second]
                if a.startswith(b) or b.startswith(a):
                    raise ValueError(f"{first} ({a!r}) and {second} ({b!r}) overlap; keys would be ambiguous")
        if (self.s3_access_key is None) != (self.s3_secret_key is None):
            raise ValueError("set both s3_access_key and s3_secret_key, or neither (boto3's credential chain)")
        if self.watch_dir is None:
            self.watch_dir = self.storage_root / self.incoming_prefix.rstrip("/")
        return self

    # --- derived values --------------------------------------------------------------------------
    @property
    def key_metadata_pattern(self) -> re.Pattern[str]:
        """The compiled :attr:`key_metadata_regex` (``re`` caches compilation)."""
        return compile_key_metadata_regex(self.key_metadata_regex)

    def key_metadata(self, key: str) -> dict[str, str]:
        """Metadata of ``key``, with the incoming or nominal prefix stripped before matching."""
        return parse_key_metadata(
            key, self.key_metadata_pattern, strip_prefixes=(self.incoming_prefix, self.nominal_prefix)
        )

    @property
    def broker_is_filesystem(self) -> bool:
        """True for kombu's filesystem transport (the embedded broker)."""
        return self.broker_url.startswith("filesystem://")

    def broker_transport_options(self, *, create_dirs: bool = True) -> dict[str, Any]:
        """Celery's ``broker_transport_options`` for :attr:`broker_url`.

        The filesystem transport writes to ``data_folder_out`` and reads from ``data_folder_in``; both
        point at the same folder so one configuration serves producers and workers. kombu does not
        create these folders, so they are made here (at app construction, never at import) unless
        ``create_dirs`` is false. Redis gets a visibility timeout longer than the longest task, so a
        slow batch is not redelivered to a second worker while the first still runs it.
        """
        if self.broker_is_filesystem:
            queue_dir = self.broker_dir / "queue"
            processed_dir = self.broker_dir / "processed"
            control_dir = self.broker_dir / "control"
            if create_dirs:
                for folder in (queue_dir, processed_dir, control_dir):
                    folder.mkdir(parents=True, exist_ok=True)
            return {
                "data_folder_in": str(queue_dir),
                "data_folder_out": str(queue_dir),
                "processed_folder": str(processed_dir),
                "store_processed": False,
                "control_folder": str(control_dir),
            }
        if self.broker_url.startswith(_REDIS_SCHEMES):
            return {"visibility_timeout": max(self.redis_visibility_timeout_s, self.task_time_limit_s + 60)}
        return {}

    def masked(self) -> dict[str, Any]:
        """The effective settings as JSON-ready values, with secrets and URL passwords shown as ``***``."""
        result: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                result[name] = MASK
            elif isinstance(value, Path):
                result[name] = str(value)
            elif isinstance(value, str):
                result[name] = mask_url(value)
            else:
                result[name] = value
        return result


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once; call only at entry points and pass values down.

    Tests that change the environment call ``get_settings.cache_clear()``.
    """
    return Settings(_env_file=settings_files())  # type: ignore[call-arg]  (pydantic-settings' init option)


def settings_files() -> tuple[Path, ...]:
    """The ``.env`` files read, lowest priority first: the current directory's, then ``$WAFERWATCH_HOME/.env``
    (the work folder of ``waferwatch demo``, so every command finds the demo's database and storage).
    Environment variables override both."""
    files = [Path(".env")]
    home = os.environ.get(HOME_ENV)
    if home:
        files.append(Path(home) / ".env")
    return tuple(files)
