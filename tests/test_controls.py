"""Known answers at default settings, controls that mean one thing each, and honest intervals.

Every number is checked against an independent computation: plain `transformers` forwards,
numpy least squares, scipy's L-BFGS, or a simulation whose true value is known.
"""

from collections import Counter

import numpy as np
import pytest
import torch

from nsr_sweep.core.cache import ActivationCache, CacheSpec
from nsr_sweep.core.corpus import load_corpus
from nsr_sweep.core.errors import NsrError
from nsr_sweep.core.fit import fit_probes, solve_logistic, train_model
from nsr_sweep.core.models import load_model
from nsr_sweep.core.spec import TrialSpec, parse_sweep
from nsr_sweep.core.trial import bag_of_tokens, recipe, run_trial, run_trials, split_indices
from nsr_sweep.sweep.inputs import aligned_tokens, cross_model_inputs

VAL_KEYS = {"epoch", "val_mse", "val_loss", "val_pearson_r", "val_skill"}


@pytest.fixture(scope="module")
def tiny():
    return load_model("nsr-tiny")


@pytest.fixture(scope="module")
def sibling():
    return load_model("nsr-tiny-seed1")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()  # the default corpus: 2000 texts


def _cache(model, corpus, **kw):
    return ActivationCache.build(model, corpus, CacheSpec(**kw), progress=False)


# -- known answers at default training settings -----------------------------------------------


@pytest.mark.slow
def test_a_probe_on_the_neurons_own_layer_finds_it_and_reads_it(tiny, corpus):
    """Features blocks.2.mlp.hook_post contain the neuron itself: r > 0.999, patch slope 1 ± 0.02, every neuron."""
    cache = _cache(tiny, corpus, layers=(2,), features="blocks.2.mlp.hook_post")
    neurons = [40, 7] + [n for n, _ in cache.top_neurons(2, "variance", 3)]
    for n in neurons:
        m = run_trial(cache, tiny, TrialSpec(layer=2, neuron=n, features={"hook": "blocks.2.mlp.hook_post"})).metrics
        assert m["pearson_r"] > 0.999 and abs(m["patch_slope"] - 1) < 0.02, (n, m["pearson_r"], m["patch_slope"])
        assert m["solver"] == "ridge" and m["converged"] is True
        assert m["patch_slope_lo"] <= m["patch_slope"] <= m["patch_slope_hi"]
        s = run_trial(cache, tiny, TrialSpec(layer=2, neuron=n, control="shuffled", features={"hook": "blocks.2.mlp.hook_post"})).metrics
        assert abs(s["pearson_r"]) < 0.1 and abs(s["patch_slope"]) < 0.05, (n, s["pearson_r"], s["patch_slope"])


@pytest.mark.slow
def test_an_exactly_linear_target_is_predicted_exactly(tiny, corpus):
    """hook_pre = LN2(x)·W_in + b: a probe on blocks.1.ln2.hook_normalized has r > 0.9999 at default settings."""
    cache = _cache(tiny, corpus, layers=(1,), hook="pre", features="blocks.1.ln2.hook_normalized")
    for n in [40, 7, 300]:
        m = run_trial(cache, tiny, TrialSpec(layer=1, neuron=n, features={"hook": "blocks.1.ln2.hook_normalized"})).metrics
        assert m["pearson_r"] > 0.9999, (n, m["pearson_r"])


@pytest.mark.slow
def test_shuffled_control_at_default_features_reads_nothing(tiny, corpus):
    cache = _cache(tiny, corpus, layers=(2,))
    for n, _ in cache.top_neurons(2, "variance", 3):
        for head in ("regression", "classification"):
            s = run_trial(cache, tiny, TrialSpec(layer=2, neuron=n, head=head, control="shuffled")).metrics
            assert abs(s["pearson_r"]) < 0.1 and abs(s["patch_slope"]) < 0.05, (n, head, s)


# -- controls: one meaning each ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tiny):
    cache = ActivationCache.build(tiny, load_corpus(n_texts=300, seed=0), CacheSpec(layers=(2,), store_resid=True,
                                                                                    max_tokens=32), progress=False)
    return cache, cache.top_neurons(2, "variance", 1)[0][0]


