"""The ``waferwatch`` command line.

Each command group lives in its own module and registers itself on :data:`app`; this module only
assembles them and turns domain errors into one clear line (``--debug`` keeps the traceback).
"""

from __future__ import annotations

from worker.cli import db_cmds as _db_cmds  # noqa: F401  (registers config/db)
from worker.cli import doctor_cmds as _doctor_cmds  # noqa: F401  (registers doctor)
from worker.cli import heatmap_cmds as _heatmap_cmds  # noqa: F401  (registers heatmap)
from worker.cli import ingest_cmds as _ingest_cmds  # noqa: F401  (registers ingest/reconcile)
from worker.cli import model_cmds as _model_cmds  # noqa: F401  (registers train/score/evaluate/dacon)
from worker.cli import model_cmds_registry as _registry_cmds  # noqa: F401  (label/models/retrain/beat/rescore)
from worker.cli import pipeline_cmds as _pipeline_cmds  # noqa: F401  (registers worker/demo)
from worker.cli import report_cmds as _report_cmds  # noqa: F401  (registers report/status)
from worker.cli import tune_cmds as _tune_cmds  # noqa: F401  (registers tune)
from worker.cli.root import app, main

__all__ = ["app", "main"]
