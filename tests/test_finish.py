"""A unit's finishing in one pass (core/finish.py): every metric of every probe — each head and control, the
cross-model included — equal to the same metric computed for that probe alone by independent numpy/scipy code (the
per-probe computation the unit path replaced), and the unit's Parquet files equal to what per-probe tables give.

Not bit-identical, to float64 rounding (rtol 1e-10): reductions over a row of a k × n array sum in another order than
over one n-vector; r and Spearman's ρ come from centred sums (np.corrcoef: a BLAS dot), the calibration line in closed
form (np.polyfit: an SVD least squares). Where a value is itself rounding noise (a constant prediction's slope,
~1e-17 either way) the two agree to ATOL."""

import io
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from nsr_sweep.core.cache import ActivationCache, CacheSpec
from nsr_sweep.core.corpus import load_corpus
from nsr_sweep.core.finish import SPLITS
from nsr_sweep.core.heads import HeadMap
from nsr_sweep.core.metrics import prediction_metric_rows, prediction_metrics
from nsr_sweep.core.models import load_model
from nsr_sweep.core.trial import TrialSpec, run_trial, run_trials
from nsr_sweep.core.uncertainty import METRICS, effective_texts, metric_intervals, tail_kurtosis
from nsr_sweep.results.records import unit_files
from nsr_sweep.results.schema import PRED_COLUMNS
from nsr_sweep.sweep.inputs import cross_model_inputs

RTOL, ATOL = 1e-10, 1e-14
ANALYSIS = {"patch_texts": 8, "n_grid": 3}
CONSTANT, BROKEN = 500, 501  # neurons made constant (a NaN r) and non-finite on one text (a failed fit)


@pytest.fixture(scope="module")
def unit():
    """A unit on nsr-tiny's layer 2: three neurons (the most varied, 40, a little varied one) and two doctored ones
    × regression and classification × real, shuffled and cross-model (nsr-tiny-seed1), and input-only."""
    tiny, sibling = load_model("nsr-tiny"), load_model("nsr-tiny-seed1")
    cache = ActivationCache.build(tiny, load_corpus(n_texts=240, seed=0), CacheSpec(layers=(2,), max_tokens=32),
                                  progress=False)
    cache.extra.update(cross_model_inputs(tiny, sibling, cache.tokens, "ln_final.hook_out"))
    acts = np.array(cache.acts[2])
    acts[:, CONSTANT], acts[7, BROKEN] = 0.25, np.nan
    cache = replace(cache, acts={2: acts})
    order = [n for n, _ in cache.top_neurons(2, "variance", 400)]
    specs = []
    for n in (order[0], 40, order[-1], CONSTANT, BROKEN):
        for h in ("regression", "classification"):
            for c in (None, "shuffled", "cross_model"):
                specs.append(TrialSpec(layer=2, neuron=n, head=h, control=c, analysis=ANALYSIS,
                                       cross_model="nsr-tiny-seed1" if c == "cross_model" else None))
        specs.append(TrialSpec(layer=2, neuron=n, control="input_only", analysis=ANALYSIS))
    return cache, tiny, specs, run_trials(cache, tiny, specs)


def _close(got, want, what) -> None:
    if isinstance(want, float) and np.isnan(want):
        assert isinstance(got, float) and np.isnan(got), what
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=RTOL, abs=ATOL), what
    else:
        assert got == want and type(got) is type(want), what


def _alone(pred, actual, train_mean) -> dict[str, float]:
    """The metric set of one predictor as np.corrcoef, np.polyfit and scipy compute it (the per-probe code)."""
    err = pred - actual
    mse, baseline = float(np.mean(err**2)), float(np.mean((train_mean - actual) ** 2))
    sd_p, sd_a = float(np.std(pred)), float(np.std(actual))
    flat = sd_p == 0 or sd_a == 0
    slope, intercept = np.polyfit(actual, pred, 1) if sd_a > 0 else (np.nan, np.nan)
    return {"pearson_r": np.nan if flat else float(np.corrcoef(pred, actual)[0, 1]),
            "spearman_rho": np.nan if flat else float(stats.spearmanr(pred, actual)[0]),
            "r2": float(1 - mse / np.var(actual)) if sd_a > 0 else np.nan, "mse": mse,
            "mae": float(np.mean(np.abs(err))), "offset": float(np.mean(err)), "calib_slope": float(slope),
            "calib_intercept": float(intercept), "std_ratio": sd_p / sd_a if sd_a > 0 else np.nan,
            "baseline_mse": baseline, "skill": 1 - mse / baseline if baseline > 0 else np.nan}


def _expected(r, real: np.ndarray) -> dict:
    """A probe's metrics from its own table alone (`TrialResult.preds`), one predictor at a time."""
    p, tm = r.preds, r.metrics["train_mean"]
    test, val, held = (p["split"] == "test").to_numpy(), (p["split"] == "val").to_numpy(), (p["split"] != "train").to_numpy()
    pred, orig = p["pred"].to_numpy(), p["actual_orig"].to_numpy()
    m = _alone(pred[test], orig[test], tm)
    kurt = {k: float(tail_kurtosis(k, pred[held], orig[held], tm)) for k in METRICS}
    m.update(metric_intervals(pred[test], orig[test], tm, kurtosis=kurt))
    shuffled = r.spec.control == "shuffled"
    m.update({f"{k}_ft": np.nan if shuffled else v for k, v in _alone(pred[test], orig[test], tm).items()})
    m.update({f"{k}_kurtosis": v for k, v in kurt.items()})
    m["drift"] = float(np.mean(p["actual_ft"].to_numpy()[test] - real[test]))
    m["bin_ceiling_r"] = HeadMap(r.spec.head, orig[p["split"].to_numpy() == "train"], r.spec.training.n_bins) \
        .bin_ceiling(orig[test]) if r.spec.head != "regression" else np.nan
    v = _alone(pred[val], orig[val], tm)
    m["val_pearson_r"], m["val_skill"] = v["pearson_r"], v["skill"]
    m.update({f"n_{s}": int((p["split"] == s).sum()) for s in SPLITS})
    d = orig[test] - orig[test].mean()
    m["n_test_eff"] = float((d**2).sum() ** 2 / (d**4).sum()) if np.ptp(orig[test]) > 0 else 0.0
    return m


