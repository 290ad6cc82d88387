"""The pieces the worker-recovery tests share: a folder bucket with real images and the active model, a
database, short leases and retries, and the SQL accounting at the end.

The settings are the product's, shortened so that a test takes seconds: ``lease_s`` 3 (renewed every
second), ``redrive_interval_s`` 1, backoff 0.5-2 s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from worker import repository
from worker.db import make_engine, make_session_factory, session_scope, upgrade_database
from worker.model_provider import publish_model
from worker.schema import Image, Inference
from worker.settings import Settings
from worker.storage import FolderStore

try:
    from end_state import image_states
except ModuleNotFoundError:  # tests/faults became a package
    from tests.faults.end_state import image_states

__all__ = ["Rig", "make_rig"]


@dataclass
class Rig:
    """One test's bucket folder, database and worker environment."""

    workdir: Path
    database_url: str
    broker_url: str
    session_factory: sessionmaker[Session]
    store: FolderStore
    model_version: str
    env: dict[str, str] = field(default_factory=dict)

    def settings(self) -> Settings:
        """The workers' settings, read from the same values as their environment."""
        return Settings(**{name.removeprefix("WAFERWATCH_").lower(): value for name, value in self.env.items()})

    def register(self, images: list[Path], prefix: str) -> list[int]:
        """Put the images in the bucket and register them (as ingest would), returning their ids."""
        ids = []
        with session_scope(self.session_factory) as session:
            for index, path in enumerate(images):
                key = f"incoming/{prefix}/{index:03d}-{path.name}"
                info = self.store.put(key, path.read_bytes())
                row, _ = repository.register_image(
                    session, bucket=self.store.bucket, key=key, etag=info.etag, size=info.size
                )
                ids.append(row.id)
        return ids

    def statuses(self, ids: list[int]) -> dict[int, tuple[str, int]]:
        """id → (status, inferences by the active version)."""
        with session_scope(self.session_factory) as session:
            rows = dict(session.execute(select(Image.id, Image.status).where(Image.id.in_(ids))).all())
            counts: dict[int, int] = {}
            for image_id in session.scalars(
                select(Inference.image_id).where(
                    Inference.image_id.in_(ids), Inference.model_version == self.model_version
                )
            ):
                counts[image_id] = counts.get(image_id, 0) + 1
        return {image_id: (status, counts.get(image_id, 0)) for image_id, status in rows.items()}

    def settled(self, ids: list[int]) -> bool:
        try:
            return all(status != "queued" for status, _ in self.statuses(ids).values())
        except Exception:  # the database may be down in the outage test
            return False

    def wait_settled(self, ids: list[int], timeout_s: float) -> float:
        """Seconds until no image of ``ids`` is ``queued``; AssertionError with the states after ``timeout_s``."""
        begin = time.monotonic()
        while not self.settled(ids):
            assert time.monotonic() - begin < timeout_s, f"not settled in {timeout_s} s: {self.statuses(ids)}"
            time.sleep(0.3)
        return time.monotonic() - begin

    def end_state(self) -> dict[str, list[str]]:
        """The SQL accounting of ``end_state`` (every image exactly once, explained)."""
        with session_scope(self.session_factory) as session:
            return image_states(session, self.model_version)


def make_rig(workdir: Path, database_url: str, broker_url: str, model_dir: Path, **settings: str) -> Rig:
    """Migrate ``database_url``, publish the model to a folder bucket, and build the worker environment."""
    upgrade_database(database_url)
    store = FolderStore(workdir / "bucket")
    store.ensure_bucket()
    factory = make_session_factory(make_engine(database_url))
    version = publish_model(store, factory, model_dir, model_prefix="models/")
    values = {
        "database_url": database_url,
        "broker_url": broker_url,
        "storage": "folder",
        "storage_root": str(workdir / "bucket"),
        "model_cache_dir": str(workdir / "cache"),
        "device": "cpu",
        "cpu_threads": "1",
        "lease_s": "3",
        "redrive_interval_s": "1",
        "retry_backoff_s": "0.5",
        "retry_backoff_max_s": "2",
        "metrics_port": "0",
        **settings,
    }
    env = {f"WAFERWATCH_{name.upper()}": value for name, value in values.items()}
    return Rig(workdir, database_url, broker_url, factory, store, version.version, env)
