"""Scoring one micro-batch of images: fetch → decode → score → heatmap → persist, without Celery.

:func:`score_batch` is what the ``waferwatch.score_batch`` task runs; tests call it directly. It takes
image ids (rows the event source committed), and for each one that still needs a score by the model
version of this batch:

* fetches the bytes (size limit ``max_object_bytes``) and decodes them (pixel limit ``max_image_pixels``)
  on a small thread pool, so downloads overlap each other;
* scores every decoded image in one call (one backbone pass per ``batch_size`` chunk, shared by all folds);
* writes the heatmap PNG to ``<heatmap_prefix><version>/<key without incoming prefix>.<image id>.png``
  *before* committing, then writes the inference, the status and the content hash in one transaction
  per image, so a row never points at a heatmap that does not exist.

Outcomes per image: a missing object is ``skipped`` (it was deleted; nothing to retry); an empty,
oversized, corrupt or non-image object gets a ``failures`` row and status ``failed``; neither is retried,
and one such image never stops the rest of its batch. A transient error (storage or database down) on
some images does not stop the others either: the rest are committed first, then the error is raised so
the task retries, and the retry skips what is already scored (``has_inference``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import BadImageError, decode_image
from models.heatmap import overlay
from worker import metrics, repository
from worker.db import session_scope
from worker.errors import BadObjectError, ObjectMissingError, PermanentError, TransientError
from worker.model_provider import LoadedModel
from worker.schema import Image, Inference
from worker.storage import ObjectStore

__all__ = ["BatchResult", "ScoringOptions", "heatmap_key", "heatmap_png", "record_gave_up", "score_batch"]

logger = logging.getLogger(__name__)

#: Statuses after which an image is never picked up again by a plain redelivery.
_FINAL_STATUSES = ("failed", "skipped")


@dataclass(frozen=True, slots=True)
class ScoringOptions:
    """The settings values scoring needs, passed down from the entry point."""

    incoming_prefix: str = "incoming/"
    heatmap_prefix: str = "heatmaps/"
    max_object_bytes: int = 200 * 1024 * 1024
    max_image_pixels: int = 64_000_000
    fetch_threads: int = 8
    write_heatmaps: bool = True


@dataclass
class BatchResult:
    """What happened to each image id of a batch, and where the time went (seconds per stage)."""

    model_version: str
    scored: list[int] = field(default_factory=list)
    already_done: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (the task's log line)."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Work:
    image_id: int
    bucket: str
    key: str


@dataclass(slots=True)
class _Fetched:
    work: _Work
    image: PILImage.Image
    sha256: str
    download_s: float
    decode_s: float


def heatmap_key(options: ScoringOptions, *, model_version: str, image_key: str, image_id: int) -> str:
    """Where the overlay of one image by one model version is stored (unique per image row)."""
    relative = image_key.removeprefix(options.incoming_prefix)
    return f"{options.heatmap_prefix}{model_version}/{relative}.{image_id}.png"


def heatmap_png(image: PILImage.Image, anomaly_map: np.ndarray, *, threshold: float) -> bytes:
    """The overlay PNG at the anomaly map's resolution (what the model saw), fast to encode.

    ``models.heatmap.overlay_png`` blends at the original size with default compression: about 100 ms
    for a 512² image on one core, as long as the model itself spends per image. At the map's size (224²)
    and zlib level 1 it takes about 15 ms and 75 kB, and shows the same information.
    """
    height, width = anomaly_map.shape[:2]
    if image.width * image.height > width * height:
        image = image.resize((width, height), PILImage.Resampling.BILINEAR)
    buffer = io.BytesIO()
    overlay(image, anomaly_map, threshold=threshold).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def score_batch(
    image_ids: Sequence[int],
    *,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    model: LoadedModel | Callable[[], LoadedModel],
    options: ScoringOptions,
) -> BatchResult:
    """Score the images of one batch that still need it; see the module docstring for every outcome.

    ``model`` is the loaded model or a callable returning it (``ModelProvider.current``), called once: the
    whole batch is scored by one version.

    Raises:
        TransientError: some images could not be fetched or written; the others are committed.
    """
    started = time.perf_counter()
    loaded = model() if callable(model) else model
    result = BatchResult(model_version=loaded.version)
    work = _pending(session_factory, list(dict.fromkeys(image_ids)), loaded.version, result)
    metrics.BATCH_SIZE.observe(len(work))
    transient: list[TransientError] = []
    fetched: list[_Fetched] = []
    threads = max(1, min(options.fetch_threads, len(work)))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fetch") as pool:
        outcomes = list(pool.map(lambda item: _fetch_and_decode(item, store, options), work))
        for item, outcome in zip(work, outcomes, strict=True):
            if isinstance(outcome, _Fetched):
                fetched.append(outcome)
            elif isinstance(outcome, TransientError):
                transient.append(outcome)
                result.retry.append(item.image_id)
            else:
                _record_permanent(session_factory, item, outcome, result)
        result.seconds["fetch"] = time.perf_counter() - started
        if fetched:
            _score_and_persist(fetched, pool, session_factory, store, loaded, options, result, transient)
    result.seconds["total"] = time.perf_counter() - started
    logger.info("score_batch %s", json.dumps(result.as_dict(), sort_keys=True))
    if transient:
        raise transient[0]
    return result


def _pending(
    session_factory: sessionmaker[Session], image_ids: list[int], version: str, result: BatchResult
) -> list[_Work]:
    """The images of the batch that need a score by ``version`` (a read-only unit of work)."""
    if not image_ids:
        return []
    with session_scope(session_factory) as session:
        rows = session.execute(
            select(Image.id, Image.bucket, Image.key, Image.kind, Image.status).where(Image.id.in_(image_ids))
        ).all()
        done = set(
            session.scalars(
                select(Inference.image_id).where(Inference.image_id.in_(image_ids), Inference.model_version == version)
            )
        )
    by_id = {row.id: row for row in rows}
    work: list[_Work] = []
    for image_id in image_ids:
        row = by_id.get(image_id)
        if row is None or row.kind != "incoming" or image_id in done or row.status in _FINAL_STATUSES:
            result.already_done.append(image_id)
            continue
        work.append(_Work(image_id, row.bucket, row.key))
    return work


def _fetch_and_decode(item: _Work, store: ObjectStore, options: ScoringOptions) -> _Fetched | Exception:
    """Fetch and decode one image; the error is returned (not raised) so the batch goes on."""
    try:
        if item.bucket != store.bucket:
            raise BadObjectError(
                f"image {item.image_id} is in bucket {item.bucket!r} but this worker reads {store.bucket!r}"
            )
        begin = time.perf_counter()
        stored = store.get(item.key, max_bytes=options.max_object_bytes)
        downloaded = time.perf_counter()
        image = decode_image(stored.data, name=item.key, max_pixels=options.max_image_pixels)
        decoded = time.perf_counter()
    except (PermanentError, TransientError, BadImageError) as exc:
        return exc
    metrics.observe_stage("download", downloaded - begin)
    metrics.observe_stage("decode", decoded - downloaded)
    return _Fetched(item, image, hashlib.sha256(stored.data).hexdigest(), downloaded - begin, decoded - downloaded)


def _record_permanent(
    session_factory: sessionmaker[Session], item: _Work, error: Exception, result: BatchResult
) -> None:
    """Missing object → skipped; anything else permanent → a failures row (one transaction each)."""
    with session_scope(session_factory) as session:
        if isinstance(error, ObjectMissingError):
            repository.mark_skipped(session, image_id=item.image_id, reason=str(error))
            result.skipped.append(item.image_id)
            metrics.IMAGES_SKIPPED.labels(reason="missing").inc()
            return
        reason = "bad_image" if isinstance(error, BadImageError) else type(error).__name__
        repository.record_failure(session, image_id=item.image_id, error_type=reason, message=str(error))
    result.failed.append(item.image_id)
    metrics.IMAGES_FAILED.labels(reason=reason).inc()
    logger.warning("image %s (%s) not scored: %s", item.image_id, item.key, error)


def _score_and_persist(
    fetched: list[_Fetched],
    pool: ThreadPoolExecutor,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    loaded: LoadedModel,
    options: ScoringOptions,
    result: BatchResult,
    transient: list[TransientError],
) -> None:
    begin = time.perf_counter()
    scores = loaded.ensemble.score_images(
        [item.image for item in fetched],
        [str(item.work.image_id) for item in fetched],
        with_maps=options.write_heatmaps,
    )
    model_s = time.perf_counter() - begin
    result.seconds["model"] = model_s
    per_image_model_s = model_s / len(fetched)
    for _ in fetched:
        metrics.observe_stage("model", per_image_model_s)

    def write_heatmap(pair: tuple[_Fetched, Any]) -> str | TransientError | None:
        item, score = pair
        if not options.write_heatmaps or score.anomaly_map is None:
            return None
        started = time.perf_counter()
        key = heatmap_key(options, model_version=loaded.version, image_key=item.work.key, image_id=item.work.image_id)
        png = heatmap_png(item.image, np.asarray(score.anomaly_map), threshold=score.threshold)
        try:
            store.put(key, png, content_type="image/png")
        except TransientError as exc:
            return exc
        metrics.observe_stage("heatmap", time.perf_counter() - started)
        return key

    begin = time.perf_counter()
    keys = list(pool.map(write_heatmap, zip(fetched, scores, strict=True)))
    result.seconds["heatmap"] = time.perf_counter() - begin
    begin = time.perf_counter()
    for item, score, key in zip(fetched, scores, keys, strict=True):
        if isinstance(key, TransientError):
            transient.append(key)
            result.retry.append(item.work.image_id)
            continue
        written = time.perf_counter()
        with session_scope(session_factory) as session:
            repository.set_image_sha256(session, image_id=item.work.image_id, sha256=item.sha256)
            created = repository.record_inference(
                session,
                image_id=item.work.image_id,
                model_version=loaded.version,
                score=score.score,
                threshold=score.threshold,
                is_anomalous=score.is_anomalous,
                fold_scores=score.fold_scores,
                heatmap_key=key,
                timings={
                    "download_ms": item.download_s * 1000.0,
                    "decode_ms": item.decode_s * 1000.0,
                    "model_ms": per_image_model_s * 1000.0,
                },
            )
        metrics.observe_stage("write", time.perf_counter() - written)
        if created:
            result.scored.append(item.work.image_id)
            metrics.IMAGES_SCORED.labels(model_version=loaded.version).inc()
        else:
            result.already_done.append(item.work.image_id)
    result.seconds["write"] = time.perf_counter() - begin


def record_gave_up(session_factory: sessionmaker[Session], image_ids: Sequence[int], error: BaseException) -> int:
    """Dead-letter the images of a batch that are still ``queued`` after the last retry; returns how many.

    Called when a task exhausted its attempts on a transient error, so such images are visible in
    ``failures`` instead of staying ``queued`` forever.
    """
    message = f"gave up after the last retry: {type(error).__name__}: {error}"
    recorded = 0
    with session_scope(session_factory) as session:
        queued = session.scalars(
            select(Image.id).where(Image.id.in_(list(image_ids)), Image.status == "queued", Image.kind == "incoming")
        ).all()
        for image_id in queued:
            repository.record_failure(session, image_id=image_id, error_type=type(error).__name__, message=message)
            recorded += 1
    if recorded:
        metrics.IMAGES_FAILED.labels(reason=type(error).__name__).inc(recorded)
    return recorded
