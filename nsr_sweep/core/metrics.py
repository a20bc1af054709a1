"""The metric set of docs/science.md, computed on the test split, in float64, from (pred, actual) — for any number of
predictors at once: texts on the last axis, one value per leading index (a unit's probes: k × n arrays)."""

from __future__ import annotations

import numpy as np
from scipy import stats


def prediction_metrics(pred: np.ndarray, actual: np.ndarray, train_mean: float) -> dict[str, float]:
    """pearson_r, spearman_rho, r2, mse, mae, offset, calibration slope/intercept, std_ratio, baseline_mse, skill of
    one predictor: the k = 1 case of `prediction_metric_rows`."""
    rows = prediction_metric_rows(np.asarray(pred, np.float64)[None], np.asarray(actual, np.float64)[None],
                                  np.array([train_mean], np.float64))
    return {k: float(v[0]) for k, v in rows.items()}


def prediction_metric_rows(pred: np.ndarray, actual: np.ndarray, train_mean) -> dict[str, np.ndarray]:
    """`prediction_metrics` over the last axis, for every leading index (pred, actual (..., n); train_mean (...)).
    A constant prediction or target has no correlation (NaN); a constant target no r2, calibration or std_ratio."""
    pred, actual = np.asarray(pred, np.float64), np.asarray(actual, np.float64)
    err = pred - actual
    mse = np.mean(err**2, -1)
    baseline = np.mean((np.asarray(train_mean, np.float64)[..., None] - actual) ** 2, -1)
    sd_pred, sd_act = np.std(pred, -1), np.std(actual, -1)
    degenerate = (sd_pred == 0) | (sd_act == 0)
    varies = sd_act > 0
    slope, intercept = calibration(pred, actual)
    ranks = stats.rankdata(pred, axis=-1), stats.rankdata(actual, axis=-1)
    nan = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "pearson_r": np.where(degenerate, nan, pearson_rows(pred, actual)),
            "spearman_rho": np.where(degenerate, nan, pearson_rows(*ranks)),
            "r2": np.where(varies, 1 - mse / np.var(actual, -1), nan),
            "mse": mse,
            "mae": np.mean(np.abs(err), -1),
            "offset": np.mean(err, -1),
            "calib_slope": slope,
            "calib_intercept": intercept,
            "std_ratio": np.where(varies, sd_pred / sd_act, nan),
            "baseline_mse": baseline,
            "skill": skill_rows(mse, baseline),
        }


def pearson_rows(x, y) -> np.ndarray:
    """Pearson r over the last axis (clipped to [−1, 1]); NaN where either series is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    dx, dy = x - x.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.clip((dx * dy).sum(-1) / np.sqrt((dx * dx).sum(-1) * (dy * dy).sum(-1)), -1.0, 1.0)
    return np.where((np.std(x, -1) == 0) | (np.std(y, -1) == 0), np.nan, r)


def skill_rows(mse, baseline) -> np.ndarray:
    """skill = 1 − MSE / the baseline MSE (always predicting the train mean); NaN where the baseline is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(baseline > 0, 1 - mse / baseline, np.nan)


def calibration(pred, actual) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares line of pred on actual over the last axis: (slope, intercept); NaN where actual is constant."""
    mean_p, mean_a = pred.mean(-1), actual.mean(-1)
    da = actual - mean_a[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (da * (pred - mean_p[..., None])).sum(-1) / (da * da).sum(-1)
    constant = np.std(actual, -1) == 0
    return np.where(constant, np.nan, slope), np.where(constant, np.nan, mean_p - slope * mean_a)
