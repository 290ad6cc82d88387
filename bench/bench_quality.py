"""The one quality table: every labelled set × every candidate config, side by side.

For each (set, candidate): image AUROC, F1 at the model's own threshold, the F1-optimal threshold's F1 (for
reference: it needs the test labels, the product never does), the false-alarm rate on the held-out good
images, pixel AUROC, training seconds, scoring ms/image and the bank size per fold.

Features depend only on the backbone side of a config (backbone, layers, image size, grid, tiling, layer
weighting), so they are extracted once per set and shared by every candidate that differs only in coreset,
k, eq. 7 or threshold rule: a table of many candidates costs a few extractions. Cached under
``runs/bench-cache/quality`` (delete it after changing the feature code).

Usage::

    python bench/bench_quality.py                       # the table in README
    python bench/bench_quality.py --candidates default,original --sets magnetic-tile
    python bench/bench_quality.py --extra "mine:coreset_ratio=0.05,k=3"
    python bench/bench_quality.py --markdown table.md --json rows.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.deeppcb import deeppcb_split
from bench.magnetic_tile import MagneticTileSplit, magnetic_tile_split, subsample
from models import PatchCoreConfig
from models.datasets import ImageRef
from models.ensemble import FoldEnsemble, ensemble_threshold
from models.evaluation import image_metrics, pixel_auroc
from models.features import PatchFeatureExtractor
from models.images import load_image_file
from models.training import FeatureSet, assemble_ensemble, build_folds, extract_features, train_representation

CACHE = Path(__file__).resolve().parents[1] / "runs" / "bench-cache" / "quality"

#: Fields that change the patch features (everything else only changes banks, scores or thresholds).
FEATURE_FIELDS = (
    "backbone",
    "layers",
    "weights_path",
    "image_size",
    "patch_size",
    "align",
    "target_dim",
    "tiles",
    "tile_overlap",
    "layer_weighting",
    "augment",
)

#: Fields that change only how fold scores become an image score and a threshold: candidates that differ in
#: nothing else share one set of fitted folds (the banks are the expensive part on tiled sets).
DECISION_FIELDS = ("score_aggregate", "threshold_rule", "false_alarm_rate", "threshold_aggregate")

#: Fitted folds by (set, config without DECISION_FIELDS) → (folds, ReConPatch representation or None, seconds
#: they took), for this run only.
_FOLDS: dict[str, tuple[list[Any], Any, float]] = {}

#: The candidates of the README table: name → overrides of PatchCoreConfig().
CANDIDATES: dict[str, dict[str, Any]] = {
    "default": {},
    # The defaults before the third run: score = max over folds, gpd at 5%.
    "before": {"score_aggregate": "max", "false_alarm_rate": 0.05},
    # The defaults before the first table: k = 5, eq. 7 over the same 5 neighbours, mean of fold maxima.
    "previous": {"k": 5, "reweight_neighbours": 5, "threshold_rule": "fold_max", "score_aggregate": "max"},
}


#: Threshold rules evaluated on every candidate's scores (JSON only): (rule, target false-alarm rate).
RULE_SWEEP = (
    ("fold_max", 0.01),
    ("percentile", 0.01),
    ("percentile", 0.02),
    ("percentile", 0.05),
    ("gpd", 0.005),
    ("gpd", 0.01),
    ("gpd", 0.02),
    ("gpd", 0.05),
    ("gpd", 0.1),
    ("gpd", 0.15),
    ("gpd", 0.2),
)


def parse_overrides(text: str) -> dict[str, Any]:
    """``key=value,key=value`` → typed overrides (ints, floats, bools, '+'-joined tuples, strings)."""
    overrides: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, raw = item.partition("=")
        value: Any = raw
        if key == "layers":
            value = tuple(raw.split("+"))
        elif raw in ("true", "false"):
            value = raw == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    continue
        overrides[key] = value
    return overrides


@dataclass
class LabelledSet:
    name: str
    split: MagneticTileSplit


def labelled_sets(names: list[str], quick: bool) -> list[LabelledSet]:
    sets = []
    for name in names:
        split = {"magnetic-tile": magnetic_tile_split, "deeppcb": deeppcb_split}[name]()
        if quick:
            split = MagneticTileSplit(
                subsample(split.train, 80), subsample(split.test_good, 40), subsample(split.test_bad, 40), split.masks
            )
        sets.append(LabelledSet(name, split))
    return sets


def feature_key(config: PatchCoreConfig, set_name: str, quick: bool) -> str:
    data = config.to_dict()
    payload = {field: data[field] for field in FEATURE_FIELDS} | {"set": set_name, "quick": quick}
    if payload["augment"] == "none":  # added after the cache's first entries: keys without it stay valid
        del payload["augment"]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def cached_features(
    config: PatchCoreConfig, data: LabelledSet, quick: bool
) -> tuple[FeatureSet, np.ndarray, list[str], float, float]:
    """Training FeatureSet, test embeddings (n_test, rows, cols, dim) float16 with their ids, and the seconds
    the training extraction and the test embedding took (measured when first computed, then cached)."""
    directory = CACHE / f"{data.name}-{feature_key(config, data.name, quick)}"
    test_path, meta_path = directory / "test.npy", directory / "test.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        test = np.load(test_path, allow_pickle=False)
        return FeatureSet.load(directory, "train"), test, meta["ids"], meta["train_s"], meta["test_s"]
    extractor = PatchFeatureExtractor(config)
    split = data.split
    started = time.perf_counter()
    train = extract_features([r.id for r in split.train], [r.path for r in split.train], config, extractor=extractor)
    train_s = time.perf_counter() - started
    refs = split.test_good + split.test_bad
    started = time.perf_counter()
    parts = []
    for begin in range(0, len(refs), config.batch_size):
        images = [load_image_file(r.path) for r in refs[begin : begin + config.batch_size]]
        parts.append(extractor.embed(images).half().numpy())
    test_s = time.perf_counter() - started
    test = np.concatenate(parts)
    train.save(directory, "train")
    np.save(test_path, test, allow_pickle=False)
    meta_path.write_text(json.dumps({"ids": [r.id for r in refs], "train_s": train_s, "test_s": test_s}))
    return train, test, [r.id for r in refs], train_s, test_s


def load_masks(refs: list[ImageRef], masks: dict[str, Path], size: int) -> list[np.ndarray]:
    from PIL import Image

    out = []
    for ref in refs:
        path = masks.get(ref.id)
        if path is None or not path.is_file():
            out.append(np.zeros((size, size), dtype=bool))
            continue
        with Image.open(path) as mask:
            out.append(np.asarray(mask.convert("L").resize((size, size), Image.Resampling.NEAREST)) > 0)
    return out


def evaluate_candidate(name: str, config: PatchCoreConfig, data: LabelledSet, quick: bool) -> dict[str, Any]:
    train, test, test_ids, extract_s, test_s = cached_features(config, data, quick)
    bank_fields = {k: v for k, v in config.to_dict().items() if k not in DECISION_FIELDS}
    key = json.dumps({"set": data.name, "quick": quick, "config": bank_fields}, sort_keys=True, default=str)
    if key not in _FOLDS:
        started = time.perf_counter()
        # ReConPatch: f is trained on the nominal patch features first (per fold unless configured shared)
        representation = train_representation(train, config, device="cpu") if config.reconpatch else None
        _FOLDS[key] = (build_folds(train, config, representation), representation, time.perf_counter() - started)
    folds, representation, fold_s = _FOLDS[key]
    ensemble: FoldEnsemble = assemble_ensemble(config, train, folds, representation=representation)
    split = data.split
    n_good = len(split.test_good)
    labels = np.array([0] * n_good + [1] * len(split.test_bad))
    started = time.perf_counter()
    scores, maps = [], []
    import torch

    size = None
    for begin in range(0, len(test_ids), config.batch_size):
        embedded = torch.from_numpy(test[begin : begin + config.batch_size].astype(np.float32))
        results = ensemble.score_embeddings(embedded, test_ids[begin : begin + config.batch_size], with_maps=True)
        scores.extend(r.score for r in results)
        maps.extend(r.anomaly_map.astype(np.float16) for r in results)
        size = results[0].anomaly_map.shape[0]
    bank_score_s = time.perf_counter() - started
    scores_array = np.asarray(scores)
    metrics = image_metrics(scores_array, labels, ensemble.threshold)
    refs = split.test_good + split.test_bad
    pixel = pixel_auroc(maps, load_masks(refs, split.masks, size))
    n_test = len(test_ids)
    pooled = np.array([x for fold in ensemble.folds for x in fold.validation_scores])
    rules = {}
    for rule, rate in RULE_SWEEP:
        threshold = ensemble_threshold(ensemble.folds, config.replace(threshold_rule=rule, false_alarm_rate=rate))
        swept = image_metrics(scores_array, labels, threshold)
        rules[f"{rule}@{rate}"] = {
            "f1": swept["f1"],
            "false_alarm_rate": float((scores_array[:n_good] > threshold).mean()),
            "threshold": threshold,
        }
    return {
        "set": data.name,
        "candidate": name,
        "image_auroc": metrics["image_auroc"],
        "f1": metrics["f1"],
        "f1_best": metrics["best_f1"],
        "recall": metrics["recall"],
        "false_alarm_rate": float((scores_array[:n_good] > ensemble.threshold).mean()),
        "pixel_auroc": pixel,
        "train_s": extract_s + fold_s,
        "score_ms": (test_s + bank_score_s) / n_test * 1000,
        "bank": sum(f.bank.n_entries for f in ensemble.folds) // len(ensemble.folds),
        "config": {k: v for k, v in config.to_dict().items() if k != "extra"},
        "rules": rules,
        "validation_scores": pooled.tolist(),
        "test_scores": scores_array.tolist(),
    }


def fuse_rows(name: str, members: list[dict[str, Any]], n_good: int) -> dict[str, Any]:
    """A backbone ensemble scored as separate members: each member's scores standardised by its own
    out-of-fold nominal scores (median, then the spread between the median and the 95th percentile), the
    standardised scores averaged, and the product's threshold rule fitted on the averaged out-of-fold scores.

    Every member splits the same sorted training ids with the same seeded folds, so their pooled validation
    scores line up image by image (checked by length; the ids are the same by construction).
    """
    from models.thresholds import fit_threshold

    config = PatchCoreConfig()
    validation, test = [], []
    for row in members:
        pooled = np.asarray(row["validation_scores"])
        centre = float(np.median(pooled))
        spread = max(float(np.quantile(pooled, 0.95)) - centre, 1e-12)
        validation.append((pooled - centre) / spread)
        test.append((np.asarray(row["test_scores"]) - centre) / spread)
    if len({len(v) for v in validation}) != 1 or len({len(t) for t in test}) != 1:
        raise ValueError(f"{name}: members were not fitted on the same images")
    pooled, scores = np.mean(validation, axis=0), np.mean(test, axis=0)
    threshold = fit_threshold(pooled, config.threshold_rule, false_alarm_rate=config.false_alarm_rate)
    labels = np.array([0] * n_good + [1] * (len(scores) - n_good))
    metrics = image_metrics(scores, labels, threshold)
    return {
        "set": members[0]["set"],
        "candidate": name,
        "image_auroc": metrics["image_auroc"],
        "f1": metrics["f1"],
        "f1_best": metrics["best_f1"],
        "recall": metrics["recall"],
        "false_alarm_rate": float((scores[:n_good] > threshold).mean()),
        "pixel_auroc": float("nan"),  # members' maps are not combined here
        "train_s": sum(r["train_s"] for r in members),
        "score_ms": sum(r["score_ms"] for r in members),
        "bank": sum(r["bank"] for r in members),
        "members": [r["candidate"] for r in members],
        "validation_scores": pooled.tolist(),
        "test_scores": scores.tolist(),
    }


HEADER = (
    "| set | candidate | image AUROC | F1 @ threshold | best F1 | false alarms | pixel AUROC | train s "
    "| score ms/img | bank/fold |"
)


def _figure(value: float) -> str:
    return f"{value:.3f}" if np.isfinite(value) else "—"


def markdown_row(row: dict[str, Any]) -> str:
    return (
        f"| {row['set']} | {row['candidate']} | {row['image_auroc']:.3f} | {row['f1']:.3f} | {row['f1_best']:.3f} | "
        f"{100 * row['false_alarm_rate']:.1f}% | {_figure(row['pixel_auroc'])} | {row['train_s']:.1f} | "
        f"{row['score_ms']:.1f} | {row['bank']} |"
    )


def set_label(name: str, per_set: dict[str, dict[str, Any]]) -> str:
    """The set's name in the table, with the overrides every candidate got on it."""
    if name not in per_set:
        return name
    return f"{name} ({', '.join(f'{k}={v}' for k, v in per_set[name].items())})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="magnetic-tile,deeppcb")
    parser.add_argument("--candidates", default=",".join(CANDIDATES), help=f"from {sorted(CANDIDATES)}")
    parser.add_argument("--extra", action="append", default=[], help="'name:key=value,...' (repeatable)")
    parser.add_argument(
        "--fuse",
        action="append",
        default=[],
        help="'name=candA+candB': a backbone ensemble of candidates run here or read from --from-json (repeatable)",
    )
    parser.add_argument("--from-json", type=Path, help="rows of an earlier run (JSON lines) to fuse with")
    parser.add_argument(
        "--set-overrides",
        action="append",
        default=[],
        help="'set:key=value,...' applied to every candidate on that set, e.g. 'deeppcb:tiles=4' (the tiling "
        "tune picks for small defects on large frames); the rows' set names say so",
    )
    parser.add_argument("--quick", action="store_true", help="subsample every set (smoke run)")
    parser.add_argument("--json", type=Path, help="append the rows here (JSON lines)")
    parser.add_argument("--markdown", type=Path, help="write the markdown table here")
    args = parser.parse_args()
    candidates = {name: CANDIDATES[name] for name in filter(None, args.candidates.split(","))}
    for spec in args.extra:
        name, _, overrides = spec.partition(":")
        candidates[name] = parse_overrides(overrides)
    sets = labelled_sets(args.sets.split(","), args.quick)
    for data in sets:
        print(
            f"{data.name}: train {len(data.split.train)} good; test {len(data.split.test_good)} good + "
            f"{len(data.split.test_bad)} defective",
            flush=True,
        )
    print(HEADER, flush=True)
    print("|---" * 10 + "|", flush=True)
    per_set: dict[str, dict[str, Any]] = {}
    for spec in args.set_overrides:
        set_name, _, overrides = spec.partition(":")
        per_set[set_name] = parse_overrides(overrides)
    rows = []
    for name, overrides in candidates.items():
        for data in sets:
            config = PatchCoreConfig().replace(**overrides, **per_set.get(data.name, {}))
            row = evaluate_candidate(name, config, data, args.quick)
            row["set"] = set_label(data.name, per_set)
            rows.append(row)
            print(markdown_row(row), flush=True)
            if args.json:
                with args.json.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
    known = list(rows)
    if args.from_json and args.from_json.is_file():
        known += [json.loads(line) for line in args.from_json.read_text().splitlines() if line.strip()]
    for spec in args.fuse:
        name, _, parts = spec.partition("=")
        for data in sets:
            by_name = {r["candidate"]: r for r in known if r["set"] == set_label(data.name, per_set)}
            missing = [p for p in parts.split("+") if p not in by_name]
            if missing:
                print(f"{name} on {data.name}: no rows for {missing}; run those candidates first", flush=True)
                continue
            row = fuse_rows(name, [by_name[p] for p in parts.split("+")], len(data.split.test_good))
            rows.append(row)
            print(markdown_row(row), flush=True)
            if args.json:
                with args.json.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
    if args.markdown:
        lines = [HEADER, "|---" * 10 + "|", *(markdown_row(r) for r in rows)]
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
