"""Training cost: the 5-fold ensemble on the 213 Dacon training images vs feature extraction alone, the
other coreset scopes and ratios timed side by side on the same features (``--compare``), and the pruned
greedy coreset vs a straightforward greedy loop at a 1% ratio (time and covering radius).

Targets: training ÷ features ≤ 3; coreset speed-up ≥ 10× with covering radius within 5%.

    python bench/bench_training.py [--skip-naive] [--compare fold:0.05,part:0.10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import dacon_train
from models import PatchCoreConfig
from models.coreset import coreset_size, covering_radius, greedy_coreset
from models.features import PatchFeatureExtractor
from models.training import assemble_ensemble, build_folds, extract_features, plan_folds


def straightforward_greedy(points: torch.Tensor, n_select: int, start: int) -> torch.Tensor:
    """The baseline: a Python loop recomputing full-dimension squared distances to every point per pick."""
    selected = [start]
    min_d2 = ((points - points[start]) ** 2).sum(dim=1)
    for _ in range(n_select - 1):
        new = int(torch.argmax(min_d2))
        selected.append(new)
        min_d2 = torch.minimum(min_d2, ((points - points[new]) ** 2).sum(dim=1))
    return torch.tensor(selected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-naive", action="store_true", help="skip the (slow) baseline coreset")
    parser.add_argument("--align", default=PatchCoreConfig().align, help="finest: the 28×28 PatchCore grid")
    parser.add_argument(
        "--compare",
        default="fold:0.01,part:0.05,part:0.10",
        help="other 'scope:ratio' fold builds timed on the same features, side by side ('' for none)",
    )
    args = parser.parse_args()
    config = PatchCoreConfig(align=args.align)
    refs = dacon_train()
    ids, paths = [r.id for r in refs], [r.path for r in refs]
    extractor = PatchFeatureExtractor(config, device="auto")

    started = time.perf_counter()
    features = extract_features(ids, paths, config, extractor=extractor)
    features_s = time.perf_counter() - started
    started = time.perf_counter()
    folds = build_folds(features, config)
    folds_s = time.perf_counter() - started
    ensemble = assemble_ensemble(config, features, folds, extractor=extractor)
    total_s = features_s + folds_s
    print(
        f"{len(ids)} Dacon training images, {config.backbone}, {config.image_size}px, grid {features.grid}, "
        f"coreset {config.coreset_scope} {config.coreset_ratio}"
    )
    print(f"features: {features_s:.1f}s; folds: {folds_s:.1f}s; total {total_s:.1f}s")
    print(f"ratio training/features: {total_s / features_s:.2f}  (target <= 3); model {ensemble.version}")
    for item in filter(None, args.compare.split(",")):
        scope, _, ratio = item.partition(":")
        other = config.replace(coreset_scope=scope, coreset_ratio=float(ratio))
        started = time.perf_counter()
        other_folds = build_folds(features, other)
        other_s = time.perf_counter() - started
        print(
            f"  coreset {scope:4} {float(ratio):.2f}: folds {other_s:6.1f}s ({other_s / folds_s:.2f}× the default's), "
            f"bank {other_folds[0].bank.n_entries}, training/features {(features_s + other_s) / features_s:.2f}"
        )

    train_ids, _ = plan_folds(features.ids, config)[0]
    patches = features.features[features.rows(train_ids)]
    points = torch.from_numpy(patches.reshape(-1, patches.shape[-1]).astype(np.float32))
    n_select = coreset_size(points.shape[0], 0.01)
    started = time.perf_counter()
    fast = greedy_coreset(
        points, n_select, projection_dim=config.coreset_projection_dim, generator=torch.Generator().manual_seed(0)
    )
    fast_s = time.perf_counter() - started
    fast_r = covering_radius(points, fast)
    print(f"coreset 1% of fold 0: {points.shape[0]} patches × {points.shape[1]} → {n_select}")
    print(f"  pruned greedy        : {fast_s:7.2f}s  covering radius {fast_r:.4f}")
    if not args.skip_naive:
        started = time.perf_counter()
        naive = straightforward_greedy(points, n_select, int(fast[0]))
        naive_s = time.perf_counter() - started
        naive_r = covering_radius(points, naive)
        print(f"  straightforward loop : {naive_s:7.2f}s  covering radius {naive_r:.4f}")
        print(
            f"  speed-up {naive_s / fast_s:.1f}×  (target >= 10), radius ratio {fast_r / naive_r:.4f} (target <= 1.05)"
        )


if __name__ == "__main__":
    main()
