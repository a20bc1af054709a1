"""The report at a layer's scale: the comparison's numbers taken a chunk of neurons at a time are the whole layer's
to the bit, a predictor that never ran gives what its jackknife would, and a table longer than a page embeds its
extremes and says so (every row stays in tables/)."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from nsr_sweep.core import uncertainty
from nsr_sweep.core.uncertainty import (
    effective_texts,
    gap_of,
    layer_mean_intervals,
    metric_interval_of,
    metric_jackknife,
)
from nsr_sweep.report import build
from nsr_sweep.report import interactive as ia
from nsr_sweep.results import compare


def _layer(n_neurons: int = 300, n_texts: int = 40, seed: int = 0):
    """A layer's targets (sparse, heavy-tailed: as real neurons) and three predictors of them, with NaN rows."""
    rng = np.random.default_rng(seed)
    y = np.maximum(rng.standard_normal((n_neurons, n_texts)), 0) ** 2
    preds = {"self": y + rng.standard_normal(y.shape), "cross": 0.5 * y + rng.standard_normal(y.shape),
             "input_only": rng.standard_normal(y.shape)}
    preds["cross"][::11] = np.nan  # neurons without a cross-model trial
    y[5] = 0.0  # a constant target
    return y, preds, y.mean(1) + 0.05


def test_a_layer_mean_taken_in_chunks_is_the_whole_one_to_the_bit(monkeypatch):
    y, p, m = _layer()
    whole = layer_mean_intervals(p["self"], y, m, {"cross": p["cross"], "input_only": p["input_only"]})
    monkeypatch.setattr(uncertainty, "LAYER_CHUNK", 7)  # 300 neurons in 43 chunks, the last one short
    chunked = layer_mean_intervals(p["self"], y, m, {"cross": p["cross"], "input_only": p["input_only"]})
    assert whole.keys() == chunked.keys() and len(whole) == 6 * 4
    for k, v in whole.items():
        assert v == chunked[k] or (np.isnan(v) and np.isnan(chunked[k])), k
    assert whole["gap_cross_pearson_r_n"] == 300 - 28 - 1  # the rows without a cross-model, and the constant one


def test_a_layer_taken_block_by_block_gives_the_whole_layers_numbers():
    """The comparison's path: per-neuron intervals and effective texts of each block, the layer means fed block by
    block (`LayerMeans`), the same as the whole layer at once."""
    y, p, m = _layer()
    kurt = {("self", "pearson_r"): np.full(len(y), 6.0)}
    whole = compare.neuron_intervals(p, y, m, kurt)
    means, parts, n_eff = uncertainty.LayerMeans(), [], []
    for s in range(0, len(y), 64):
        at = slice(s, s + 64)
        parts.append(compare.neuron_intervals({k: x[at] for k, x in p.items()}, y[at], m[at],
                                              {k: v[at] for k, v in kurt.items()}))
        n_eff.append(effective_texts(y[at]))
        means.add(p["self"][at], y[at], m[at], {"cross": p["cross"][at]})
    for col, iv in whole.items():
        for k, v in iv.items():
            np.testing.assert_array_equal(v, np.concatenate([part[col][k] for part in parts]), err_msg=f"{col} {k}")
    assert means.result() == layer_mean_intervals(p["self"], y, m, {"cross": p["cross"]})  # (no NaN: the means)
    d = y - y.mean(1, keepdims=True)  # effective texts, recomputed: (Σd²)² / Σd⁴, 0 for a constant target
    with np.errstate(invalid="ignore", divide="ignore"):
        want = np.where((d**4).sum(1) > 0, (d**2).sum(1) ** 2 / (d**4).sum(1), 0.0)
    np.testing.assert_allclose(np.concatenate(n_eff), want, rtol=1e-12)
    assert np.concatenate(n_eff)[5] == 0


def test_a_predictor_that_never_ran_has_the_columns_its_jackknife_gives():
    y, p, m = _layer(n_neurons=40)
    p["cross"] = np.full_like(y, np.nan)  # no cross-model trial at all: not computed
    got = compare.neuron_intervals(p, y, m)
    for metric, short in (("pearson_r", "r"), ("skill", "skill")):
        a, b = (metric_jackknife(metric, p[k], y, m) for k in ("self", "cross"))
        own = metric_interval_of(b, metric)
        for k in ("point", "lo", "hi"):
            np.testing.assert_array_equal(got[f"cross_{short}"][k], own[k])
        gap = gap_of(a, b, metric)
        for k, g in (("point", "gap"), ("lo", "gap_lo"), ("hi", "gap_hi"), ("p", "gap_p")):
            np.testing.assert_array_equal(got[f"gap_cross_{short}"][k], gap[g])
    assert np.isfinite(got["gap_input_only_r"]["p"]).sum() == len(y) - 1  # the others computed (but the constant)


