"""Trials: known answers, batched = one-at-a-time, every valid head × freeze on nsr-tiny, artefacts."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from nsr_sweep.core.cache import ActivationCache, CacheSpec
from nsr_sweep.core.corpus import load_corpus
from nsr_sweep.core.errors import NsrError
from nsr_sweep.core.fit import fit_probes
from nsr_sweep.core.heads import HeadMap, digit_token_ids
from nsr_sweep.core.metrics import prediction_metrics
from nsr_sweep.core.models import load_model
from nsr_sweep.core.reuse import Reuse
from nsr_sweep.core.spec import TrialSpec
from nsr_sweep.core.trial import recipe, run_trial, run_trials, split_indices
from nsr_sweep.report.plots import trial_chart
from nsr_sweep.results.records import save_trial


def synthetic_cache(acts: np.ndarray, features: np.ndarray) -> ActivationCache:
    n = len(features)
    return ActivationCache(texts=[f"t{i}" for i in range(n)], tokens=[[0, 1]] * n, positions=np.ones(n, np.int64),
                           acts={0: acts.astype(np.float32)}, features=features.astype(np.float32),
                           meta={"spec": {"features": "ln_final.hook_out", "hook": "post"}})


@pytest.fixture(scope="module")
def linear_data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(4000, 16))
    w = rng.normal(size=(16, 3))
    return X, X @ w + np.array([0.5, -1.0, 2.0])


def test_exact_linear_target_is_recovered(linear_data):
    X, Y = linear_data
    cache = synthetic_cache(Y, X)
    r = run_trial(cache, None, TrialSpec(layer=0, neuron=0, training={"lr": 3e-2, "epochs": 60, "patience": 60, "batch_size": 256}))
    m = r.metrics
    assert r.status == "ok" and m["pearson_r"] > 0.999
    assert abs(m["offset"]) < 1e-3 * Y[:, 0].std()
    assert m["n_test"] == 600


def test_permuted_targets_give_no_correlation(linear_data):
    X, Y = linear_data
    y = np.random.default_rng(1).permutation(Y[:, 0])
    r = run_trial(synthetic_cache(y[:, None], X), None, TrialSpec(layer=0, neuron=0, training={"lr": 1e-2, "epochs": 20}))
    assert r.metrics["n_test"] >= 500 and abs(r.metrics["pearson_r"]) < 0.15


def test_classification_predictions_stay_inside_the_train_range(linear_data):
    X, Y = linear_data
    y = np.maximum(Y[:, 1], 0) ** 2  # skewed with ties at zero: empty quantile bins happen
    r = run_trial(synthetic_cache(y[:, None], X), None,
                  TrialSpec(layer=0, neuron=0, head="classification", training={"n_bins": 12, "lr": 1e-2, "epochs": 10}))
    train = r.preds[r.preds.split == "train"].actual_orig
    assert r.preds.pred.between(train.min(), train.max()).all()
    assert r.metrics["skill"] > 0.5


def test_headmap_bins_maximise_the_ceiling_with_train_means():
    y = np.arange(100.0)  # uniform: the best 4 bins are equal, 25 texts each, an edge halfway between neighbours
    h = HeadMap("classification", y, n_bins=4)
    np.testing.assert_allclose(h.edges, [0, 24.5, 49.5, 74.5, 99])
    np.testing.assert_allclose(h.values, [12, 37, 62, 87])
    p = h.predict(torch.tensor([[0.0, 0, 0, 0], [100.0, 0, 0, 0]]))
    np.testing.assert_allclose(p.numpy(), [49.5, 12], atol=1e-9)
    assert h.bin_ceiling(y) == pytest.approx(np.corrcoef(np.repeat([12, 37, 62, 87], 25), y)[0, 1])
    assert np.isnan(HeadMap("regression", y).bin_ceiling(y))
    # a sparse (ReLU-like) neuron: its tied resting 0 is one bin (with its two least active texts: 902 texts), the
    # other nine resolve its active range
    rng = np.random.default_rng(0)
    sparse = np.r_[np.zeros(900), rng.gamma(2.0, size=100)]
    h = HeadMap("classification", sparse, n_bins=10)
    assert (h.labels(sparse[:900]) == 0).all() and (h.edges[1:-1] > 0).all()
    assert (np.bincount(h.labels(sparse), minlength=10)[1:] >= 4).all()  # ≥ ⌈1000/320⌉ texts a bin
    quantile = np.quantile(sparse, np.linspace(0, 1, 11))  # the old bins: nine of ten edges at 0
    q_lab = np.clip(np.searchsorted(quantile[1:-1], sparse, side="right"), 0, 9)
    q_values = np.array([sparse[q_lab == j].mean() if (q_lab == j).any() else 0.0 for j in range(10)])
    assert h.bin_ceiling(sparse) > 0.99 > 0.9 > np.corrcoef(q_values[q_lab], sparse)[0, 1]
    # too few distinct values for K bins: still K outputs, the missing bins empty at the bottom
    h = HeadMap("classification", np.r_[np.zeros(50), np.ones(3), np.full(40, 2.0)], n_bins=5)
    np.testing.assert_allclose(h.edges, [0, 0, 0, 0.5, 1.5, 2])
    np.testing.assert_allclose(h.values, [0, 0, 0, 1, 2])
    assert h.n_out == 5 and list(h.labels(np.array([0.0, 1, 2]))) == [2, 3, 4]


def test_batched_probe_fit_equals_one_at_a_time(linear_data):
    X, Y = linear_data
    Y = Y + np.random.default_rng(2).normal(size=Y.shape)
    splits = split_indices(len(X), seed=0)
    for head, solver in [(h, s) for h in ("regression", "classification") for s in ("exact", "adamw")]:
        spec = TrialSpec(layer=0, neuron=0, head=head, training={"lr": 1e-2, "epochs": 8, "patience": 2, "solver": solver})
        together = fit_probes(X, Y, head, recipe(spec), splits)
        for j in range(Y.shape[1]):
            alone = fit_probes(X, Y[:, j : j + 1], head, recipe(spec), splits)
            torch.testing.assert_close(together.weight[j], alone.weight[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(together.bias[j], alone.bias[0], atol=1e-5, rtol=0)
            assert len(together.history[j]) == len(alone.history[0])


def test_a_workers_memo_is_its_own_and_changes_no_number(linear_data):
    """Units run with the worker's `Reuse` — one SVD per feature set and split, kept across units, never keyed by
    the features' bytes — give exactly the numbers of a fresh run; another cache starts a fresh memo."""
    X, Y = (a[:1000] for a in linear_data)
    cache = synthetic_cache(Y[:, :1] + np.random.default_rng(3).normal(size=(len(X), 1)), X)
    specs = [TrialSpec(layer=0, neuron=0, head=h, control=c) for h in ("regression", "classification")
             for c in (None, "shuffled")]
    reuse = Reuse()
    first, again = run_trials(cache, None, specs, reuse=reuse), run_trials(cache, None, specs, reuse=reuse)
    fresh = run_trials(cache, None, specs)
    assert len(reuse.svds) == 1 and not reuse.engines  # this model's features, one split: one SVD for all four
    for a, b, c in zip(first, again, fresh):
        for k in set(a.metrics) - {"seconds", "train_seconds"}:
            assert a.metrics[k] == b.metrics[k] == c.metrics[k] or np.isnan(a.metrics[k]) and np.isnan(c.metrics[k]), k
        pd.testing.assert_frame_equal(a.preds, c.preds)
    other = synthetic_cache(np.asarray(cache.acts[0]), X[::-1].copy())
    assert reuse.bind(other, None) is reuse and not reuse.svds  # another cache: nothing of the first one is read
    alone = run_trial(other, None, specs[0], reuse=reuse)
    assert alone.metrics["pearson_r"] == run_trial(other, None, specs[0]).metrics["pearson_r"] != first[0].metrics["pearson_r"]


