"""The trial table: one row per trial, built from the trial directories (the single source)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from .results import atomic_write
from .sweepdir import RECORD, TRIALS, parse_trial_id

ID_COLUMNS = ["trial_id", "layer", "neuron", "head", "freeze", "control", "cross_model", "sample", "seed"]
HP_COLUMNS = ["solver", "lr", "epochs", "batch_size", "weight_decay", "patience", "n_bins"]
STATUS_COLUMNS = ["status", "error", "seconds", "best"]


def trial_row(config: dict, status: str, metrics: dict, error: str | None, **extra) -> dict:
    row = {k: config.get(k) for k in ID_COLUMNS + HP_COLUMNS}
    row.update({"status": status, "error": error})
    row.update({k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                for k, v in sorted(metrics.items()) if k != "seconds"})
    row.update(extra)
    return row


def read_trial_dir(d: Path) -> dict | None:
    """The row of a finished trial (ok or failed), None while it has not finished, or — for a record that
    cannot be read — a `damaged` row named after the directory (a reader never crashes on one bad file)."""
    f = d / RECORD
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_text())
        config = {**m["spec"], "trial_id": m.get("trial_id", d.name), "sample": m.get("sample", 0)}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return damaged_row(d.name, f"unreadable {RECORD}: {type(e).__name__}")
    return trial_row(config, m["status"], m.get("metrics", {}), m.get("reason"),
                     seconds=m.get("metrics", {}).get("seconds"))


def damaged_row(trial_id: str, why: str) -> dict | None:
    """A row for a trial whose record is damaged, its identity read from the trial id (None if that fails too)."""
    config = parse_trial_id(trial_id)
    return None if config is None else trial_row(config, "damaged", {}, why)


def finished_rows(sweep_dir: Path) -> list[dict]:
    trials = Path(sweep_dir) / TRIALS
    rows = [read_trial_dir(d) for d in sorted(trials.iterdir())] if trials.is_dir() else []
    return [r for r in rows if r is not None]


GROUP = ["layer", "neuron", "head", "freeze", "control"]


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
