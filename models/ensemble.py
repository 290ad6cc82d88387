"""The fold-ensemble PatchCore detector (the Dacon-winning recipe, made reproducible and bounded in memory).

Training: the nominal images are sorted by id and split with a seeded KFold. The backbone runs once per
image; every fold reuses those features. Fold ``i`` builds a memory bank (greedy coreset) from its train part
and calibrates its threshold as the maximum score over its validation part. The ensemble threshold aggregates
the fold thresholds (mean by default) and an image's score aggregates the fold scores (``score_aggregate``:
the mean by default, the max in the original recipe); an image is anomalous iff its score is strictly
greater than the threshold.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.backbones import resolve_device
from models.config import PatchCoreConfig
from models.errors import ConfigError
from models.features import PatchFeatureExtractor
from models.memory_bank import MemoryBank
from models.reconpatch import PatchRepresentation
from models.scoring import anomaly_maps, score_patches

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
    threshold: float  # the maximum validation score (the original recipe's fold threshold)
    bank: MemoryBank
    validation_scores: tuple[float, ...] = ()  # by validation id order; what the threshold rules are fitted on


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
        representation: PatchRepresentation | None = None,
        calibration: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.calibration = calibration  # models.calibration's record (rule labelled), saved in the manifest
        self.representation = representation  # ReConPatch f (per fold or shared), None for plain PatchCore
        self.folds = tuple(folds)
        self.training_images = tuple(training_images)
        self.grid = grid
        self.report = report or FitReport()
        self._extractor = extractor
        self._device = device
        self.fold_thresholds = tuple(fold.threshold for fold in self.folds)
        self.threshold = ensemble_threshold(self.folds, config)

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
        from models.training import assemble_ensemble, build_folds, extract_features, train_representation

        extractor = PatchFeatureExtractor(config, device=device)
        features = extract_features(ids, sources, config, extractor=extractor, progress=progress)
        representation = train_representation(features, config, device=device, progress=progress)  # ReConPatch
        folds = build_folds(
            features,
            config,
            representation,
            progress=(lambda done: progress("folds", done, config.folds)) if progress else None,
        )
        return assemble_ensemble(
            config, features, folds, extractor=extractor, device=device, representation=representation
        )

    # ------------------------------------------------------------------ scoring
    @property
    def extractor(self) -> PatchFeatureExtractor:
        """The backbone, built on first use (a loaded model scores without rebuilding anything else)."""
        if self._extractor is None:
            self._extractor = PatchFeatureExtractor(self.config, device=self._device)
        return self._extractor

    def _search_device(self) -> torch.device:
        """The model's device, where its banks are searched: ``MemoryBank.search`` keeps an accelerator's
        search there (the CPU of a GPU host feeds the model and should do nothing else) and gives a CPU's to
        faiss. Never builds the backbone to find out."""
        return self._extractor.device if self._extractor is not None else resolve_device(self._device)

    @property
    def input_size(self) -> int:
        """Side of the square images are resized to before scoring, and of the anomaly maps (the tiled
        canvas; ``image_size`` without tiling)."""
        if self.config.tiles == 1:
            return self.config.image_size
        return self.extractor.input_size

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
        raw_dim = self.representation.in_dim if self.representation else self.folds[0].bank.embed_dim
        if (height, width) != self.grid or dim != raw_dim:
            raise ConfigError(
                f"embeddings of shape {(height, width, dim)} do not match the model's {(*self.grid, raw_dim)}"
            )
        # Rounded through float16 exactly like the stored training features, so an image scores the same
        # whether it was calibrated on or scored later.
        patches = embedded.reshape(n_images, height * width, dim).half().float().numpy()
        fold_scores = np.empty((len(self.folds), n_images), dtype=np.float64)
        fold_grids = np.empty((len(self.folds), n_images, height * width), dtype=np.float32)
        search_on = self._search_device()
        for f, fold in enumerate(self.folds):
            fold_patches = self.representation.transform(patches, f) if self.representation else patches
            fold_scores[f], fold_grids[f] = score_patches(fold.bank, fold_patches, self.config, device=search_on)
        if self.config.score_aggregate == "max":
            scores, grids = fold_scores.max(axis=0), fold_grids.max(axis=0)
        else:
            scores, grids = fold_scores.mean(axis=0), fold_grids.mean(axis=0)
        maps = None
        if with_maps:
            grid_tensor = torch.from_numpy(grids.reshape(n_images, height, width))
            maps = anomaly_maps(grid_tensor, self.input_size, self.config.smoothing_sigma).numpy()
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
    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the model directory (atomically; an existing model is replaced only with ``overwrite``)."""
        from models.artifacts import save_ensemble

        return save_ensemble(self, Path(directory), overwrite=overwrite)

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device | None = "auto") -> FoldEnsemble:
        from models.artifacts import load_ensemble

        return load_ensemble(Path(directory), device=device)

    @functools.cached_property
    def version(self) -> str:
        """Content id: the same config, training images and banks always give the same version (computed once:
        a fitted ensemble never changes)."""
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


def ensemble_threshold(folds: Sequence[Fold], config: PatchCoreConfig) -> float:
    """The decision threshold, by ``config.threshold_rule``.

    ``fold_max`` is the original recipe: each fold's maximum validation score, aggregated over the folds
    (mean by default). The other rules (:mod:`models.thresholds`) are fitted on every training image's
    out-of-fold score: each nominal image is scored once, by the one fold that did not train on it, so the
    fit sees as many honest nominal scores as there are training images instead of one maximum per fold.
    Models saved without validation scores fall back to ``fold_max``. ``labelled`` is the threshold
    :mod:`models.calibration` fitted on reviewed good and defective images, stored in the config.
    """
    if config.threshold_rule == "labelled" and config.labelled_threshold is not None:
        return float(config.labelled_threshold)  # refitted on reviewed images (models.calibration)
    pooled = [score for fold in folds for score in fold.validation_scores]
    if config.threshold_rule == "fold_max" or not pooled:
        return aggregate_thresholds([fold.threshold for fold in folds], config.threshold_aggregate)
    from models.thresholds import fit_threshold

    return fit_threshold(
        np.asarray(pooled, dtype=np.float64), config.threshold_rule, false_alarm_rate=config.false_alarm_rate
    )


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
