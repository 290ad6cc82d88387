"""Scoring cost of the 5-fold ensemble relative to the backbone forward pass alone.

Both are timed on the same batch of 32 real images, alternating, in one run; the ratio is
(end-to-end ensemble scoring incl. preprocessing, embedding, 5× k-NN, eq. 7, anomaly maps) ÷ (backbone
forward only). Target ≤ 1.15 (five separate models would be about 5×).

    python bench/bench_scoring.py [--backbone wide_resnet101_2 --weights random] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import cached_dacon_model, dacon_test, median, timed
from models import PatchCoreConfig, load_image_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None, help="'random' for timing torchvision backbones offline")
    parser.add_argument("--layers", default=None)
    parser.add_argument("--align", default=PatchCoreConfig().align)
    parser.add_argument("--coreset-ratio", type=float, default=PatchCoreConfig().coreset_ratio)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    config = PatchCoreConfig(
        backbone=args.backbone,
        layers=tuple(args.layers.split(",")) if args.layers else (),
        weights_path=args.weights,
        align=args.align,
        coreset_ratio=args.coreset_ratio,
        batch_size=args.batch,
    )
    ensemble = cached_dacon_model(config, device=args.device)
    refs = (dacon_test() * 4)[: args.batch]
    images = [load_image_file(r.path) for r in refs]
    ids = [r.id for r in refs]
    extractor = ensemble.extractor
    batch = extractor.preprocess(images)
    device = extractor.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def backbone_only() -> None:
        extractor.backbone(batch)
        sync()

    def end_to_end() -> None:
        ensemble.score_images(images, ids, with_maps=True)
        sync()

    backbone_only(), end_to_end()  # warm-up
    backbone_times, ensemble_times = [], []
    for _ in range(args.repeats):
        backbone_times += timed(backbone_only, 1)
        ensemble_times += timed(end_to_end, 1)
    b, e = median(backbone_times), median(ensemble_times)
    info = ensemble.describe()
    print(f"backbone {config.backbone} {list(config.layers)} align={config.align} on {device}, batch {args.batch}")
    print(f"banks per fold: {info['bank_sizes']} × dim {info['embed_dim']}, grid {info['grid']}")
    print(f"backbone forward only : {b * 1000:8.1f} ms/batch  {b / args.batch * 1000:7.2f} ms/image")
    print(f"5-fold ensemble, e2e  : {e * 1000:8.1f} ms/batch  {e / args.batch * 1000:7.2f} ms/image")
    print(f"images/s (ensemble)   : {args.batch / e:8.1f}")
    print(f"ratio ensemble/backbone: {e / b:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
