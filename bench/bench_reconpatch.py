"""Plain PatchCore vs ReConPatch on the labelled sets, same backbone (Lite0 defaults), two embedding widths.

For every set the backbone runs once: the training features and the test embeddings are cached under
``runs/bench-reconpatch/`` and every variant is built and scored from them in its own child process, so
each row's peak memory (max RSS of that child, torch and faiss included) is its own. Columns: image AUROC,
F1 at the calibrated threshold, pixel AUROC, training seconds after the backbone (f + folds), scoring
ms/image (backbone share + folds), peak RSS. A last block measures the training budget on the 213 Dacon
training images: whole training vs scoring the same images.

Usage: nice -n 10 python bench/bench_reconpatch.py [--sets magnetic-tile,deeppcb] [--variants plain,rcp64,...]
       [--train N --test N] [--set key=value ...] [--no-budget]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.magnetic_tile import DATASETS, magnetic_tile_split, subsample
from models import PatchCoreConfig
from models.datasets import ImageRef, list_images
from models.evaluation import _load_mask, image_metrics, pixel_auroc
from models.features import PatchFeatureExtractor
from models.images import load_image_file
from models.training import (
    FeatureSet,
    assemble_ensemble,
    build_fold,
    extract_features,
    train_representation,
)

CACHE = Path(__file__).resolve().parents[1] / "runs" / "bench-reconpatch"
DEEPPCB = DATASETS / "deeppcb"

#: Named variants: config overrides on the Lite0 defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "rcp64": {"reconpatch": True, "reconpatch_dim": 64, "reconpatch_projection_dim": 64},
    "rcp128": {"reconpatch": True, "reconpatch_dim": 128, "reconpatch_projection_dim": 128},
    "rcp64-shared": {"reconpatch": True, "reconpatch_dim": 64, "reconpatch_per_fold": False},
    "rcp128-shared": {
        "reconpatch": True,
        "reconpatch_dim": 128,
        "reconpatch_projection_dim": 128,
        "reconpatch_per_fold": False,
    },
    "rcp64-mlp": {"reconpatch": True, "reconpatch_dim": 64, "reconpatch_hidden": 256},
}


def labelled_set(name: str, n_train: int, n_test: int) -> tuple[list[ImageRef], list[ImageRef], list[ImageRef], dict]:
    """(train, test good, test defective, masks by id), deterministically subsampled."""
    if name == "magnetic-tile":
        split = magnetic_tile_split()
        return (
            subsample(split.train, n_train),
            subsample(split.test_good, n_test),
            subsample(split.test_bad, n_test),
            split.masks,
        )
    if name == "deeppcb":
        train = list_images(DEEPPCB / "train" / "good")
        good = [ImageRef(f"good/{r.id}", r.path) for r in list_images(DEEPPCB / "test" / "good")]
        bad = [ImageRef(f"defect/{r.id}", r.path) for r in list_images(DEEPPCB / "test" / "defect")]
        masks = {r.id: DEEPPCB / "ground_truth" / "defect" / f"{r.path.stem}.png" for r in bad}
        return subsample(train, n_train), subsample(good, n_test), subsample(bad, n_test), masks
    raise SystemExit(f"unknown set {name!r}: magnetic-tile or deeppcb")


def cache_set(name: str, n_train: int, n_test: int, config: PatchCoreConfig) -> tuple[Path, dict[str, float]]:
    """Run the backbone once for a set: training FeatureSet, test embeddings, labels and masks."""
    folder = CACHE / f"{name}-{n_train}-{n_test}-{config.image_size}"
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        return folder, json.loads(meta_path.read_text())["timing"]
    train, good, bad, masks = labelled_set(name, n_train, n_test)
    extractor = PatchFeatureExtractor(config, device="cpu")
    features = extract_features([r.id for r in train], [r.path for r in train], config, extractor=extractor)
    features.save(folder, "train")
    refs = [(r, 0) for r in good] + [(r, 1) for r in bad]
    started = time.perf_counter()
    embedded = []
    for begin in range(0, len(refs), config.batch_size):
        images = [load_image_file(r.path) for r, _ in refs[begin : begin + config.batch_size]]
        embedded.append(extractor.embed(images))
    backbone_ms = (time.perf_counter() - started) / len(refs) * 1000
    np.save(folder / "test.npy", torch.cat(embedded).numpy(), allow_pickle=False)
    truth = np.stack([_load_mask(masks.get(r.id), config.image_size, defect_expected=bool(label)) for r, label in refs])
    np.save(folder / "masks.npy", truth, allow_pickle=False)
    timing = {"extract_s": features.seconds, "backbone_ms": backbone_ms}
    meta = {"ids": [r.id for r, _ in refs], "labels": [label for _, label in refs], "timing": timing}
    meta_path.write_text(json.dumps(meta))
    return folder, timing


def run_variant(folder: Path, config: PatchCoreConfig) -> dict[str, float]:
    """(In a child process.) Build the ensemble from the cached features and score the cached test set."""
    features = FeatureSet.load(folder, "train")
    meta = json.loads((folder / "meta.json").read_text())
    started = time.perf_counter()
    representation = train_representation(features, config, device="cpu")
    f_s = time.perf_counter() - started
    folds = [build_fold(features, index, config, representation) for index in range(config.folds)]
    train_s = time.perf_counter() - started
    ensemble = assemble_ensemble(config, features, folds, device="cpu", representation=representation)
    test = torch.from_numpy(np.load(folder / "test.npy"))
    started = time.perf_counter()
    results = []
    for begin in range(0, len(test), config.batch_size):
        chunk = test[begin : begin + config.batch_size]
        results.extend(ensemble.score_embeddings(chunk, meta["ids"][begin : begin + len(chunk)]))
    score_ms = (time.perf_counter() - started) / len(test) * 1000
    masks = np.load(folder / "masks.npy")
    metrics = image_metrics([r.score for r in results], meta["labels"], ensemble.threshold)
    steps = [run.steps for run in representation.runs] if representation else []
    return {
        "image_auroc": metrics["image_auroc"],
        "f1": metrics["f1"],
        "pixel_auroc": pixel_auroc([r.anomaly_map for r in results], list(masks)),
        "f_s": f_s,
        "train_s": train_s,
        "score_ms": score_ms + meta["timing"]["backbone_ms"],
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": float(np.mean(steps)) if steps else 0.0,
    }


def child(folder: Path, overrides: dict[str, Any]) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", str(folder), "--overrides", json.dumps(overrides)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def budget(overrides: dict[str, Any]) -> None:
    """The issue's training budget on the 213 Dacon images: whole training vs scoring those images."""
    from bench.common import dacon_train
    from models import FoldEnsemble

    refs = dacon_train()
    for name, extra in (("plain", {}), ("reconpatch", {**VARIANTS["rcp64"], **overrides})):
        config = PatchCoreConfig(**extra)
        started = time.perf_counter()
        ensemble = FoldEnsemble.fit([r.id for r in refs], [r.path for r in refs], config, device="cpu")
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        for begin in range(0, len(refs), config.batch_size):
            chunk = refs[begin : begin + config.batch_size]
            ensemble.score_images([load_image_file(r.path) for r in chunk], [r.id for r in chunk], with_maps=False)
        score_s = time.perf_counter() - started
        print(
            f"dacon budget {name:<11} train {train_s:6.1f} s, score 213 images {score_s:5.1f} s: "
            f"{train_s / score_s:4.2f}x (budget 3x)",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="magnetic-tile,deeppcb")
    parser.add_argument("--variants", default="plain,rcp64,rcp128,rcp64-shared")
    parser.add_argument("--train", type=int, default=120, help="training images per set (subsampled)")
    parser.add_argument("--test", type=int, default=40, help="good and defective test images each")
    parser.add_argument("--set", action="append", default=[], help="key=value override for the rcp variants")
    parser.add_argument("--no-budget", action="store_true", help="skip the Dacon training-budget block")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, PatchCoreConfig(**json.loads(args.overrides)))))
        return
    extra = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    base = PatchCoreConfig()
    print(
        f"{'set':<14}{'variant':<15}{'AUROC':>7}{'F1':>7}{'pxAUROC':>9}{'f s':>7}{'train s':>9}"
        f"{'steps':>7}{'score ms/img':>13}{'peak MB':>9}",
        flush=True,
    )
    for name in args.sets.split(","):
        folder, timing = cache_set(name, args.train, args.test, base)
        for variant in args.variants.split(","):
            overrides = dict(VARIANTS[variant])
            if overrides.get("reconpatch"):
                overrides.update(extra)
            row = child(folder, overrides)
            print(
                f"{name:<14}{variant:<15}{row['image_auroc']:>7.3f}{row['f1']:>7.3f}{row['pixel_auroc']:>9.3f}"
                f"{row['f_s']:>7.1f}{row['train_s'] + timing['extract_s']:>9.1f}{row['steps']:>7.0f}"
                f"{row['score_ms']:>13.1f}{row['peak_mb']:>9.0f}",
                flush=True,
            )
    print("train s = backbone on the training images + f + folds; f s = ReConPatch training alone", flush=True)
    if not args.no_budget:
        budget(extra)


if __name__ == "__main__":
    main()
