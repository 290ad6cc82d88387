"""ReConPatch: the loss and the pseudo-labels against hand and brute-force computations, deterministic
training on real nominal features, hash-checked artifacts, and detection on the labelled magnetic tiles."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.magnetic_tile import MagneticTileSplit, subsample
from models import ArtifactError, ConfigError, FoldEnsemble, PatchCoreConfig
from models.artifacts import MANIFEST
from models.evaluation import evaluate_ensemble
from models.reconpatch import (
    PatchRepresentation,
    contextual_similarity,
    pairwise_similarity,
    relaxed_contrastive_loss,
    train_heads,
)
from models.training import FeatureSet, extract_features

# --- the maths on tiny examples --------------------------------------------------------------------------

#: Four points on a line at 0, 1, 2, 3. Row-mean-normalised distances δ (mean over the other three):
#: row 0: (1, 2, 3)/2; row 1: (1, 1, 2)/(4/3); rows 2 and 3 mirror rows 1 and 0.
LINE = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
DELTA = np.array(
    [
        [0.0, 0.5, 1.0, 1.5],
        [0.75, 0.0, 0.75, 1.5],
        [1.5, 0.75, 0.0, 0.75],
        [1.5, 1.0, 0.5, 0.0],
    ]
)


def test_loss_pull_term_by_hand() -> None:
    # w = 1 between neighbours on the line, 0 otherwise; every pushed pair has δ >= 1 = m, so only the pull
    # term counts: (0.5² + 2·0.75² + 2·0.75² + 0.5²) / 4 = 2.75 / 4.
    w = torch.tensor([[1.0 if abs(i - j) <= 1 else 0.0 for j in range(4)] for i in range(4)])
    assert relaxed_contrastive_loss(LINE, w, margin=1.0).item() == pytest.approx(2.75 / 4)


def test_loss_push_term_by_hand() -> None:
    # w = 0: only pairs closer than the margin push: (1 − 0.5)² twice and (1 − 0.75)² four times.
    w = torch.eye(4)
    expected = (2 * 0.5**2 + 4 * 0.25**2) / 4
    assert relaxed_contrastive_loss(LINE, w, margin=1.0).item() == pytest.approx(expected)


def test_loss_both_terms_by_hand() -> None:
    # w = 0.5 everywhere: half of every δ² (Σ = 13.75) plus half of the push terms (Σ = 0.75), over 4 rows.
    w = torch.full((4, 4), 0.5)
    assert relaxed_contrastive_loss(LINE, w, margin=1.0).item() == pytest.approx((0.5 * 13.75 + 0.5 * 0.75) / 4)
    # The same from the δ table, with a margin of 1.2 so that more pairs push.
    pull = 0.5 * (DELTA**2).sum()
    push = 0.5 * sum(max(1.2 - DELTA[i, j], 0.0) ** 2 for i in range(4) for j in range(4) if i != j)
    assert relaxed_contrastive_loss(LINE, w, margin=1.2).item() == pytest.approx((pull + push) / 4)


def test_loss_is_scale_free_and_has_gradients() -> None:
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.rand(6, 6, generator=torch.Generator().manual_seed(1))
    loss = relaxed_contrastive_loss(z, w, margin=1.0)
    loss.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert relaxed_contrastive_loss(z.detach() * 7.0, w, margin=1.0).item() == pytest.approx(loss.item(), rel=1e-5)


def _brute_contextual(points: np.ndarray, k: int) -> np.ndarray:
    """The paper's definition with Python sets."""
    n = len(points)
    squared = ((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=2)
    knn = [set(np.argsort(squared[i], kind="stable")[:k].tolist()) for i in range(n)]
    half = [set(np.argsort(squared[i], kind="stable")[: max(1, k // 2)].tolist()) for i in range(n)]
    w_tilde = np.zeros((n, n))
    for i, j in itertools.product(range(n), range(n)):
        if j in knn[i]:
            w_tilde[i, j] = len(knn[i] & knn[j]) / len(knn[i])
    w_hat = np.zeros((n, n))
    for i in range(n):
        reciprocal = [j for j in half[i] if i in half[j]]
        w_hat[i] = np.mean([w_tilde[j] for j in reciprocal], axis=0)
    return 0.5 * (w_hat + w_hat.T)


@pytest.mark.parametrize(("n", "dim", "k", "seed"), [(12, 3, 4, 0), (20, 5, 5, 1), (9, 2, 6, 2)])
def test_contextual_similarity_matches_brute_force(n: int, dim: int, k: int, seed: int) -> None:
    points = np.random.default_rng(seed).normal(size=(n, dim))
    actual = contextual_similarity(torch.from_numpy(points), k).numpy()
    np.testing.assert_allclose(actual, _brute_contextual(points, k), atol=1e-12)
    assert np.allclose(actual, actual.T) and actual.min() >= 0 and actual.max() <= 1


def test_pairwise_similarity_is_a_relative_gaussian_kernel() -> None:
    points = np.random.default_rng(3).normal(size=(7, 4))
    squared = ((points[:, None] - points[None]) ** 2).sum(axis=2)
    mean = squared.sum() / (7 * 6)
    actual = pairwise_similarity(torch.from_numpy(points), sigma=0.5).numpy()
    np.testing.assert_allclose(actual, np.exp(-squared / (0.5 * mean)), rtol=1e-10)


def test_config_fields_are_validated_by_name() -> None:
    for field, value in (("reconpatch_alpha", 1.5), ("reconpatch_ema", 1.0), ("reconpatch_dim", 0),
                         ("reconpatch_batch", 1), ("reconpatch_sigma", 0.0), ("reconpatch_hidden", -1)):  # fmt: skip
        with pytest.raises(ConfigError, match=field):
            PatchCoreConfig(reconpatch=True, **{field: value})
    config = PatchCoreConfig(reconpatch=True, reconpatch_dim=32)
    assert PatchCoreConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# --- training on real nominal features -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tile_features(tile_split: MagneticTileSplit, small_config: PatchCoreConfig) -> FeatureSet:
    train = subsample(tile_split.train, 24)
    return extract_features([r.id for r in train], [r.path for r in train], small_config, device="cpu")


def test_training_is_deterministic_and_the_loss_decreases(tile_features: FeatureSet) -> None:
    config = PatchCoreConfig(reconpatch=True, reconpatch_steps=75, reconpatch_patience=10)
    f1, g1, run = train_heads(tile_features.features, config, seed=7, device="cpu")
    f2, g2, _ = train_heads(tile_features.features, config, seed=7, device="cpu")
    for a, b in zip([*f1.state_dict().values(), *g1.state_dict().values()],
                    [*f2.state_dict().values(), *g2.state_dict().values()], strict=True):  # fmt: skip
        assert torch.equal(a, b)
    f3, _, _ = train_heads(tile_features.features, config, seed=8, device="cpu")
    assert not torch.equal(f1.state_dict()["layers.0.weight"], f3.state_dict()["layers.0.weight"])
    assert run.steps == 75 and len(run.window_losses) == 3
    assert run.window_losses[-1] < run.window_losses[0], run.window_losses


def test_training_stops_on_a_plateau_and_reports_the_loss(tile_features: FeatureSet) -> None:
    config = PatchCoreConfig(reconpatch=True, reconpatch_steps=2000, reconpatch_lr=1e-9, reconpatch_patience=1)
    reports: list[tuple[str, int, int, float]] = []
    _, _, run = train_heads(tile_features.features, config, seed=0, device="cpu", progress=lambda *a: reports.append(a))
    assert run.stopped_early and run.steps < 2000
    assert reports[-1][:3] == ("reconpatch", 2000, 2000) and all(np.isfinite(r[3]) for r in reports)


# --- artifacts ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rcp_ensemble(tile_split: MagneticTileSplit) -> FoldEnsemble:
    """ReConPatch (per-fold f, 64 dims, a short training) on 80 real defect-free magnetic tiles."""
    train = subsample(tile_split.train, 80)
    config = PatchCoreConfig(
        coreset_ratio=0.02,
        batch_size=16,
        reconpatch=True,
        reconpatch_steps=100,
        reconpatch_batch=256,
        score_aggregate="max",  # pinned: MIN_AUROC below was measured with it
    )
    return FoldEnsemble.fit([r.id for r in train], [r.path for r in train], config, device="cpu")


def test_save_load_round_trip_and_tamper_is_refused(rcp_ensemble: FoldEnsemble, tile_split, tmp_path: Path) -> None:
    saved = rcp_ensemble.save(tmp_path / "model")
    manifest = json.loads((saved / MANIFEST).read_text())
    names = [f"reconpatch_{i}.safetensors" for i in range(5)]
    assert set(names) <= set(manifest["files"]) and manifest["reconpatch"]["files"] == names
    assert manifest["embed_dim"] == 64 and manifest["reconpatch"]["in_dim"] == 152
    loaded = FoldEnsemble.load(saved, device="cpu")
    assert loaded.version == rcp_ensemble.version
    refs = subsample(tile_split.test_bad, 3)
    from models import load_image_file

    images = [load_image_file(r.path) for r in refs]
    before = rcp_ensemble.score_images(images, [r.id for r in refs], with_maps=False)
    after = loaded.score_images(images, [r.id for r in refs], with_maps=False)
    assert [(a.score, a.fold_scores) for a in before] == [(b.score, b.fold_scores) for b in after]

    path = saved / names[2]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"reconpatch_2\.safetensors"):
        FoldEnsemble.load(saved, device="cpu")
    # PatchRepresentation.load checks the hashes on its own too (the rebuild's work files).
    files = {name: manifest["files"][name] for name in names}
    with pytest.raises(ArtifactError, match=r"reconpatch_2\.safetensors"):
        PatchRepresentation.load(saved, files, rcp_ensemble.config, in_dim=152, n_folds=5)


def test_per_fold_f_never_sees_its_validation_images(rcp_ensemble: FoldEnsemble) -> None:
    representation = rcp_ensemble.representation
    assert representation is not None and representation.per_fold and len(representation.heads) == 5
    weights = [head[0].state_dict()["layers.0.weight"] for head in representation.heads]
    assert all(not torch.equal(weights[0], other) for other in weights[1:])


# --- detection ---------------------------------------------------------------------------------------------

#: Measured on this subset (20 good + 20 defective test tiles, the 80 training tiles of ``rcp_ensemble``):
#: image AUROC 0.905 (2026-12-02); the bound leaves a margin of 0.1 for other CPUs' float rounding.
MIN_AUROC = 0.80


def test_reconpatch_scores_defects_above_nominal(rcp_ensemble: FoldEnsemble, tile_split) -> None:
    good, bad = subsample(tile_split.test_good, 20), subsample(tile_split.test_bad, 20)
    report, scores = evaluate_ensemble(rcp_ensemble, good, bad)
    print(f"reconpatch image AUROC on 20+20 tiles: {report.image_auroc:.3f}")
    assert report.image_auroc >= MIN_AUROC, report
    good_scores = [s.score for s in scores[: len(good)]]
    bad_scores = [s.score for s in scores[len(good) :]]
    assert np.median(bad_scores) > np.median(good_scores)
