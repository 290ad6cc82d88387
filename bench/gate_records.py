"""Four full promotion-gate records on the real pipeline pieces, printed as markdown (issue 15's closing note).

What it builds (real PostgreSQL on 127.0.0.1:5432, a private moto S3 server, the real gate of
:mod:`scheduler.gate` with its default rules; Dacon *training* images only):

The 213 Dacon training images are taken in a seeded random order (so no slice is a run of neighbouring
ids), then cut into disjoint parts:

* an **active** version fitted on 40 clean images, brought in with
  :func:`scheduler.registry.register_model` and activated;
* a **good candidate** fitted on 80 clean images (the active's 40 and 40 more);
* a **bad candidate** fitted on 20 clean images plus 30 damaged ones (a black square pasted in each, like
  a contaminated nominal drop);
* the evaluation data the gate reads from the database and the bucket: 30 nominal drops whose keys fall in
  the held-out slice, and, for the second round, ``gate_min_labels`` + 2 (12) reviewed ``good`` images of
  the held-out slice and 12 reviewed ``defect`` images (other training images with a dark bar or a bright
  scratch drawn in; not the kind of damage the bad candidate was trained on).

Each candidate is gated twice against the active version: without any label, then with the labels. The
records are not applied (the active version stays the same for all four runs).
Usage: ``nice python bench/gate_records.py > records.md`` (a few minutes on 2 busy CPU cores).
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import psycopg
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.magnetic_tile import DATASETS
from models import FoldEnsemble, PatchCoreConfig
from models.datasets import read_image_csv
from scheduler.gate import GateRules, evaluate_gate
from scheduler.rebuild import held_out
from scheduler.registry import label_image, register_model
from tests.s3_server import dummy_aws_environment, running_moto_server
from worker import repository
from worker.db import make_engine, make_session_factory, session_scope, upgrade_database
from worker.storage import make_store

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
BUCKET = "fab-gate-records"
CONFIG = PatchCoreConfig()  # the product defaults
RULES = GateRules()  # the gate's defaults (min_labels 10, min_holdout 10, …)
N_LABELS = RULES.min_labels + 2


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def black_square(path: Path, index: int) -> bytes:
    """Training damage: a black square a quarter of the width wide, position by ``index``."""
    image = Image.open(path).convert("RGB")
    side = image.width // 4
    x, y = (index * 37) % (image.width - side), (index * 53) % (image.height - side)
    image.paste((0, 0, 0), (x, y, x + side, y + side))
    return png(image)


def labelled_defect(path: Path, index: int) -> bytes:
    """A reviewed defect: a dark bar (even ``index``) or a bright 6 px scratch (odd) near the device."""
    image = Image.open(path).convert("RGB")
    draw = ImageDraw.Draw(image)
    w, h = image.size
    x, y = w // 3 + (index * 29) % (w // 3), h // 3 + (index * 41) % (h // 3)
    if index % 2 == 0:
        draw.rectangle((x, y, x + w // 6, y + h // 14), fill=(15, 15, 15))
    else:
        draw.line((x - w // 8, y - h // 10, x + w // 8, y + h // 10), fill=(245, 245, 245), width=6)
    return png(image)


def held_out_keys(prefix: str, count: int, fraction: float) -> list[str]:
    """The first ``count`` keys ``<prefix>NNNN.png`` that fall in the gate's held-out slice."""
    keys, index = [], 0
    while len(keys) < count:
        key = f"{prefix}{index:04d}.png"
        if held_out(key, fraction):
            keys.append(key)
        index += 1
    return keys


def fit(pool: list[tuple[str, bytes]]) -> FoldEnsemble:
    return FoldEnsemble.fit([i for i, _ in pool], [(lambda d=d: d) for _, d in pool], CONFIG, device="cpu")


