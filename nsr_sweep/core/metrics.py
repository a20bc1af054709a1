"""The metric set of docs/science.md, computed on the test split, in float64, from (pred, actual)."""

from __future__ import annotations

import numpy as np
from scipy import stats


def prediction_metrics(pred: np.ndarray, actual: np.ndarray, train_mean: float) -> dict[str, float]:
    """pearson_r, spearman_rho, r2, mse, mae, offset, calibration slope/intercept, std_ratio, baseline_mse, skill."""
    pred, actual = np.asarray(pred, np.float64), np.asarray(actual, np.float64)
    err = pred - actual
    mse = float(np.mean(err**2))
    baseline = float(np.mean((train_mean - actual) ** 2))
    sd_pred, sd_act = float(np.std(pred)), float(np.std(actual))
    degenerate = sd_pred == 0 or sd_act == 0  # a constant prediction has no correlation
    if sd_act > 0:
        slope, intercept = np.polyfit(actual, pred, 1)  # calibration: pred regressed on actual
    else:
        slope, intercept = float("nan"), float("nan")
    return {
        "pearson_r": float("nan") if degenerate else float(np.corrcoef(pred, actual)[0, 1]),
        "spearman_rho": float("nan") if degenerate else float(np.corrcoef(stats.rankdata(pred),
                                                                          stats.rankdata(actual))[0, 1]),
        "r2": float(1 - mse / np.var(actual)) if sd_act > 0 else float("nan"),
        "mse": mse,
        "mae": float(np.mean(np.abs(err))),
        "offset": float(np.mean(err)),
        "calib_slope": float(slope),
        "calib_intercept": float(intercept),
        "std_ratio": sd_pred / sd_act if sd_act > 0 else float("nan"),
        "baseline_mse": baseline,
        "skill": 1 - mse / baseline if baseline > 0 else float("nan"),
    }
