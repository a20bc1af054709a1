"""Analyses: known answers for patching, controls, the identity projection, cosine nulls, the patch hook."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import save_tiny_gpt2

from nsr_sweep.core import analyses as A
from nsr_sweep.core.cache import ActivationCache, CacheSpec, pad_batch
from nsr_sweep.core.corpus import load_corpus
from nsr_sweep.core.models import load_model
from nsr_sweep.core.trial import TrialSpec, run_trial


@pytest.fixture(scope="module")
def big():
    """≥ 3,400 texts so the test split holds ≥ 500; features = the layer's own hook_post."""
    model = load_model("nsr-tiny")
    corpus = load_corpus(n_texts=3400)
    cache = ActivationCache.build(model, corpus, CacheSpec(layers=(2,), features="blocks.2.mlp.hook_post",
                                                           max_tokens=32), progress=False)
    neuron = cache.top_neurons(2, "variance", 1)[0][0]
    return model, cache, neuron


def test_a_head_reading_the_neuron_itself_has_patch_slope_one(big):
    """At default settings (the exact solver) the probe finds w = e_n, so the patch slope must be 1.

    (AdamW from zero reaches r = 0.9998 on the same data with weight 0.08 on the neuron: it spreads
    weight over near-collinear neurons. High r without the neuron is the very case patching exposes.)"""
    model, cache, neuron = big
    r = run_trial(cache, model, TrialSpec(layer=2, neuron=neuron, features={"hook": "blocks.2.mlp.hook_post"}))
    m = r.metrics
    assert r.status == "ok" and m["n_test"] >= 500
    assert m["pearson_r"] > 0.999
    assert abs(m["patch_slope"] - 1) < 0.02 and m["patch_r2"] > 0.99
    assert "cos_win" not in m  # an MLP-basis probe has no residual-space direction
    pts = r.patch
    assert len(pts) == 7 * 64 and pts["grid_value"].nunique() == 7


def test_shuffled_control_reads_nothing(big):
    model, cache, neuron = big
    r = run_trial(cache, model, TrialSpec(layer=2, neuron=neuron, control="shuffled", features={"hook": "blocks.2.mlp.hook_post"}, training={"lr": 1e-2, "epochs": 10}))
    m = r.metrics
    assert m["n_test"] >= 500 and abs(m["pearson_r"]) < 0.15 and abs(m["patch_slope"]) < 0.1


@pytest.mark.parametrize("which", ["nsr-tiny", "random-ln"])
def test_identity_r_is_one_for_hook_pre(which, tmp_path_factory):
    name = "nsr-tiny" if which == "nsr-tiny" else str(save_tiny_gpt2(tmp_path_factory.mktemp("rln"), seed=3))
    model = load_model(name)
    cache = ActivationCache.build(model, load_corpus(n_texts=300), CacheSpec(layers=(1,), hook="pre"), progress=False)
    r = run_trial(cache, model, TrialSpec(layer=1, neuron=11, training={"epochs": 2, "lr": 1e-2}))
    assert r.metrics["identity_r"] >= 0.99999
    post = ActivationCache.build(model, load_corpus(n_texts=300), CacheSpec(layers=(1,)), progress=False)
    assert run_trial(post, model, TrialSpec(layer=1, neuron=11, training={"epochs": 2, "lr": 1e-2})).metrics["identity_r"] < 0.99999