def test_non_finite_loss_fails_the_trial_with_its_reason(linear_data):
    X, Y = linear_data
    for solver in ("adamw", "exact"):
        r = run_trial(synthetic_cache(Y * 1e30, X * 1e38), None,
                      TrialSpec(layer=0, neuron=0, training={"lr": 10, "epochs": 3, "solver": solver}))
        assert r.status == "failed" and "non-finite" in r.reason


def test_token_with_freeze_none_is_an_error():
    with pytest.raises(ValueError, match="token with freeze none"):
        TrialSpec(layer=0, neuron=0, head="token", freeze="none")


def test_digit_tokens_come_from_the_tokenizer():
    tok = load_model("nsr-tiny").tokenizer
    ids = digit_token_ids(tok, " Answer:")
    assert [tok.decode([i]) for i in ids] == [f" {d}" for d in "0123456789"]


    class SplitsSeven:  # a vocabulary in which ' 7' is two tokens
        def encode(self, text, add_special_tokens=False):
            return [hash(t) % 1000 for t in re.findall(r" [0-68-9]|.", text)]

    with pytest.raises(NsrError, match="' 7' does not encode to exactly one token"):
        digit_token_ids(SplitsSeven(), " Answer:")


# -- on nsr-tiny ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cache():
    model = load_model("nsr-tiny")
    cache = ActivationCache.build(model, load_corpus(n_texts=400, seed=0), CacheSpec(layers=(2,), store_resid=True),
                                  progress=False)
    neuron = cache.top_neurons(2, "variance", 1)[0][0]
    return model, cache, neuron


