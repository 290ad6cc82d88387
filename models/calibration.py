"""Decision thresholds refitted on labelled images (good and defective), and the calibrated model.

The nominal-only rules of :mod:`models.thresholds` aim at a false-alarm rate because nothing else is
known at training time. Once people have reviewed images (good and defect verdicts), the threshold can
be chosen where it serves the metric a fab is judged by, F1 on the defect class:
:func:`f1_optimal_threshold`.

Any threshold between two neighbouring scores gives the same decisions on the labelled images, so the
optimum is an interval, not a number. Its midpoint is taken: the decision boundary then sits as far as
the data allow from the images on both sides, which is what generalises to the next image (the
maximum-margin choice in one dimension), and it is deterministic. When several cut positions reach the
same F1 (counted exactly, as integers), the one with fewer false alarms wins, then the higher threshold.

:func:`calibrated_ensemble` returns a copy of a fitted ensemble (same banks, same fold thresholds) whose
config carries the rule ``labelled`` and the fitted threshold: a different config, hence a new content
version, and the calibration record goes into its manifest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_curve

from models.ensemble import FoldEnsemble
from models.errors import ConfigError

__all__ = ["Calibration", "calibrated_ensemble", "f1_optimal_threshold"]


@dataclass(frozen=True, slots=True)
class Calibration:
    """The F1-optimal threshold and what it achieves on the labelled images it was fitted on.

    An image is anomalous iff its score is strictly greater than ``threshold`` (the ensemble's rule).
    ``lower``/``upper`` are the neighbouring scores the threshold is the midpoint of (None below the
    lowest or above the highest score).
    """

    threshold: float
    f1: float
    precision: float
    recall: float
    false_alarm_rate: float
    n_good: int
    n_defect: int
    true_positives: int
    false_positives: int
    false_negatives: int
    lower: float | None
    upper: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def f1_optimal_threshold(good_scores: Sequence[float], defect_scores: Sequence[float]) -> Calibration:
    """The threshold maximising F1 on the defect class (see the module docstring for ties).

    Candidate cuts are the thresholds of :func:`sklearn.metrics.precision_recall_curve` (each distinct
    score ``t``: flag ``score >= t``), turned into the strict rule ``score > threshold`` by taking the
    midpoint between ``t`` and the next lower distinct score. Counts are recomputed exactly per cut, so
    ties are ties and the result does not depend on floating-point rounding of precision and recall.

    Raises:
        ConfigError: no good or no defective score, or a score that is not finite.
    """
    good = np.asarray(good_scores, dtype=np.float64)
    defect = np.asarray(defect_scores, dtype=np.float64)
    if good.ndim != 1 or defect.ndim != 1 or good.size == 0 or defect.size == 0:
        raise ConfigError(
            f"calibration needs at least one good and one defective score, got {good.size} good / {defect.size} defect"
        )
    if not (np.all(np.isfinite(good)) and np.all(np.isfinite(defect))):
        raise ConfigError("calibration scores contain NaN or infinity; every labelled image needs a finite score")
    scores = np.concatenate([good, defect])
    truth = np.concatenate([np.zeros(good.size, dtype=np.int64), np.ones(defect.size, dtype=np.int64)])
    _, _, cuts = precision_recall_curve(truth, scores, drop_intermediate=False)
    distinct = np.unique(scores)  # ascending
    sorted_good, sorted_defect = np.sort(good), np.sort(defect)

    best: tuple[Fraction, int, float] | None = None  # (F1, -false positives, threshold)
    best_counts = (0, 0, 0)
    best_bounds: tuple[float | None, float | None] = (None, None)
    for cut in cuts:
        position = int(np.searchsorted(distinct, cut, side="left"))
        lower = float(distinct[position - 1]) if position > 0 else None
        threshold = _midpoint(lower, float(cut), distinct)
        tp = defect.size - int(np.searchsorted(sorted_defect, threshold, side="right"))
        fp = good.size - int(np.searchsorted(sorted_good, threshold, side="right"))
        fn = defect.size - tp
        f1 = Fraction(2 * tp, 2 * tp + fp + fn)
        key = (f1, -fp, threshold)
        if best is None or key > best:
            best, best_counts, best_bounds = key, (tp, fp, fn), (lower, float(cut))
    assert best is not None  # cuts holds every distinct score, and there is at least one
    tp, fp, fn = best_counts
    return Calibration(
        threshold=best[2],
        f1=float(best[0]),
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / defect.size,
        false_alarm_rate=fp / good.size,
        n_good=int(good.size),
        n_defect=int(defect.size),
        true_positives=tp,
        false_positives=fp,
        false_negatives=fn,
        lower=best_bounds[0],
        upper=best_bounds[1],
    )


def _midpoint(lower: float | None, upper: float, distinct: np.ndarray) -> float:
    """The threshold between ``lower`` and ``upper``; below the lowest score, mirror the first gap."""
    if lower is not None:
        return (lower + upper) / 2.0
    if distinct.size > 1:
        return upper - (float(distinct[1]) - upper) / 2.0
    return float(np.nextafter(upper, -np.inf))  # one distinct score: just below it flags everything


def calibrated_ensemble(
    ensemble: FoldEnsemble, calibration: Calibration, record: Mapping[str, Any] | None = None
) -> FoldEnsemble:
    """``ensemble`` with its decision threshold replaced by ``calibration.threshold``.

    Banks, fold thresholds and validation scores are kept as they are, so scores do not change, only
    decisions. The config records rule ``labelled`` and the threshold (a new content version); ``record``
    (the calibration's counts, F1, the old threshold and rule, where the labels came from) is written
    to the manifest by :meth:`FoldEnsemble.save`.
    """
    config = ensemble.config.replace(threshold_rule="labelled", labelled_threshold=calibration.threshold)
    return FoldEnsemble(
        config,
        ensemble.folds,
        training_images=ensemble.training_images,
        grid=ensemble.grid,
        device=ensemble._device,  # the device the source was loaded on
        report=ensemble.report,
        representation=ensemble.representation,
        calibration=dict(record or calibration.as_dict()),
    )
