"""Does the model know its own neuron better than an outsider? Self against cross-model and input-only.

Per neuron and head/freeze (`tables/comparison.parquet`): the best real trial ("self"), the best
cross_model trial of the same group (another model, same texts, same target), and the neuron's
input_only trial (the text alone) — each r and skill with its interval over the test texts — and the
gaps self − cross and self − input-only with paired intervals and p-values (the same texts left out of
both predictors), Benjamini–Hochberg-controlled over the neurons of each layer × head × freeze.

Per layer and head/freeze (`tables/comparison_by_layer.parquet`): the mean over the layer's neurons of
each of those, with an interval that leaves each shared test text out of every neuron at once (the
neurons of a layer are read on the same texts), and how many neurons' gap is positive, or negative,
after the multiple-comparison control. Intervals and p-values: `uncertainty` (jackknife-t).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..core.controls import OUTSIDERS, REAL, Control
from ..core.spec import CELL_COLUMNS
from ..core.uncertainty import (bh_adjusted, effective_texts, gap_of, layer_mean_intervals, metric_interval_of,
                                metric_jackknife)
from .store import open_store

KEY = list(CELL_COLUMNS)
METRICS = ("pearson_r", "skill")
SELF = str(REAL.comparison)  # the source name of this model's own predictor: "self"
OTHERS = tuple(str(c.comparison) for c in OUTSIDERS)
SHORT = {"pearson_r": "r", "skill": "skill"}
Q = 0.05
"""False discovery rate of the per-neuron gap tests (Benjamini–Hochberg, per layer × head × freeze)."""


def _best(df: pd.DataFrame, control: Control) -> pd.DataFrame:
    """The best ok trials of a control, by cell (by (layer, neuron) for a control that is one per neuron)."""
    ok = df[(df["status"] == "ok") & df["best"] & (df["control"] == control.name)]
    return ok.set_index(KEY if control.per_cell else KEY[:2])


def _matrix(table: pd.DataFrame, ids: list, texts: np.ndarray) -> np.ndarray:
    """Rows of `table` (trial × text) for trial ids (NaN rows for None or a trial without predictions)."""
    out = np.full((len(ids), len(texts)), np.nan)
    have = [i for i, t in enumerate(ids) if t is not None and t in table.index]
    if have:
        out[have] = table.loc[[ids[i] for i in have], texts].to_numpy(np.float64)
    return out


def neuron_intervals(preds: dict[str, np.ndarray], actual: np.ndarray, train_mean: np.ndarray,
                     kurtosis: dict[tuple[str, str], np.ndarray] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per neuron (rows: neurons × test texts; `preds` by source: self, cross, input_only): each source's r and skill,
    and the gaps self − cross and self − input-only, as {column: {point, lo, hi[, p]}} — the numbers (and the code
    path) behind the comparison table's columns `<source>_r`, `gap_<other>_skill`, … (`benchmarks/coverage_real.py`
    measures their coverage on real neurons). `kurtosis[(source, metric)]`: per neuron, the predictor's
    `tail_kurtosis` over test ∪ validation texts (the trial's `<metric>_kurtosis`; NaN or absent: the test texts')."""
    kurt = kurtosis or {}
    jk = {(name, m): metric_jackknife(m, x, actual, train_mean, kurt.get((name, m)))
          for name, x in preds.items() for m in METRICS}
    out: dict[str, dict[str, np.ndarray]] = {}
    for (name, m), j in jk.items():
        iv = metric_interval_of(j, m)
        out[f"{name}_{SHORT[m]}"] = {"point": iv["point"], "lo": iv["lo"], "hi": iv["hi"]}
    for name in OTHERS:
        for m in METRICS:
            t = gap_of(jk[(SELF, m)], jk[(name, m)], m)  # each predictor's jackknife, shared with its own interval
            out[f"gap_{name}_{SHORT[m]}"] = {"point": t["gap"], "lo": t["gap_lo"], "hi": t["gap_hi"], "p": t["gap_p"]}
    return out


def _trials_at(trial_ids: pd.Series, keys: list[tuple]) -> list[str | None]:
    """The trial ids (a control's best, indexed by cell or by (layer, neuron)) at these keys; None where none is."""
    if trial_ids.empty:
        return [None] * len(keys)
    got = trial_ids.reindex(pd.MultiIndex.from_tuples(keys, names=trial_ids.index.names))
    return [t if isinstance(t, str) else None for t in got.tolist()]


def _column(by_id: pd.DataFrame, ids: list, col: str) -> np.ndarray:
    """A trial-table column (`by_id`: the table indexed by trial_id) for trial ids (NaN for None, an unknown trial,
    or a table without the column)."""
    if col not in by_id:
        return np.full(len(ids), np.nan)
    values = by_id[col]
    return np.array([values.get(t, np.nan) if t is not None else np.nan for t in ids], np.float64)


