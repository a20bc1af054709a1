"""A fitted trial's numbers from its predictions: the metrics on the test split with their intervals, the `_ft`
metrics, drift, the bin ceiling and the validation scores — for every predictor of a unit at once.

`Predictions` holds k predictors' values on every text of the cache, stacked (k × n, texts on the last axis): the
probes of a unit are one pass over those arrays (`trial_metrics`), a trial alone is the case k = 1, and
`Predictions.frame` is one predictor's table (a trial's preds.parquet; `TrialResult.preds`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .heads import HeadMap
from .metrics import pearson_rows, prediction_metric_rows, skill_rows
from .uncertainty import METRICS, effective_texts, metric_interval_arrays, tail_kurtosis

SPLITS = ("train", "val", "test")
VALUES = ("actual_orig", "actual_ft", "pred", "readout")
"""A predictor's values per text: its target (the shuffled control's: permuted), the neuron in the final model,
the prediction in activation units and the head's readout (the prediction before mapping)."""


@dataclass(frozen=True)
class Predictions:
    """k predictors on the n texts of one split of the cache: `split` (n,) the index into SPLITS of each text, and
    each of VALUES as a (k, n) float64 array."""

    split: np.ndarray
    actual_orig: np.ndarray
    actual_ft: np.ndarray
    pred: np.ndarray
    readout: np.ndarray

    @classmethod
    def stacked(cls, splits: dict[str, np.ndarray], *values: list[np.ndarray]) -> Predictions:
        """From the split's index arrays and, for each of VALUES, one array of n texts per predictor."""
        n = sum(len(v) for v in splits.values())
        split = np.zeros(n, np.int8)
        for code, name in enumerate(SPLITS):
            split[splits[name]] = code
        return cls(split, *(np.stack([np.asarray(v, np.float64) for v in rows]) for rows in values))

    def texts(self, name: str) -> np.ndarray:
        """A mask of the texts in split `name`."""
        return self.split == SPLITS.index(name)

    def frame(self, j: int = 0) -> pd.DataFrame:
        """Predictor j on every text: text_id, split (categorical), actual_orig, actual_ft, pred, readout."""
        return pd.DataFrame({
            "text_id": np.arange(len(self.split), dtype=np.int64),
            "split": pd.Categorical.from_codes(self.split, categories=list(SPLITS)),
            **{c: getattr(self, c)[j] for c in VALUES},
        })

    def test_rows(self, columns: list[int]) -> dict[str, np.ndarray]:
        """The test texts of the predictors `columns`, one predictor after another, each in text order: text_id
        and VALUES as flat arrays (a unit's preds.parquet)."""
        test = np.flatnonzero(self.texts("test"))
        return {"text_id": np.tile(test, len(columns)),
                **{c: getattr(self, c)[np.ix_(np.asarray(columns, np.int64), test)].ravel() for c in VALUES}}


def trial_metrics(p: Predictions, train_mean, real: np.ndarray, shuffled, hmaps: list[HeadMap | None]) -> list[dict]:
    """Each predictor's metrics (rows of `p`; `train_mean`, `shuffled` per row, `real` (k, n) the real neuron).

    Test-split metrics against actual_orig (with intervals for r and skill), and against actual_ft (suffix `_ft`),
    plus drift, and — for a binned head (`hmaps`) — its hard-bin ceiling on the test split, `bin_ceiling_r` (the r
    of always picking the true bin of actual_orig: what the head can reach; NaN for regression).
    `pearson_r_kurtosis`, `skill_kurtosis`: each metric's `tail_kurtosis` over test ∪ val, which sets its interval's
    degrees of freedom (and the comparison's, which rebuilds the intervals from the stored test predictions).

    `drift` = mean(actual_ft − the real neuron): for the shuffled control the real neuron, not the permuted
    target, so it is 0 whenever the neuron cannot change; its `_ft` metrics would mix the two and are null."""
    tm, shuffled = np.asarray(train_mean, np.float64), np.asarray(shuffled, bool)
    test = p.texts("test")
    pred, orig, ft_actual = p.pred[:, test], p.actual_orig[:, test], p.actual_ft[:, test]
    m = prediction_metric_rows(pred, orig, tm)
    names = list(m)
    held = ~p.texts("train")  # test ∪ val: texts the weights never saw, for the interval's tail shape
    kurt = {k: tail_kurtosis(k, p.pred[:, held], p.actual_orig[:, held], tm) for k in METRICS}
    for k in METRICS:
        iv = metric_interval_arrays(k, pred, orig, tm, kurtosis=kurt[k])
        m[f"{k}_lo"], m[f"{k}_hi"] = iv["lo"], iv["hi"]
    m.update(_after_training(m, names, pred, ft_actual, orig, tm, shuffled))
    m.update({f"{k}_kurtosis": v for k, v in kurt.items()})  # the comparison's intervals read it again
    m["drift"] = np.mean(ft_actual - real[:, test], -1)
    m["bin_ceiling_r"] = np.array([h.bin_ceiling(y) if h is not None else np.nan for h, y in zip(hmaps, orig)])
    val = p.texts("val")
    m["val_pearson_r"] = pearson_rows(p.pred[:, val], p.actual_orig[:, val])  # what a search ranks by
    m["val_skill"] = skill_rows(np.mean((p.pred[:, val] - p.actual_orig[:, val]) ** 2, -1),
                                np.mean((tm[:, None] - p.actual_orig[:, val]) ** 2, -1))
    m.update({f"n_{name}": np.full(len(tm), p.texts(name).sum()) for name in SPLITS})  # ints
    m["n_test_eff"] = effective_texts(orig)
    columns = {k: np.asarray(v).tolist() for k, v in m.items()}  # Python floats and ints
    return [{k: v[j] for k, v in columns.items()} for j in range(len(tm))]


def _after_training(m: dict, names: list[str], pred, ft_actual, orig, tm, shuffled) -> dict[str, np.ndarray]:
    """The `_ft` metrics: against the neuron in the final model — the test metrics themselves where it did not move
    (the same numbers), null for the shuffled control."""
    same = (ft_actual == orig).all(-1)
    moved = ~same & ~shuffled
    ft = prediction_metric_rows(pred[moved], ft_actual[moved], tm[moved]) if moved.any() else {}
    out = {}
    for k in names:
        v = np.where(shuffled, np.nan, m[k])
        if moved.any():
            v[moved] = ft[k]
        out[f"{k}_ft"] = v
    return out
