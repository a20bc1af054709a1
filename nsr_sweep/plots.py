"""Figures computed from saved tables (never from in-memory state), so a plot always matches its data."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def diagnostics_png(preds: pd.DataFrame, metrics: dict, title: str, path: Path) -> None:
    """The 4-panel chart: pred vs actual (y = x), error histogram, both distributions, error vs actual."""
    test = preds[preds["split"] == "test"]
    actual, pred = test["actual_orig"].to_numpy(), test["pred"].to_numpy()
    err = pred - actual
    fig, ax = plt.subplots(2, 2, figsize=(10, 8))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.07, top=0.91, wspace=0.25, hspace=0.32)
    lo, hi = float(min(actual.min(), pred.min())), float(max(actual.max(), pred.max()))
    ax[0, 0].scatter(actual, pred, s=8, alpha=0.5)
    ax[0, 0].plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax[0, 0].set(xlabel="actual activation (original model)", ylabel="prediction", title="Prediction vs actual")
    ax[0, 0].legend(loc="upper left")
    ax[0, 1].hist(err, bins=40, color="tab:red", alpha=0.7, histtype="stepfilled")
    ax[0, 1].axvline(0, color="k", lw=1)
    ax[0, 1].set(xlabel="prediction − actual", ylabel="texts", title="Error histogram")
    bins = np.linspace(lo, hi, 40) if hi > lo else 10
    ax[1, 0].hist(actual, bins=bins, alpha=0.5, label="actual", histtype="stepfilled")
    ax[1, 0].hist(pred, bins=bins, alpha=0.5, label="prediction", histtype="stepfilled")
    ax[1, 0].set(xlabel="activation", ylabel="texts", title="Distributions")
    ax[1, 0].legend()
    ax[1, 1].scatter(actual, err, s=8, alpha=0.5, color="tab:purple")
    ax[1, 1].axhline(0, color="k", lw=1)
    ax[1, 1].set(xlabel="actual activation", ylabel="prediction − actual", title="Error vs actual")
    box = (f"r = {metrics.get('pearson_r', float('nan')):.3f}\nMSE = {metrics.get('mse', float('nan')):.4g}\n"
           f"offset = {metrics.get('offset', float('nan')):.4g}\ndrift = {metrics.get('drift', float('nan')):.4g}")
    ax[0, 0].text(0.97, 0.03, box, transform=ax[0, 0].transAxes, ha="right", va="bottom", family="monospace",
                  bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9})
    fig.suptitle(f"{title} — test split, {len(test)} texts")
    fig.savefig(path, dpi=72, format="png")
    plt.close(fig)
