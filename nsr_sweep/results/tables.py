"""The trial table: one row per trial, built from the trial records (`TrialStore.finished_frame`, the single source)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.files import atomic_write
from ..core.spec import GROUP_COLUMNS
from .schema import HP_COLUMNS, ID_COLUMNS
from .store import TrialStore, open_store

STATUS_COLUMNS = ["status", "error", "seconds", "best"]


GROUP = list(GROUP_COLUMNS)


def mark_best(df: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """`best` is True for the best ok trial of each (layer, neuron, head, freeze, control) group (the first in the
    frame's order on a tie)."""
    df["best"] = False
    if metric not in df:
        return df
    ok = (df["status"] == "ok") & df[metric].map(lambda v: isinstance(v, float) and math.isfinite(v))
    if ok.any():
        groups = df.loc[ok, GROUP + [metric]].groupby(GROUP, dropna=False)[metric]  # the columns it needs alone
        idx = groups.idxmin() if mode == "min" else groups.idxmax()
        df.loc[idx.values, "best"] = True
    return df


def trials_frame(rows: list[dict] | pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """The trial table from finished rows: a list of rows, or a store's `finished_frame` (taken over: at a layer's
    scale the table is held about twice at most, while it is sorted)."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    del rows
    if df.empty:
        return df
    if df["trial_id"].duplicated().any():
        df = df.drop_duplicates("trial_id", keep="last")
    for c in ("layer", "neuron", "sample"):
        df[c] = df[c].astype("int64")
    for c in ("seed", "epochs", "batch_size", "patience", "n_bins", "epochs_run", "best_epoch", "n_train", "n_val",
              "n_test"):
        if c in df:
            df[c] = df[c].astype("Int64")  # nullable (Parquet int64): a trial that failed early has none
    df["error"] = df["error"].astype("string")
    for c in ("control", "cross_model"):
        df[c] = df[c].astype("string")  # <NA> for the real trials
    df["best"] = False
    first = [c for c in ID_COLUMNS + HP_COLUMNS + STATUS_COLUMNS if c in df]
    df = df[first + [c for c in df.columns if c not in first]]
    if not df["trial_id"].is_monotonic_increasing:  # (a store's units are read in trial-id order already)
        df = df.take(np.argsort(df["trial_id"].to_numpy(), kind="stable"))
    df = df.reset_index(drop=True)
    return mark_best(df, metric, mode)


def trial_table(store: TrialStore, metric: str, mode: str) -> pd.DataFrame:
    """The trial table of what a store holds, built by columns (a layer's probes never become Python rows)."""
    return trials_frame(store.finished_frame(), metric, mode)


def write_trials_table(sweep_dir: Path, metric: str, mode: str) -> pd.DataFrame:
    """tables/trials.parquet from the records under `sweep_dir`, written whole (atomically); returns the table."""
    df = trial_table(open_store(sweep_dir), metric, mode)
    atomic_write(Path(sweep_dir) / "tables" / "trials.parquet", lambda tmp: df.to_parquet(tmp, index=False))
    return df
