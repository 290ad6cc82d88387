"""Decision thresholds from nominal validation scores alone, at a target false-alarm rate.

The original recipe takes the maximum validation score of each fold (``fold_max``): with n validation
images it sits at the 1 − 1/(n+1) quantile on average whatever the target, and its value rests on a single
image, so it moves a lot between folds and data sets. The other rules aim at a stated false-alarm rate
``alpha`` (the share of nominal images flagged):

- ``percentile``: the empirical 1 − alpha quantile. Interpolated with Weibull plotting positions
  (rank p·(n+1), Hyndman & Fan type 6): the k-th smallest of n scores exceeds a fresh nominal score with
  probability k/(n+1) on average, so this is the unbiased estimate of the wanted quantile; beyond
  n/(n+1) there is no data, and the threshold is the maximum.
- ``gpd``: peaks over threshold (Pickands–Balkema–de Haan): the scores above a high empirical quantile u
  (the 90th) follow a generalised Pareto distribution; fitted by maximum likelihood with
  ``scipy.stats.genpareto``, it extrapolates the tail beyond the largest score, which the empirical
  quantile cannot do when alpha·n is small.

Measured on 200 draws from normal, gamma, Gumbel and beta distributions (tests/models/test_thresholds.py)
at alpha = 1%: the true false-alarm rate of ``percentile`` averages 0.010 (90% of draws below 0.020),
``gpd`` 0.012–0.013 (below 0.023), ``fold_max`` 0.005 (below 0.012). The small-sample maximum-likelihood
shape is biased towards light tails, hence gpd's slightly liberal threshold; the Zhang–Stephens estimator
was tried and is conservative instead (0.005–0.0075).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from models.errors import ConfigError

THRESHOLD_RULES: tuple[str, ...] = ("fold_max", "percentile", "gpd")
DEFAULT_FALSE_ALARM_RATE = 0.01

#: Peaks over threshold: u is the TAIL_QUANTILE empirical quantile, and at least MIN_EXCEEDANCES scores
#: (but never more than MAX_TAIL_FRACTION of them) lie above it.
TAIL_QUANTILE = 0.9
MIN_EXCEEDANCES = 10
MAX_TAIL_FRACTION = 0.2
#: A fitted shape above this is an infinite-variance tail that 10–40 points cannot support; the extrapolated
#: quantile would be arbitrary, so the rule falls back to the empirical percentile.
MAX_SHAPE = 1.0


def fit_threshold(scores: np.ndarray, rule: str, *, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE) -> float:
    """The threshold for ``rule`` over nominal validation ``scores`` (1-D, finite, at least one).

    An image is anomalous iff its score is strictly greater than the threshold. ``false_alarm_rate`` is the
    target share of nominal images above it (ignored by ``fold_max``).

    Fallbacks of ``gpd``, each to ``percentile`` at the same rate: fewer than ``MIN_EXCEEDANCES`` scores
    would lie above u even at the ``1 − MAX_TAIL_FRACTION`` quantile (fewer than 50 scores); the target rate
    is not beyond u (alpha ≥ share of exceedances: the data answer directly); the maximum-likelihood fit
    fails or is not finite; the shape exceeds ``MAX_SHAPE``. All scores equal → that value for every rule.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ConfigError(f"threshold scores must be a non-empty 1-D array, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ConfigError("threshold scores contain NaN or infinity; every validation image needs a finite score")
    if rule not in THRESHOLD_RULES:
        raise ConfigError(f"threshold rule {rule!r} is unknown; choose one of {list(THRESHOLD_RULES)}")
    if not 0.0 < false_alarm_rate < 1.0:
        raise ConfigError(f"false_alarm_rate={false_alarm_rate} must be in (0, 1), e.g. 0.01 for 1%")
    if rule == "fold_max":
        return float(values.max())
    if rule == "percentile":
        return percentile_threshold(values, false_alarm_rate)
    return gpd_threshold(values, false_alarm_rate)


def percentile_threshold(values: np.ndarray, false_alarm_rate: float) -> float:
    """Empirical 1 − alpha quantile with Weibull plotting positions (clipped to the sample range)."""
    return float(np.quantile(values, 1.0 - false_alarm_rate, method="weibull"))


def gpd_threshold(values: np.ndarray, false_alarm_rate: float) -> float:
    """Peaks-over-threshold quantile: u + GPD⁻¹(1 − alpha / zeta) with zeta = share of scores above u."""
    ordered = np.sort(values)
    n = ordered.size
    n_tail = max(math.ceil((1.0 - TAIL_QUANTILE) * n), MIN_EXCEEDANCES)
    if n_tail > MAX_TAIL_FRACTION * n or ordered[0] == ordered[-1]:
        return percentile_threshold(values, false_alarm_rate)
    u = float(ordered[n - n_tail - 1])  # the largest score not in the tail
    exceedances = ordered[n - n_tail :] - u
    zeta = n_tail / n
    if false_alarm_rate >= zeta or not np.any(exceedances > 0):
        return percentile_threshold(values, false_alarm_rate)
    fit = fit_gpd(exceedances)
    if fit is None:
        return percentile_threshold(values, false_alarm_rate)
    shape, scale = fit
    from scipy.stats import genpareto

    quantile = float(genpareto.ppf(1.0 - false_alarm_rate / zeta, shape, loc=0.0, scale=scale))
    if not math.isfinite(quantile):
        return percentile_threshold(values, false_alarm_rate)
    return u + max(quantile, 0.0)


def fit_gpd(exceedances: np.ndarray) -> tuple[float, float] | None:
    """Maximum-likelihood (shape, scale) of a GPD with location 0, or None when the fit is unusable."""
    from scipy.stats import genpareto

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            shape, _, scale = genpareto.fit(exceedances, floc=0.0)
    except (ValueError, RuntimeError, FloatingPointError):
        return None
    if not (math.isfinite(shape) and math.isfinite(scale)) or scale <= 0 or shape > MAX_SHAPE:
        return None
    return float(shape), float(scale)