def _ranked(n: int = 50) -> pd.DataFrame:
    r = np.random.default_rng(1).standard_normal(n)
    r[[3, 17]] = np.nan
    return pd.DataFrame({"layer": 0, "neuron": np.arange(n), "pearson_r": r})


def _extreme_neurons(df: pd.DataFrame, k: int) -> set[int]:
    ok = df.dropna(subset=["pearson_r"])
    return set(ok.nlargest(k, "pearson_r")["neuron"]) | set(ok.nsmallest(k, "pearson_r")["neuron"])


def test_an_interactive_table_longer_than_a_page_embeds_its_extremes(monkeypatch):
    df = _ranked()
    monkeypatch.setattr(ia, "MAX_TABLE_ROWS", 10)
    rows, note = ia.cut(df, "pearson_r")
    block = ia.table_block("t", rows, note)
    data = json.loads(re.search(r"class='nsr-table' data-table='t'>(.*)</script>", block).group(1))["data"]
    assert {row[1] for row in data} == _extreme_neurons(df, 5) and len(data) == 10
    assert "50 rows: the 5 highest and 5 lowest by <code>pearson_r</code> are shown" in block
    whole = ia.table_block("t", *ia.cut(df.head(10), "pearson_r"))
    assert "rows:" not in whole and len(json.loads(re.search(r"'t'>(.*)</script>", whole).group(1))["data"]) == 10


def test_summary_tables_longer_than_a_page_show_their_extremes(monkeypatch):
    df = _ranked()
    monkeypatch.setattr(build, "MAX_HTML_ROWS", 10)
    text = build._md(df, rank="pearson_r")
    rows = [line for line in text.splitlines() if line.startswith("| 0 |")]
    assert {int(line.split("|")[2]) for line in rows} == _extreme_neurons(df, 5) and len(rows) == 10
    assert text.startswith("_50 rows: the 5 highest and 5 lowest by `pearson_r` are shown")
    assert len([line for line in build._md(df.head(10)).splitlines() if line.startswith("| 0 |")]) == 10


@pytest.mark.parametrize("n_best", [30, 5])
def test_the_scatter_draws_a_seeded_sample_of_many_best_trials(monkeypatch, n_best):
    rng = np.random.default_rng(2)
    df = pd.DataFrame({"layer": 0, "neuron": np.arange(n_best), "head": "regression", "freeze": "none",
                       "control": None, "status": "ok", "best": True, "pearson_r": rng.uniform(0, 1, n_best),
                       "patch_slope": rng.uniform(0, 1, n_best)})
    monkeypatch.setattr(ia, "MAX_POINTS", 7)
    fig = json.loads(ia.r_vs_patch_figure(df))
    points = [n for t in fig["data"] for _, n in t["customdata"]]
    assert len(points) == min(n_best, 7) and len(set(points)) == len(points)
    assert fig == json.loads(ia.r_vs_patch_figure(df))  # the same sample every time
    title = fig["layout"].get("title", {}).get("text", "")
    assert (title == f"a random 7 of the {n_best} best trials (tables/best.parquet: all)") == (n_best > 7)


def test_the_trial_table_is_cut_by_the_sweeps_metric(monkeypatch):
    df = _ranked().rename(columns={"pearson_r": "val_mse"}).assign(trial_id=lambda d: [f"t{n}" for n in d["neuron"]],
                                                                  pearson_r=0.5)
    monkeypatch.setattr(ia, "MAX_TABLE_ROWS", 10)
    rows, note = build.trial_rows(df, "val_mse")
    assert "val_mse" in rows and "5 highest and 5 lowest by <code>val_mse</code>" in note
    assert set(rows["neuron"]) == _extreme_neurons(df[["neuron", "val_mse"]].rename(columns={"val_mse": "pearson_r"}), 5)


def test_a_table_of_failures_alone_compares_nothing(tmp_path):
    failed = pd.DataFrame({"trial_id": ["a", "b"], "layer": 0, "neuron": [1, 2], "head": "regression",
                           "freeze": "none", "control": pd.array([None, None], dtype="string"), "status": "failed",
                           "best": False, "error": "boom"})  # no metric columns: none finished
    per_neuron, per_layer = compare.compare(tmp_path, failed)
    assert per_neuron.empty and per_layer.empty


def test_a_cut_table_with_few_ranked_rows_says_so():
    from nsr_sweep.report.markup import extremes

    df = _ranked()
    df.loc[df.index[6:], "pearson_r"] = np.nan  # 5 rows with a value (neuron 3's is NaN already), 45 without
    shown, words = extremes(df, 10, "pearson_r")
    assert len(shown) == 10 and shown["pearson_r"].notna().sum() == 5
    assert words == "the 5 with a `pearson_r` and 5 without one"
    assert list(shown["neuron"][:5]) == [4, 1, 5, 0, 2]  # highest first (recomputed: argsort of the five values)
    assert list(shown["neuron"][5:]) == [3, 6, 7, 8, 9]  # then the first rows without one, in order
