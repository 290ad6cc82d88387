"""Quality vs cost on the labelled magnetic-tile set: choose the defaults by measurement.

For each configuration: image AUROC, F1 at the calibrated threshold, pixel AUROC, training time and bank
size. Usage: python bench/bench_quality.py [--quick] [--grid ratio=0.01,0.1 size=224,320 layers=...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.magnetic_tile import magnetic_tile_split, subsample
from models import FoldEnsemble, PatchCoreConfig
from models.evaluation import evaluate_ensemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratios", default="0.01,0.1,0.25")
    parser.add_argument("--sizes", default="224,320")
    parser.add_argument("--layers", default="blocks.4+blocks.10", help="';'-separated '+'-joined tap lists")
    parser.add_argument("--target-dims", default="0", help="comma-separated target_dim values (0 = native)")
    parser.add_argument("--aligns", default="finest", help="comma-separated: finest,coarsest")
    parser.add_argument("--quick", action="store_true", help="subsample the test set (smoke run)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    split = magnetic_tile_split()
    good, bad = split.test_good, split.test_bad
    if args.quick:
        good, bad = subsample(good, 40), subsample(bad, 40)
    print(
        f"magnetic-tile: train {len(split.train)} good; test {len(good)} good + {len(bad)} defective",
        flush=True,
    )
    rows = []
    header = (
        f"{'layers':<22}{'size':>5}{'ratio':>7}{'AUROC':>8}{'F1':>7}{'pxAUROC':>9}"
        f"{'train s':>9}{'score ms/img':>13}{'bank':>7}"
    )
    print(header, flush=True)
    combos = itertools.product(
        [tuple(x.split("+")) for x in args.layers.split(";")],
        [int(s) for s in args.sizes.split(",")],
        [float(r) for r in args.ratios.split(",")],
        args.aligns.split(","),
        [int(d) for d in args.target_dims.split(",")],
    )
    for layers, size, ratio, align, target_dim in combos:
        config = PatchCoreConfig(
            layers=layers, image_size=size, coreset_ratio=ratio, align=align, target_dim=target_dim
        )
        started = time.perf_counter()
        ensemble = FoldEnsemble.fit([r.id for r in split.train], [r.path for r in split.train], config)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        report, _ = evaluate_ensemble(ensemble, good, bad, masks=split.masks)
        score_ms = (time.perf_counter() - started) / (len(good) + len(bad)) * 1000
        bank = sum(f.bank.n_entries for f in ensemble.folds) // len(ensemble.folds)
        row = {
            "layers": "+".join(layers),
            "size": size,
            "ratio": ratio,
            **report.as_dict(),
            "train_s": train_s,
            "score_ms_per_image": score_ms,
            "bank_per_fold": bank,
        }
        rows.append(row)
        print(
            f"{row['layers']:<22}{size:>5}{ratio:>7.2f}{report.image_auroc:>8.3f}{report.f1:>7.3f}"
            f"{report.pixel_auroc:>9.3f}{train_s:>9.1f}{score_ms:>13.1f}{bank:>7}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
