"""Scoring one micro-batch of images: fetch → decode → score → heatmap → persist, without Celery.

:func:`score_batch` is what the ``waferwatch.score_batch`` task runs; tests call it directly. It takes
image ids (rows the event source committed) and scores those that still need a score by the model version
of this batch. The stages overlap, so the model is rarely kept waiting:

* every fetch (size limit ``max_object_bytes``) and decode (pixel limit ``max_image_pixels``) is queued on
  a thread pool at once, and runs ahead of the model (downloads wait on the network, PNG decoding
  releases the GIL);
* the model scores the images in chunks of ``model_chunk`` (8 on a CPU, the whole batch on a GPU), each
  as soon as its images are decoded; one backbone pass serves every fold;
* each scored image's anomaly map (every image, only the anomalous ones, or none: ``heatmaps``) is kept
  as an 8-bit 56² PNG for its row (:func:`models.heatmap.encode_map`, 0.2 ms); with
  ``heatmap_format="overlay"`` the rendered overlay is also encoded and written, on the same pool, to
  ``<heatmap_prefix><version>/<key without incoming prefix and suffix>.<image id>.heatmap.png`` while the
  next chunk is scored;
* once every overlay is written, all inferences (with their maps), statuses and content hashes of the
  batch are written in one transaction of two set-based statements, so a row never points at a
  missing overlay and the database costs a round trip per batch, not per image.

Each stage's CPU time (the thread's own, ``time.thread_time``) is in ``BatchResult.cpu`` and the task's
log line, so where a worker's CPU goes outside the model can be read off any batch.

A row scores exactly the bytes it registered: on a versioned bucket the fetch reads its ``version_id``,
otherwise it sends ``If-Match`` with its ``etag``. If the object was overwritten meanwhile, the row is
``superseded`` by a row for the current version (registered here, from a HEAD), which is enqueued with
``enqueue`` when given; it is never scored with the new bytes. Decodes hold pixels of a process-wide
budget (``decode_pixel_budget``, default ``max_image_pixels``: one image of the largest allowed size at a
time, or any number of ordinary ones), and decode straight to the model's input size, so eight 8000²
16-bit PNGs no longer hold eight full-size copies at once.

Outcomes per image: a missing object is ``skipped`` (it was deleted; nothing to retry); an empty,
oversized, corrupt or non-image object gets a ``failures`` row and status ``failed``; an overwritten one
is ``superseded``; none is retried, and one such image never stops the rest of its batch. A transient
error (storage or database down) on some images does not stop the others either: the rest are committed
first, then the error is raised so the task retries, and the retry skips what is already scored
(``has_inference``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import BadImageError, ImageScore
from models.heatmap import StoredMap, encode_map, heatmap_png  # heatmap_png: re-exported
from models.images import image_pixels, load_pixels, to_model_input
from worker import metrics, repository
from worker.db import session_scope
from worker.decode_budget import return_large_buffers_to_the_os, shared_budget
from worker.errors import (
    BadObjectError,
    ObjectChangedError,
    ObjectMissingError,
    PermanentError,
    StorageUnavailableError,
    TransientError,
)
from worker.model_provider import LoadedModel
from worker.schema import Image, Inference
from worker.storage import ObjectInfo, ObjectStore

__all__ = ["BatchResult", "ScoringOptions", "heatmap_key", "heatmap_png", "record_gave_up", "score_batch"]

logger = logging.getLogger(__name__)

#: One model call at a time per process: with several batches in flight (the ``threads`` pool of a GPU
#: worker) the others fetch, decode and write meanwhile, and GPU memory holds one batch's activations.
_MODEL_TURN = threading.Lock()

#: Statuses after which an image is never picked up again by a plain redelivery.
_FINAL_STATUSES = ("failed", "skipped", "superseded")


@dataclass(frozen=True, slots=True)
class ScoringOptions:
    """The settings values scoring needs, passed down from the entry point."""

    incoming_prefix: str = "incoming/"
    heatmap_prefix: str = "heatmaps/"
    max_object_bytes: int = 200 * 1024 * 1024
    max_image_pixels: int = 64_000_000
    fetch_threads: int = 8
    heatmaps: str = "all"  # all | anomalous | none: which scored images get a stored anomaly map
    heatmap_format: str = "map"  # map | overlay: overlay also writes the rendered PNG object (heatmap_key)
    model_chunk: int | None = None  # images per model call; None: 8 on a CPU, the whole batch on a GPU
    decode_pixel_budget: int | None = None  # pixels decoded at once in a process; None: max_image_pixels

    @property
    def pixel_budget(self) -> int:
        """The decode budget in pixels (``decode_pixel_budget``, else ``max_image_pixels``)."""
        return self.decode_pixel_budget or self.max_image_pixels


@dataclass
class BatchResult:
    """What happened to each image id of a batch, and where the time went (seconds per stage)."""

    model_version: str
    scored: list[int] = field(default_factory=list)
    already_done: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    superseded: list[int] = field(default_factory=list)
    registered: list[int] = field(default_factory=list)  # new rows of overwritten objects' current versions
    retry: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per stage, all threads of the batch

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (the task's log line)."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Work:
    image_id: int
    bucket: str
    key: str
    etag: str | None = None
    version_id: str | None = None


@dataclass(frozen=True, slots=True)
class _Overwritten:
    """The fetch found a newer version than the row's: what a HEAD says the object is now."""

    error: ObjectChangedError
    current: ObjectInfo


