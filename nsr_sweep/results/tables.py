"""The trial table: one row per trial, built from the trial records (`TrialStore.finished_rows`, the single source)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..core.files import atomic_write
from ..core.spec import GROUP_COLUMNS
from .schema import HP_COLUMNS, ID_COLUMNS

STATUS_COLUMNS = ["status", "error", "seconds", "best"]


GROUP = list(GROUP_COLUMNS)


def mark_best(df: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """`best` is True for the best ok trial of each (layer, neuron, head, freeze, control) group."""
    df = df.copy()
    df["best"] = False
    if metric not in df:
        return df
    ok = df[(df["status"] == "ok") & df[metric].map(lambda v: isinstance(v, float) and math.isfinite(v))]
    if len(ok):
        groups = ok.groupby(GROUP, dropna=False)[metric]
        idx = groups.idxmin() if mode == "min" else groups.idxmax()
        df.loc[idx.values, "best"] = True
    return df


def trials_frame(rows: list[dict], metric: str, mode: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = df.drop_duplicates("trial_id", keep="last").sort_values("trial_id").reset_index(drop=True)
    for c in ("layer", "neuron", "sample"):
        df[c] = df[c].astype("int64")
    for c in ("seed", "epochs", "batch_size", "patience", "n_bins", "epochs_run", "best_epoch", "n_train", "n_val",
              "n_test"):
        if c in df:
            df[c] = df[c].astype("Int64")  # nullable (Parquet int64): a trial that failed early has none
    df["error"] = df["error"].astype("string")
    for c in ("control", "cross_model"):
        df[c] = df[c].astype("string")  # <NA> for the real trials
    df = mark_best(df, metric, mode)
    first = [c for c in ID_COLUMNS + HP_COLUMNS + STATUS_COLUMNS if c in df]
    return df[first + [c for c in df.columns if c not in first]]


def write_trials_table(sweep_dir: Path, rows: list[dict], metric: str, mode: str) -> pd.DataFrame:
    df = trials_frame(rows, metric, mode)
    atomic_write(Path(sweep_dir) / "tables" / "trials.parquet", lambda tmp: df.to_parquet(tmp, index=False))
    return df