COMBOS = [("regression", "none"), ("classification", "none"), ("regression", "after_target"),
          ("classification", "after_target"), ("token", "after_target"), ("regression", "all"),
          ("classification", "all"), ("token", "all")]


@pytest.mark.parametrize("head, freeze", COMBOS)
def test_every_valid_combination_beats_the_train_mean_on_nsr_tiny(tiny_cache, head, freeze, tmp_path):
    model, cache, neuron = tiny_cache
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    lr, epochs, batch = {"none": (1e-2, 4, 32), "after_target": (2e-3, 4, 32)}.get(freeze, (2e-3, 4, 32))
    if head == "token":  # the frozen digit unembedding needs more steering
        lr, epochs, batch = (5e-3 if freeze == "after_target" else 1e-3), 6, 16
    spec = TrialSpec(layer=2, neuron=neuron, head=head, freeze=freeze, training={"epochs": epochs, "batch_size": batch, "lr": lr, "save_weights": freeze != "none"})
    r = run_trial(cache, model, spec)
    assert r.status == "ok", r.reason
    assert r.metrics["skill"] > 0, r.metrics
    if head != "regression":
        train = r.preds[r.preds.split == "train"].actual_orig
        assert r.preds.pred.between(train.min(), train.max()).all()
    if freeze != "all":  # the neuron cannot change: equal by construction
        assert np.array_equal(r.preds.actual_ft.to_numpy(), r.preds.actual_orig.to_numpy())
        assert r.metrics["drift"] == 0.0
    else:
        assert r.metrics["drift"] != 0.0
    assert all(torch.equal(v, before[k]) for k, v in model.hf.state_dict().items())  # base untouched
    m = r.metrics  # the analyses run for every head × freeze
    if head != "token":  # a token head's digits move by ~1e-8 here: patch_r2 of numerically zero changes is undefined
        assert np.isfinite(m["patch_r2"])
    for k in ("patch_slope", "identity_r", "proj_readout_r", "proj_wout_r", "cos_win", "cos_wout",
              "cos_win_z_neurons", "cos_wout_z_random", "cos_win_wout"):
        assert np.isfinite(m[k]), k
    test = r.preds[r.preds.split == "test"]
    ft_readout = np.corrcoef(test.readout, test.actual_ft)[0, 1]  # the final model's readout, its own neuron
    if freeze == "none":
        assert m["proj_readout_r"] == pytest.approx(ft_readout, abs=1e-9)
    else:  # one model at a time: the fine-tuned readout against the fine-tuned neuron, and …
        # (its neuron re-read by a forward of the final model: float32 batching moves it by ~1e-8)
        assert m["proj_readout_r_ft"] == pytest.approx(ft_readout, abs=1e-6)
        if head != "token":  # … the frozen head on the original model's features (a plain HF forward) against the original
            w, b = r.head["weight"].double(), r.head["bias"].double()
            values = r.head.get("bin_values", torch.ones(1, dtype=torch.float64)).double()
            reads = []
            for i in test.text_id:
                with torch.no_grad():
                    f = model.hf(torch.tensor([cache.tokens[i]]), output_hidden_states=True).hidden_states[-1][0, -1]
                out = f.double() @ w.T + b
                reads.append(float(out[0]) if head == "regression" else float(out @ (values - values.mean())))
            assert m["proj_readout_r"] == pytest.approx(np.corrcoef(reads, test.actual_orig)[0, 1], abs=1e-6)
    assert np.isfinite(m.get("resid_change_along_head_r", np.nan)) == (freeze != "none")
    assert len(r.patch) == 7 * 60 and r.patch["pred_base"].notna().all()

    d = save_trial(r, tmp_path / "trial", chart=trial_chart)
    saved = json.loads((d / "metrics.json").read_text())
    preds = pd.read_parquet(d / "preds.parquet")
    assert list(preds.columns) == ["text_id", "split", "actual_orig", "actual_ft", "pred", "readout"]
    test = preds[preds.split == "test"]
    train_mean = preds[preds.split == "train"].actual_orig.mean()
    for suffix, actual in (("", "actual_orig"), ("_ft", "actual_ft")):
        again = prediction_metrics(test.pred.to_numpy(), test[actual].to_numpy(), train_mean)
        for k, v in again.items():
            assert saved["metrics"][k + suffix] == pytest.approx(v, abs=1e-9, nan_ok=True)
    assert saved["metrics"]["drift"] == pytest.approx((test.actual_ft - test.actual_orig).mean(), abs=1e-9)
    held = preds[preds.split != "train"]  # the interval's tail shape: κ of r's leave-one-out z over test ∪ val
    p, y = held.pred.to_numpy(), held.actual_orig.to_numpy()
    z = np.arctanh([np.corrcoef(p[k], y[k])[0, 1] for k in ~np.eye(len(y), dtype=bool)])
    kappa = len(z) * ((z - z.mean()) ** 4).sum() / ((z - z.mean()) ** 2).sum() ** 2
    assert saved["metrics"]["pearson_r_kurtosis"] == pytest.approx(kappa, rel=1e-6)
    assert (d / "diagnostics.png").stat().st_size > 10_000
    head_file = load_file(d / "head.safetensors")
    assert "weight" in head_file and ("bin_values" in head_file or "mu" in head_file)
    if head == "regression":  # the hard-bin ceiling: what a head that always picks the true bin scores
        assert np.isnan(saved["metrics"]["bin_ceiling_r"])
    else:
        edges, values = head_file["bin_edges"].double().numpy(), head_file["bin_values"].double().numpy()
        y = test.actual_orig.to_numpy()
        stair = values[np.clip(np.searchsorted(edges[1:-1], y, side="right"), 0, len(values) - 1)]
        assert saved["metrics"]["bin_ceiling_r"] == pytest.approx(np.corrcoef(stair, y)[0, 1], abs=1e-9)
    assert (d / "model" / "config.json").exists() == (freeze != "none")
    assert pd.read_parquet(d / "patch.parquet").shape[0] == 7 * 60


