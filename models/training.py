"""The steps of fitting a fold ensemble, usable one by one.

:meth:`FoldEnsemble.fit` runs them in one process. A cluster rebuild runs them as separate tasks:
feature extraction in chunks (each chunk a :class:`FeatureSet` saved as ``.npy`` + JSON), then one task per
fold bank, then :func:`assemble_ensemble`. Every step is a pure function of its inputs, so both ways give
byte-identical models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import KFold

from models.artifacts import sha256_file
from models.augment import augmented_batches, copies_per_image
from models.config import PatchCoreConfig
from models.coreset import coreset_size, greedy_coreset
from models.ensemble import FitReport, Fold, FoldEnsemble, ImageSource, Progress, TrainingImage
from models.errors import ArtifactError, BadImageError, ConfigError
from models.features import PatchFeatureExtractor
from models.images import decode_image
from models.memory_bank import MemoryBank
from models.reconpatch import LossProgress, PatchRepresentation, fit_representation
from models.scoring import score_patches

logger = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """Patch features of nominal images, sorted by id, float16 (n_images, n_patches, embed_dim).

    ``augmented`` holds the bank-only copies of :mod:`models.augment` (n_images, copies, n_patches, embed_dim),
    row for row with ``features``; None without augmentation.
    """

    ids: list[str]
    sha256: list[str]
    features: np.ndarray
    grid: tuple[int, int]
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    augmented: np.ndarray | None = None

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row indices of ``ids`` (joined by id, never by position)."""
        position = {image_id: row for row, image_id in enumerate(self.ids)}
        return np.array([position[i] for i in ids], dtype=np.int64)

    def save(self, directory: Path, name: str = "features") -> list[Path]:
        """``<name>.npy`` (float16 array) and ``<name>.json`` (ids, hashes, grid, skipped)."""
        directory.mkdir(parents=True, exist_ok=True)
        array_path, meta_path = directory / f"{name}.npy", directory / f"{name}.json"
        np.save(array_path, self.features, allow_pickle=False)
        written = [array_path, meta_path]
        augmented_sha256 = None
        if self.augmented is not None:
            augmented_path = directory / f"{name}-augmented.npy"
            np.save(augmented_path, self.augmented, allow_pickle=False)
            augmented_sha256 = sha256_file(augmented_path)
            written.append(augmented_path)
        meta = {
            "ids": self.ids,
            "sha256": self.sha256,
            "grid": list(self.grid),
            "skipped": self.skipped,
            "seconds": self.seconds,
            "features_sha256": sha256_file(array_path),
            "augmented_sha256": augmented_sha256,
        }
        meta_path.write_text(json.dumps(meta), encoding="utf-8")
        return written

    @classmethod
    def load(cls, directory: Path, name: str = "features") -> FeatureSet:
        array_path, meta_path = directory / f"{name}.npy", directory / f"{name}.json"
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if sha256_file(array_path) != meta["features_sha256"]:
            raise ArtifactError(f"{array_path} does not match the hash recorded in {meta_path}")
        features = np.load(array_path, allow_pickle=False)
        augmented = None
        if meta.get("augmented_sha256"):
            augmented_path = directory / f"{name}-augmented.npy"
            if sha256_file(augmented_path) != meta["augmented_sha256"]:
                raise ArtifactError(f"{augmented_path} does not match the hash recorded in {meta_path}")
            augmented = np.load(augmented_path, allow_pickle=False)
        return cls(
            meta["ids"], meta["sha256"], features, tuple(meta["grid"]), meta["skipped"], meta["seconds"], augmented
        )

    @classmethod
    def concatenate(cls, parts: Sequence[FeatureSet]) -> FeatureSet:
        """Merge chunks (in any order) into one set sorted by id; ids must not repeat across chunks."""
        parts = [p for p in parts if p.ids]
        if not parts:
            raise ConfigError("no usable training image in any chunk")
        grids = {p.grid for p in parts}
        if len(grids) != 1:
            raise ConfigError(f"feature chunks disagree on the patch grid: {sorted(grids)}")
        ids = [i for p in parts for i in p.ids]
        if len(set(ids)) != len(ids):
            raise ConfigError("an image id appears in more than one feature chunk")
        order = np.argsort(np.array(ids, dtype=object), kind="stable")
        features = np.concatenate([p.features for p in parts])[order]
        if len({p.augmented is None for p in parts}) != 1:
            raise ConfigError("feature chunks disagree on augmentation: some carry augmented copies, some not")
        augmented = None if parts[0].augmented is None else np.concatenate([p.augmented for p in parts])[order]
        hashes = [h for p in parts for h in p.sha256]
        return cls(
            ids=[ids[i] for i in order],
            sha256=[hashes[i] for i in order],
            features=features,
            grid=parts[0].grid,
            skipped=sorted((s for p in parts for s in p.skipped), key=lambda s: s["id"]),
            seconds=sum(p.seconds for p in parts),
            augmented=augmented,
        )


