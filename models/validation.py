"""Label-free scoring of a config: how well does it separate held-out nominal images from synthetic defects?

A user who brings only defect-free images cannot measure a config on real defects. Here a deterministic
part of the nominal images (chosen by a hash of each id, so adding images never reshuffles the others) is
held out; a :class:`~models.ensemble.FoldEnsemble` is fitted on the rest; the held-out images are scored
as they are and with one synthetic defect each (:mod:`models.synthetic`). The image AUROC of nominal vs
synthetic (and the pixel AUROC on the synthetic masks) ranks configs; ``bench/bench_label_free.py``
measures how well that ranking agrees with the ranking by real defects on the labelled sets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from models.config import PatchCoreConfig
from models.ensemble import FoldEnsemble, ImageScore, ImageSource
from models.errors import BadImageError, ConfigError
from models.evaluation import pixel_auroc
from models.images import decode_image
from models.synthetic import DEFAULT_SCALE, SYNTHETIC_KINDS, synthetic_anomalies

#: A nominal image: a decoded image, or anything :meth:`FoldEnsemble.fit` reads (path, bytes, callable).
NominalImage = Image.Image | ImageSource
DEFAULT_HELDOUT_FRACTION = 0.3
MIN_HELDOUT = 2


@dataclass(frozen=True)
class LabelFreeScore:
    """The separation of held-out nominal images from synthetic defects made from them.

    Scores are in the order of ``heldout_ids`` / ``anomaly_ids`` (both sorted by the nominal id).
    """

    image_auroc: float
    pixel_auroc: float | None  # None when maps were not asked for
    train_ids: tuple[str, ...]
    heldout_ids: tuple[str, ...]
    nominal_scores: tuple[float, ...]
    anomaly_ids: tuple[str, ...]
    anomaly_kinds: tuple[str, ...]
    anomaly_scores: tuple[float, ...]
    fit_seconds: float  # 0 when the caller fitted the ensemble (score_synthetic)
    score_seconds: float
    skipped: tuple[str, ...] = ()  # held-out ids that could not be read or decoded

    def auroc_by_kind(self) -> dict[str, float]:
        """Image AUROC of the held-out nominal images vs each kind of synthetic defect alone."""
        kinds = np.asarray(self.anomaly_kinds)
        return {
            kind: _auroc(np.asarray(self.nominal_scores), np.asarray(self.anomaly_scores)[kinds == kind])
            for kind in sorted(set(self.anomaly_kinds))
        }


def split_heldout(
    ids: Sequence[str], heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, *, salt: str = "label-free"
) -> tuple[list[str], list[str]]:
    """(train ids, held-out ids), each sorted: an id is held out iff a hash of it falls below the fraction."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction={heldout_fraction} must be in (0, 1), e.g. 0.3")
    train, heldout = [], []
    for image_id in sorted(ids):
        bucket = int.from_bytes(hashlib.sha256(f"{salt}:{image_id}".encode()).digest()[:8], "big") / 2**64
        (heldout if bucket < heldout_fraction else train).append(image_id)
    return train, heldout


def label_free_score(
    ids: Sequence[str],
    images: Sequence[NominalImage],
    config: PatchCoreConfig,
    *,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    seed: int = 0,
    kinds: Sequence[str] = SYNTHETIC_KINDS,
    scale: float = DEFAULT_SCALE,
    with_maps: bool = True,
    device: str | torch.device | None = "auto",
) -> LabelFreeScore:
    """Fit ``config`` on the training part of the nominal images and score held-out vs synthetic defects.

    ``ids`` are joined to ``images`` by position here and by id after: the input order does not change
    the result. The held-out images are decoded together (this is meant for the few hundred images of a
    tuning run). ``seed`` seeds the synthetic defects only; the fit uses ``config.seed``.
    """
    if len(ids) != len(images):
        raise ConfigError(f"got {len(ids)} ids but {len(images)} images")
    if len(set(ids)) != len(ids):
        raise ConfigError("image ids must be unique")
    by_id = dict(zip(ids, images, strict=True))
    train_ids, heldout_ids = split_heldout(ids, heldout_fraction)
    if len(train_ids) < config.folds or len(heldout_ids) < MIN_HELDOUT:
        raise ConfigError(
            f"{len(ids)} nominal images give {len(train_ids)} to train and {len(heldout_ids)} to hold out; "
            f"label-free validation needs at least {config.folds} (the folds) and {MIN_HELDOUT}: add images"
        )
    started = time.perf_counter()
    ensemble = FoldEnsemble.fit(train_ids, [_as_source(by_id[i]) for i in train_ids], config, device=device)
    fit_seconds = time.perf_counter() - started
    result = score_synthetic(
        ensemble, heldout_ids, [by_id[i] for i in heldout_ids], seed=seed, kinds=kinds, scale=scale, with_maps=with_maps
    )
    return dataclasses.replace(result, fit_seconds=fit_seconds)