@pytest.mark.parametrize("freeze", ["none", "after_target"])
def test_shuffled_rows_refer_to_the_real_neuron(tiny, small, freeze):
    """drift exactly 0, identity_r equal to the real trial's, patching based at the real activation, _ft null."""
    cache, n = small
    kw = dict(layer=2, neuron=n, freeze=freeze, training={"epochs": 2, "batch_size": 32}, analysis={"patch_texts": 16})
    real = run_trial(cache, tiny, TrialSpec(**kw))
    shuf = run_trial(cache, tiny, TrialSpec(**kw, control="shuffled"))
    acts = cache.activations(2, n)
    assert shuf.metrics["drift"] == 0.0 and real.metrics["drift"] == 0.0
    assert shuf.metrics["identity_r"] == real.metrics["identity_r"]
    pts = shuf.patch
    # based at the real activation, as the patched forward itself reads it (the cache read it in other batches)
    np.testing.assert_allclose(pts["act_base"].to_numpy(), acts[pts["text_id"].to_numpy()], rtol=0, atol=1e-6)
    assert np.isnan(shuf.metrics["pearson_r_ft"]) and not np.isnan(real.metrics["pearson_r_ft"])
    assert not np.array_equal(shuf.preds["actual_orig"], acts)  # the target itself is what is permuted


def test_aligned_tokens_read_the_same_characters(tiny, sibling, small):
    cache, _ = small
    other = aligned_tokens(tiny, sibling, cache.tokens)
    assert other != cache.tokens  # the sibling's tokenizer differs
    for mine, theirs in zip(cache.tokens, other):
        assert theirs[0] == sibling.tokenizer.bos_token_id
        assert sibling.tokenizer.decode(theirs[1:]) == tiny.tokenizer.decode(mine[1:])


def test_a_text_the_other_model_cannot_read_whole_is_refused_before_ray():
    """Re-encoded by nsr-tiny-seed1, a few of the 2,000 default texts at 256 tokens pass its 256 positions: the
    other model would not see the target token, so the sweep is refused (with the count), never truncated."""
    from nsr_sweep.core.cache import encode
    from nsr_sweep.sweep.inputs import check_cross_model, realigned

    def spec(max_tokens):
        return parse_sweep({"name": "x", "layers": [1], "neurons": [3], "heads": ["regression"], "freeze": ["none"],
                            "corpus": {"n_texts": 2000, "max_tokens": max_tokens},
                            "controls": [{"cross_model": "nsr-tiny-seed1"}]})

    tiny, sib = load_model("nsr-tiny"), load_model("nsr-tiny-seed1")
    seqs = encode(tiny.tokenizer, load_corpus(n_texts=2000).texts, 256)[0]
    over = sum(len(q) > sib.hf.config.n_positions for q in realigned(tiny.tokenizer, sib.tokenizer, seqs))
    assert over > 0
    with pytest.raises(NsrError, match=rf"cross_model: {over} of 2000 texts .* lower corpus.max_tokens"):
        check_cross_model(spec(256))
    check_cross_model(spec(64))  # every text fits


def test_cross_model_features_are_the_other_models_final_residual(tiny, sibling, small):
    """Independent: a plain HF forward of the sibling, text by text, last hidden state (after ln_f) at the last token."""
    cache, _ = small
    got = cross_model_inputs(tiny, sibling, cache.tokens[:12], "ln_final.hook_out")
    for i in range(12):
        ids = got["cross_model_tokens"][i]
        ids = torch.as_tensor(ids[ids >= 0])[None]
        with torch.no_grad():
            h = sibling.hf(ids, output_hidden_states=True).hidden_states[-1][0, -1]
        np.testing.assert_allclose(got["cross_model_features"][i], h.numpy(), atol=1e-4)