def extract_features(
    ids: Sequence[str],
    sources: Sequence[ImageSource],
    config: PatchCoreConfig,
    *,
    extractor: PatchFeatureExtractor | None = None,
    device: str | torch.device | None = "auto",
    progress: Progress | None = None,
) -> FeatureSet:
    """Stream images through the backbone in batches into one float16 array.

    Only one batch of decoded images is alive at a time and features are stored as float16, so memory
    grows by ``n_patches · embed_dim · 2`` bytes per image (times ``1 + copies`` with ``config.augment``) and
    nothing else. Unreadable images are left out and listed in ``skipped``; training on the rest continues.
    """
    if len(ids) != len(sources):
        raise ConfigError(f"got {len(ids)} ids but {len(sources)} images")
    if len(set(ids)) != len(ids):
        raise ConfigError("training image ids must be unique")
    started = time.perf_counter()
    extractor = extractor or PatchFeatureExtractor(config, device=device)
    by_id = dict(zip(ids, sources, strict=True))
    ordered = sorted(by_id)
    kept: list[str] = []
    hashes: list[str] = []
    skipped: list[dict[str, str]] = []
    store: np.ndarray | None = None
    augmented: np.ndarray | None = None
    copies = copies_per_image(config.augment)
    grid = (0, 0)
    for begin in range(0, len(ordered), config.batch_size):
        batch_ids, batch_images = [], []
        for image_id in ordered[begin : begin + config.batch_size]:
            try:
                data = _read_source(by_id[image_id])
                # At the input size, exactly as the worker decodes what it scores (models.images).
                image = decode_image(data, name=image_id, max_pixels=config.max_image_pixels, size=extractor.input_size)
            except (BadImageError, OSError) as exc:
                logger.warning("training image %s left out: %s", image_id, exc)
                skipped.append({"id": image_id, "reason": str(exc)})
                continue
            batch_ids.append(image_id)
            batch_images.append(image)
            hashes.append(hashlib.sha256(data).hexdigest())
        if batch_ids:
            canvases = extractor.preprocess(batch_images)
            embedded = extractor.embed_batch(canvases)
            n, height, width, dim = embedded.shape
            if store is None:
                grid = (height, width)
                store = np.empty((len(ordered), height * width, dim), dtype=np.float16)
                if copies:
                    augmented = np.empty((len(ordered), copies, height * width, dim), dtype=np.float16)
            store[len(kept) : len(kept) + n] = embedded.reshape(n, height * width, dim).numpy()
            if augmented is not None:
                for copy, batch in enumerate(augmented_batches(canvases, config.augment)):
                    copied = extractor.embed_batch(batch).reshape(n, height * width, dim).numpy()
                    augmented[len(kept) : len(kept) + n, copy] = copied
            kept.extend(batch_ids)
        if progress:
            progress("features", min(begin + config.batch_size, len(ordered)), len(ordered))
    features = store[: len(kept)] if store is not None else np.empty((0, 0, 0), dtype=np.float16)
    if augmented is not None:
        augmented = augmented[: len(kept)]
    return FeatureSet(kept, hashes, features, grid, skipped, time.perf_counter() - started, augmented)