def test_random_direction_null_has_the_expected_spread():
    model = load_model("nsr-tiny")
    w = model.surface.neuron_weights(1)
    W_in, W_out = w["W_in"], w["W_out"]
    vectors = {"win": W_in, "wout": W_out.T}
    direction = torch.randn(model.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    c = A.weight_cosines(direction[None], vectors, [3], n_random=4000)[0]
    assert abs(c["cos_null_random_std"] * np.sqrt(model.d_model) - 1) < 0.10
    assert c["cos_null_n_neurons"] == model.d_mlp - 1 >= 200
    w = W_in[:, 3]  # the neuron's own input vector: cos 1, far out in both nulls
    own = A.weight_cosines(w[None], vectors, [3])[0]
    assert own["cos_win"] == pytest.approx(1.0) and own["cos_win_z_random"] > 5 and own["cos_win_z_neurons"] > 3


def test_weight_cosines_of_a_unit_equal_each_probe_computed_alone_in_numpy():
    """One matrix product for many probes: every cosine and z-score is the one-direction numpy computation."""
    model = load_model("nsr-tiny")
    w = model.surface.neuron_weights(1)
    vectors = {"win": w["W_in"], "wout": w["W_out"].T}
    D = torch.randn(37, model.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    neurons = np.random.default_rng(0).integers(0, model.d_mlp, 37)
    got = A.weight_cosines(D, vectors, neurons, n_random=300, seed=5)
    R = A.random_directions(model.d_model, 300, 5).numpy()
    for p, n in enumerate(neurons):
        d = D[p].numpy()
        null_r = d @ R / (np.linalg.norm(d) * np.linalg.norm(R, axis=0))
        for name, V in vectors.items():
            c = d @ V.numpy() / (np.linalg.norm(d) * np.linalg.norm(V.numpy(), axis=0))
            others = np.delete(c, n)
            assert got[p][f"cos_{name}"] == pytest.approx(c[n], abs=1e-12)
            assert got[p][f"cos_{name}_z_neurons"] == pytest.approx((c[n] - others.mean()) / others.std(ddof=1), abs=1e-9)
            assert got[p][f"cos_{name}_z_random"] == pytest.approx((c[n] - null_r.mean()) / null_r.std(ddof=1), abs=1e-9)
        alone = A.weight_cosines(D[p][None], vectors, [n], n_random=300, seed=5)[0]
        assert alone.keys() == got[p].keys() and all(got[p][k] == pytest.approx(v, abs=1e-12) for k, v in alone.items())
    lw = A.LayerWeights(model.surface, 1)  # chunked (5 at a time) = all at once, raw and effective columns
    whole = A.direction_cosines(lw, "ln_final.hook_out", D, neurons)
    chunked = A.direction_cosines(lw, "ln_final.hook_out", D, neurons, chunk=5)
    assert len(whole) == 37 and "cos_win_eff" in whole[0] and all(
        a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-12) for k in a) for a, b in zip(whole, chunked))
    with pytest.raises(ValueError, match="37 directions but 1 neurons"):
        A.direction_cosines(lw, "ln_final.hook_out", D, [3])


def test_readout_direction_of_binned_heads():
    from nsr_sweep.core.heads import HeadMap

    h = HeadMap("classification", np.arange(100.0), n_bins=4)
    W = torch.eye(4, 6, dtype=torch.float64)
    np.testing.assert_allclose(A.readout_direction(W, h).numpy(), [-37.5, -12.5, 12.5, 37.5, 0, 0])


def test_patch_hook_changes_only_the_target_neuron_at_the_target_position():
    model = load_model("nsr-tiny")
    down = model.hf.transformer.h[2].mlp.c_proj  # hook_post is its input
    seqs = [model.tokenizer.encode(t) for t in ("def f(x): return x", "A longer text about many things here.")]
    seqs = [[model.tokenizer.bos_token_id] + s for s in seqs]
    ids, mask = pad_batch(seqs, model.tokenizer.pad_token_id, "cpu")
    pos = mask.sum(1) - 1
    seen = {}
    with torch.no_grad():
        h = down.register_forward_pre_hook(lambda m, a: seen.__setitem__("post", a[0].clone()))
        model.hf(input_ids=ids, attention_mask=mask)
        before = seen["post"]
        h.remove()
        with model.surface.patch(2, "post", pos, 17, 5.0):
            h = down.register_forward_pre_hook(lambda m, a: seen.__setitem__("post", a[0].clone()))  # after the patch
            model.hf(input_ids=ids, attention_mask=mask)
            h.remove()
    after = seen["post"]
    changed = (after != before).nonzero().tolist()
    assert changed == [[0, int(pos[0]), 17], [1, int(pos[1]), 17]]
    assert torch.all(after[torch.arange(2), pos, 17] == 5.0)


def test_exact_patching_reruns_only_the_last_position_above_the_layer():
    """Patching the neuron at the last token moves nothing before it: one base forward of the patched texts
    (blocks ≤ L see full sequences once), then blocks L+1… see one position per (text, grid value) — plus the
    unpatched alternative and one pass for the first-order estimate's Jacobian."""
    model = load_model("nsr-tiny")
    cache = ActivationCache.build(model, load_corpus(n_texts=300), CacheSpec(layers=(1,)), progress=False)
    calls = {L: [] for L in range(4)}
    hooks = [model.hf.transformer.h[L].register_forward_hook(lambda m, i, o, L=L: calls[L].append(tuple(i[0].shape[:2])))
             for L in range(4)]
    try:
        r = run_trial(cache, model, TrialSpec(layer=1, neuron=4, training={"epochs": 2}, analysis={"n_grid": 5, "patch_texts": 40}))
    finally:
        for h in hooks:
            h.remove()
    T = max(len(cache.tokens[i]) for i in r.patch["text_id"].unique())
    assert calls[0] == calls[1] == [(40, T)]  # the base forward, once: no patch reaches blocks ≤ L
    assert calls[2] == calls[3] == [(40, T), (40, 1 + 5), (40, 1)]  # base; 5 grid values + unpatched; Jacobian
    assert len(r.patch) == 5 * 40 and r.patch["text_id"].nunique() == 40


