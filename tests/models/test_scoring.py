import math

import numpy as np
import pytest
import torch

from models.ensemble import aggregate_thresholds
from models.memory_bank import MemoryBank
from models.scoring import anomaly_maps, patch_scores, reweighted_image_scores


@pytest.fixture
def bank_and_queries():
    rng = np.random.default_rng(0)
    return MemoryBank(rng.normal(size=(300, 24)).astype(np.float32)), rng.normal(size=(50, 24)).astype(np.float32)


def _brute_force(bank: MemoryBank, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest entries by every distance in float64: distances and indices, as ``search`` returns."""
    brute = np.linalg.norm(queries[:, None, :].astype(np.float64) - bank.vectors[None].astype(np.float64), axis=2)
    indices = np.argsort(brute, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(brute, indices, axis=1), indices


def test_knn_matches_brute_force(bank_and_queries):
    bank, queries = bank_and_queries
    distances, indices = bank.search(queries, 5)
    expected_distances, expected_idx = _brute_force(bank, queries, 5)
    np.testing.assert_array_equal(indices, expected_idx)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-4, atol=1e-4)


def _search_devices() -> list[torch.device]:
    """The CPU always, the GPU where there is one."""
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("k", [1, 5])  # 1 (the default) takes a row minimum, more a top-k
@pytest.mark.parametrize("device", _search_devices(), ids=str)
def test_the_matrix_product_search_finds_the_brute_force_neighbours_on_every_device(bank_and_queries, device, k):
    """A GPU host searches the banks on its GPU: faiss's neighbours (the CPU's), distances within rounding."""
    bank, queries = bank_and_queries
    distances, indices = bank.search_by_product(queries, k, device=device)
    expected_distances, expected = _brute_force(bank, queries, k)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-5, atol=1e-5)
    assert distances.dtype == np.float32 and distances.shape == (50, k)
    by_faiss = bank.search(queries, k)
    np.testing.assert_array_equal(by_faiss[1], indices)
    np.testing.assert_allclose(by_faiss[0], distances, rtol=1e-5)


def test_search_goes_to_faiss_on_a_cpu_and_to_the_product_on_any_other_device(bank_and_queries, monkeypatch):
    bank, queries = bank_and_queries
    calls: list[str] = []
    monkeypatch.setattr(bank, "search_by_product", lambda q, k, device: calls.append(device.type))
    bank.search(queries, 1)
    bank.search(queries, 1, device=torch.device("cpu"))
    assert calls == []
    bank.search(queries, 1, device=torch.device("meta"))
    assert calls == ["meta"]


def test_a_read_only_query_array_is_searched_without_a_warning(bank_and_queries):
    """Feature files are memory-mapped read-only by the benchmarks and calibration."""
    import warnings

    bank, queries = bank_and_queries
    queries.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        by_product, _ = bank.search_by_product(queries, 1, device=torch.device("cpu"))
        by_faiss, _ = bank.search(queries, 1)
    assert by_product.shape == by_faiss.shape == (50, 1)


def test_the_device_search_holds_a_bounded_block_of_distances(bank_and_queries, monkeypatch):
    """A tiled batch against a large bank is searched in blocks of queries: same answer, bounded memory."""
    import models.memory_bank as memory_bank

    bank, queries = bank_and_queries
    cpu = torch.device("cpu")
    whole = bank.search_by_product(queries, 3, device=cpu)
    monkeypatch.setattr(memory_bank, "_SEARCH_BLOCK_ELEMENTS", 7 * bank.n_entries)  # 7 queries at a time
    blocks: list[tuple[int, ...]] = []
    addmm = torch.addmm

    def recorded(*args, **kwargs):
        result = addmm(*args, **kwargs)
        blocks.append(tuple(result.shape))
        return result

    monkeypatch.setattr(memory_bank.torch, "addmm", recorded)
    chunked = bank.search_by_product(queries, 3, device=cpu)
    assert max(blocks) <= (7, bank.n_entries) and sum(rows for rows, _ in blocks) == len(queries)
    np.testing.assert_array_equal(chunked[1], whole[1])
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)  # the product's blocking may move a last bit


def test_a_cpu_ensemble_leaves_its_banks_to_faiss(tile_ensemble, tile_split, monkeypatch):
    """Only an accelerator model searches by matrix product; on a CPU faiss is faster (bench_search.py)."""
    from models import load_image_file

    products: list[torch.device] = []
    search_by_product = MemoryBank.search_by_product

    def recorded(self, queries, k, *, device):
        products.append(device)
        return search_by_product(self, queries, k, device=device)

    monkeypatch.setattr(MemoryBank, "search_by_product", recorded)
    images = [load_image_file(ref.path, size=tile_ensemble.input_size) for ref in tile_split.test_bad[:2]]
    scored = tile_ensemble.score_embeddings(tile_ensemble.extractor.embed(images), ["a", "b"])
    assert len(scored) == 2 and products == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it there)")
def test_a_gpu_ensemble_searches_its_banks_on_the_gpu_with_the_cpus_scores(tile_split, small_config, tmp_path):
    """The same embeddings scored by the model on the GPU (banks searched there) and on the CPU."""
    from bench.magnetic_tile import subsample
    from models import FoldEnsemble, load_image_file

    train = subsample(tile_split.train, 30)
    tile_ensemble = FoldEnsemble.fit([r.id for r in train], [r.path for r in train], small_config, device="cpu")
    on_gpu = FoldEnsemble.load(tile_ensemble.save(tmp_path / "model"), device="cuda")
    assert on_gpu._search_device() == torch.device("cuda", torch.cuda.current_device())
    images = [load_image_file(ref.path, size=tile_ensemble.input_size) for ref in tile_split.test_bad[:6]]
    embedded = tile_ensemble.extractor.embed(images)
    on_cpu_scores = tile_ensemble.score_embeddings(embedded, [str(i) for i in range(6)])
    on_gpu_scores = on_gpu.score_embeddings(embedded, [str(i) for i in range(6)])
    for cpu, gpu in zip(on_cpu_scores, on_gpu_scores, strict=True):
        assert gpu.fold_scores == pytest.approx(cpu.fold_scores, rel=1e-5)
        np.testing.assert_allclose(gpu.anomaly_map, cpu.anomaly_map, rtol=1e-4, atol=1e-5)


def test_patch_score_is_mean_distance_to_k_nearest(bank_and_queries):
    bank, queries = bank_and_queries
    scores, nearest = patch_scores(bank, queries, 5)
    brute = np.sort(np.linalg.norm(queries[:, None, :] - bank.vectors[None], axis=2), axis=1)
    np.testing.assert_allclose(scores, brute[:, :5].mean(axis=1), rtol=1e-4)
    assert nearest.shape == (50,)


def test_eq7_reweighting_against_the_formula(bank_and_queries):
    bank, queries = bank_and_queries
    k = 5
    patches = queries.reshape(2, 25, 24)
    scores, nearest = patch_scores(bank, queries, k)
    scores, nearest = scores.reshape(2, 25), nearest.reshape(2, 25)
    got = reweighted_image_scores(bank, patches, scores, nearest, k)
    for image in range(2):
        worst = int(np.argmax(scores[image]))
        m_test = patches[image, worst].astype(np.float64)
        m_star = bank.vectors[nearest[image, worst]].astype(np.float64)
        bank_d = np.linalg.norm(bank.vectors.astype(np.float64) - m_star, axis=1)
        support = np.argsort(bank_d, kind="stable")[:k]
        numerator = math.exp(np.linalg.norm(m_test - m_star))
        denominator = sum(math.exp(np.linalg.norm(m_test - bank.vectors[j])) for j in support)
        expected = (1 - numerator / denominator) * scores[image, worst]
        assert got[image] == pytest.approx(expected, rel=1e-4)
        assert 0 < got[image] < scores[image, worst]


def test_anomaly_map_is_upsampled_and_smoothed():
    grid = torch.zeros(1, 8, 8)
    grid[0, 4, 4] = 1.0
    maps = anomaly_maps(grid, 64, sigma=4.0)
    assert maps.shape == (1, 64, 64)
    peak = np.unravel_index(int(maps[0].argmax()), (64, 64))
    assert abs(peak[0] - 36) <= 4 and abs(peak[1] - 36) <= 4
    assert float(maps[0].max()) < 1.0  # smoothing spreads the peak
    unsmoothed = anomaly_maps(grid, 64, sigma=0.0)
    assert float(unsmoothed.max()) > float(maps.max())


def test_threshold_aggregates():
    assert aggregate_thresholds([1.0, 2.0, 6.0], "mean") == pytest.approx(3.0)
    assert aggregate_thresholds([1.0, 2.0, 6.0], "max") == 6.0
    assert aggregate_thresholds([1.0, 2.0, 6.0], "median") == 2.0


def test_anomaly_maps_equal_upsampling_then_gaussian_blur():
    from torchvision.transforms.functional import gaussian_blur

    grid = torch.rand(3, 14, 10, generator=torch.Generator().manual_seed(0))
    upsampled = torch.nn.functional.interpolate(grid[:, None], size=(96, 96), mode="bilinear", align_corners=False)
    expected = gaussian_blur(upsampled, kernel_size=[33, 33], sigma=[4.0, 4.0])[:, 0]
    torch.testing.assert_close(anomaly_maps(grid, 96, sigma=4.0), expected, rtol=0, atol=1e-5)


def test_eq7_neighbourhood_is_its_own_parameter(bank_and_queries):
    """With k=1 the old code took eq. 7's neighbourhood from k: a softmax over one entry, every score 0."""
    from models.config import PatchCoreConfig
    from models.scoring import score_patches

    bank, queries = bank_and_queries
    patches = queries.reshape(2, 25, 24)
    scores, _ = score_patches(bank, patches, PatchCoreConfig(k=1))
    assert (scores > 0).all()
    assert scores[0] != scores[1]


