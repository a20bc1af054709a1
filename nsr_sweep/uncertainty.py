"""Uncertainty: bootstrap intervals over test texts, and intervals over neurons.

Every statistic here (Pearson r, skill, the patching slope, and the gap between two predictors of
the same neuron) is a function of per-text sums, so one resampling of the texts is a matrix
product: `counts (B × n) @ per-text sums (n × k)`. The resamples depend only on the number of
texts and the seed, so two trials on the same test texts are resampled identically — a gap's
interval is a paired bootstrap.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import stats

N_BOOT = 2000
"""Bootstrap resamples per interval."""
LEVEL = 0.95
"""Coverage of every interval."""


@lru_cache(maxsize=16)
def resample_counts(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """B × n: how often each text appears in each bootstrap resample (multinomial, n draws); read-only."""
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    counts.flags.writeable = False
    return counts


def percentile(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap values (NaN resamples — a constant resample — are dropped)."""
    v = values[np.isfinite(values)]
    if v.size < 0.9 * values.size:
        return float("nan"), float("nan")
    a = (1 - level) / 2
    return float(np.quantile(v, a)), float(np.quantile(v, 1 - a))


def pearson_from_sums(S: np.ndarray) -> np.ndarray:
    """r from the sums [n, Σx, Σy, Σx², Σy², Σxy] (last axis)."""
    n, sx, sy, sxx, syy, sxy = np.moveaxis(S, -1, 0)
    cov, vx, vy = sxy - sx * sy / n, sxx - sx**2 / n, syy - sy**2 / n
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.sqrt(vx * vy)


def _pair_sums(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], 1)


def r_samples(pred: np.ndarray, actual: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return pearson_from_sums(counts @ _pair_sums(np.asarray(pred, np.float64), np.asarray(actual, np.float64)))


def skill_samples(pred: np.ndarray, actual: np.ndarray, train_mean: float, counts: np.ndarray) -> np.ndarray:
    """1 − MSE / MSE of predicting the train mean, per resample."""
    pred, actual = np.asarray(pred, np.float64), np.asarray(actual, np.float64)
    S = counts @ np.stack([(pred - actual) ** 2, (train_mean - actual) ** 2], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1 - S[:, 0] / S[:, 1]


def metric_intervals(pred: np.ndarray, actual: np.ndarray, train_mean: float, seed: int = 0) -> dict[str, float]:
    """`pearson_r_lo/hi` and `skill_lo/hi`: bootstrap intervals over the (test) texts given."""
    counts = resample_counts(len(pred), seed=seed)
    out = {}
    for name, samples in (("pearson_r", r_samples(pred, actual, counts)),
                          ("skill", skill_samples(pred, actual, train_mean, counts))):
        out[f"{name}_lo"], out[f"{name}_hi"] = percentile(samples)
    return out


def slope_interval(text_id: np.ndarray, dx: np.ndarray, dy: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the least-squares slope of dy on dx over all points, resampling whole texts
    (each text's grid of patched values stays together)."""
    texts, inv = np.unique(text_id, return_inverse=True)
    per_text = np.zeros((len(texts), 6))
    np.add.at(per_text, inv, _pair_sums(np.asarray(dx, np.float64), np.asarray(dy, np.float64)))
    S = resample_counts(len(texts), seed=seed) @ per_text
    n, sx, sy, sxx, _, sxy = S.T
    with np.errstate(invalid="ignore", divide="ignore"):
        slopes = (sxy - sx * sy / n) / (sxx - sx**2 / n)
    return percentile(slopes)


def gap_interval(a_pred, b_pred, actual, metric: str, train_mean: float, seed: int = 0) -> dict[str, float]:
    """metric(a) − metric(b) on the same texts, with its paired bootstrap interval."""
    actual = np.asarray(actual, np.float64)
    counts = resample_counts(len(actual), seed=seed)
    ones = np.ones((1, len(actual)))
    if metric == "pearson_r":
        point = r_samples(a_pred, actual, ones)[0] - r_samples(b_pred, actual, ones)[0]
        samples = r_samples(a_pred, actual, counts) - r_samples(b_pred, actual, counts)
    elif metric == "skill":
        point = skill_samples(a_pred, actual, train_mean, ones)[0] - skill_samples(b_pred, actual, train_mean, ones)[0]
        samples = skill_samples(a_pred, actual, train_mean, counts) - skill_samples(b_pred, actual, train_mean, counts)
    else:
        raise ValueError(f"gap metric {metric!r}: allowed pearson_r, skill")
    lo, hi = percentile(samples)
    return {"gap": float(point), "gap_lo": lo, "gap_hi": hi}


def mean_interval(values, level: float = LEVEL) -> tuple[float, float, float]:
    """Mean over neurons with its t interval (NaN bounds for fewer than two finite values)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if v.size < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf((1 + level) / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return m, m - half, m + half