def test_every_probes_metrics_are_its_own_computed_alone(unit):
    """Every head and control, each metric column equal (rtol 1e-10) to the per-probe numpy/scipy computation; a
    constant neuron's r is NaN and a non-finite one fails, each alone."""
    cache, _, specs, results = unit
    for s, r in zip(specs, results):
        if s.neuron == BROKEN:  # a non-finite target: every probe of it (input-only too) fails, nothing else
            assert r.status == "failed" and "non-finite targets" in r.reason and r.preds is None, s.trial_id
            continue
        assert r.status == "ok", (s.trial_id, r.reason)
        want = _expected(r, cache.activations(2, s.neuron).astype(np.float64))
        assert list(r.metrics)[: len(want)] == list(want)  # the record's columns, in the per-probe order
        for k, v in want.items():
            _close(r.metrics[k], v, (s.trial_id, k))
        if s.neuron == CONSTANT:
            assert np.isnan(r.metrics["pearson_r"]) and r.metrics["n_test_eff"] == 0.0
        else:
            assert np.isfinite(r.metrics["pearson_r"]), s.trial_id
    assert sum(r.status == "failed" for r in results) == 7


def test_a_probe_in_its_unit_has_its_alone_numbers(unit):
    """A probe run alone (`run_trial`: the k = 1 case) and the same probe in its unit: the same metrics (rtol 1e-10),
    predictions bit for bit. Patching is left out: a unit patches its neurons together in float32
    (tests/test_controls.py checks it to 1e-6)."""
    cache, tiny, specs, results = unit
    for i in (1, 3, 6, 9):  # shuffled, classification, input-only, the next neuron's cross-model
        alone = run_trial(cache, tiny, specs[i])
        assert set(alone.metrics) == set(results[i].metrics)
        for k, v in alone.metrics.items():
            if "seconds" not in k and not k.startswith("patch_"):
                _close(results[i].metrics[k], v, (specs[i].trial_id, k))
        pd.testing.assert_frame_equal(alone.preds, results[i].preds)


def test_the_units_preds_file_is_each_probes_test_rows(unit):
    """preds/<unit>.parquet holds, probe after probe, each finished probe's test rows of its own table — the
    per-probe tables concatenated, bit for bit, with the same column types; the records hold every metric."""
    _, _, specs, results = unit
    done = [(r, s.trial_id, s.sample) for s, r in zip(specs, results)]
    files = unit_files(done, "U")
    got = pd.read_parquet(io.BytesIO(files["probes/preds/U.parquet"]))
    parts = [r.preds[r.preds["split"] == "test"].assign(trial_id=tid) for r, tid, _ in done if r.status == "ok"]
    want = pd.concat(parts, ignore_index=True)[["trial_id", *PRED_COLUMNS]]
    want = want.astype({"trial_id": "string", "text_id": "int32"})
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert dict(got.dtypes.astype(str)) == {"trial_id": "string", "text_id": "int32", "actual_orig": "float64",
                                            "actual_ft": "float64", "pred": "float64", "readout": "float64"}
    records = pd.read_parquet(io.BytesIO(files["probes/records/U.parquet"])).set_index("trial_id")
    for r, tid, _ in done:
        row = records.loc[tid]
        assert row["status"] == r.status and json.loads(row["spec_json"]) == r.spec.model_dump(mode="json")
        for k, v in r.metrics.items():
            if k != "seconds" and isinstance(v, (int, float)) and not isinstance(v, bool):
                assert row[k] == v or (np.isnan(row[k]) and np.isnan(v)), (tid, k)


def test_the_vectorised_metrics_are_the_per_predictor_ones_row_by_row():
    """prediction_metric_rows and effective_texts over k rows: each row what the one-predictor call gives."""
    rng = np.random.default_rng(3)
    actual = np.maximum(rng.normal(size=(6, 40)) - 0.5, 0)
    pred = actual * rng.uniform(0, 2, (6, 1)) + rng.normal(size=(6, 40)) * 0.3
    pred[2], actual[4] = 1.5, 0.0  # a constant prediction, a constant target
    rows = prediction_metric_rows(pred, actual, np.linspace(0, 1, 6))
    n_eff = effective_texts(actual)
    for i in range(6):
        one = prediction_metrics(pred[i], actual[i], np.linspace(0, 1, 6)[i])
        for k, v in one.items():
            _close(float(rows[k][i]), v, (i, k))
            _close(v, _alone(pred[i], actual[i], np.linspace(0, 1, 6)[i])[k], (i, k))
        _close(float(n_eff[i]), effective_texts(actual[i]), i)
    assert np.isnan(rows["pearson_r"][2]) and np.isnan(rows["r2"][4]) and n_eff[4] == 0.0