def main() -> None:
    started = time.perf_counter()
    ordered = sorted(read_image_csv(DATASETS / "dacon-semiconductor" / "train.csv"), key=lambda ref: ref.id)
    refs = [ordered[i] for i in np.random.default_rng(0).permutation(len(ordered))]  # no run of similar ids
    clean = [(ref.id, ref.path.read_bytes()) for ref in refs[:80]]
    damaged = [(f"damaged-{i}", black_square(ref.path, i + 7)) for i, ref in enumerate(refs[80:110])]
    nominal = [ref.path.read_bytes() for ref in refs[110:140]]
    good = [ref.path.read_bytes() for ref in refs[140 : 140 + N_LABELS]]
    defects = [labelled_defect(ref.path, i) for i, ref in enumerate(refs[160 : 160 + N_LABELS])]

    active = fit(clean[:40])
    candidates = {"good candidate": fit(clean), "bad candidate": fit(clean[:20] + damaged)}
    fitted_s = time.perf_counter() - started

    database = f"waferwatch_gate_records_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{database}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}"
    records: list[tuple[str, str, dict]] = []
    try:
        upgrade_database(url)
        engine = make_engine(url)
        factory = make_session_factory(engine)
        with dummy_aws_environment(), running_moto_server() as endpoint, tempfile.TemporaryDirectory() as work:
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
            store = make_store("s3", endpoint_url=endpoint, bucket=BUCKET)
            register_model(store, factory, active.save(Path(work) / "active"), model_prefix="models/",
                           nominal_prefix="nominal/", activate=True, author="bench")  # fmt: skip

            def put(key: str, data: bytes, kind: str) -> None:
                info = store.put(key, data)
                with session_scope(factory) as session:
                    image, _ = repository.register_image(
                        session, bucket=BUCKET, key=key, etag=info.etag, size=len(data), kind=kind
                    )
                    repository.set_image_sha256(session, image_id=image.id, sha256=hashlib.sha256(data).hexdigest())

            fraction = RULES.holdout_fraction
            for key, data in zip(held_out_keys("nominal/line3/", len(nominal), fraction), nominal, strict=True):
                put(key, data, "nominal")
            good_keys = held_out_keys("incoming/T1/L7/good-", len(good), fraction)
            defect_keys = [f"incoming/T1/L7/defect-{i:04d}.png" for i in range(len(defects))]
            for key, data in [*zip(good_keys, good, strict=True), *zip(defect_keys, defects, strict=True)]:
                put(key, data, "incoming")

            def gate(name: str, labels: str) -> None:
                model = candidates[name]
                result = evaluate_gate(model, active, session_factory=factory, store=store, rules=RULES,
                                       active_version=active.version, candidate_version=model.version)  # fmt: skip
                records.append((name, labels, result.as_dict()))

            for name in candidates:
                gate(name, "without labels")
            with session_scope(factory) as session:
                for key in good_keys:
                    label_image(session, bucket=BUCKET, key=key, verdict="good", author="lee", note=None)
                for key in defect_keys:
                    label_image(session, bucket=BUCKET, key=key, verdict="defect", author="lee", note=None)
            for name in candidates:
                gate(name, f"with {len(good_keys)} good + {len(defect_keys)} defect labels")
        engine.dispose()
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')

    print("## Gate records (bench/gate_records.py)\n")
    print(f"Active {active.version} (40 clean Dacon training images, seeded random order); good candidate "
          f"{candidates['good candidate'].version} (80 clean); bad candidate {candidates['bad candidate'].version} "
          f"(20 clean + 30 with a pasted black square). Product default config, gate default rules; "
          f"{len(nominal)} held-out nominal drops; models fitted in {fitted_s:.0f} s, total "
          f"{time.perf_counter() - started:.0f} s on the 2-CPU-core development machine.\n")  # fmt: skip
    print("| candidate | labels | passed | reasons |\n|---|---|---|---|")
    for name, labels, record in records:
        print(f"| {name} | {labels} | {record['passed']} | {'; '.join(record['reasons']) or '—'} |")
    for name, labels, record in records:
        print(f"\n### {name}, {labels}\n\n```json\n{json.dumps(record, indent=2)}\n```")


if __name__ == "__main__":
    main()