def test_early_features_control_reads_the_residual_before_the_layer(tiny_cache):
    model, cache, neuron = tiny_cache
    spec = TrialSpec(layer=2, neuron=neuron, control="early_features", training={"epochs": 4, "lr": 1e-2})
    r = run_trial(cache, model, spec)
    assert r.status == "ok" and "cos_win" not in r.metrics  # a control of the features, not of the model …
    assert r.metrics["patch_slope"] == 0.0 and r.patch is None  # … read before the neuron: nothing can move them
    with pytest.raises(ValueError, match="needs freeze none"):
        TrialSpec(layer=2, neuron=1, freeze="all", control="early_features")
    with pytest.raises(NsrError, match="random model's features"):
        run_trial(cache, model, TrialSpec(layer=2, neuron=neuron, control="random_model", training={"epochs": 1}))


def test_trials_are_seeded(tiny_cache):
    model, cache, neuron = tiny_cache
    spec = TrialSpec(layer=2, neuron=neuron, head="classification", freeze="after_target", training={"epochs": 2})
    a, b = run_trial(cache, model, spec), run_trial(cache, model, spec)
    assert a.metrics["mse"] == b.metrics["mse"] and np.array_equal(a.preds.pred, b.preds.pred)


def test_bf16_trains_under_autocast_and_evaluates_in_float32(tiny_cache):
    """training.precision bf16: the trained blocks' forward and backward run in bfloat16 (the numbers move,
    the probe still learns); the trial's predictions are a float32 evaluation of the model it trained."""
    model, cache, neuron = tiny_cache
    kw = dict(layer=2, neuron=neuron, freeze="after_target", analysis={"enabled": False})
    train = dict(epochs=2, lr=2e-3, batch_size=32)
    fp32 = run_trial(cache, model, TrialSpec(**kw, training=train))
    bf16 = run_trial(cache, model, TrialSpec(**kw, training={**train, "precision": "bf16"}))
    assert bf16.status == "ok" and bf16.metrics["skill"] > 0, bf16.metrics
    assert bf16.metrics["val_mse"] != fp32.metrics["val_mse"]  # bfloat16 rounding changed the training
    assert abs(bf16.metrics["pearson_r"] - fp32.metrics["pearson_r"]) < 0.05
    from nsr_sweep import load_sweep  # the sweep file's fields, validated as the CLI does

    spec = load_sweep({"name": "p", "layers": [1], "neurons": [3], "heads": ["regression"], "freeze": ["all"],
                       "training": {"precision": "bf16"}, "resources": {"tf32": True}})
    assert spec.training.precision == "bf16" and spec.resources.tf32
    with pytest.raises(NsrError, match="precision"):
        load_sweep({"name": "p", "layers": [1], "neurons": [3], "heads": ["regression"], "freeze": ["all"],
                    "training": {"precision": "fp16"}})