def score_synthetic(
    ensemble: FoldEnsemble,
    ids: Sequence[str],
    images: Sequence[NominalImage],
    *,
    seed: int = 0,
    kinds: Sequence[str] = SYNTHETIC_KINDS,
    scale: float = DEFAULT_SCALE,
    with_maps: bool = True,
) -> LabelFreeScore:
    """Score nominal images the ensemble was not trained on, and one synthetic defect made from each.

    The second half of :func:`label_free_score`, for callers that fit the ensemble themselves (a benchmark
    that also scores real defects with the same model). Unreadable images are left out and listed.
    """
    config = ensemble.config
    started = time.perf_counter()
    nominal, heldout_ids, skipped = [], [], []
    for image_id, image in sorted(zip(ids, images, strict=True), key=lambda pair: pair[0]):
        try:
            nominal.append(_as_image(image, image_id, config))
            heldout_ids.append(image_id)
        except (BadImageError, OSError):
            skipped.append(image_id)
    if len(heldout_ids) < MIN_HELDOUT:
        raise ConfigError(f"only {len(heldout_ids)} held-out images could be read; unreadable: {skipped[:5]}")
    anomalies = synthetic_anomalies(nominal, heldout_ids, seed=seed, kinds=kinds, scale=scale)
    nominal_results = _score(ensemble, nominal, heldout_ids, with_maps)
    anomaly_results = _score(ensemble, [a.image for a in anomalies], [a.id for a in anomalies], with_maps)
    score_seconds = time.perf_counter() - started

    nominal_scores = np.array([r.score for r in nominal_results])
    anomaly_scores = np.array([r.score for r in anomaly_results])
    pixel = None
    if with_maps:
        maps = [r.anomaly_map for r in (*nominal_results, *anomaly_results)]
        masks = [np.zeros((image.height, image.width), dtype=bool) for image in nominal]
        masks += [a.mask for a in anomalies]
        pixel = pixel_auroc(maps, [_mask_like(mask, m.shape) for mask, m in zip(masks, maps, strict=True)])
    return LabelFreeScore(
        image_auroc=_auroc(nominal_scores, anomaly_scores),
        pixel_auroc=pixel,
        train_ids=tuple(ensemble_ids(ensemble)),
        heldout_ids=tuple(heldout_ids),
        nominal_scores=tuple(float(s) for s in nominal_scores),
        anomaly_ids=tuple(a.id for a in anomalies),
        anomaly_kinds=tuple(a.kind for a in anomalies),
        anomaly_scores=tuple(float(s) for s in anomaly_scores),
        fit_seconds=0.0,
        score_seconds=score_seconds,
        skipped=tuple(skipped),
    )


def ensemble_ids(ensemble: FoldEnsemble) -> list[str]:
    """The ids the ensemble was actually trained on (unreadable images are left out by the fit)."""
    return [image.id for image in ensemble.training_images]


def _score(ensemble: FoldEnsemble, images: list[Image.Image], ids: list[str], with_maps: bool) -> list[ImageScore]:
    results = ensemble.score_images(images, ids, with_maps=with_maps)
    if [r.id for r in results] != list(ids):
        raise ConfigError("the ensemble returned scores for other ids than it was given")
    return results


def _as_source(image: NominalImage) -> ImageSource:
    """What :meth:`FoldEnsemble.fit` reads; a decoded image is re-encoded losslessly (PNG)."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue()
    return image


def _as_image(image: NominalImage, image_id: str, config: PatchCoreConfig) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, bytes):
        data = image
    elif callable(image):
        data = image()
    else:
        data = Path(image).read_bytes()
    return decode_image(data, name=image_id, max_pixels=config.max_image_pixels)


def _mask_like(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The mask at the anomaly map's resolution (nearest neighbour, as real masks are in evaluation)."""
    if mask.shape == tuple(shape):
        return mask
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(resized) > 0


def _auroc(nominal: np.ndarray, anomalous: np.ndarray) -> float:
    if nominal.size == 0 or anomalous.size == 0:
        return float("nan")
    labels = np.concatenate([np.zeros(nominal.size), np.ones(anomalous.size)])
    return float(roc_auc_score(labels, np.concatenate([nominal, anomalous])))
