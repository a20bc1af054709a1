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

from functools import reduce
from pathlib import Path

import numpy as np
import pandas as pd

from ..core.controls import OUTSIDERS, REAL, Control
from ..core.spec import CELL_COLUMNS
from ..core.memory import give_back
from ..core.multiple import bh_adjusted
from ..core.uncertainty import (LAYER_CHUNK, LayerMeans, effective_texts, gap_of, metric_interval_of,
                                metric_jackknife)
from .store import TrialStore, open_store

KEY = list(CELL_COLUMNS)
METRICS = ("pearson_r", "skill")
SELF = str(REAL.comparison)  # the source name of this model's own predictor: "self"
OTHERS = tuple(str(c.comparison) for c in OUTSIDERS)
SHORT = {"pearson_r": "r", "skill": "skill"}
Q = 0.05
"""False discovery rate of the per-neuron gap tests (Benjamini–Hochberg, per layer × head × freeze)."""


def _best(df: pd.DataFrame, finished: pd.Series, control: Control) -> pd.DataFrame:
    """The best ok trials of a control (`finished`: the table's best ok trials), by cell (by (layer, neuron) for a
    control that is one per neuron)."""
    ok = df.loc[finished & (df["control"] == control.name), KEY + ["trial_id"]]
    return ok.set_index(KEY if control.per_cell else KEY[:2])


