"""Does the model know its own neuron better than an outsider? Self against cross-model and input-only.

Per neuron and head/freeze (`tables/comparison.parquet`): the best real trial ("self"), the best
cross_model trial of the same group (another model, same texts, same target), and the neuron's
input_only trial (the text alone) — each r and skill with a bootstrap interval over the test texts —
and the gaps self − cross and self − input-only with paired bootstrap intervals (the same resamples
of the same test texts). Per layer and head/freeze (`tables/comparison_by_layer.parquet`): the mean
of each over neurons with a t interval over neurons (for r, clipped to r's range).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .metrics import prediction_metrics
from .sweepdir import TRIALS
from .uncertainty import gap_interval, mean_interval, metric_intervals

KEY = ["layer", "neuron", "head", "freeze"]
METRICS = ("pearson_r", "skill")
OTHERS = ("cross", "input_only")
SHORT = {"pearson_r": "r", "skill": "skill"}


def _test_preds(sweep_dir: Path, trial_id: str) -> pd.DataFrame | None:
    f = Path(sweep_dir) / TRIALS / trial_id / "preds.parquet"
    return pd.read_parquet(f) if f.is_file() else None


def _best(df: pd.DataFrame, control: str) -> pd.DataFrame:
    ok = df[(df["status"] == "ok") & df["best"] & (df["control"] == control)]
    return ok.set_index(KEY if control != "input_only" else ["layer", "neuron"])


def comparison(sweep_dir: Path, df: pd.DataFrame) -> pd.DataFrame:
    """One row per best real trial: self, cross and input-only r/skill with intervals, and the two gaps."""
    if df.empty or "control" not in df:
        return pd.DataFrame()
    real = df[(df["status"] == "ok") & df["best"] & df["control"].isna()]
    cross, text = _best(df, "cross_model"), _best(df, "input_only")
    rows = []
    for t in real.itertuples(index=False):
        key = tuple(getattr(t, k) for k in KEY)
        self_p = _test_preds(sweep_dir, t.trial_id)
        if self_p is None:
            continue
        train_mean = float(self_p.loc[self_p["split"] == "train", "actual_orig"].mean())
        test = self_p[self_p["split"] == "test"].sort_values("text_id")
        row: dict = dict(zip(KEY, key), self_trial=t.trial_id)
        preds = {"self": test["pred"].to_numpy()}
        for name, table, k in (("cross", cross, key), ("input_only", text, key[:2])):
            tid = table.loc[k, "trial_id"] if k in table.index else None
            p = _test_preds(sweep_dir, tid) if tid is not None else None
            row[f"{name}_trial"] = tid
            if p is not None:
                p = p[p["split"] == "test"].set_index("text_id").loc[test["text_id"]]
                preds[name] = p["pred"].to_numpy()
        actual = test["actual_orig"].to_numpy()
        for name in ("self", *OTHERS):
            point = prediction_metrics(preds[name], actual, train_mean) if name in preds else {}
            iv = metric_intervals(preds[name], actual, train_mean) if name in preds else {}
            for m in METRICS:
                col = f"{name}_{SHORT[m]}"
                row[col], row[f"{col}_lo"], row[f"{col}_hi"] = (point.get(m, np.nan), iv.get(f"{m}_lo", np.nan),
                                                                iv.get(f"{m}_hi", np.nan))
        for name in OTHERS:
            for m in METRICS:
                col = f"gap_{name}_{SHORT[m]}"
                g = gap_interval(preds["self"], preds[name], actual, m, train_mean) if name in preds else \
                    {"gap": np.nan, "gap_lo": np.nan, "gap_hi": np.nan}
                row[col], row[f"{col}_lo"], row[f"{col}_hi"] = g["gap"], g["gap_lo"], g["gap_hi"]
        rows.append(row)
    return pd.DataFrame(rows)


def by_layer(comp: pd.DataFrame) -> pd.DataFrame:
    """Per layer × head/freeze: mean over neurons of self, cross, input-only and the gaps, t intervals over neurons."""
    if comp.empty:
        return pd.DataFrame()
    values = [f"{n}_{SHORT[m]}" for n in ("self", *OTHERS) for m in METRICS] + \
             [f"gap_{n}_{SHORT[m]}" for n in OTHERS for m in METRICS]
    rows = []
    for (L, h, f), g in comp.groupby(["layer", "head", "freeze"], sort=True):
        row = {"layer": L, "head": h, "freeze": f, "n_neurons": int(g["neuron"].nunique())}
        for v in values:
            m, lo, hi = mean_interval(g[v])
            bound = 2.0 if v.startswith("gap_") else 1.0  # a t interval knows no range: keep it inside r's
            row[v], row[f"{v}_lo"], row[f"{v}_hi"] = (m, max(lo, -bound), min(hi, bound)) if v.endswith("_r") \
                else (m, lo, hi)
        rows.append(row)
    return pd.DataFrame(rows)