@pytest.mark.parametrize("head, freeze", [("regression", "none"), ("regression", "all"), ("token", "all")])
def test_cross_model_trial_predicts_this_models_neuron_with_the_other_model(tiny, sibling, small, head, freeze):
    cache, n = small
    cache.extra.update(cross_model_inputs(tiny, sibling, cache.tokens, "ln_final.hook_out"))
    spec = TrialSpec(layer=2, neuron=n, head=head, freeze=freeze, control="cross_model", cross_model="nsr-tiny-seed1", training={"epochs": 1, "batch_size": 32})
    if freeze == "all":  # it fine-tunes the other model; a probe reads its cached features
        with pytest.raises(NsrError, match="needs the other model"):
            run_trial(cache, tiny, spec)
    r = run_trial(cache, tiny, spec, outsider=sibling)
    assert r.status == "ok"
    np.testing.assert_array_equal(r.preds["actual_orig"], cache.activations(2, n).astype(np.float64))
    assert r.metrics["drift"] == 0.0 and "cos_win" not in r.metrics  # the other model has no such neuron
    assert r.metrics["patch_slope"] == 0.0 and r.patch is None  # … and patching this one cannot move it
    if freeze == "none":  # a probe on the sibling's features: equal to one fitted here by hand
        fit = fit_probes(cache.extra["cross_model_features"], cache.activations(2, n)[:, None].astype(np.float64),
                         head, recipe(spec), split_indices(cache.n_texts))
        pred = fit.maps[0].predict(fit.head(0)(torch.as_tensor(cache.extra["cross_model_features"])))
        np.testing.assert_allclose(r.preds["pred"], pred.numpy(), atol=1e-6)


def test_cross_model_accompanies_none_and_all_only():
    spec = parse_sweep({"name": "x", "layers": [1], "neurons": [3], "heads": ["regression", "token"],
                        "freeze": ["none", "after_target", "all"],
                        "controls": [{"cross_model": "nsr-tiny-seed1"}, "input_only"]})
    from nsr_sweep.sweep.grid import expand

    groups = expand(spec, {1: [3]})
    cross = {(g.head, g.freeze) for g in groups if g.control == "cross_model"}
    assert cross == {("regression", "none"), ("regression", "all"), ("token", "all")}
    assert all(g.cross_model == "nsr-tiny-seed1" for g in groups if g.control == "cross_model")
    text = [g for g in groups if g.control == "input_only"]
    assert [(g.head, g.freeze) for g in text] == [("regression", "none")]
    with pytest.raises(ValueError, match="freeze in none, all"):
        TrialSpec(layer=1, neuron=3, freeze="after_target", control="cross_model", cross_model="nsr-tiny-seed1")


def test_bag_of_tokens_counts_the_text_and_its_last_tokens():
    seqs = [[5, 9, 9, 2], [9, 7], [3]]
    X = bag_of_tokens(seqs)
    vocab = sorted({t for q in seqs for t in q})
    V = len(vocab)
    for row, q in zip(X, seqs):
        c = Counter(q)
        assert [row[i] for i in range(V)] == [c[t] for t in vocab]
        assert row[V + vocab.index(q[-1])] == 1 and row[V:2 * V].sum() == 1
        assert row[2 * V:].sum() == (1 if len(q) > 1 else 0)


def test_input_only_never_runs_a_transformer(small):
    cache, n = small
    r = run_trial(cache, None, TrialSpec(layer=2, neuron=n, control="input_only"))
    assert r.status == "ok" and r.metrics["solver"] == "ridge" and r.metrics["drift"] == 0.0
    assert -0.5 < r.metrics["pearson_r"] < 1 and r.metrics["patch_slope"] == 0.0  # token counts: no path from the neuron


# -- solvers and records ----------------------------------------------------------------------