def neuron_intervals(preds: dict[str, np.ndarray], actual: np.ndarray, train_mean: np.ndarray,
                     kurtosis: dict[tuple[str, str], np.ndarray] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per neuron (rows: neurons × test texts; `preds` by source: self, cross, input_only): each source's r and skill,
    and the gaps self − cross and self − input-only, as {column: {point, lo, hi[, p]}} — the numbers (and the code
    path) behind the comparison table's columns `<source>_r`, `gap_<other>_skill`, … (`benchmarks/coverage_real.py`
    measures their coverage on real neurons). `kurtosis[(source, metric)]`: per neuron, the predictor's
    `tail_kurtosis` over test ∪ validation texts (the trial's `<metric>_kurtosis`; NaN or absent: the test texts').
    A source without a single prediction (no such trial ran) has NaN columns, as its jackknife would give."""
    kurt = kurtosis or {}
    jk = {(name, m): metric_jackknife(m, x, actual, train_mean, kurt.get((name, m)))
          for name, x in preds.items() if not np.isnan(x).all() for m in METRICS}
    nan = np.full(len(actual), np.nan)
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in preds:
        for m in METRICS:
            iv = metric_interval_of(jk[(name, m)], m) if (name, m) in jk else {"point": nan, "lo": nan, "hi": nan}
            out[f"{name}_{SHORT[m]}"] = {"point": iv["point"], "lo": iv["lo"], "hi": iv["hi"]}
    for name in OTHERS:
        for m in METRICS:
            t = gap_of(jk[(SELF, m)], jk[(name, m)], m) if (SELF, m) in jk and (name, m) in jk else \
                {"gap": nan, "gap_lo": nan, "gap_hi": nan, "gap_p": nan}  # each predictor's jackknife, shared
            out[f"gap_{name}_{SHORT[m]}"] = {"point": t["gap"], "lo": t["gap_lo"], "hi": t["gap_hi"], "p": t["gap_p"]}
    return out


def _trials_at(trial_ids: pd.Series, keys: pd.DataFrame) -> np.ndarray:
    """The trial ids (a control's best, indexed by cell or by (layer, neuron)) at these keys' rows; None where none
    is."""
    if trial_ids.empty:
        return np.full(len(keys), None, object)
    got = trial_ids.reindex(pd.MultiIndex.from_frame(keys[list(trial_ids.index.names)]))
    return np.array([t if isinstance(t, str) else None for t in got.tolist()], object)


def _column(by_id: pd.DataFrame, ids, col: str) -> np.ndarray:
    """A trial-table column (`by_id`: the table indexed by trial_id) for trial ids (NaN for None, an unknown trial,
    or a table without the column)."""
    if col not in by_id:
        return np.full(len(ids), np.nan)
    values = by_id[col]
    return np.array([values.get(t, np.nan) if t is not None else np.nan for t in ids], np.float64)


def test_texts(store: TrialStore, wanted: set[str]) -> np.ndarray:
    """The test texts of these trials (every trial's: the same), sorted; empty when none has predictions."""
    texts = [np.unique(f["text_id"].to_numpy()) for f in store.pred_frames(wanted, columns=["text_id"]) if len(f)]
    return reduce(np.union1d, texts) if texts else np.array([], np.int64)


def test_matrices(store: TrialStore, ids: dict[str, np.ndarray], texts: np.ndarray) -> tuple[np.ndarray, dict]:
    """(actual, {source: predictions}) of a block of one layer × head × freeze's neurons, neuron × test text: row i of
    a source the test predictions of `ids[source][i]` (NaN for None or a trial without them; a source with no trial
    here: a read-only view of NaN), `actual` the self trials' targets — filled a stored file at a time from the
    files that hold these trials (ids are matched once per file)."""
    shape = (len(ids[SELF]), len(texts))
    ran = {name: v for name, v in ids.items() if any(t is not None for t in v)}
    preds = {name: np.full(shape, np.nan) if name in ran else np.broadcast_to(np.nan, shape) for name in ids}
    actual = np.full(shape, np.nan)
    rows = {name: pd.Series(np.arange(len(v)))[[t is not None for t in v]].set_axis([t for t in v if t is not None])
            for name, v in ran.items()}
    wanted = {t for v in ids.values() for t in v if t is not None}
    for frame in store.pred_frames(wanted, columns=["text_id", "pred", "actual_orig"]):
        codes, uniq = pd.factorize(frame["trial_id"])
        col = np.searchsorted(texts, frame["text_id"].to_numpy())
        pred, target = frame["pred"].to_numpy(np.float64), frame["actual_orig"].to_numpy(np.float64)
        for name, at in rows.items():
            row = at.reindex(np.asarray(uniq, object)).fillna(-1).to_numpy(np.int64)[codes]
            keep = row >= 0
            preds[name][row[keep], col[keep]] = pred[keep]
            if name == SELF:
                actual[row[keep], col[keep]] = target[keep]
    return actual, preds


def compare(sweep_dir: Path, df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per neuron, per layer) self-vs-outsider tables from the best trials and their stored test predictions, one
    layer × head × freeze at a time and LAYER_CHUNK neurons at a time (what is held is a block's matrices)."""
    if df.empty or "control" not in df:
        return pd.DataFrame(), pd.DataFrame()
    finished = (df["status"] == "ok") & df["best"]
    mine = finished & df["control"].isna()
    if not mine.any():  # nothing finished well yet (a table of failures has no metric columns at all)
        return pd.DataFrame(), pd.DataFrame()
    real = df.loc[mine, KEY + ["trial_id", "train_mean"]]
    best = {c: _best(df, finished, c) for c in OUTSIDERS}
    groups = [(key, g.sort_values("neuron").reset_index(drop=True)) for key, g in
              real.groupby(["layer", "head", "freeze"], sort=True)]
    ids = {key: {SELF: g["trial_id"].to_numpy(object), **{str(c.comparison): _trials_at(b["trial_id"], g)
                                                         for c, b in best.items()}} for key, g in groups}
    wanted = {t for group in ids.values() for v in group.values() for t in v if t is not None}
    kurtosis = [c for c in (f"{m}_kurtosis" for m in METRICS) if c in df]  # each trial's stored tail shape, by id
    chosen = df.loc[finished, ["trial_id", *kurtosis, *(["unit"] if "unit" in df else [])]]
    chosen = chosen[chosen["trial_id"].isin(wanted)].drop_duplicates("trial_id")
    store = open_store(sweep_dir, trials=chosen)  # where each trial is: of these trials only
    texts = test_texts(store, wanted)
    if not len(texts):  # no trial's predictions could be read
        return pd.DataFrame(), pd.DataFrame()
    by_id = chosen.set_index("trial_id")
    neurons, layers = [], []
    for (L, h, f), g in groups:
        rows, layer = _compare_cell(store, (L, h, f), g, ids[(L, h, f)], texts, by_id)
        neurons.append(rows)
        layers.append(layer)
    return pd.concat(neurons, ignore_index=True), pd.DataFrame(layers)


def _compare_cell(store: TrialStore, key: tuple, g: pd.DataFrame, ids: dict[str, np.ndarray], texts: np.ndarray,
                  by_id: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """One layer × head × freeze (`g`: its best real trials, by neuron): the per-neuron rows and the layer's means and
    counts, its neurons LAYER_CHUNK at a time (each block's test predictions read from the files that hold them)."""
    ran = [name for name, v in ids.items() if any(t is not None for t in v)]  # a source that never ran: NaN means
    means = {name: LayerMeans() for name in ran}
    parts: list[dict[str, dict[str, np.ndarray]]] = []
    n_eff = []
    for s in range(0, len(g), LAYER_CHUNK):
        block = {k: v[s : s + LAYER_CHUNK] for k, v in ids.items()}
        y, p = test_matrices(store, block, texts)
        train_mean = g["train_mean"].to_numpy(np.float64)[s : s + LAYER_CHUNK]
        kurt = {(k, m): _column(by_id, v, f"{m}_kurtosis") for k, v in block.items() for m in METRICS}
        parts.append(neuron_intervals(p, y, train_mean, kurt))
        n_eff.append(effective_texts(y))  # how many texts each neuron's numbers rest on
        for name in ran:
            means[name].add(p[name], y, train_mean, {o: p[o] for o in OTHERS if o in ran} if name == SELF else None)
        del y, p
        give_back()  # a block's matrices: returned before the next block's (else the heap keeps them in pieces)
    L, h, f = key
    rows = pd.DataFrame({"layer": L, "neuron": g["neuron"].to_numpy(), "head": h, "freeze": f,
                         **{f"{k}_trial": v for k, v in ids.items()}, "n_test_eff": np.concatenate(n_eff)})
    layer: dict = {"layer": L, "head": h, "freeze": f, "n_neurons": len(g)}
    for col in parts[0]:
        iv = {k: np.concatenate([part[col][k] for part in parts]) for k in parts[0][col]}
        rows[col], rows[f"{col}_lo"], rows[f"{col}_hi"] = iv["point"], iv["lo"], iv["hi"]
        if col.startswith("gap_"):
            layer.update(_calls(rows, col, iv))
    got = {name: m.result() for name, m in means.items()}
    for name in ids:
        for m in METRICS:
            stats = [(f"{name}_{SHORT[m]}", m)] + ([(f"gap_{o}_{SHORT[m]}", f"gap_{o}_{m}") for o in OTHERS]
                                                   if name == SELF else [])
            for col, k in stats:  # a mean that was not computed (no trial ran): NaN
                layer[col], layer[f"{col}_lo"], layer[f"{col}_hi"] = (got.get(name, {}).get(x, np.nan) for x in
                                                                      (k, f"{k}_lo", f"{k}_hi"))
    return rows, layer


def _calls(rows: pd.DataFrame, col: str, iv: dict[str, np.ndarray]) -> dict[str, float]:
    """A gap column's p- and q-values (into `rows`) and the layer's counts of significant calls."""
    q = bh_adjusted(iv["p"])
    rows[f"{col}_p"], rows[f"{col}_q"] = iv["p"], q
    positive, negative = int(np.sum((q <= Q) & (iv["point"] > 0))), int(np.sum((q <= Q) & (iv["point"] < 0)))
    by = bh_adjusted(iv["p"], dependence="any")
    return {f"n_{col}_positive": positive, f"n_{col}_negative": negative,
            f"n_{col}_tested": int(np.isfinite(iv["p"]).sum()),
            f"n_{col}_false_expected": Q * (positive + negative),  # BH: on average at most a fraction q of the calls
            f"n_{col}_positive_by": int(np.sum((by <= Q) & (iv["point"] > 0)))}