@dataclass(slots=True)
class _Fetched:
    work: _Work
    image: PILImage.Image
    sha256: str
    download_s: float
    decode_s: float
    cpu: dict[str, float]
    model_s: float = 0.0


def heatmap_key(options: ScoringOptions, *, model_version: str, image_key: str, image_id: int) -> str:
    """Where the overlay of one image by one model version is stored: ``<folder>/<stem>.<image id>.heatmap.png``
    beside the image's own folders (the id keeps it unique per image row when an object is overwritten)."""
    relative = PurePosixPath(image_key.removeprefix(options.incoming_prefix))
    return f"{options.heatmap_prefix}{model_version}/{relative.with_name(relative.stem)}.{image_id}.heatmap.png"


def score_batch(
    image_ids: Sequence[int],
    *,
    session_factory: sessionmaker[Session],
    store: ObjectStore,
    model: LoadedModel | Callable[[], LoadedModel],
    options: ScoringOptions,
    enqueue: Callable[[Sequence[int]], None] | None = None,
) -> BatchResult:
    """Score the images of one batch that still need it; see the module docstring for every outcome.

    ``model`` is the loaded model or a callable returning it (``ModelProvider.current``), called once: the
    whole batch is scored by one version. ``enqueue`` sends the rows registered for overwritten objects
    (after their commit); without it they wait, ``queued``, for reconciliation.

    Raises:
        TransientError: some images could not be fetched or written; the others are committed.
    """
    started = time.perf_counter()
    return_large_buffers_to_the_os()
    loaded = model() if callable(model) else model
    result = BatchResult(model_version=loaded.version)
    work = _pending(session_factory, list(dict.fromkeys(image_ids)), loaded.version, result)
    metrics.BATCH_SIZE.observe(len(work))
    transient: list[TransientError] = []
    if work:
        chunk = options.model_chunk or _default_model_chunk(loaded, len(work))
        threads = max(1, min(options.fetch_threads, len(work)))
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fetch") as pool:
            size = loaded.ensemble.input_size
            fetches = [pool.submit(_fetch_and_decode, item, store, options, size) for item in work]
            uploads: list[tuple[_Fetched, ImageScore, StoredMap | None, Future[_Overlay] | None]] = []
            for begin in range(0, len(work), chunk):
                ready = _collect(work[begin : begin + chunk], fetches[begin : begin + chunk], session_factory, result)
                transient.extend(error for error in ready if isinstance(error, TransientError))
                fetched = [item for item in ready if isinstance(item, _Fetched)]
                if fetched:
                    scores = _score(fetched, loaded, options, result)
                    for item, score in zip(fetched, scores, strict=True):
                        stored = _stored_map(score, options, result)
                        overlay = None
                        if stored is not None and options.heatmap_format == "overlay":
                            overlay = pool.submit(_write_overlay, item, score, loaded.version, store, options)
                        uploads.append((item, score, stored, overlay))
            waited = time.perf_counter()
            finished = [
                (item, score, stored, None if overlay is None else _overlay_result(overlay, result))
                for item, score, stored, overlay in uploads
            ]
            result.seconds["heatmap_wait"] = time.perf_counter() - waited
        _persist(finished, session_factory, loaded.version, result, transient)
    if result.registered and enqueue is not None:
        _enqueue_registered(enqueue, result.registered)
    result.seconds["total"] = time.perf_counter() - started
    logger.info("score_batch %s", json.dumps(result.as_dict(), sort_keys=True))
    if transient:
        raise transient[0]
    return result