def test_matrices(sweep_dir: Path, df: pd.DataFrame, wanted: set[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The test predictions and actual activations of these trials, trial × test text (every trial: the same
    texts), pivoted one stored file at a time: a layer's probes never stand in one long table."""
    preds, actual = [], []
    for frame in open_store(sweep_dir, trials=df).pred_frames(wanted):
        if len(frame):
            preds.append(frame.pivot(index="trial_id", columns="text_id", values="pred"))
            actual.append(frame.pivot(index="trial_id", columns="text_id", values="actual_orig"))
    if not preds:
        return pd.DataFrame(), pd.DataFrame()
    return pd.concat(preds), pd.concat(actual)


def compare(sweep_dir: Path, df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per neuron, per layer) self-vs-outsider tables from the best trials and their stored test predictions."""
    if df.empty or "control" not in df:
        return pd.DataFrame(), pd.DataFrame()
    real = df[(df["status"] == "ok") & df["best"] & df["control"].isna()]
    best = {c: _best(df, c) for c in OUTSIDERS}
    wanted = set(real["trial_id"]).union(*(set(b["trial_id"]) for b in best.values()))
    pred, actual = test_matrices(sweep_dir, df, wanted)
    if real.empty or pred.empty:
        return pd.DataFrame(), pd.DataFrame()
    texts = np.asarray(sorted(pred.columns))
    kurtosis = [c for c in (f"{m}_kurtosis" for m in METRICS) if c in df]  # each trial's stored tail shape, by id
    by_id = df[["trial_id", *kurtosis]].drop_duplicates("trial_id").set_index("trial_id")
    neurons, layers = [], []
    for (L, h, f), g in real.groupby(["layer", "head", "freeze"], sort=True):
        g = g.sort_values("neuron")
        cells = [(L, n, h, f) for n in g["neuron"]]
        ids = {SELF: list(g["trial_id"]), **{str(c.comparison): _trials_at(b["trial_id"], cells if c.per_cell else
                                                                           [k[:2] for k in cells]) for c, b in best.items()}}
        y = _matrix(actual, ids[SELF], texts)
        p = {k: _matrix(pred, v, texts) for k, v in ids.items()}
        train_mean = g["train_mean"].to_numpy(np.float64)
        kurt = {(k, m): _column(by_id, v, f"{m}_kurtosis") for k, v in ids.items() for m in METRICS}
        rows = pd.DataFrame({"layer": L, "neuron": g["neuron"].to_numpy(), "head": h, "freeze": f,
                             **{f"{k}_trial": v for k, v in ids.items()}})
        rows["n_test_eff"] = effective_texts(y)  # how many texts each neuron's numbers rest on
        layer = {"layer": L, "head": h, "freeze": f, "n_neurons": len(g)}
        for col, iv in neuron_intervals(p, y, train_mean, kurt).items():
            rows[col], rows[f"{col}_lo"], rows[f"{col}_hi"] = iv["point"], iv["lo"], iv["hi"]
            if col.startswith("gap_"):
                q = bh_adjusted(iv["p"])
                rows[f"{col}_p"], rows[f"{col}_q"] = iv["p"], q
                layer[f"n_{col}_positive"] = int(np.sum((q <= Q) & (iv["point"] > 0)))
                layer[f"n_{col}_negative"] = int(np.sum((q <= Q) & (iv["point"] < 0)))
                layer[f"n_{col}_tested"] = int(np.isfinite(iv["p"]).sum())
                calls = layer[f"n_{col}_positive"] + layer[f"n_{col}_negative"]
                layer[f"n_{col}_false_expected"] = Q * calls  # BH: on average at most a fraction q of the calls
                by = bh_adjusted(iv["p"], dependence="any")
                layer[f"n_{col}_positive_by"] = int(np.sum((by <= Q) & (iv["point"] > 0)))
        for name, x in p.items():
            got = layer_mean_intervals(x, y, train_mean, others={o: p[o] for o in OTHERS} if name == SELF else None)
            for m in METRICS:
                col = f"{name}_{SHORT[m]}"
                layer[col], layer[f"{col}_lo"], layer[f"{col}_hi"] = got[m], got[f"{m}_lo"], got[f"{m}_hi"]
                if name == SELF:
                    for o in OTHERS:
                        k, gcol = f"gap_{o}_{m}", f"gap_{o}_{SHORT[m]}"
                        layer[gcol], layer[f"{gcol}_lo"], layer[f"{gcol}_hi"] = got[k], got[f"{k}_lo"], got[f"{k}_hi"]
        neurons.append(rows)
        layers.append(layer)
    return pd.concat(neurons, ignore_index=True), pd.DataFrame(layers)
