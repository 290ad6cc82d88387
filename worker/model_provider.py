"""Which model a worker process scores with, loaded once and kept.

Resolution, in order:

1. ``model_dir`` (a pinned local directory): loaded as is; its ``model_versions`` row is created as a
   candidate if missing, because every inference row references its version.
2. ``model_version`` (a pinned version id): that row's ``artifact_uri``.
3. Otherwise the single ``active`` row of ``model_versions``.

An ``artifact_uri`` is a local directory (``/abs/path`` or ``file:///abs/path``) or a key prefix in the
configured bucket (``models/<version>/``, or ``s3://<bucket>/models/<version>/`` naming the same bucket).
Bucket artifacts are downloaded into ``cache_dir/<version>`` (into a temporary folder first, renamed when
complete) and every load verifies each file's sha256 against the manifest (``FoldEnsemble.load``).

Hot reload hook: :meth:`ModelProvider.current` is called at the start of every batch. It costs one
indexed SELECT (or nothing while ``check_interval_s`` has not elapsed) and returns the loaded model for the
version that should be used now, loading a different one first if the active version changed. A batch
keeps the :class:`LoadedModel` it started with, so it finishes with one version. A new version is loaded
(downloaded, hash-checked, backbone built) in a background thread; the batch that noticed it waits for it
at most ``reload_wait_s`` and otherwise goes on with the version already loaded, which keeps scoring until
the swap. The first model of a process is loaded in the foreground (there is nothing to score with yet).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sqlalchemy.orm import Session, sessionmaker

from models import FoldEnsemble
from models.artifacts import MANIFEST, read_manifest
from worker import metrics, model_events, repository
from worker.db import session_scope
from worker.errors import TransientError
from worker.schema import ModelVersion
from worker.storage import ObjectStore

__all__ = [
    "LoadedModel",
    "ModelProvider",
    "ModelRef",
    "ModelUnavailableError",
    "publish_model",
    "register_local_model",
]

logger = logging.getLogger(__name__)

_ARTIFACT_MAX_BYTES = 8 * 1024**3  # a bank file of a huge model; only guards against runaway objects


class ModelUnavailableError(TransientError):
    """No model can be used yet (nothing active, artifact not uploaded): the batch is retried later."""


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Where a model version lives: a local directory or a key prefix in the bucket."""

    version: str
    artifact_uri: str


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready to score, with the version id written on every inference it produces."""

    version: str
    ensemble: FoldEnsemble
    artifact_uri: str
    loaded_at: float


class ModelProvider:
    """Per-process holder of the scoring model (see the module docstring for resolution and reload)."""

    def __init__(
        self,
        *,
        session_factory: sessionmaker[Session],
        store: ObjectStore,
        cache_dir: Path,
        device: str = "auto",
        model_dir: Path | None = None,
        model_version: str | None = None,
        check_interval_s: float = 0.0,
        reload_wait_s: float = 10.0,
    ) -> None:
        self._session_factory = session_factory
        self._store = store
        self._cache_dir = Path(cache_dir)
        self._device = device
        self._model_dir = Path(model_dir) if model_dir is not None else None
        self._model_version = model_version
        self._check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._loaded: LoadedModel | None = None
        self._checked_at = float("-inf")
        self._reload_wait_s = reload_wait_s
        self._reload: tuple[str, threading.Thread] | None = None

    @property
    def loaded(self) -> LoadedModel | None:
        """The model in memory, without any check (None before the first batch)."""
        return self._loaded

    def current(self) -> LoadedModel:
        """The model to score the next batch with; loads it on first use or after the active version changed.

        Raises:
            ModelUnavailableError: nothing to load yet (transient: the task retries).
            ArtifactError: the artifact is corrupt (a hash mismatch); not retried blindly.
        """
        with self._lock:
            now = time.monotonic()
            if self._loaded is not None and now - self._checked_at < self._check_interval_s:
                return self._loaded
            wanted = self.resolve()
            self._checked_at = now
            if self._loaded is None:
                self._loaded = self._load_now(wanted)
                _export_active(None, wanted.version)
                logger.info("model %s loaded from %s", wanted.version, wanted.artifact_uri)
                return self._loaded
            if self._loaded.version == wanted.version:
                return self._loaded
            reload = self._start_reload(wanted)
        reload.join(self._reload_wait_s)
        with self._lock:
            return self._loaded

    def _start_reload(self, ref: ModelRef) -> threading.Thread:
        """The background load of ``ref`` (started unless one for it is running); call with the lock held."""
        if self._reload is not None and self._reload[0] == ref.version and self._reload[1].is_alive():
            return self._reload[1]

        def load() -> None:
            try:
                loaded = self._load_now(ref)
                _ = loaded.ensemble.extractor  # build the backbone here, not in the next batch
            except Exception:
                logger.exception("model %s could not be loaded; still scoring with the previous one", ref.version)
                return
            with self._lock:
                previous = self._loaded.version if self._loaded else None
                self._loaded = loaded
            _export_active(previous, ref.version)
            logger.info("model %s loaded (was %s) from %s", ref.version, previous, ref.artifact_uri)

        thread = threading.Thread(target=load, name=f"model-reload-{ref.version}", daemon=True)
        self._reload = (ref.version, thread)
        thread.start()
        return thread

    def resolve(self) -> ModelRef:
        """The version that should be used now (a cheap DB read; never loads anything)."""
        if self._model_dir is not None:
            if self._loaded is not None:
                return ModelRef(self._loaded.version, self._loaded.artifact_uri)
            return register_local_model(self._session_factory, self._model_dir)
        with session_scope(self._session_factory) as session:
            if self._model_version is not None:
                row = session.get(ModelVersion, self._model_version)
                if row is None:
                    raise ModelUnavailableError(
                        f"model_version {self._model_version!r} has no model_versions row; register it first"
                    )
            else:
                row = repository.get_active_model_version(session)
                if row is None:
                    raise ModelUnavailableError(
                        "no active model version yet; train and activate one (waferwatch demo does both)"
                    )
            if not row.artifact_uri:
                raise ModelUnavailableError(f"model version {row.id!r} has no artifact_uri")
            return ModelRef(row.id, row.artifact_uri)

    def _load_now(self, ref: ModelRef) -> LoadedModel:
        directory = self._local_directory(ref)
        ensemble = FoldEnsemble.load(directory, device=self._device)
        if ensemble.version != ref.version:
            raise ModelUnavailableError(
                f"artifact {ref.artifact_uri} holds model {ensemble.version}, not {ref.version}; fix the registry"
            )
        return LoadedModel(ref.version, ensemble, ref.artifact_uri, time.time())

    def _local_directory(self, ref: ModelRef) -> Path:
        """The artifact as a local directory, downloading a bucket artifact into the cache once."""
        local = _local_path(ref.artifact_uri)
        if local is not None:
            if not (local / MANIFEST).is_file():
                raise ModelUnavailableError(f"model directory {local} has no {MANIFEST}")
            return local
        prefix = _bucket_prefix(ref.artifact_uri, self._store.bucket)
        target = self._cache_dir / ref.version
        if (target / MANIFEST).is_file():
            return target
        return _download(self._store, prefix, target)


def _export_active(previous: str | None, version: str) -> None:
    """The ``waferwatch_active_model_info`` gauge: 1 for the version now scored with, 0 for the one replaced."""
    if previous is not None and previous != version:
        metrics.ACTIVE_MODEL.labels(version=previous).set(0)
    metrics.ACTIVE_MODEL.labels(version=version).set(1)


def _local_path(uri: str) -> Path | None:
    if uri.startswith("file://"):
        return Path(unquote(urlsplit(uri).path))
    if uri.startswith("/"):
        return Path(uri)
    return None


def _bucket_prefix(uri: str, bucket: str) -> str:
    if uri.startswith("s3://"):
        parts = urlsplit(uri)
        if parts.netloc != bucket:
            raise ModelUnavailableError(f"artifact {uri} is in bucket {parts.netloc!r}, this worker reads {bucket!r}")
        uri = parts.path.lstrip("/")
    return uri if uri.endswith("/") else uri + "/"


def _download(store: ObjectStore, prefix: str, target: Path) -> Path:
    """Copy every object under ``prefix`` into ``target`` (atomically: a temp folder renamed at the end)."""
    objects = list(store.list(prefix))
    if not any(info.key == prefix + MANIFEST for info in objects):
        raise ModelUnavailableError(f"no {MANIFEST} under {store.bucket}/{prefix}; the artifact is not uploaded")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        for info in objects:
            name = info.key[len(prefix) :]
            if "/" in name or not name:
                continue  # a model directory is flat
            stored = store.get(info.key, max_bytes=_ARTIFACT_MAX_BYTES)
            (staging / name).write_bytes(stored.data)
        read_manifest(staging)
        if target.exists():  # another process finished first; its copy is as good as ours
            shutil.rmtree(staging, ignore_errors=True)
            return target
        staging.replace(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def register_local_model(
    session_factory: sessionmaker[Session], directory: Path, *, activate: bool = False
) -> ModelRef:
    """Make sure ``directory``'s model has a ``model_versions`` row (artifact_uri = its absolute path)."""
    manifest = read_manifest(directory)
    uri = str(Path(directory).resolve())
    with session_scope(session_factory) as session:
        _, created = repository.ensure_model_version(
            session,
            version=manifest["version"],
            manifest=manifest,
            artifact_uri=uri,
            threshold=manifest["threshold"],
            fold_thresholds=manifest["fold_thresholds"],
        )
        if created:
            model_events.record_event(
                session, version=manifest["version"], event="registered", details={"artifact_uri": uri}
            )
        if activate:
            model_events.activate(session, manifest["version"], how="register")
    return ModelRef(manifest["version"], uri)