def _default_model_chunk(loaded: LoadedModel, batch: int) -> int:
    """Images per model call: the whole batch on a GPU; 8 on a CPU, so the model starts as soon as the
    first 8 images are decoded and their heatmaps are encoded while the next chunk is scored."""
    return batch if loaded.ensemble.extractor.device.type == "cuda" else 8


def _enqueue_registered(enqueue: Callable[[Sequence[int]], None], image_ids: list[int]) -> None:
    """Send the current versions of overwritten objects; their rows are committed, so a lost send only
    delays them (reconciliation re-sends ``queued`` rows) and must not fail the batch that found them."""
    try:
        enqueue(image_ids)
    except Exception:
        logger.exception("could not enqueue %d re-registered images; reconciliation will send them", len(image_ids))


def _add_seconds(result: BatchResult, stage: str, seconds: float) -> None:
    result.seconds[stage] = result.seconds.get(stage, 0.0) + seconds


def _add_cpu(result: BatchResult, stage: str, seconds: float) -> None:
    result.cpu[stage] = result.cpu.get(stage, 0.0) + seconds


def _collect(
    work: Sequence[_Work],
    fetches: Sequence[Future[_Fetched | _Overwritten | Exception]],
    session_factory: sessionmaker[Session],
    result: BatchResult,
) -> list[_Fetched | TransientError]:
    """Wait for the fetches of one chunk (in order); record permanent failures, return the rest."""
    waited = time.perf_counter()
    outcomes = [future.result() for future in fetches]
    _add_seconds(result, "fetch_wait", time.perf_counter() - waited)
    ready: list[_Fetched | TransientError] = []
    for item, outcome in zip(work, outcomes, strict=True):
        if isinstance(outcome, _Fetched):
            ready.append(outcome)
        elif isinstance(outcome, TransientError):
            ready.append(outcome)
            result.retry.append(item.image_id)
        elif isinstance(outcome, _Overwritten):
            _record_overwritten(session_factory, item, outcome, result)
        else:
            _record_permanent(session_factory, item, outcome, result)
    return ready


