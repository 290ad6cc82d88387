"""Scoring cost of the 5-fold ensemble relative to the backbone forward pass alone.

Both are timed on the same batch of 32 real images, alternating, in one run; the ratio is
(end-to-end ensemble scoring incl. normalisation, embedding, 5× k-NN, eq. 7, anomaly maps) ÷ (backbone
forward only). Target ≤ 1.15 (five separate models would be about 5×). The ensemble gets the images as
the worker hands them over: decoded at the model's input size (the worker resizes on its fetch threads,
where ``bench_pipeline.py`` accounts for it); the ratio from full-size images, resizing included, is
printed beside it. Both use the extractor's forward
chunk (images per backbone pass; on a CPU a few at a time, see ``models.features.default_forward_chunk``);
the backbone on the whole batch in one pass is timed alongside, so the gain of chunking is measured in the
same run.

    python bench/bench_scoring.py [--backbone wide_resnet101_2 --weights random] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import cached_dacon_model, dacon_test, median, timed
from models import PatchCoreConfig, decode_image, load_image_file


def scoring_config(
    *,
    backbone: str,
    weights: str | None,
    batch: int,
    layers: str | None = None,
    align: str = PatchCoreConfig().align,
    coreset_ratio: float = PatchCoreConfig().coreset_ratio,
    coreset_scope: str = PatchCoreConfig().coreset_scope,
) -> PatchCoreConfig:
    """The model this benchmark times (bench/gpu_bundle.py fits the same ones ahead for an offline GPU)."""
    return PatchCoreConfig(
        backbone=backbone,
        layers=tuple(layers.split(",")) if layers else (),
        weights_path=weights,
        align=align,
        coreset_ratio=coreset_ratio,
        coreset_scope=coreset_scope,
        batch_size=batch,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default=None, help="'random' for timing torchvision backbones offline")
    parser.add_argument("--layers", default=None)
    parser.add_argument("--align", default=PatchCoreConfig().align)
    parser.add_argument("--coreset-ratio", type=float, default=PatchCoreConfig().coreset_ratio)
    parser.add_argument("--coreset-scope", default=PatchCoreConfig().coreset_scope, choices=("fold", "part"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--forward-chunk", type=int, default=None, help="images per backbone pass (default: auto)")
    args = parser.parse_args()
    config = scoring_config(
        backbone=args.backbone,
        weights=args.weights,
        batch=args.batch,
        layers=args.layers,
        align=args.align,
        coreset_ratio=args.coreset_ratio,
        coreset_scope=args.coreset_scope,
    )
    ensemble = cached_dacon_model(config, device=args.device)
    test = dacon_test()  # the batch repeats them as needed (a GPU bundle carries only a few, bench/gpu_bundle.py)
    refs = [test[i % len(test)] for i in range(args.batch)]
    full_size = [load_image_file(r.path) for r in refs]
    images = [decode_image(r.path.read_bytes(), size=ensemble.input_size) for r in refs]  # as the worker does
    ids = [r.id for r in refs]
    extractor = ensemble.extractor
    if args.forward_chunk:
        extractor.forward_chunk = args.forward_chunk
    chunk = extractor.forward_chunk or args.batch
    batch = extractor.preprocess(images)
    device = extractor.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def backbone_only() -> None:
        for begin in range(0, len(batch), chunk):
            extractor.backbone(batch[begin : begin + chunk])
        sync()

    def backbone_whole_batch() -> None:
        extractor.backbone(batch)
        sync()

    def preprocess_only() -> None:
        extractor.preprocess(images)

    embedded = extractor.embed_batch(batch)

    def folds_only() -> None:
        ensemble.score_embeddings(embedded, ids, with_maps=True)

    def end_to_end() -> None:
        ensemble.score_images(images, ids, with_maps=True)
        sync()

    def end_to_end_full_size() -> None:
        ensemble.score_images(full_size, ids, with_maps=True)
        sync()

    def resize_only() -> None:
        extractor.preprocess(full_size)

    backbone_only(), end_to_end(), backbone_whole_batch()  # warm-up
    backbone_times, ensemble_times, whole_times, pre_times, fold_times, full_times, resize_times = (
        [] for _ in range(7)
    )
    with torch.inference_mode():
        for _ in range(args.repeats):
            backbone_times += timed(backbone_only, 1)
            ensemble_times += timed(end_to_end, 1)
            whole_times += timed(backbone_whole_batch, 1)
            pre_times += timed(preprocess_only, 1)
            fold_times += timed(folds_only, 1)
            full_times += timed(end_to_end_full_size, 1)
            resize_times += timed(resize_only, 1)
    b, e, w = median(backbone_times), median(ensemble_times), median(whole_times)
    pre, folds, full, resize = median(pre_times), median(fold_times), median(full_times), median(resize_times)
    info = ensemble.describe()
    print(f"backbone {config.backbone} {list(config.layers)} align={config.align} on {device}, batch {args.batch}")
    print(f"banks per fold: {info['bank_sizes']} × dim {info['embed_dim']}, grid {info['grid']}")
    print(f"backbone, one pass    : {w * 1000:8.1f} ms/batch  {w / args.batch * 1000:7.2f} ms/image")
    print(f"backbone, {chunk:>2} per pass: {b * 1000:8.1f} ms/batch  {b / args.batch * 1000:7.2f} ms/image")
    print(f"5-fold ensemble, e2e  : {e * 1000:8.1f} ms/batch  {e / args.batch * 1000:7.2f} ms/image")
    print(f"  of which normalisation (input-size images)  : {pre / args.batch * 1000:6.2f} ms/image")
    print(f"  of which 5 folds (k-NN, eq. 7, maps)       : {folds / args.batch * 1000:6.2f} ms/image")
    print(f"images/s (ensemble)   : {args.batch / e:8.1f}")
    print(
        f"from full-size images : {full * 1000:8.1f} ms/batch  {full / args.batch * 1000:7.2f} ms/image "
        f"(resize + normalise {resize / args.batch * 1000:.2f}); ratio {full / b:.3f}"
    )
    print(f"ratio ensemble/backbone: {e / b:.3f}  (target <= 1.15)")
    if device.type == "cuda":  # bf16 autocast on CUDA (models.backbones)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        print(f"peak GPU memory       : {peak:8.0f} MiB ({torch.cuda.get_device_name(device)}, bf16 autocast)")


if __name__ == "__main__":
    main()
