import json
import shutil

import numpy as np
import pytest

from bench.magnetic_tile import subsample
from models import ArtifactError, FoldEnsemble, load_image_file
from models.artifacts import MANIFEST


@pytest.fixture
def saved(tile_ensemble, tmp_path):
    return tile_ensemble.save(tmp_path / "model")


def test_round_trip_gives_identical_scores(tile_ensemble, saved, tile_split):
    loaded = FoldEnsemble.load(saved, device="cpu")
    assert loaded.version == tile_ensemble.version
    refs = subsample(tile_split.test_bad, 4)
    images = [load_image_file(r.path) for r in refs]
    before = tile_ensemble.score_images(images, [r.id for r in refs])
    after = loaded.score_images(images, [r.id for r in refs])
    for a, b in zip(before, after, strict=True):
        assert (a.score, a.fold_scores, a.threshold) == (b.score, b.fold_scores, b.threshold)
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_manifest_records_what_built_the_model(saved, tile_ensemble):
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest["format_version"] == 1
    assert manifest["config"]["backbone"] == "efficientnet_lite0"
    assert manifest["layers"] == list(tile_ensemble.config.layers)
    assert len(manifest["training_images"]) == len(tile_ensemble.training_images)
    assert all(len(t["sha256"]) == 64 for t in manifest["training_images"])
    assert manifest["threshold"] == tile_ensemble.threshold
    assert sorted(manifest["files"]) == [f"fold_{i}.safetensors" for i in range(5)]
    assert manifest["environment"]["libraries"]["torch"]
    assert not list(saved.glob("*.pkl")) and not list(saved.glob("*.pt"))


def test_tampered_bank_is_refused(saved):
    bank = saved / "fold_2.safetensors"
    data = bytearray(bank.read_bytes())
    data[-1] ^= 0x01
    bank.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"fold_2\.safetensors has sha256"):
        FoldEnsemble.load(saved, device="cpu")


def test_edited_threshold_is_refused(saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["folds"][0]["threshold"] *= 0.5
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="recomputes to version"):
        FoldEnsemble.load(saved, device="cpu")


def test_missing_file_and_unknown_format_are_refused(saved, tmp_path):
    (saved / "fold_0.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        FoldEnsemble.load(saved, device="cpu")
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["format_version"] = 99
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format_version 99"):
        FoldEnsemble.load(saved, device="cpu")
    with pytest.raises(ArtifactError, match=r"manifest\.json is missing"):
        FoldEnsemble.load(tmp_path / "nowhere", device="cpu")


@pytest.fixture
def small_saved(pipeline_model_dir, tmp_path):
    """A copy of the small pipeline model (20 images, 2 folds): cheap to train once, safe to modify."""
    target = tmp_path / "small" / "model"
    shutil.copytree(pipeline_model_dir, target)
    return target


def test_saving_over_an_existing_model_is_refused_unless_overwrite(small_saved):
    ensemble = FoldEnsemble.load(small_saved, device="cpu")
    before = (small_saved / MANIFEST).read_bytes()
    with pytest.raises(ArtifactError, match=r"already holds a model.*overwrite"):
        ensemble.save(small_saved)
    assert (small_saved / MANIFEST).read_bytes() == before


def test_overwrite_replaces_the_whole_directory(small_saved):
    ensemble = FoldEnsemble.load(small_saved, device="cpu")
    # What a 5-fold model written over by a 2-fold one used to leave behind: folds the new manifest does not list.
    for stale in (2, 3, 4):
        (small_saved / f"fold_{stale}.safetensors").write_bytes((small_saved / "fold_0.safetensors").read_bytes())
    ensemble.save(small_saved, overwrite=True)
    expected = sorted([MANIFEST, "fold_0.safetensors", "fold_1.safetensors"])
    assert sorted(p.name for p in small_saved.iterdir()) == expected
    assert [p.name for p in small_saved.parent.iterdir()] == ["model"]  # no staging folder or old copy left
    assert FoldEnsemble.load(small_saved, device="cpu").version == ensemble.version


def test_a_file_the_manifest_does_not_list_is_refused(small_saved):
    (small_saved / "fold_4.safetensors").write_bytes((small_saved / "fold_0.safetensors").read_bytes())
    with pytest.raises(ArtifactError, match=r"fold_4\.safetensors, which manifest\.json does not list"):
        FoldEnsemble.load(small_saved, device="cpu")
