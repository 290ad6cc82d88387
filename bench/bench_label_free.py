"""Does label-free validation rank configs like real defects do? (issue 9, §1)

For each labelled set (magnetic tile, DeepPCB) and each config: the nominal training images are split by a
hash of their ids (models.validation.split_heldout); one FoldEnsemble is fitted on the training part; it
scores (a) the held-out nominal images and a synthetic defect made from each — the label-free score, which
needs no label — and (b) the set's real test images (good + defective) — the truth the label-free score
should predict. Prints one row per config and, per set, the Spearman correlation across configs between
the label-free image AUROC and the real image AUROC (and the same for pixel AUROC).

Images are subsampled (deterministically) so that it runs in minutes on a shared 2-core machine.
Usage: nice -n 10 python bench/bench_label_free.py [--n-train 80] [--n-test 30] [--sets tile,pcb]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scipy.stats import spearmanr

from bench.magnetic_tile import DATASETS, magnetic_tile_split, subsample
from models import FoldEnsemble, PatchCoreConfig
from models.datasets import ImageRef, list_images
from models.evaluation import evaluate_ensemble
from models.validation import score_synthetic, split_heldout

DEEPPCB = DATASETS / "deeppcb"

#: Cheapest first, so that a run cut short still has a ranking.
CONFIGS: dict[str, dict[str, object]] = {
    "default": {},
    "b10+b14": {"layers": ("blocks.10", "blocks.14")},
    "b4": {"layers": ("blocks.4",)},
    "k1": {"k": 1},
    "b2+b4": {"layers": ("blocks.2", "blocks.4")},
    "coreset10": {"coreset_ratio": 0.1},
    "size320": {"image_size": 320},
}


def tile_set(n_train: int, n_test: int) -> tuple[list[ImageRef], list[ImageRef], list[ImageRef], dict[str, Path]]:
    split = magnetic_tile_split()
    return (
        subsample(split.train, n_train),
        subsample(split.test_good, n_test),
        subsample(split.test_bad, n_test),
        split.masks,
    )


def pcb_set(n_train: int, n_test: int) -> tuple[list[ImageRef], list[ImageRef], list[ImageRef], dict[str, Path]]:
    """DeepPCB: train/good; test/good and test/defect share file names, so ids get a folder prefix."""
    train = subsample(list_images(DEEPPCB / "train" / "good"), n_train)
    good = [ImageRef(f"good/{r.id}", r.path) for r in subsample(list_images(DEEPPCB / "test" / "good"), n_test)]
    bad = [ImageRef(f"defect/{r.id}", r.path) for r in subsample(list_images(DEEPPCB / "test" / "defect"), n_test)]
    masks = {r.id: DEEPPCB / "ground_truth" / "defect" / f"{r.path.stem}.png" for r in bad}
    return train, good, bad, masks


SETS = {"tile": tile_set, "pcb": pcb_set}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-train", type=int, default=60, help="nominal training images per set")
    parser.add_argument("--n-test", type=int, default=24, help="real test images per class per set")
    parser.add_argument("--sets", default="tile,pcb")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    for set_name in args.sets.split(","):
        train, good, bad, masks = SETS[set_name](args.n_train, args.n_test)
        by_id = {r.id: r for r in train}
        fit_ids, heldout_ids = split_heldout(list(by_id))
        print(
            f"\n{set_name}: {len(fit_ids)} nominal to fit, {len(heldout_ids)} held out (+1 synthetic defect each); "
            f"real test {len(good)} good + {len(bad)} defective",
            flush=True,
        )
        print(f"{'config':<11}{'LF AUROC':>9}{'LF px':>7}{'real AUROC':>11}{'real px':>8}{'seconds':>8}", flush=True)
        set_rows = []
        for name in args.configs.split(","):
            started = time.perf_counter()
            config = PatchCoreConfig(**CONFIGS[name])
            ensemble = FoldEnsemble.fit(fit_ids, [by_id[i].path for i in fit_ids], config, device="cpu")
            label_free = score_synthetic(ensemble, heldout_ids, [by_id[i].path for i in heldout_ids])
            real, _ = evaluate_ensemble(ensemble, good, bad, masks=masks)
            row = {
                "set": set_name,
                "config": name,
                "label_free_auroc": label_free.image_auroc,
                "label_free_pixel_auroc": label_free.pixel_auroc,
                "label_free_auroc_by_kind": label_free.auroc_by_kind(),
                "real_auroc": real.image_auroc,
                "real_pixel_auroc": real.pixel_auroc,
                "seconds": time.perf_counter() - started,
            }
            set_rows.append(row)
            print(
                f"{name:<11}{row['label_free_auroc']:>9.3f}{row['label_free_pixel_auroc']:>7.3f}"
                f"{row['real_auroc']:>11.3f}{row['real_pixel_auroc']:>8.3f}{row['seconds']:>8.0f}",
                flush=True,
            )
        image_rho = spearmanr([r["label_free_auroc"] for r in set_rows], [r["real_auroc"] for r in set_rows])[0]
        pixel_rho = spearmanr(
            [r["label_free_pixel_auroc"] for r in set_rows], [r["real_pixel_auroc"] for r in set_rows]
        )[0]
        print(
            f"{set_name}: Spearman over {len(set_rows)} configs, label-free vs real: image AUROC {image_rho:+.2f}, "
            f"pixel AUROC {pixel_rho:+.2f}",
            flush=True,
        )
        rows.extend(set_rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