def test_after_target_starts_from_the_cached_residual(tiny_cache):
    """Blocks L+1… applied to the cached residual after block L reproduce the cached features exactly."""
    model, cache, _ = tiny_cache
    net = model.surface.trainable_from(3)
    tr = model.hf.transformer
    trainable = net.trainable()
    assert net.blocks[:3] == list(tr.h[:3]) and net.blocks[3] is not tr.h[3]  # a copy of block 3 only
    assert sum(p.numel() for p in trainable.values()) == sum(p.numel() for p in [*tr.h[3].parameters(),
                                                                                  *tr.ln_f.parameters()])
    assert all(p is not q for p in trainable.values() for q in tr.parameters())  # a private copy
    assert {k for k in trainable if k.startswith("transformer.ln_f")} == {"transformer.ln_f.weight",
                                                                          "transformer.ln_f.bias"}
    idx = np.arange(40)
    T = max(len(cache.tokens[i]) for i in idx)
    with torch.no_grad():
        feats = net.ln_final(net.run(torch.from_numpy(np.asarray(cache.resid[2][idx, :T])), 3))
    got = feats[torch.arange(40), torch.as_tensor(cache.positions[idx])].numpy()
    np.testing.assert_allclose(got, cache.features[idx], atol=2e-5)


def test_exact_ridge_equals_numpy_at_the_lambda_validation_chooses(linear_data):
    """solve_ridge = numpy's ridge (bias unpenalised) at the λ of RIDGE_GRID with the least validation MSE
    (validation MSEs within TIE × the baseline's of the least are a tie: the smallest such λ)."""
    from nsr_sweep.core.fit import RIDGE_GRID, TIE

    X, Y = linear_data
    Y = Y + np.random.default_rng(3).normal(size=Y.shape) * np.array([0.1, 3.0, 30.0])
    splits = split_indices(len(X), seed=0)
    fit = fit_probes(X, Y, "regression", recipe(TrialSpec(layer=0, neuron=0)), splits)
    tr, va = splits["train"], splits["val"]
    Xc = X[tr] - X[tr].mean(0)
    scale = np.linalg.svd(Xc, compute_uv=False)[0] ** 2

    def ridge(y, lam):
        w = np.linalg.solve(Xc.T @ Xc + lam * np.eye(X.shape[1]), Xc.T @ (y[tr] - y[tr].mean()))
        return lambda Z: (Z - X[tr].mean(0)) @ w + y[tr].mean()

    for j in range(Y.shape[1]):
        val = np.array([np.mean((ridge(Y[:, j], rel * scale)(X[va]) - Y[va, j]) ** 2) for rel in RIDGE_GRID])
        best = int(np.argmax(val <= val.min() + TIE * np.mean((Y[tr, j].mean() - Y[va, j]) ** 2)))
        assert fit.info[j]["l2_relative"] == RIDGE_GRID[best] and fit.info[j]["converged"]
        pred = fit.maps[j].predict(torch.as_tensor(X @ fit.weight[j].double().numpy().T + fit.bias[j].double().numpy()))
        np.testing.assert_allclose(pred.numpy(), ridge(Y[:, j], RIDGE_GRID[best] * scale)(X), atol=1e-4)
        assert fit.history[j][0]["val_mse"] == pytest.approx(val[best], rel=1e-4)
