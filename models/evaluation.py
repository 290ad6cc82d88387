"""Detection-quality metrics: image AUROC, F1 at the calibrated threshold, pixel AUROC."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from models.datasets import ImageRef
from models.ensemble import FoldEnsemble, ImageScore, Progress
from models.images import load_image_file


@dataclass(frozen=True)
class DetectionReport:
    n_good: int
    n_bad: int
    image_auroc: float
    f1: float  # anomalous class, at the model's own threshold
    precision: float
    recall: float
    false_alarm_rate: float = float("nan")  # share of the good images flagged at the model's threshold
    true_positives: int = 0
    false_positives: int = 0
    true_negatives: int = 0
    false_negatives: int = 0
    best_f1: float = float("nan")  # the F1 the best threshold for these labels would reach (reference only)
    best_threshold: float = float("nan")
    pixel_auroc: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def image_metrics(scores: Sequence[float], labels: Sequence[int], threshold: float) -> dict[str, float]:
    """AUROC of scores vs labels (1 = defect) and F1/precision/recall of ``score > threshold``."""
    y_true = np.asarray(labels, dtype=int)
    y_score = np.asarray(scores, dtype=np.float64)
    y_pred = (y_score > threshold).astype(int)
    both = len(set(y_true.tolist())) == 2
    best_f1, best_threshold = f1_optimal_threshold(y_score, y_true)
    good = y_true == 0
    return {
        "image_auroc": float(roc_auc_score(y_true, y_score)) if both else float("nan"),
        "f1": float(f1_score(y_true, y_pred, zero_division=0)),
        "precision": float(precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0)),
        "false_alarm_rate": float(y_pred[good].mean()) if good.any() else float("nan"),
        "true_positives": int(((y_pred == 1) & (y_true == 1)).sum()),
        "false_positives": int(((y_pred == 1) & good).sum()),
        "true_negatives": int(((y_pred == 0) & good).sum()),
        "false_negatives": int(((y_pred == 0) & (y_true == 1)).sum()),
        "best_f1": best_f1,
        "best_threshold": best_threshold,
    }


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(best F1, its threshold) over every cut between sorted scores, flagging ``score > threshold``.

    It needs the test labels, so it is a reference for judging a threshold rule, never a product setting.
    The threshold returned is midway between the last flagged score and the next one down.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    if not labels.any() or scores.size == 0:
        return float("nan"), float("nan")
    order = np.argsort(-scores, kind="stable")
    ranked, truth = scores[order], labels[order]
    tp = np.cumsum(truth)
    fp = np.cumsum(1 - truth)
    f1 = 2 * tp / (2 * tp + fp + (truth.sum() - tp))
    distinct = np.append(ranked[1:] < ranked[:-1], True)  # cut only between different scores
    f1 = np.where(distinct, f1, -1.0)
    best = int(np.argmax(f1))
    below = ranked[best + 1] if best + 1 < ranked.size else ranked[best] - 1.0
    return float(f1[best]), float((ranked[best] + below) / 2)


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, max_pixels: int = 20_000_000) -> float:
    """AUROC over all pixels of all images; maps and masks of equal shape, masks > 0 = defect.

    Pixels are subsampled on a fixed stride beyond ``max_pixels`` to bound memory.
    """
    flat_scores = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    flat_truth = np.concatenate([(np.asarray(m) > 0).ravel() for m in masks])
    stride = max(1, flat_scores.size // max_pixels)
    flat_scores, flat_truth = flat_scores[::stride], flat_truth[::stride]
    if flat_truth.all() or not flat_truth.any():
        return float("nan")
    return float(roc_auc_score(flat_truth, flat_scores))


def evaluate_ensemble(
    ensemble: FoldEnsemble,
    good: Sequence[ImageRef],
    bad: Sequence[ImageRef],
    *,
    masks: dict[str, Path] | None = None,
    progress: Progress | None = None,
) -> tuple[DetectionReport, list[ImageScore]]:
    """Score labelled images batch by batch and report image AUROC, F1 at the model's threshold and, when
    masks are given (by image id; missing mask for a good image = all good), pixel AUROC."""
    refs = [(ref, 0) for ref in good] + [(ref, 1) for ref in bad]
    size = ensemble.input_size
    scores: list[ImageScore] = []
    pixel_maps: list[np.ndarray] = []
    pixel_masks: list[np.ndarray] = []
    batch = ensemble.config.batch_size
    for begin in range(0, len(refs), batch):
        chunk = refs[begin : begin + batch]
        images = [load_image_file(ref.path, max_pixels=ensemble.config.max_image_pixels, size=size) for ref, _ in chunk]
        results = ensemble.score_images(images, [ref.id for ref, _ in chunk], with_maps=masks is not None)
        scores.extend(results)
        if masks is not None:
            for (ref, label), result in zip(chunk, results, strict=True):
                pixel_maps.append(result.anomaly_map.astype(np.float16))
                pixel_masks.append(_load_mask(masks.get(ref.id), size, defect_expected=bool(label)))
        if progress:
            progress("evaluate", min(begin + batch, len(refs)), len(refs))
    labels = [label for _, label in refs]
    metrics = image_metrics([s.score for s in scores], labels, ensemble.threshold)
    report = DetectionReport(
        n_good=len(good),
        n_bad=len(bad),
        pixel_auroc=pixel_auroc(pixel_maps, pixel_masks) if masks is not None else None,
        **metrics,
    )
    return report, scores


def _load_mask(path: Path | None, size: int, *, defect_expected: bool) -> np.ndarray:
    if path is None:
        if defect_expected:
            raise FileNotFoundError("a defective image has no mask; pass masks for every defective image")
        return np.zeros((size, size), dtype=bool)
    with Image.open(path) as mask:
        resized = mask.convert("L").resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(resized) > 0