def plan_folds(ids: Sequence[str], config: PatchCoreConfig) -> list[tuple[list[str], list[str]]]:
    """(train ids, validation ids) per fold: seeded KFold over the sorted ids."""
    ordered = sorted(ids)
    if len(ordered) < config.folds:
        raise ConfigError(
            f"{len(ordered)} usable training images for {config.folds} folds; each fold needs at least one "
            "validation image (add images or lower --folds)"
        )
    splitter = KFold(n_splits=config.folds, shuffle=True, random_state=config.seed)
    return [
        ([ordered[i] for i in train], [ordered[i] for i in val])
        for train, val in splitter.split(np.arange(len(ordered)))
    ]


def part_ids(features: FeatureSet, config: PatchCoreConfig) -> list[list[str]]:
    """The folds' disjoint validation parts, in fold order: part ``p`` is fold ``p``'s validation set."""
    return [validation for _, validation in plan_folds(features.ids, config)]


def part_coreset(features: FeatureSet, part: int, config: PatchCoreConfig) -> np.ndarray:
    """Greedy coreset (float32 patches) over the images of part ``part`` and their augmented copies.

    With ``coreset_scope="part"`` a fold's bank is the union of the other parts' coresets, so each coreset
    is computed once and shared by the four folds that train on its part (see :func:`part_coresets`). The
    cost of a greedy coreset grows with points × picks, so five coresets over a fifth of the patches each cost
    1/16 of five over four fifths at the same ratio: the ratio can grow without making training slower.
    A fold still never sees its own validation images.
    """
    rows = features.rows(part_ids(features, config)[part])
    patches = _candidate_patches(features, rows)
    generator = torch.Generator().manual_seed(config.seed * 1_000 + 100 + part)
    selected = greedy_coreset(
        patches,
        coreset_size(patches.shape[0], config.coreset_ratio),
        projection_dim=config.coreset_projection_dim,
        generator=generator,
    )
    return patches[selected].numpy()


def part_coresets(features: FeatureSet, config: PatchCoreConfig) -> dict[int, np.ndarray]:
    """Every part's coreset (``coreset_scope="part"``), computed once for all folds."""
    return {part: part_coreset(features, part, config) for part in range(config.folds)}


def _candidate_patches(features: FeatureSet, rows: np.ndarray) -> torch.Tensor:
    """The coreset's candidates for these image rows: their patches and their augmented copies, flattened."""
    patches = features.features[rows]
    if features.augmented is not None:
        patches = np.concatenate([patches[:, None], features.augmented[rows]], axis=1)
    return torch.from_numpy(patches.reshape(-1, patches.shape[-1]).astype(np.float32))


def build_fold(
    features: FeatureSet,
    index: int,
    config: PatchCoreConfig,
    representation: PatchRepresentation | None = None,
    parts: Mapping[int, np.ndarray] | None = None,
) -> Fold:
    """Fold ``index``: coreset bank from its train part, threshold = max score over its validation part.

    With a ReConPatch ``representation`` the fold works on its f's output instead of the raw features. The
    augmented copies of the train part (``config.augment``) join the coreset's candidates; validation images
    are scored as they are. With ``coreset_scope="part"`` the bank is the union, in part order, of the other
    parts' coresets: taken from ``parts`` when given (they must come from the same features), else computed.
    """
    train_ids, validation_ids = plan_folds(features.ids, config)[index]
    if representation is not None:
        features = transform_features(features, representation, index)
    started = time.perf_counter()
    if config.coreset_scope == "part":
        others = [p for p in range(config.folds) if p != index]
        bank = MemoryBank(
            np.concatenate(
                [parts[p] if parts is not None else part_coreset(features, p, config) for p in others], axis=0
            )
        )
    else:
        patches = _candidate_patches(features, features.rows(train_ids))
        generator = torch.Generator().manual_seed(config.seed * 1_000 + index)
        selected = greedy_coreset(
            patches,
            coreset_size(patches.shape[0], config.coreset_ratio),
            projection_dim=config.coreset_projection_dim,
            generator=generator,
        )
        bank = MemoryBank(patches[selected].numpy())
    coreset_s = time.perf_counter() - started
    validation = features.features[features.rows(validation_ids)]
    scores = np.concatenate(
        [
            score_patches(bank, validation[b : b + config.batch_size].astype(np.float32), config)[0]
            for b in range(0, len(validation_ids), config.batch_size)
        ]
    )
    if len(scores) > 1 and float(np.ptp(scores)) == 0.0:
        raise ConfigError(
            f"fold {index}: every validation image scores exactly {scores[0]:.6g}; this config cannot tell images "
            "apart (check k, reweight_neighbours and coreset_ratio)"
        )
    logger.info("fold %d: bank %d, coreset %.1fs, threshold %.4f", index, bank.n_entries, coreset_s, scores.max())
    return Fold(
        index,
        tuple(train_ids),
        tuple(validation_ids),
        float(scores.max()),
        bank,
        validation_scores=tuple(float(x) for x in scores),
    )