def test_a_one_entry_eq7_neighbourhood_is_refused():
    from models.config import PatchCoreConfig
    from models.errors import ConfigError

    with pytest.raises(ConfigError, match="reweight_neighbours=1"):
        PatchCoreConfig(reweight_neighbours=1)


def test_a_config_that_scores_every_image_alike_is_refused_at_training():
    from models.config import PatchCoreConfig
    from models.errors import ConfigError
    from models.training import FeatureSet, build_fold

    ids = [f"img{i}" for i in range(10)]
    features = np.ones((10, 4, 8), dtype=np.float16)  # every patch of every image identical
    feature_set = FeatureSet(ids, ["0" * 64] * 10, features, (2, 2))
    with pytest.raises(ConfigError, match="every validation image scores exactly"):
        build_fold(feature_set, 0, PatchCoreConfig(folds=2, coreset_ratio=0.5))


def test_models_saved_before_eq7_had_its_own_neighbourhood_score_as_before():
    from models.config import PatchCoreConfig

    old = {
        k: v for k, v in PatchCoreConfig(k=3).to_dict().items() if k not in ("reweight_neighbours", "threshold_rule")
    }
    restored = PatchCoreConfig.from_dict(old)
    assert restored.reweight_neighbours == 3
    assert restored.threshold_rule == "fold_max"


def test_f1_optimal_threshold_matches_a_brute_force_search():
    from sklearn.metrics import f1_score

    from models.evaluation import f1_optimal_threshold, image_metrics

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 60)
    scores = rng.normal(size=60) + labels * 0.8
    scores[5] = scores[6]  # a tie: no cut may split it
    best, threshold = f1_optimal_threshold(scores, labels)
    brute = max(f1_score(labels, (scores > t).astype(int)) for t in np.append(scores, scores.min() - 1))
    assert best == pytest.approx(brute)
    assert f1_score(labels, (scores > threshold).astype(int)) == pytest.approx(best)
    metrics = image_metrics(scores, labels, threshold)
    assert metrics["true_positives"] + metrics["false_negatives"] == labels.sum()
    assert metrics["false_alarm_rate"] == pytest.approx(metrics["false_positives"] / (labels == 0).sum())