def test_the_patch_slope_estimate_is_the_autograd_derivative_of_a_plain_hf_forward():
    """patch_slope_est = mean over the patching texts of d(probe prediction)/d(neuron at the last token),
    recomputed with transformers' GPT-2 and one forward hook on the MLP's down projection."""
    model = load_model("nsr-tiny")
    cache = ActivationCache.build(model, load_corpus(n_texts=300), CacheSpec(layers=(1,)), progress=False)
    hf = model.hf
    for head in ("regression", "classification"):
        spec = TrialSpec(layer=1, neuron=9, head=head, analysis={"patch_texts": 16, "n_grid": 3})
        r = run_trial(cache, model, spec)
        sample = r.preds.index[r.preds["split"] == "test"][:16].to_numpy()
        w, b = r.head["weight"].double(), r.head["bias"].double()
        grads = []
        for i in sample:
            ids = torch.tensor([cache.tokens[i]])
            leaf = {}

            def put(mod, args):
                x = args[0].clone()
                leaf["a"] = x[0, -1, 9].detach().clone().requires_grad_()
                x[0, -1, 9] = leaf["a"]
                return (x,)

            h = hf.transformer.h[1].mlp.c_proj.register_forward_pre_hook(put)
            try:
                f = hf(ids, output_hidden_states=True).hidden_states[-1][0, -1].double()  # ln_f's output
            finally:
                h.remove()
            out = f @ w.T + b
            if head == "regression":
                pred = float(r.head["mu"]) + float(r.head["sigma"]) * out[0]
            else:
                pred = torch.softmax(out, -1) @ r.head["bin_values"].double()
            grads.append(torch.autograd.grad(pred, leaf["a"])[0].item())
        assert r.metrics["patch_slope_est"] == pytest.approx(np.mean(grads), rel=1e-4, abs=1e-6), head


@pytest.mark.parametrize("features", ["blocks.1.ln2.hook_normalized", "blocks.0.hook_resid_post"])
def test_features_the_patch_cannot_reach_have_slope_and_estimate_exactly_zero(features):
    """Read before the neuron's MLP (inside its block, or in an earlier one): nothing can move them."""
    model = load_model("nsr-tiny")
    cache = ActivationCache.build(model, load_corpus(n_texts=200), CacheSpec(layers=(1,), features=features),
                                  progress=False)
    m = run_trial(cache, model, TrialSpec(layer=1, neuron=4, features={"hook": features}, analysis={"patch_texts": 8, "n_grid": 3})).metrics
    assert m["patch_slope_est"] == 0.0 and m["patch_slope"] == 0.0


def test_fit_patch_recovers_a_known_slope():
    rng = np.random.default_rng(0)
    rows = []
    for t in range(20):
        for g in np.linspace(-1, 2, 7):
            rows.append({"text_id": t, "delta_act": g, "delta_pred": 0.4 * g + 0.01 * rng.normal()})
    fit = A.fit_patch(pd.DataFrame(rows))
    assert fit["patch_slope"] == pytest.approx(0.4, abs=0.01) and fit["patch_r2"] > 0.99
    assert fit["patch_slope_text_std"] < 0.02


@pytest.mark.parametrize("n", [3, 45, 300])
def test_correlations_equal_scipys(n):
    """`analyses.pearson` (r and its p-value) and `prediction_metrics`' spearman_rho, computed without scipy's
    per-call overhead, equal scipy.stats.pearsonr and spearmanr — on a skewed, sparse target with ties."""
    from scipy import stats

    from nsr_sweep.core.metrics import prediction_metrics

    rng = np.random.default_rng(n)
    for _ in range(50):
        act = np.maximum(rng.normal(size=n) - 1.0, 0.0) + 1e-3 * rng.integers(0, 2, size=n)  # zeros and ties
        act[0] = 1.5  # never constant
        pred = np.round(0.5 * act + rng.uniform(0.01, 2.0) * rng.normal(size=n), 1)
        if pred.std() == 0:
            continue
        r, p = A.pearson(act, pred)
        ref = stats.pearsonr(act, pred)
        assert r == pytest.approx(ref[0], abs=1e-14) and p == pytest.approx(ref[1], rel=1e-9, abs=1e-300)
        rho = prediction_metrics(pred, act, 0.0)["spearman_rho"]
        assert rho == pytest.approx(stats.spearmanr(pred, act)[0], abs=1e-14)
    assert np.isnan(A.pearson(np.ones(5), np.arange(5.0))).all()
    r, p = A.pearson(np.arange(10.0), 2 * np.arange(10.0) + 1)
    assert r == 1.0 and p == 0.0  # exact: scipy rounds to 0.9999999999999998 with p 1e-8
