"""The per-part coreset (``coreset_scope="part"``): each fold's bank is the union of the other parts' coresets."""

from __future__ import annotations

import numpy as np
import pytest

from models import PatchCoreConfig
from models.config import preset_config
from models.coreset import coreset_size
from models.errors import ConfigError
from models.training import FeatureSet, build_fold, build_folds, part_coreset, part_ids, plan_folds


def _features(n_images: int = 20, seed: int = 3) -> FeatureSet:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n_images, 16, 6)).astype(np.float16)
    ids = [f"img{n:02d}" for n in range(n_images)]
    return FeatureSet(ids, ["0" * 64] * n_images, features, (4, 4))


def _rows_of(features: FeatureSet, ids: list[str]) -> np.ndarray:
    return features.features[features.rows(ids)].reshape(-1, features.features.shape[-1]).astype(np.float32)


def test_parts_are_the_folds_validation_sets_and_partition_the_images() -> None:
    features = _features()
    config = PatchCoreConfig(coreset_scope="part")
    parts = part_ids(features, config)
    assert parts == [validation for _, validation in plan_folds(features.ids, config)]
    assert sorted(i for part in parts for i in part) == sorted(features.ids)


def test_a_fold_bank_is_the_union_of_the_other_parts_coresets_and_never_its_validation_patches() -> None:
    features = _features()
    config = PatchCoreConfig(coreset_scope="part", coreset_ratio=0.25)
    parts = part_ids(features, config)
    for index in range(config.folds):
        fold = build_fold(features, index, config)
        expected = np.concatenate([part_coreset(features, p, config) for p in range(config.folds) if p != index])
        np.testing.assert_array_equal(fold.bank.vectors, expected)
        assert fold.bank.n_entries == sum(
            coreset_size(len(parts[p]) * 16, 0.25) for p in range(config.folds) if p != index
        )
        validation = {row.tobytes() for row in _rows_of(features, parts[index])}
        train = {row.tobytes() for p in range(config.folds) if p != index for row in _rows_of(features, parts[p])}
        bank = {row.tobytes() for row in fold.bank.vectors}
        assert bank <= train and not bank & validation


def test_shared_part_coresets_give_the_same_folds_as_one_fold_at_a_time() -> None:
    """The cluster rebuild builds each fold in its own task; the one-process build shares the parts."""
    features = _features()
    config = PatchCoreConfig(coreset_scope="part", coreset_ratio=0.2)
    shared = build_folds(features, config)
    for fold in shared:
        alone = build_fold(features, fold.index, config)
        np.testing.assert_array_equal(fold.bank.vectors, alone.bank.vectors)
        assert fold.validation_scores == alone.validation_scores and fold.threshold == alone.threshold


def test_at_full_ratio_both_scopes_keep_every_train_patch() -> None:
    features = _features()
    for index in range(5):
        by_fold = build_fold(features, index, PatchCoreConfig(coreset_scope="fold", coreset_ratio=1.0))
        by_part = build_fold(features, index, PatchCoreConfig(coreset_scope="part", coreset_ratio=1.0))
        assert sorted(r.tobytes() for r in by_fold.bank.vectors) == sorted(r.tobytes() for r in by_part.bank.vectors)
        assert by_fold.validation_scores == pytest.approx(by_part.validation_scores, rel=1e-6)


def test_an_unknown_scope_is_refused_and_older_manifests_read_as_per_fold() -> None:
    with pytest.raises(ConfigError, match="coreset_scope"):
        PatchCoreConfig(coreset_scope="image")
    data = PatchCoreConfig().to_dict()
    del data["coreset_scope"]
    assert PatchCoreConfig.from_dict(data).coreset_scope == "fold"
    assert preset_config("original").coreset_scope == "fold"
