"""Prometheus metrics of the worker and ingest processes (prometheus-client, default registry).

Metric objects are module-level, as prometheus-client intends (they register once per process and cost
nothing until observed); no server is started at import. :func:`start_metrics_server` is called by the
``worker`` and ``ingest`` entry points when ``metrics_port`` is set. Under a prefork pool with one child
the server runs in the child that scores (started from ``worker_process_init``). With several children,
``waferwatch worker`` turns on prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``): each
child writes its samples to files there and the parent serves their sum (:func:`multiprocess_mode`).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = [
    "ACTIVE_MODEL",
    "BATCH_SIZE",
    "EVENTS_REGISTERED",
    "IMAGES_FAILED",
    "IMAGES_SCORED",
    "IMAGES_SKIPPED",
    "QUEUE_DEPTH",
    "STAGE_SECONDS",
    "TASKS_ENQUEUED",
    "multiprocess_mode",
    "observe_stage",
    "start_metrics_server",
]

logger = logging.getLogger(__name__)

STAGES: Final = ("download", "decode", "model", "heatmap", "write")
_LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

IMAGES_SCORED = Counter("waferwatch_images_scored", "Images scored (new inference rows)", ["model_version"])
IMAGES_FAILED = Counter("waferwatch_images_failed", "Images recorded in failures, by reason", ["reason"])
IMAGES_SKIPPED = Counter("waferwatch_images_skipped", "Images not scored, by reason", ["reason"])
BATCH_SIZE = Histogram(
    "waferwatch_batch_size", "Images per score_batch task", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
)
STAGE_SECONDS = Histogram(
    "waferwatch_stage_seconds",
    "Per-image latency of each scoring stage (model: the batch's time divided by its images)",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
ACTIVE_MODEL = Gauge(
    "waferwatch_active_model_info",
    "1 for the model version a scoring process scores with (the highest over processes), 0 once replaced",
    ["version"],
    multiprocess_mode="max",
)
QUEUE_DEPTH = Gauge("waferwatch_queue_depth", "Messages waiting in a Celery queue", ["queue"])
EVENTS_REGISTERED = Counter(
    "waferwatch_events_registered", "Object events registered by ingest, by kind and outcome", ["kind", "outcome"]
)
TASKS_ENQUEUED = Counter("waferwatch_tasks_enqueued", "score_batch tasks sent by ingest and reconciliation")

_server_lock = threading.Lock()
_server_port: int | None = None


def observe_stage(stage: str, seconds: float) -> None:
    """Record one per-image observation of ``stage`` (one of :data:`STAGES`)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    STAGE_SECONDS.labels(stage=stage).observe(max(seconds, 0.0))


def multiprocess_mode() -> bool:
    """Whether samples go to ``PROMETHEUS_MULTIPROC_DIR`` files (several scoring processes, one endpoint)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def start_metrics_server(port: int, *, host: str = "0.0.0.0") -> bool:
    """Serve ``/metrics`` on ``port`` in a daemon thread, once per process; False when ``port`` is 0.

    A second call in the same process is a no-op, so entry points can call it unconditionally. In
    multiprocess mode the endpoint serves the sum over every process that writes to the directory.
    """
    global _server_port
    if port <= 0:
        return False
    with _server_lock:
        if _server_port is not None:
            return True
        if multiprocess_mode():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            start_http_server(port, addr=host, registry=registry)
        else:
            start_http_server(port, addr=host)
        _server_port = port
    logger.info("Prometheus metrics on http://%s:%d/metrics", host, port)
    return True