def test_logistic_probe_converges_to_scipys_optimum():
    """solve_logistic = scipy on the same problem, computed here from scratch: the ridge readout (numpy, at
    each λ of RIDGE_GRID, chosen on validation under the tie rule), standardised on train; then for every L2
    strength the multinomial logistic regression of the bins on it (scipy L-BFGS, out_k = a_k·ŝ + b_k, mean
    cross-entropy + l2/2·|a|²); the strength chosen under the tie rule; the head a ⊗ readout."""
    from scipy.optimize import minimize
    from scipy.special import logsumexp, softmax

    from nsr_sweep.core.fit import L2_GRID, RIDGE_GRID, TIE

    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 6)) * np.array([1, 10, 0.1, 1, 1, 3])
    X[:, 3] += X[:, 0]  # correlated features
    y = (X[:, 0] + 0.2 * X[:, 1] + rng.normal(size=600))[:, None]
    splits = split_indices(600)
    fit = solve_logistic(X, y, "classification", 4, splits)
    info = fit.info[0]
    assert info["converged"] and info["grad_max"] <= 1e-10 and info["rank"] == 6
    tr, va = splits["train"], splits["val"]
    yt, yv, k = y[tr, 0], y[va, 0], 4
    base = np.mean((yt.mean() - yv) ** 2)
    m = X[tr].mean(0)
    Xc = X[tr] - m
    z = (yt - yt.mean()) / yt.std()
    s1 = np.linalg.svd(Xc, compute_uv=False)[0]
    ridge = [np.linalg.solve(Xc.T @ Xc + rel * s1**2 * np.eye(6), Xc.T @ z) for rel in RIDGE_GRID]
    val = np.array([np.mean(((X[va] - m) @ w * yt.std() + yt.mean() - yv) ** 2) for w in ridge])
    w = ridge[int(np.argmax(val <= val.min() + TIE * base))]  # ties: the weakest λ
    assert info["readout_l2_relative"] == RIDGE_GRID[int(np.argmax(val <= val.min() + TIE * base))]
    sd = ((X[tr] - m) @ w).std()
    s_tr, s_va = (X[tr] - m) @ w / sd, (X[va] - m) @ w / sd
    lab, values = fit.maps[0].labels(yt), fit.maps[0].values

    def f(theta, l2):
        out = s_tr[:, None] * theta[:k] + theta[k:]
        return np.mean(logsumexp(out, 1) - out[np.arange(len(lab)), lab]) + l2 / 2 * (theta[:k] ** 2).sum()

    path, theta = [], np.zeros(2 * k)
    for l2 in L2_GRID:
        theta = minimize(f, theta, args=(l2,), method="L-BFGS-B",
                         options={"gtol": 1e-12, "ftol": 1e-16, "maxiter": 10000}).x
        path.append((theta, np.mean((softmax(s_va[:, None] * theta[:k] + theta[k:], 1) @ values - yv) ** 2)))
    val = np.array([v for _, v in path])
    c = len(val) - 1 - int(np.argmax((val <= val.min() + TIE * base)[::-1]))  # ties: the weakest strength
    assert info["l2"] == L2_GRID[c]
    a_ref, b_ref = path[c][0][:k], path[c][0][k:]
    W_ref = np.outer(a_ref, w / sd)  # the head on the raw features: out = x·Wᵀ + b
    np.testing.assert_allclose(fit.weight[0].double().numpy(), W_ref, rtol=1e-4, atol=1e-5)
    p_ref = softmax((X - m) @ W_ref.T + b_ref, 1)
    p = torch.softmax(torch.as_tensor(X) @ fit.weight[0].double().T + fit.bias[0].double(), -1).numpy()
    np.testing.assert_allclose(p, p_ref, atol=1e-5)


def test_probes_fitted_together_equal_each_fitted_alone(small):
    """Every neuron's probe is what it would be alone (≤ 1e-6 on every prediction), for both solvers. Of the
    solver's record only what is robust to the last bits of a BLAS build is compared: the strengths chosen
    (ties within fit.TIE, far above rounding), the rank and convergence — not iterations or max|grad|."""
    cache, _ = small
    Y = np.asarray(cache.acts[2][:, :12], np.float64)
    splits = split_indices(cache.n_texts)
    X = torch.as_tensor(cache.features, dtype=torch.float32)
    robust = ("solver", "l2", "l2_relative", "readout_l2_relative", "rank")
    for head in ("regression", "classification"):
        together = fit_probes(cache.features, Y, head, recipe(TrialSpec(layer=2, neuron=0, head=head)), splits)
        for j in (0, 5, 11):
            alone = fit_probes(cache.features, Y[:, [j]], head, recipe(TrialSpec(layer=2, neuron=j, head=head)), splits)
            a = alone.maps[0].predict(alone.head(0)(X))
            t = together.maps[j].predict(together.head(j)(X))
            assert float((a - t).abs().max()) <= 1e-6, (head, j)
            assert alone.info[0]["converged"] and together.info[j]["converged"]
            assert {k: v for k, v in alone.info[0].items() if k in robust} == \
                {k: v for k, v in together.info[j].items() if k in robust}
            assert alone.history[0] == [pytest.approx(h, rel=1e-6) for h in together.history[j]]