def publish_model(
    store: ObjectStore,
    session_factory: sessionmaker[Session],
    directory: Path,
    *,
    model_prefix: str,
    activate: bool = True,
    stage: str | None = None,
    event: str = "registered",
    actor: str = model_events.SCHEDULER,
    reason: str | None = None,
    details: dict[str, object] | None = None,
) -> ModelRef:
    """Upload a model directory to ``<model_prefix><version>/``, register it, and optionally activate it.

    The manifest is uploaded last, so a reader never sees a manifest naming files not yet there. ``stage``
    is written in the same transaction as the row, so nobody sees a candidate whose gate has not run as a
    finished one. A new row gets its first history entry, ``event`` (``registered``, or ``built`` for a
    rebuild) by ``actor``, with ``reason`` (e.g. "calibrated from VERSION").
    """
    manifest = read_manifest(directory)
    version = manifest["version"]
    prefix = f"{model_prefix}{version}/"
    files = sorted(path for path in Path(directory).iterdir() if path.is_file() and path.name != MANIFEST)
    for path in [*files, Path(directory) / MANIFEST]:
        if path.name.startswith("."):
            continue
        store.put(prefix + path.name, path.read_bytes())
    with session_scope(session_factory) as session:
        row, created = repository.ensure_model_version(
            session,
            version=version,
            manifest=manifest,
            artifact_uri=prefix,
            threshold=manifest["threshold"],
            fold_thresholds=manifest["fold_thresholds"],
        )
        if row.artifact_uri != prefix:
            raise ValueError(f"model {version} is already registered at {row.artifact_uri}, not {prefix}")
        if created:
            model_events.record_event(
                session,
                version=version,
                event=event,
                actor=actor,
                reason=reason,
                details={"artifact_uri": prefix, **(details or {})},
            )
        if stage is not None:
            row.stage = stage
        if activate:
            model_events.activate(session, version, actor=actor, how="register")
    return ModelRef(version, prefix)