def build_folds(
    features: FeatureSet,
    config: PatchCoreConfig,
    representation: PatchRepresentation | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Fold]:
    """Every fold in one process, each part's coreset computed once (``coreset_scope="part"``) unless the
    folds work in different feature spaces (a ReConPatch f per fold)."""
    shared = config.coreset_scope == "part" and (representation is None or not representation.per_fold)
    if shared and representation is not None:
        parts = part_coresets(transform_features(features, representation, 0), config)
    else:
        parts = part_coresets(features, config) if shared else None
    folds = []
    for index in range(config.folds):
        folds.append(build_fold(features, index, config, representation, parts))
        if progress:
            progress(index + 1)
    return folds


def assemble_ensemble(
    config: PatchCoreConfig,
    features: FeatureSet,
    folds: Sequence[Fold],
    *,
    extractor: PatchFeatureExtractor | None = None,
    device: str | torch.device | None = "auto",
    representation: PatchRepresentation | None = None,
) -> FoldEnsemble:
    """The ensemble from its folds (in fold order, whatever order they were built in)."""
    folds = sorted(folds, key=lambda fold: fold.index)
    if [f.index for f in folds] != list(range(config.folds)):
        raise ConfigError(f"expected folds 0..{config.folds - 1}, got {[f.index for f in folds]}")
    report = FitReport(seconds={"features": features.seconds}, skipped=list(features.skipped))
    training = [TrainingImage(id=i, sha256=h) for i, h in zip(features.ids, features.sha256, strict=True)]
    return FoldEnsemble(
        config,
        folds,
        training_images=training,
        grid=features.grid,
        extractor=extractor,
        device=device,
        report=report,
        representation=representation,
    )


# --- ReConPatch (models/reconpatch.py) ------------------------------------------------------------------


def train_representation(
    features: FeatureSet,
    config: PatchCoreConfig,
    *,
    device: str | torch.device | None = "auto",
    progress: LossProgress | None = None,
) -> PatchRepresentation | None:
    """The ReConPatch f of the model (None unless ``config.reconpatch``): one per fold, trained on that
    fold's train images only (so its threshold stays honest), or one shared, trained on all of them."""
    if not config.reconpatch:
        return None
    if config.reconpatch_per_fold:
        parts = [features.features[features.rows(train_ids)] for train_ids, _ in plan_folds(features.ids, config)]
    else:
        parts = [features.features]
    return fit_representation(parts, config, device=device, progress=progress)


def transform_features(features: FeatureSet, representation: PatchRepresentation, fold: int) -> FeatureSet:
    """The set in fold ``fold``'s ReConPatch feature space (float16, like the raw set)."""
    transformed = representation.transform(features.features, fold).astype(np.float16)
    augmented = None
    if features.augmented is not None:
        augmented = representation.transform(features.augmented, fold).astype(np.float16)
    return FeatureSet(
        features.ids, features.sha256, transformed, features.grid, features.skipped, features.seconds, augmented
    )


def _read_source(source: ImageSource) -> bytes:
    if isinstance(source, bytes):
        return source
    if callable(source):
        return source()
    return Path(source).read_bytes()