def test_a_unit_gives_each_probe_its_alone_result(tiny, small):
    """run_trials on a unit — several neurons of a layer, both heads, real and shuffled, input-only — every
    metric, prediction and patching point of every probe equal (≤ 1e-6) to run_trial on that probe alone."""
    cache, _ = small
    specs = [TrialSpec(layer=2, neuron=n, head=h, control=c, sample=100 + n, analysis={"patch_texts": 12, "n_grid": 3})
             for n in (3, 300, 511) for h in ("regression", "classification") for c in (None, "shuffled")]
    specs.append(TrialSpec(layer=2, neuron=40, control="input_only", analysis={"patch_texts": 12, "n_grid": 3}))
    together = run_trials(cache, tiny, specs)
    for spec, t in zip(specs, together):
        alone = run_trial(cache, tiny, spec)
        assert t.status == alone.status == "ok"
        timing = {"seconds", "train_seconds", "patch_seconds"}
        assert set(t.metrics) == set(alone.metrics)
        for k in set(t.metrics) - timing:
            a, b = alone.metrics[k], t.metrics[k]
            if isinstance(a, float) and not (np.isnan(a) and np.isnan(b)):
                assert b == pytest.approx(a, rel=1e-6, abs=1e-9), (spec.neuron, k)
            elif not isinstance(a, float):
                assert a == b, (spec.neuron, k)
        np.testing.assert_allclose(t.preds["pred"], alone.preds["pred"], rtol=1e-6, atol=1e-9)
        if spec.control == "input_only":
            assert t.patch is None and t.metrics["patch_slope"] == 0.0  # no path from the neuron to token counts
        else:
            np.testing.assert_allclose(t.patch["delta_pred"], alone.patch["delta_pred"], rtol=1e-6, atol=1e-9)
    with pytest.raises(NsrError, match="share"):
        run_trials(cache, tiny, [specs[0], TrialSpec(layer=2, neuron=5, head="regression", analysis={"patch_texts": 13})])


def test_a_neuron_with_non_finite_targets_fails_alone_in_its_batch(small):
    cache, _ = small
    Y = np.asarray(cache.acts[2][:, :3], np.float64).copy()
    Y[5, 1] = np.nan
    splits = split_indices(cache.n_texts)
    fit = fit_probes(cache.features, Y, "regression", recipe(TrialSpec(layer=2, neuron=0)), splits)
    assert fit.failed[1] and fit.failed[0] is None and fit.failed[2] is None
    alone = fit_probes(cache.features, Y[:, [2]], "regression", recipe(TrialSpec(layer=2, neuron=2)), splits)
    assert torch.allclose(alone.weight[0], fit.weight[2], rtol=1e-5, atol=1e-7)


def test_every_validation_record_carries_every_val_metric(tiny, small):
    cache, n = small
    y = cache.activations(2, n)[:, None].astype(np.float64)
    splits = split_indices(cache.n_texts)
    for head in ("regression", "classification"):
        for solver in ("exact", "adamw"):
            hist = fit_probes(cache.features, y, head, recipe(TrialSpec(layer=2, neuron=n, head=head, training={"solver": solver, "epochs": 2})), splits).history[0]
            assert hist and all(set(h) == VAL_KEYS for h in hist)
    r = run_trial(cache, tiny, TrialSpec(layer=2, neuron=n, freeze="after_target", training={"epochs": 2}, analysis={"enabled": False}))
    assert len(r.history) == 2 and all(set(h) == VAL_KEYS for h in r.history)
    assert train_model  # the unfrozen path above is train_model's


def test_asha_needs_a_scale_free_metric():
    base = {"name": "x", "layers": [1], "neurons": [3], "heads": ["regression"], "freeze": ["all"]}
    with pytest.raises(NsrError, match="scale-free metric: allowed val_pearson_r, val_skill"):
        parse_sweep({**base, "search": {"scheduler": "asha", "metric": "val_mse", "mode": "min"}})
    parse_sweep({**base, "search": {"scheduler": "asha", "metric": "val_pearson_r", "mode": "max"}})