def _pending(
    session_factory: sessionmaker[Session], image_ids: list[int], version: str, result: BatchResult
) -> list[_Work]:
    """The images of the batch that need a score by ``version`` (a read-only unit of work)."""
    if not image_ids:
        return []
    with session_scope(session_factory) as session:
        rows = session.execute(
            select(Image.id, Image.bucket, Image.key, Image.kind, Image.status, Image.etag, Image.version_id).where(
                Image.id.in_(image_ids)
            )
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
        work.append(_Work(image_id, row.bucket, row.key, row.etag, row.version_id))
    return work


def _fetch_and_decode(
    item: _Work, store: ObjectStore, options: ScoringOptions, image_size: int
) -> _Fetched | _Overwritten | Exception:
    """Fetch the registered version, decode it to the model's input size within the pixel budget; the
    error is returned (not raised) so the batch goes on. Resizing here takes it off the model's thread,
    never holds the full-size RGB image, and the heatmap reuses the result (it is drawn at the anomaly
    map's size, which is the input size)."""
    try:
        if item.bucket != store.bucket:
            raise BadObjectError(
                f"image {item.image_id} is in bucket {item.bucket!r} but this worker reads {store.bucket!r}"
            )
        begin, cpu_begin = time.perf_counter(), time.thread_time()
        try:
            stored = store.get(
                item.key,
                max_bytes=options.max_object_bytes,
                version_id=item.version_id,
                if_match=None if item.version_id else item.etag,
            )
        except ObjectChangedError as exc:
            return _overwritten(item, store, exc)
        downloaded = time.perf_counter()
        cpu = {"fetch": time.thread_time() - cpu_begin}
        with shared_budget(options.pixel_budget).hold(image_pixels(stored.data)):
            mark = time.thread_time()
            pixels = load_pixels(stored.data, name=item.key, max_pixels=options.max_image_pixels, size=image_size)
            cpu["decode"], mark = time.thread_time() - mark, time.thread_time()
            image = to_model_input(pixels, image_size)
            del pixels
            cpu["resize"] = time.thread_time() - mark
        decoded = time.perf_counter()
        mark = time.thread_time()
        sha256 = hashlib.sha256(stored.data).hexdigest()
        cpu["hash"] = time.thread_time() - mark
    except (PermanentError, TransientError, BadImageError) as exc:
        return exc
    metrics.observe_stage("download", downloaded - begin)
    metrics.observe_stage("decode", decoded - downloaded)
    return _Fetched(item, image, sha256, downloaded - begin, decoded - downloaded, cpu)


def _overwritten(item: _Work, store: ObjectStore, error: ObjectChangedError) -> _Overwritten | Exception:
    """What the object is now (a HEAD), to register it; a deleted object is simply missing."""
    try:
        current = store.head(item.key)
    except (PermanentError, TransientError) as exc:
        return exc
    if current.etag == error.expected_etag:  # overwritten again with the registered bytes: read it again
        return StorageUnavailableError(
            f"{item.bucket}/{item.key} changed while it was read (ETag {error.expected_etag!r} again); retry"
        )
    return _Overwritten(error, current)


def _record_overwritten(
    session_factory: sessionmaker[Session], item: _Work, outcome: _Overwritten, result: BatchResult
) -> None:
    """The row's bytes are gone: mark it ``superseded`` and register the current version (one transaction)."""
    current = outcome.current
    with session_scope(session_factory) as session:
        registered = repository.mark_superseded(
            session, image_id=item.image_id, etag=current.etag, version_id=current.version_id, size=current.size
        )
    if registered is None:  # recorded meanwhile by another worker
        result.already_done.append(item.image_id)
        return
    new, created = registered
    result.superseded.append(item.image_id)
    if created:
        result.registered.append(new.id)
    metrics.IMAGES_SKIPPED.labels(reason="superseded").inc()
    logger.warning("image %s (%s) superseded by image %s: %s", item.image_id, item.key, new.id, outcome.error)


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


def _score(
    fetched: list[_Fetched], loaded: LoadedModel, options: ScoringOptions, result: BatchResult
) -> list[ImageScore]:
    with _MODEL_TURN:  # batches in flight in one process (the GPU default) take turns at the model
        begin, cpu_begin = time.perf_counter(), time.thread_time()
        scores = loaded.ensemble.score_images(
            [item.image for item in fetched],
            [str(item.work.image_id) for item in fetched],
            with_maps=options.heatmaps != "none",
        )
    model_s = time.perf_counter() - begin
    _add_seconds(result, "model", model_s)
    _add_cpu(result, "model", time.thread_time() - cpu_begin)  # the caller's thread; torch's own threads are not in it
    for item in fetched:
        item.model_s = model_s / len(fetched)
        metrics.observe_stage("model", item.model_s)
    return scores


def _stored_map(score: ImageScore, options: ScoringOptions, result: BatchResult) -> StoredMap | None:
    """The map to store with this score, or None (``heatmaps``: all, anomalous or none)."""
    if score.anomaly_map is None or (options.heatmaps == "anomalous" and not score.is_anomalous):
        return None
    begin, cpu_begin = time.perf_counter(), time.thread_time()
    stored = encode_map(np.asarray(score.anomaly_map))
    _add_cpu(result, "heatmap", time.thread_time() - cpu_begin)
    metrics.observe_stage("heatmap", time.perf_counter() - begin)
    return stored


#: What writing one overlay gave (its key, or the error) and the CPU seconds it took.
_Overlay = tuple[str | TransientError | PermanentError, float]


def _write_overlay(
    item: _Fetched, score: ImageScore, version: str, store: ObjectStore, options: ScoringOptions
) -> _Overlay:
    """Encode and upload one overlay (``heatmap_format="overlay"``; on the pool: PNG encoding releases the GIL)."""
    cpu_begin = time.thread_time()
    key = heatmap_key(options, model_version=version, image_key=item.work.key, image_id=item.work.image_id)
    png = heatmap_png(item.image, np.asarray(score.anomaly_map), threshold=score.threshold)
    try:
        store.put(key, png, content_type="image/png")
    except TransientError as exc:
        return exc, time.thread_time() - cpu_begin
    except PermanentError as exc:  # e.g. a folder store name over the length limit: retrying cannot help
        return BadObjectError(f"the heatmap of this image cannot be stored at {key!r}: {exc}"), 0.0
    return key, time.thread_time() - cpu_begin


def _overlay_result(future: Future[_Overlay], result: BatchResult) -> str | TransientError | PermanentError:
    outcome, cpu_s = future.result()
    _add_cpu(result, "overlay", cpu_s)
    return outcome


def _persist(
    finished: list[tuple[_Fetched, ImageScore, StoredMap | None, str | TransientError | PermanentError | None]],
    session_factory: sessionmaker[Session],
    version: str,
    result: BatchResult,
    transient: list[TransientError],
) -> None:
    """Every scored image of the batch in one transaction of set-based statements (not one per image)."""
    rows: list[tuple[_Fetched, repository.InferenceRow]] = []
    for item, score, stored, key in finished:
        for stage, seconds in item.cpu.items():
            _add_cpu(result, stage, seconds)
        if isinstance(key, TransientError):
            transient.append(key)
            result.retry.append(item.work.image_id)
        elif isinstance(key, PermanentError):
            _record_permanent(session_factory, item.work, key, result)
        else:
            rows.append((item, _row(item, score, stored, key)))
    if not rows:
        return
    begin, cpu_begin = time.perf_counter(), time.thread_time()
    with session_scope(session_factory) as session:
        created = repository.record_inferences(session, model_version=version, rows=[row for _, row in rows])
    for item, _ in rows:
        if item.work.image_id in created:
            result.scored.append(item.work.image_id)
            metrics.IMAGES_SCORED.labels(model_version=version).inc()
        else:
            result.already_done.append(item.work.image_id)
    written = time.perf_counter() - begin
    result.seconds["write"] = written
    _add_cpu(result, "database", time.thread_time() - cpu_begin)
    for _ in rows:
        metrics.observe_stage("write", written / len(rows))


def _row(item: _Fetched, score: ImageScore, stored: StoredMap | None, key: str | None) -> repository.InferenceRow:
    return repository.InferenceRow(
        image_id=item.work.image_id,
        score=score.score,
        threshold=score.threshold,
        is_anomalous=score.is_anomalous,
        fold_scores=score.fold_scores,
        sha256=item.sha256,
        heatmap_key=key,
        anomaly_map=stored,
        timings={
            "download_ms": item.download_s * 1000.0,
            "decode_ms": item.decode_s * 1000.0,
            "model_ms": item.model_s * 1000.0,
        },
    )


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
