"""The F1-optimal threshold on hand-checked score sets, its properties on seeded random ones, and the
calibrated model's round trip (new version, same scores, recorded rule)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score

from models import ConfigError, FoldEnsemble, PatchCoreConfig
from models.artifacts import MANIFEST
from models.calibration import calibrated_ensemble, f1_optimal_threshold


def test_separable_scores_give_the_midpoint_of_the_gap() -> None:
    result = f1_optimal_threshold([0.1, 0.2, 0.3], [0.7, 0.8])
    assert result.threshold == pytest.approx(0.5)
    assert (result.f1, result.precision, result.recall, result.false_alarm_rate) == (1.0, 1.0, 1.0, 0.0)
    assert (result.lower, result.upper) == (0.3, 0.7)


def test_overlapping_scores_hand_checked() -> None:
    # cuts (flag >= t): 6 → F1 2/4; 5 → 4/5; 4 → 4/6; 3.5 → 6/7 (best: TP 3, FP 1); 3 → 6/8; …
    result = f1_optimal_threshold([1, 2, 3, 4], [3.5, 5, 6])
    assert result.threshold == pytest.approx(3.25)  # between the good 3 and the defect 3.5
    assert result.f1 == pytest.approx(6 / 7)
    assert (result.true_positives, result.false_positives, result.false_negatives) == (3, 1, 0)
    assert (result.precision, result.recall, result.false_alarm_rate) == (0.75, 1.0, 0.25)


def test_equal_f1_prefers_fewer_false_alarms() -> None:
    # flag >= 10: TP 1, FP 0, FN 1 → 2/3; flag >= 1: TP 2, FP 2, FN 0 → 4/6 = 2/3 as well
    result = f1_optimal_threshold([4, 5], [10, 1])
    assert result.threshold == pytest.approx(7.5)
    assert result.f1 == pytest.approx(2 / 3) and result.false_positives == 0


def test_flagging_everything_mirrors_the_first_gap() -> None:
    # flag >= 1: TP 3, FP 1 → 6/7 beats flag >= 2 (4/6) and >= 3 (2/4)
    result = f1_optimal_threshold([2.5], [1, 2, 3])
    assert result.threshold == pytest.approx(0.5) and result.lower is None
    assert result.recall == 1.0 and result.false_alarm_rate == 1.0
    single = f1_optimal_threshold([1.0], [1.0])  # one distinct score: just below it
    assert single.threshold < 1.0 and single.recall == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_threshold_is_optimal_deterministic_and_matches_sklearn_f1(seed: int) -> None:
    rng = np.random.default_rng(seed)
    good = rng.normal(0.0, 1.0, 40).round(1)  # rounded: ties between scores occur
    defect = rng.normal(1.5, 1.0, 25).round(1)
    result = f1_optimal_threshold(good, defect)
    scores = np.concatenate([good, defect])
    truth = np.r_[np.zeros(good.size), np.ones(defect.size)]
    assert result.f1 == pytest.approx(f1_score(truth, scores > result.threshold))
    every_cut = [f1_score(truth, scores > cut) for cut in np.unique(scores) - 1e-9]
    assert result.f1 >= max(every_cut) - 1e-12
    assert result.threshold not in set(scores.tolist())  # strictly between neighbouring scores
    order = rng.permutation(good.size)
    assert f1_optimal_threshold(good[order], defect[::-1]) == result


def test_refuses_missing_classes_and_non_finite_scores() -> None:
    with pytest.raises(ConfigError, match="at least one good and one defective"):
        f1_optimal_threshold([], [1.0])
    with pytest.raises(ConfigError, match="NaN or infinity"):
        f1_optimal_threshold([0.1, float("nan")], [1.0])


def test_labelled_rule_needs_its_threshold_and_old_configs_keep_their_dict() -> None:
    with pytest.raises(ConfigError, match="labelled"):
        PatchCoreConfig(threshold_rule="labelled")
    with pytest.raises(ConfigError, match="labelled"):
        PatchCoreConfig(labelled_threshold=1.0)  # a fixed threshold under a nominal rule would be ignored
    assert "labelled_threshold" not in PatchCoreConfig().to_dict()  # so existing versions do not change
    config = PatchCoreConfig(threshold_rule="labelled", labelled_threshold=2.5)
    assert PatchCoreConfig.from_dict(config.to_dict()) == config


def test_calibrated_model_is_a_new_version_with_the_same_scores(pipeline_model_dir: Path, tmp_path: Path) -> None:
    source = FoldEnsemble.load(pipeline_model_dir, device="cpu")
    calibration = f1_optimal_threshold([0.1, 0.2], [source.threshold * 0.5, source.threshold * 0.6])
    record = {**calibration.as_dict(), "from_version": source.version, "old_threshold": source.threshold}
    model = calibrated_ensemble(source, calibration, record)
    assert model.threshold == calibration.threshold and model.fold_thresholds == source.fold_thresholds
    assert model.version != source.version
    saved = model.save(tmp_path / "calibrated")
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest["config"]["threshold_rule"] == "labelled"
    assert manifest["config"]["labelled_threshold"] == calibration.threshold
    assert manifest["calibration"] == record and manifest["threshold"] == calibration.threshold
    loaded = FoldEnsemble.load(saved, device="cpu")  # every sha256 and the version check pass
    assert loaded.version == model.version and loaded.calibration == record
    image = np.full((64, 64, 3), 128, dtype=np.uint8)
    from PIL import Image

    picture = Image.fromarray(image)
    before = source.score_images([picture], ["grey"], with_maps=False)[0]
    after = loaded.score_images([picture], ["grey"], with_maps=False)[0]
    assert after.score == before.score and after.threshold == calibration.threshold
