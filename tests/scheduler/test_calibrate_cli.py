"""``waferwatch models calibrate VERSION`` through real subprocesses, on PostgreSQL and a moto S3 bucket.

The active version is the pipeline tests' small model (20 Dacon training images), registered with
``models register``. Reviewed images: 12 other Dacon training images labelled ``good`` and 12 of them with a
pasted defect labelled ``defect`` (never Dacon test images), plus two of the model's own training images
labelled ``good`` (they must be left out). Four labelled images already have an inference by the version
(their scores must be reused, the rest scored by the command).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
from PIL import Image as PILImage
from sqlalchemy.orm import Session, sessionmaker

from models import FoldEnsemble, PatchCoreConfig, decode_image
from models.calibration import f1_optimal_threshold
from models.datasets import read_image_csv
from scheduler.rebuild import build_config
from worker import repository
from worker.db import make_engine, make_session_factory, session_scope, upgrade_database
from worker.schema import Label, ModelVersion, utcnow

BUCKET = "fab-calibrate"
N_EACH = 12


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from worker.cli import main; main()", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _with_defect(data: bytes, index: int) -> bytes:
    """The image with a dark scratch-like bar pasted in (a visible, local defect), as PNG."""
    image = PILImage.open(io.BytesIO(data)).convert("RGB")
    side = image.width // 5
    x, y = 40 + (index * 37) % (image.width - side - 80), 40 + (index * 53) % (image.height - side - 80)
    image.paste((10, 10, 10), (x, y, x + side, y + side // 2))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def calibrate_env(
    s3_endpoint: str, pg_database_factory: Callable[[], str], tmp_path: Path
) -> tuple[dict[str, str], str]:
    url = pg_database_factory()
    upgrade_database(url)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    env = {key: value for key, value in os.environ.items() if not key.startswith("WAFERWATCH_")}
    env.update(
        {
            "WAFERWATCH_DATABASE_URL": url,
            "WAFERWATCH_STORAGE": "s3",
            "WAFERWATCH_S3_ENDPOINT_URL": s3_endpoint,
            "WAFERWATCH_S3_BUCKET": BUCKET,
            "WAFERWATCH_MODEL_CACHE_DIR": str(tmp_path / "cache"),
            "WAFERWATCH_DEVICE": "cpu",
            "COLUMNS": "80",
        }
    )
    return env, url


def test_calibrate_refits_the_threshold_as_a_new_candidate_and_refuses_too_few_labels(
    calibrate_env: tuple[dict[str, str], str], pipeline_model_dir: Path, dacon_data: Path
) -> None:
    env, url = calibrate_env
    registered = _cli(env, "models", "register", str(pipeline_model_dir), "--activate", "--author", "kim")
    assert registered.returncode == 0, registered.stderr
    source = FoldEnsemble.load(pipeline_model_dir, device="cpu")
    version = source.version

    refs = sorted(read_image_csv(dacon_data / "train.csv"), key=lambda ref: ref.id)
    trained_ids = {t.id for t in source.training_images}
    fresh = [ref for ref in refs if ref.id not in trained_ids][100 : 100 + N_EACH]
    own = [ref for ref in refs if ref.id in trained_ids][:2]
    objects = [(f"incoming/good/{ref.id}.png", ref.path.read_bytes(), "good") for ref in fresh]
    objects += [(f"incoming/own/{ref.id}.png", ref.path.read_bytes(), "good") for ref in own]
    objects += [
        (f"incoming/defect/{ref.id}.png", _with_defect(ref.path.read_bytes(), i), "defect")
        for i, ref in enumerate(fresh)
    ]
    s3 = boto3.client("s3", endpoint_url=env["WAFERWATCH_S3_ENDPOINT_URL"], region_name="us-east-1")
    truth = {}
    for key, data, verdict in objects:
        s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        if not key.startswith("incoming/own/"):
            truth[key] = (verdict, source.score_images([decode_image(data, name=key)], [key], with_maps=False)[0])
    factory = make_session_factory(make_engine(url))
    with session_scope(factory) as session:
        for index, (key, data, verdict) in enumerate(objects):
            image, _ = repository.register_image(session, bucket=BUCKET, key=key, etag=f"e{index}", size=len(data))
            repository.set_image_sha256(session, image_id=image.id, sha256=hashlib.sha256(data).hexdigest())
            session.add(Label(image_id=image.id, verdict=verdict, author="lee", created_at=utcnow()))
            if key in truth and index % 7 == 0:  # a stored inference by the version: reused, not rescored
                result = truth[key][1]
                repository.record_inference(session, image_id=image.id, model_version=version, score=result.score,
                                            threshold=result.threshold, is_anomalous=result.is_anomalous,
                                            fold_scores=result.fold_scores)  # fmt: skip
    reused = sum(1 for index, (key, _, _) in enumerate(objects) if key in truth and index % 7 == 0)

    refused = _cli({**env, "WAFERWATCH_GATE_MIN_LABELS": str(N_EACH + 1)}, "models", "calibrate", version)
    assert refused.returncode == 2, refused.stderr
    message = _flat(refused.stderr + refused.stdout)
    assert "--min-labels" in message and f"{N_EACH} good and {N_EACH} defect" in message
    refused = _cli(env, "models", "calibrate", version, "--min-labels", str(N_EACH + 1))
    assert refused.returncode == 2 and "--min-labels" in _flat(refused.stderr + refused.stdout)
    with session_scope(factory) as session:
        assert session.query(ModelVersion).count() == 1  # nothing written

    done = _cli(env, "models", "calibrate", version, "--author", "lee", "--reason", "line 3 review")
    assert done.returncode == 0, done.stderr
    good = [r.score for v, r in truth.values() if v == "good"]
    defect = [r.score for v, r in truth.values() if v == "defect"]
    expected = f1_optimal_threshold(good, defect)
    with session_scope(factory) as session:
        rows = {row.id: row for row in session.query(ModelVersion)}
        assert set(rows) - {version}, "no new version"
        (new,) = set(rows) - {version}
        assert rows[version].status == "active" and rows[version].threshold == source.threshold  # unchanged
        row = rows[new]
        assert row.status == "candidate" and row.artifact_uri == f"models/{new}/"
        assert row.threshold == pytest.approx(expected.threshold, rel=1e-6)
        assert row.manifest["config"]["threshold_rule"] == "labelled"
        record = row.metrics["calibration"]
    assert f"calibrated from {version}" in _flat(done.stderr) and new in _flat(done.stderr)
    assert (record["n_good"], record["n_defect"]) == (N_EACH, N_EACH)
    assert record["left_out_trained"] == 2  # the model's own training images never calibrate it
    assert (record["reused_scores"], record["scored_now"]) == (reused, 2 * N_EACH - reused)
    assert record["f1"] == pytest.approx(expected.f1) and record["old_threshold"] == source.threshold
    assert (record["from_version"], record["old_rule"], record["base_rule"]) == (version, "gpd", "gpd")

    show = _cli(env, "models", "show", new)
    assert show.returncode == 0, show.stderr
    data = json.loads(show.stdout)
    assert data["manifest"]["calibration"] == record
    assert data["manifest"]["config"]["labelled_threshold"] == row.threshold
    (event,) = data["history"]
    assert (event["event"], event["actor"]) == ("registered", "lee")
    assert event["reason"] == f"calibrated from {version}: line 3 review"
    assert event["details"]["calibrated_from"] == version

    from worker.model_provider import ModelProvider
    from worker.storage import make_store

    store = make_store("s3", endpoint_url=env["WAFERWATCH_S3_ENDPOINT_URL"], bucket=BUCKET)
    provider = ModelProvider(session_factory=factory, store=store, cache_dir=Path(env["WAFERWATCH_MODEL_CACHE_DIR"])
                             / "check", device="cpu", model_version=new)  # fmt: skip
    loaded = provider.current().ensemble  # downloaded from the bucket, every sha256 checked
    assert loaded.threshold == row.threshold and loaded.config.threshold_rule == "labelled"

    promoted = _cli(env, "models", "promote", new, "--author", "lee")
    assert promoted.returncode == 0, promoted.stderr
    with session_scope(factory) as session:
        assert session.get(ModelVersion, new).status == "active"


def test_a_rebuild_after_calibration_goes_back_to_the_nominal_rule(session_factory: sessionmaker[Session]) -> None:
    calibrated = PatchCoreConfig(threshold_rule="labelled", labelled_threshold=3.5, coreset_ratio=0.05)
    manifest = {"config": calibrated.to_dict(), "calibration": {"base_rule": "percentile", "threshold": 3.5}}
    with session_scope(session_factory) as session:
        repository.ensure_model_version(session, version="v-cal", manifest=manifest, status="active")
    with session_scope(session_factory) as session:
        config = build_config(session, {})
    assert (config.threshold_rule, config.labelled_threshold, config.coreset_ratio) == ("percentile", None, 0.05)
