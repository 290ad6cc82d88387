"""The fold-ensemble PatchCore detector (the Dacon-winning recipe, made reproducible and bounded in memory).

Training: the nominal images are sorted by id and split with a seeded KFold. The backbone runs once per
image; every fold reuses those features. Fold ``i`` builds a memory bank (greedy coreset) from its train part
and calibrates its threshold as the maximum score over its validation part. The ensemble threshold aggregates
the fold thresholds (mean by default) and an image's score aggregates the fold scores (max by default); an
image is anomalous iff its score is strictly greater than the threshold.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import KFold

from models.config import PatchCoreConfig
from models.coreset import coreset_size, greedy_coreset
from models.errors import BadImageError, ConfigError
from models.features import PatchFeatureExtractor
from models.images import decode_image
from models.memory_bank import MemoryBank
from models.scoring import anomaly_maps, patch_scores, reweighted_image_scores

logger = logging.getLogger(__name__)

#: A training image: a file path, its bytes, or a callable returning its bytes (read lazily, in batches).
ImageSource = str | Path | bytes | Callable[[], bytes]
#: Progress callback: (stage, done, total). Library code reports; the CLI decides how to draw it.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ImageScore:
    """The verdict on one image, with the evidence behind it."""

    id: str
    score: float
    threshold: float
    is_anomalous: bool
    fold_scores: tuple[float, ...]
    anomaly_map: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Fold:
    """One member of the ensemble: its bank, the images it was calibrated on and its threshold."""

    index: int
    train_ids: tuple[str, ...]
    validation_ids: tuple[str, ...]
    threshold: float
    bank: MemoryBank


@dataclass(frozen=True)
class TrainingImage:
    id: str
    sha256: str


@dataclass
class FitReport:
    """Where the training time went, and which images were left out (and why)."""

    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)


class FoldEnsemble:
    """A fitted fold ensemble. Build with :meth:`fit`, persist with :meth:`save` / :meth:`load`."""

    def __init__(
        self,
        config: PatchCoreConfig,
        folds: Sequence[Fold],
        *,
        training_images: Sequence[TrainingImage],
        grid: tuple[int, int],
        extractor: PatchFeatureExtractor | None = None,
        device: str | torch.device | None = "auto",
        report: FitReport | None = None,
    ) -> None:
        self.config = config
        self.folds = tuple(folds)
        self.training_images = tuple(training_images)
        self.grid = grid
        self.report = report or FitReport()
        self._extractor = extractor
        self._device = device
        self.fold_thresholds = tuple(fold.threshold for fold in self.folds)
        self.threshold = aggregate_thresholds(self.fold_thresholds, config.threshold_aggregate)

    # ------------------------------------------------------------------ training
    @classmethod
    def fit(
        cls,
        ids: Sequence[str],
        sources: Sequence[ImageSource],
        config: PatchCoreConfig,
        *,
        device: str | torch.device | None = "auto",
        progress: Progress | None = None,
    ) -> FoldEnsemble:
        """Fit on nominal images. ``ids`` must be unique; ``sources`` are joined to them by position here
        and by id everywhere after (the order of the inputs does not change the result)."""
        if len(ids) != len(sources):
            raise ConfigError(f"got {len(ids)} ids but {len(sources)} images")
        if len(set(ids)) != len(ids):
            raise ConfigError("training image ids must be unique")
        torch.manual_seed(config.seed)
        report = FitReport()
        by_id = dict(zip(ids, sources, strict=True))
        ordered_ids = sorted(by_id)
        extractor = PatchFeatureExtractor(config, device=device)

        started = time.perf_counter()
        kept_ids, hashes, features, grid = _extract_training_features(
            extractor, ordered_ids, by_id, config, report, progress
        )
        report.seconds["features"] = time.perf_counter() - started
        if len(kept_ids) < config.folds:
            raise ConfigError(
                f"{len(kept_ids)} usable training images for {config.folds} folds; each fold needs at least one "
                "validation image (add images or lower --folds)"
            )
        folds = []
        splitter = KFold(n_splits=config.folds, shuffle=True, random_state=config.seed)
        for index, (train_rows, val_rows) in enumerate(splitter.split(np.arange(len(kept_ids)))):
            started = time.perf_counter()
            bank = _build_bank(features, train_rows, config, fold_index=index)
            report.seconds[f"fold{index}_coreset"] = time.perf_counter() - started
            started = time.perf_counter()
            val_scores = _score_features(bank, features[val_rows], config)
            report.seconds[f"fold{index}_calibrate"] = time.perf_counter() - started
            folds.append(
                Fold(
                    index=index,
                    train_ids=tuple(kept_ids[i] for i in train_rows),
                    validation_ids=tuple(kept_ids[i] for i in val_rows),
                    threshold=float(val_scores.max()),
                    bank=bank,
                )
            )
            if progress:
                progress("folds", index + 1, config.folds)
        training = [TrainingImage(id=i, sha256=h) for i, h in zip(kept_ids, hashes, strict=True)]
        return cls(
            config,
            folds,
            training_images=training,
            grid=grid,
            extractor=extractor,
            device=device,
            report=report,
        )

    # ------------------------------------------------------------------ scoring
    @property
    def extractor(self) -> PatchFeatureExtractor:
        """The backbone, built on first use (a loaded model scores without rebuilding anything else)."""
        if self._extractor is None:
            self._extractor = PatchFeatureExtractor(self.config, device=self._device)
        return self._extractor

    def score_images(
        self,
        images: Sequence[Image.Image],
        ids: Sequence[str] | None = None,
        *,
        with_maps: bool = True,
    ) -> list[ImageScore]:
        """Score decoded images (any size, RGB). One backbone pass per batch, shared by all folds."""
        ids = list(ids) if ids is not None else [str(i) for i in range(len(images))]
        if len(ids) != len(images):
            raise ConfigError(f"got {len(ids)} ids but {len(images)} images")
        results: list[ImageScore] = []
        for begin in range(0, len(images), self.config.batch_size):
            chunk = images[begin : begin + self.config.batch_size]
            embedded = self.extractor.embed(chunk)
            results.extend(self.score_embeddings(embedded, ids[begin : begin + len(chunk)], with_maps=with_maps))
        return results

    def score_embeddings(
        self, embedded: torch.Tensor, ids: Sequence[str], *, with_maps: bool = True
    ) -> list[ImageScore]:
        """Score patch embeddings (n_images, h, w, embed_dim) from :class:`PatchFeatureExtractor`."""
        n_images, height, width, dim = embedded.shape
        if (height, width) != self.grid or dim != self.folds[0].bank.embed_dim:
            raise ConfigError(
                f"embeddings of shape {(height, width, dim)} do not match the model's "
                f"{(*self.grid, self.folds[0].bank.embed_dim)}"
            )
        # Rounded through float16 exactly like the stored training features, so an image scores the same
        # whether it was calibrated on or scored later.
        patches = embedded.reshape(n_images, height * width, dim).half().float().numpy()
        fold_scores = np.empty((len(self.folds), n_images), dtype=np.float64)
        fold_grids = np.empty((len(self.folds), n_images, height * width), dtype=np.float32)
        for f, fold in enumerate(self.folds):
            fold_scores[f], fold_grids[f] = _score_patches(fold.bank, patches, self.config)
        if self.config.score_aggregate == "max":
            scores, grids = fold_scores.max(axis=0), fold_grids.max(axis=0)
        else:
            scores, grids = fold_scores.mean(axis=0), fold_grids.mean(axis=0)
        maps = None
        if with_maps:
            grid_tensor = torch.from_numpy(grids.reshape(n_images, height, width))
            maps = anomaly_maps(grid_tensor, self.config.image_size, self.config.smoothing_sigma).numpy()
        return [
            ImageScore(
                id=image_id,
                score=float(scores[i]),
                threshold=self.threshold,
                is_anomalous=bool(scores[i] > self.threshold),
                fold_scores=tuple(float(s) for s in fold_scores[:, i]),
                anomaly_map=None if maps is None else maps[i],
            )
            for i, image_id in enumerate(ids)
        ]

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        from models.artifacts import save_ensemble

        return save_ensemble(self, Path(directory))

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device | None = "auto") -> FoldEnsemble:
        from models.artifacts import load_ensemble

        return load_ensemble(Path(directory), device=device)

    @property
    def version(self) -> str:
        """Content id: the same config, training images and banks always give the same version."""
        from models.artifacts import ensemble_version

        return ensemble_version(self)

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "backbone": self.config.backbone,
            "layers": list(self.config.layers),
            "threshold": self.threshold,
            "fold_thresholds": list(self.fold_thresholds),
            "bank_sizes": [fold.bank.n_entries for fold in self.folds],
            "embed_dim": self.folds[0].bank.embed_dim,
            "grid": list(self.grid),
            "n_training_images": len(self.training_images),
        }


def aggregate_thresholds(thresholds: Sequence[float], how: str) -> float:
    """Ensemble threshold from the per-fold thresholds: mean (the original recipe), max or median."""
    values = np.asarray(thresholds, dtype=np.float64)
    if how == "mean":
        return float(values.mean())
    if how == "max":
        return float(values.max())
    if how == "median":
        return float(np.median(values))
    raise ConfigError(f"threshold_aggregate={how!r} must be mean, max or median")


def _read_source(source: ImageSource) -> bytes:
    if isinstance(source, bytes):
        return source
    if callable(source):
        return source()
    return Path(source).read_bytes()


def _extract_training_features(
    extractor: PatchFeatureExtractor,
    ordered_ids: list[str],
    by_id: dict[str, ImageSource],
    config: PatchCoreConfig,
    report: FitReport,
    progress: Progress | None,
) -> tuple[list[str], list[str], np.ndarray, tuple[int, int]]:
    """Stream images through the backbone in batches into one float16 array (n_images, n_patches, dim).

    Only one batch of decoded images is alive at a time, and features are stored as float16, so memory
    grows by ``n_patches · dim · 2`` bytes per image and nothing else.
    """
    kept_ids: list[str] = []
    hashes: list[str] = []
    store: np.ndarray | None = None
    grid = (0, 0)
    for begin in range(0, len(ordered_ids), config.batch_size):
        batch_ids, batch_images = [], []
        for image_id in ordered_ids[begin : begin + config.batch_size]:
            try:
                data = _read_source(by_id[image_id])
                image = decode_image(data, name=image_id, max_pixels=config.max_image_pixels)
            except (BadImageError, OSError) as exc:
                logger.warning("training image %s left out: %s", image_id, exc)
                report.skipped.append({"id": image_id, "reason": str(exc)})
                continue
            batch_ids.append(image_id)
            batch_images.append(image)
            hashes.append(hashlib.sha256(data).hexdigest())
        if batch_ids:
            embedded = extractor.embed(batch_images)
            n, height, width, dim = embedded.shape
            if store is None:
                grid = (height, width)
                store = np.empty((len(ordered_ids), height * width, dim), dtype=np.float16)
            store[len(kept_ids) : len(kept_ids) + n] = embedded.reshape(n, height * width, dim).numpy()
            kept_ids.extend(batch_ids)
        if progress:
            progress("features", min(begin + config.batch_size, len(ordered_ids)), len(ordered_ids))
    if store is None:
        raise ConfigError("no usable training image")
    return kept_ids, hashes, store[: len(kept_ids)], grid


def _build_bank(
    features: np.ndarray, train_rows: np.ndarray, config: PatchCoreConfig, *, fold_index: int
) -> MemoryBank:
    """Coreset of the fold's training patches; the seed depends on the fold so folds differ reproducibly."""
    patches = torch.from_numpy(features[train_rows].reshape(-1, features.shape[-1]).astype(np.float32))
    generator = torch.Generator().manual_seed(config.seed * 1_000 + fold_index)
    selected = greedy_coreset(
        patches,
        coreset_size(patches.shape[0], config.coreset_ratio),
        projection_dim=config.coreset_projection_dim,
        generator=generator,
    )
    return MemoryBank(patches[selected].numpy())


def _score_patches(bank: MemoryBank, patches: np.ndarray, config: PatchCoreConfig) -> tuple[np.ndarray, np.ndarray]:
    """One fold on a batch: image scores (n_images,) and patch scores (n_images, n_patches)."""
    n_images, n_patches, dim = patches.shape
    scores, nearest = patch_scores(bank, patches.reshape(-1, dim), config.k)
    scores = scores.reshape(n_images, n_patches)
    nearest = nearest.reshape(n_images, n_patches)
    if config.reweight:
        image_scores = reweighted_image_scores(bank, patches, scores, nearest, config.k)
    else:
        image_scores = scores.max(axis=1).astype(np.float64)
    return image_scores, scores


def _score_features(bank: MemoryBank, features: np.ndarray, config: PatchCoreConfig) -> np.ndarray:
    """Image scores of stored float16 features, in batches (calibration)."""
    out = []
    for begin in range(0, features.shape[0], config.batch_size):
        out.append(_score_patches(bank, features[begin : begin + config.batch_size].astype(np.float32), config)[0])
    return np.concatenate(out)
