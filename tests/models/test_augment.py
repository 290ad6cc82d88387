"""Nominal-bank augmentation: the dihedral copies, the features they give and where they are used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import FoldEnsemble, PatchCoreConfig
from models.augment import TRANSFORMS, augmented_batches, copies_per_image
from models.coreset import coreset_size
from models.errors import ConfigError
from models.features import PatchFeatureExtractor
from models.training import FeatureSet, build_fold, extract_features, plan_folds


def _images(n: int, size: int = 64) -> list[Image.Image]:
    """Asymmetric test pictures (a bright corner block and a ramp), different per image."""
    out = []
    for i in range(n):
        array = np.zeros((size, size, 3), dtype=np.uint8)
        array[:, :, 0] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
        array[2 : 10 + i, 3 : 12 + 2 * i, 1] = 250
        array[size // 2 :, : size // 4, 2] = 40 * (i % 5)
        out.append(Image.fromarray(array))
    return out


def test_dihedral_copies_are_the_seven_other_symmetries_of_the_square() -> None:
    grid = torch.arange(16.0).reshape(1, 1, 4, 4)
    copies = augmented_batches(grid, "dihedral")
    assert len(copies) == copies_per_image("dihedral") == 7
    patterns = {tuple(grid.flatten().tolist())} | {tuple(c.flatten().tolist()) for c in copies}
    assert len(patterns) == 8  # identity + 7 distinct
    for copy in copies:  # each a permutation of the pixels
        assert sorted(copy.flatten().tolist()) == sorted(grid.flatten().tolist())
    # closed under composition: applying any transform to any copy gives one of the eight
    for _, transform in TRANSFORMS["dihedral"]:
        for copy in copies:
            assert tuple(transform(copy).flatten().tolist()) in patterns


def test_flips_are_the_two_mirrors_and_none_adds_nothing() -> None:
    grid = torch.arange(6.0).reshape(1, 1, 2, 3)
    left_right, top_bottom = augmented_batches(grid, "flips")
    assert left_right[0, 0, 0].tolist() == [2.0, 1.0, 0.0]
    assert top_bottom[0, 0, :, 0].tolist() == [3.0, 0.0]
    assert augmented_batches(grid, "none") == [] and copies_per_image("none") == 0


def test_an_unknown_augmentation_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="augment='rotate'"):
        PatchCoreConfig(augment="rotate")


def test_augmented_features_are_the_embeddings_of_the_mirrored_images(tmp_path: Path) -> None:
    config = PatchCoreConfig(augment="flips", batch_size=4, folds=2)
    extractor = PatchFeatureExtractor(config, device="cpu")
    images = _images(6)
    features = extract_features(
        [f"img{i}" for i in range(6)], [_png(image, tmp_path / f"{i}.png") for i, image in enumerate(images)], config
    )
    assert features.augmented is not None
    n_patches, dim = features.features.shape[1:]
    assert features.augmented.shape == (6, 2, n_patches, dim)
    canvases = extractor.preprocess(images)
    mirrored = extractor.embed_batch(torch.flip(canvases, dims=(-1,))).reshape(6, n_patches, dim).half().numpy()
    np.testing.assert_array_equal(features.augmented[:, 0], mirrored)
    assert not np.array_equal(features.augmented[:, 0], features.features)  # the pictures are not symmetric
    # the originals are exactly what training without augmentation extracts
    plain = extract_features(
        features.ids, [tmp_path / f"{i}.png" for i in range(6)], config.replace(augment="none"), extractor=extractor
    )
    np.testing.assert_array_equal(plain.features, features.features)
    assert plain.augmented is None


def test_feature_sets_keep_their_copies_through_save_load_and_concatenate(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    parts = []
    for names in (["b", "d"], ["a", "c"]):
        parts.append(
            FeatureSet(
                names,
                ["0" * 64] * 2,
                rng.normal(size=(2, 4, 3)).astype(np.float16),
                (2, 2),
                augmented=rng.normal(size=(2, 2, 4, 3)).astype(np.float16),
            )
        )
    parts[0].save(tmp_path, "chunk0")
    loaded = FeatureSet.load(tmp_path, "chunk0")
    np.testing.assert_array_equal(loaded.augmented, parts[0].augmented)
    merged = FeatureSet.concatenate([loaded, parts[1]])
    assert merged.ids == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(merged.augmented[1], parts[0].augmented[0])  # "b" keeps its own copies
    (tmp_path / "chunk0-augmented.npy").write_bytes(b"tampered")
    with pytest.raises(Exception, match="does not match the hash"):
        FeatureSet.load(tmp_path, "chunk0")
    with pytest.raises(ConfigError, match="augmentation"):
        FeatureSet.concatenate([parts[1], FeatureSet(["e"], ["0" * 64], parts[1].features[:1], (2, 2))])


def test_banks_draw_on_the_copies_and_validation_scores_ignore_them() -> None:
    rng = np.random.default_rng(1)
    features = rng.normal(size=(10, 4, 3)).astype(np.float16)
    augmented = rng.normal(size=(10, 2, 4, 3)).astype(np.float16) + 5.0  # far from every original
    ids = [f"i{n}" for n in range(10)]
    config = PatchCoreConfig(coreset_ratio=1.0, folds=2, augment="flips")
    plain = build_fold(FeatureSet(ids, ["0" * 64] * 10, features, (2, 2)), 0, config.replace(augment="none"))
    with_copies = build_fold(FeatureSet(ids, ["0" * 64] * 10, features, (2, 2), augmented=augmented), 0, config)
    n_train = len(plan_folds(ids, config)[0][0])
    assert plain.bank.n_entries == coreset_size(n_train * 4, 1.0)
    assert with_copies.bank.n_entries == coreset_size(n_train * 4 * 3, 1.0)
    # the copies sit far away, so no validation patch has a copy as nearest neighbour: scores unchanged
    np.testing.assert_allclose(with_copies.validation_scores, plain.validation_scores, rtol=1e-6)


def test_a_model_trained_with_copies_records_it_and_knows_the_mirrored_product(tmp_path: Path) -> None:
    images = _images(8)
    ids = [f"img{i}" for i in range(8)]
    paths = [_png(image, tmp_path / f"{i}.png") for i, image in enumerate(images)]
    config = PatchCoreConfig(augment="dihedral", folds=2, coreset_ratio=0.5, batch_size=8)
    model = FoldEnsemble.fit(ids, paths, config, device="cpu")
    plain = FoldEnsemble.fit(ids, paths, config.replace(augment="none"), device="cpu")
    model.save(tmp_path / "model")
    loaded = FoldEnsemble.load(tmp_path / "model", device="cpu")
    assert loaded.config.augment == "dihedral"
    assert loaded.version == model.version != plain.version
    mirrored = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images[:4]]
    with_copies = [s.score for s in loaded.score_images(mirrored, with_maps=False)]
    without = [s.score for s in plain.score_images(mirrored, with_maps=False)]
    assert all(a < b for a, b in zip(with_copies, without, strict=True)), (with_copies, without)


def _png(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path
