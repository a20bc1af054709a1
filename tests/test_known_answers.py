"""Known answers for every probe of a layer, each checked against an independent numpy/scipy computation.

- A classification probe whose features contain its neuron reads the neuron: its test r is at least the
  *binning ceiling* (the test-split correlation of a neuron with its own bin value, `values[labels(y)]`:
  what a perfect classifier scores) less 0.02, its readout lies on the neuron's own coordinate, and its
  exact patch slope is that of the best prediction a binned head can make from the neuron (the neuron
  clipped to [first bin value, last bin value]), within 0.1.
- Its shuffled control reads nothing: r is at chance.
- Ridge on a LayerNorm's output drops the degenerate direction (rank d − 1) and puts no weight on it.
- Token heads bin as classification with K = 10: a perfect digit answer scores the ceiling, and a perfect
  staircase's patch slope is the population slope of the staircase (computed here by quadrature).

Patch slopes here need no forward pass: the features are `blocks.2.mlp.hook_post` at the last token, so
patching neuron n to g replaces coordinate n of the features by g (grid: the train quantiles at k/8,
k = 1…7; the first 64 test texts; Δpred = slope·Δact + b over texts × grid, `analyses.fit_patch`'s slope).
"""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from nsr_sweep.core.cache import ActivationCache, CacheSpec
from nsr_sweep.core.corpus import load_corpus
from nsr_sweep.core.fit import RANK_CUTOFF, _ridge, fit_probes
from nsr_sweep.core.heads import HeadMap
from nsr_sweep.core.models import load_model
from nsr_sweep.core.spec import TrialSpec
from nsr_sweep.core.trial import recipe, shuffled_target, split_indices

N_GRID, PATCH_TEXTS = 7, 64  # the defaults: patch_grid quantiles, n_grid 7, patch_texts 64
HELD_OUT = 8000  # texts added to the test split only: a null r's SD is then ≤ 1/√8000 = 0.011


def with_held_out(n: int, n_held: int = HELD_OUT) -> dict:
    """The default split of the first n texts, its test split extended by the next n_held texts (never fitted).
    The probes are those of the default split; only the test estimates get n_held more texts."""
    splits = split_indices(n)
    return {**splits, "test": np.r_[splits["test"], np.arange(n, n + n_held)]}


def quantile_bins(y_train: np.ndarray, k: int):
    """Bins computed here with numpy: edges at the train quantiles, a bin's value its train mean."""
    edges = np.quantile(y_train, np.linspace(0, 1, k + 1))
    lab = lambda y: np.clip(np.digitize(y, edges[1:-1], right=False), 0, k - 1)  # noqa: E731
    mids = (edges[:-1] + edges[1:]) / 2  # an empty bin (tied quantiles): its midpoint, as HeadMap documents
    values = np.array([y_train[lab(y_train) == j].mean() if (lab(y_train) == j).any() else mids[j] for j in range(k)])
    return lab, values


def ceiling(y: np.ndarray, splits: dict, k: int = 10) -> float:
    lab, values = quantile_bins(y[splits["train"]], k)
    te = splits["test"]
    return float(np.corrcoef(values[lab(y[te])], y[te])[0, 1])


def linear(X: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """X·Wᵀ + b, without a BLAS thread pool (small products, many of them, on a shared machine)."""
    return np.einsum("td,kd->tk", X, W) + b


def softmax_pred(out: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = out - out.max(-1, keepdims=True)
    p = np.exp(out)
    return (p / p.sum(-1, keepdims=True)) @ values


def patch_points(predict, x_base: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Δact, Δpred) over texts × grid for `predict(values of the neuron) -> prediction` (the neuron is all
    it varies)."""
    base = predict(x_base)
    return (np.concatenate([g - x_base for g in grid]),
            np.concatenate([predict(np.full(len(x_base), g)) - base for g in grid]))


def patch_slope(points: tuple[np.ndarray, np.ndarray]) -> float:
    """Δpred = slope·Δact + b over every (text, grid value) point: `analyses.fit_patch`'s slope."""
    return float(np.polyfit(points[0], points[1], 1)[0])


def exact_patch_slope(W, b, values, X, n, grid, texts) -> float:
    """Patch coordinate n of the features (the neuron itself) to each grid value; numpy softmax."""
    def predict(x_n):
        Xp = X[texts].copy()
        Xp[:, n] = x_n
        return softmax_pred(linear(Xp, W, b), values)
    return patch_slope(patch_points(predict, X[texts, n], grid))


def clipped_slope(y, values, grid, texts) -> float:
    """The slope of the best prediction a binned head can make from the neuron: clip(y, v₀, v_K−1)."""
    clip = lambda x: np.clip(x, values[0], values[-1])  # noqa: E731
    return patch_slope(patch_points(clip, y[texts], grid))


def layer_known_answers(X: np.ndarray, Y: np.ndarray, spec: TrialSpec, splits: dict):
    """Classification probes for every column of Y on features X ⊇ Y (column j of Y is feature j), real
    and shuffled (each neuron's target permuted by the pipeline's own `shuffled_target`), and the numbers of
    the known answers, per neuron (a DataFrame)."""
    X64, tr, te = np.asarray(X, np.float64), splits["train"], splits["test"]
    texts = te[:PATCH_TEXTS]
    Yp = np.stack([shuffled_target(Y[:, j], spec.model_copy(update={"neuron": j})) for j in range(Y.shape[1])], 1)
    real = fit_probes(X, Y, "classification", recipe(spec), splits)
    shuf = fit_probes(X, Yp, "classification", recipe(spec), splits)
    rows = []
    for j in range(Y.shape[1]):
        y = Y[:, j]
        lab, values = quantile_bins(y[tr], 10)
        np.testing.assert_allclose(real.maps[j].values, values, rtol=1e-12, atol=1e-15)
        grid = np.quantile(y[tr], (np.arange(N_GRID) + 1) / (N_GRID + 1))
        W, b = real.weight[j].double().numpy(), real.bias[j].double().numpy()
        pred = softmax_pred(linear(X64[te], W, b), values)
        off = np.delete(W, j, axis=1)
        ys = Yp[:, j]
        _, vs = quantile_bins(ys[tr], 10)
        Ws, bs = shuf.weight[j].double().numpy(), shuf.bias[j].double().numpy()
        pred_s = softmax_pred(linear(X64[te], Ws, bs), vs)
        rows.append({
            "neuron": j, "r": stats.pearsonr(pred, y[te])[0], "ceiling": ceiling(y, splits),
            "off_neuron": np.linalg.norm(off) / np.linalg.norm(W),
            "slope": exact_patch_slope(W, b, values, X64, j, grid, texts),
            "clipped_slope": clipped_slope(y, values, grid, texts),
            "r_shuffled": stats.pearsonr(pred_s, ys[te])[0],
            "slope_shuffled": exact_patch_slope(Ws, bs, vs, X64, j, grid, texts),  # the real neuron, patched
            "converged": real.info[j]["converged"] and shuf.info[j]["converged"],
        })
    return pd.DataFrame(rows)


def assert_known_answers(df: pd.DataFrame, n_test: int, slope_share: float):
    """The margins, with their reasons (measured on nsr-tiny layer 2, all 512 neurons, 8,225 test texts:
    r − ceiling ≥ +0.006, |slope − clipped slope| ≤ 0.1 for 501 of 512 and ≤ 0.151 for all; shuffled |r| ≤ 0.039,
    mean 0.0089 against the null's 0.0088)."""
    assert df.converged.all()
    gap = df.r - df.ceiling
    assert (gap >= -0.02).all(), df[gap < -0.02]
    assert (df.off_neuron <= 1e-6).all(), df.off_neuron.max()  # the readout is the neuron alone
    dev = (df.slope - df.clipped_slope).abs()
    assert (dev <= 0.2).all(), df[dev > 0.2]
    assert (dev <= 0.1).mean() >= slope_share, df[dev > 0.1]
    known = (gap >= -0.02) & (dev <= 0.15)  # the binned-head known answer (docs/science.md), for ≥ 99% of neurons
    assert known.mean() >= 0.99, df[~known]  # the rest: a smoothed staircase (the strongest L2 chosen on validation)
    # Shuffled: under the null each r is ~ N(0, 1/n_test) (SD 0.067 at 225 test texts), so among 512 neurons
    # a few |r| pass 0.2 by chance; their mean |r| is √(2/π)/√n_test (0.053), not 0. Neurons share the one
    # permutation and are correlated, so the mean varies more than for independent draws: ± 30% allowed.
    null = np.sqrt(2 / np.pi) / np.sqrt(n_test)
    assert df.r_shuffled.notna().all()
    assert 0.7 * null <= df.r_shuffled.abs().mean() <= 1.3 * null, (df.r_shuffled.abs().mean(), null)
    # with thousands of test texts 0.1 is ≥ 8 null SDs: every neuron's |r| < 0.1, or the control read something
    assert (df.r_shuffled.abs() < 0.1).all(), df[df.r_shuffled.abs() >= 0.1]
    # its patch slope is fitting noise around 0 (layer 2: mean −0.0003, SD 0.009; the largest, −0.19, a sparse
    # neuron's whose few active train texts the permuted probe fits); a probe that read the neuron would have ~0.9
    slopes = df.slope_shuffled
    assert abs(slopes.mean()) < 0.005 and (slopes.abs() <= 0.05).mean() >= 0.99 and slopes.abs().max() < 0.3, slopes


# -- the layer: every neuron of nsr-tiny layer 2 on its own features -----------------------------------


@pytest.mark.slow
def test_every_classification_probe_of_a_layer_reads_its_neuron():
    """All 512 neurons of nsr-tiny layer 2, features blocks.2.mlp.hook_post (the neuron is feature n),
    1,500 texts split by default, default settings; the test split then gets 8,000 more texts that no probe
    fits (`with_held_out`), so that test r resolves 0.1. The binned head's prediction cannot leave [v₀, v₉]
    (the first and last bin values), so its patch slope is not 1 for a neuron with heavy tails: patching a text
    whose activation lies far above v₉ moves the prediction by g − v₉, not g − act. The reference is therefore
    the slope of clip(act, v₀, v₉) (measured: median 0.885, 0.19–1.0; a hard staircase: median 0.89,
    0.21–1.38, within 1 ± 0.1 for only 45% of neurons). The probe's slope: median 0.87, within 0.1 of the
    clipped slope for 97.9% of neurons; the rest chose the strongest L2 any neuron chose (0.01, a smoothed
    staircase) or have a staircase that jumps at a grid value. Shuffled (each neuron's target permuted by
    `shuffled_target`): under the null test r has SD 1/√n_test — 0.067 at a default split's 225 test texts, where
    a few of 512 neurons pass |r| = 0.1 by chance; 0.011 at 8,225, where |r| < 0.1 holds for every neuron
    (measured: max 0.039) and the mean |r| is the null's √(2/π)/√n_test (0.0089 against 0.0088)."""
    model = load_model("nsr-tiny")
    cache = ActivationCache.build(model, load_corpus(n_texts=1500 + HELD_OUT, seed=2),
                                  CacheSpec(layers=(2,), features="blocks.2.mlp.hook_post", max_tokens=48),
                                  progress=False)
    Y = np.asarray(cache.acts[2], np.float64)
    np.testing.assert_array_equal(np.asarray(cache.features, np.float64), Y)  # feature n is neuron n
    splits = with_held_out(1500)  # load_corpus keeps a prefix: the first 1,500 texts, split as a sweep would
    spec = TrialSpec(layer=2, neuron=0, head="classification", features={"hook": "blocks.2.mlp.hook_post"})
    df = layer_known_answers(cache.features, Y, spec, splits)
    assert len(df) == 512
    assert_known_answers(df, len(splits["test"]), slope_share=0.97)


# -- the same, small: a synthetic layer ---------------------------------------------------------------


def synthetic_layer(n: int = 800, d_in: int = 48, width: int = 192, seed: int = 0,
                    held_out: int = HELD_OUT) -> np.ndarray:
    """A GELU layer on a d_in-dimensional input: `width` neurons, each predictable from the others; n rows, then
    `held_out` more rows of the same layer (their inputs from a second stream, so the first n do not change)."""
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(n, d_in))
    weight, bias = rng.normal(size=(d_in, width)) / np.sqrt(d_in), rng.normal(size=width) * 0.5 - 0.5
    inputs = np.concatenate([inputs, np.random.default_rng([seed, 1]).normal(size=(held_out, d_in))])
    pre = inputs @ weight + bias
    return (pre * stats.norm.cdf(pre)).astype(np.float32)


def test_classification_probes_on_a_synthetic_layer_read_their_neurons():
    """The layer test, small: 48 neurons of a 192-wide synthetic GELU layer, 800 texts (its features
    as wide as half the train texts, as nsr-tiny's 512 are of 1,050: the regime in which an L2 penalty
    on whitened features overfits — the solver before this one scored r − ceiling ≈ −0.09 and slope 0.46
    here)."""
    X = synthetic_layer()
    splits = with_held_out(800)
    df = layer_known_answers(X, X[:, :48].astype(np.float64), TrialSpec(layer=0, neuron=0, head="classification"),
                             splits)
    assert_known_answers(df, len(splits["test"]), slope_share=0.9)


# -- ridge: LayerNorm's degenerate direction ---------------------------------------------------------


@pytest.mark.slow
def test_ridge_drops_the_layernorm_direction_for_every_neuron():
    """ln_final.hook_out of nsr-tiny (width 128) spans 127 dimensions: the 128th singular value of the
    centred train features is float32 rounding (~2e-8·s₁). Every neuron's ridge probe has rank 127 and no
    weight along that direction (float64 solution: 1e-9 relative; the stored float32 weight: rounding),
    and its λ is the one numpy's ridge (λ = 0: least squares with singular values below RANK_CUTOFF·s₁
    cut) gives under the tie rule."""
    model = load_model("nsr-tiny")
    cache = ActivationCache.build(model, load_corpus(n_texts=1500, seed=2), CacheSpec(layers=(2,), max_tokens=48),
                                  progress=False)
    X = np.asarray(cache.features, np.float64)
    Y = np.asarray(cache.acts[2], np.float64)
    splits = split_indices(cache.n_texts)
    tr, va = splits["train"], splits["val"]
    Xc = X[tr] - X[tr].mean(0)
    _, s, Vt = np.linalg.svd(Xc, full_matrices=False)
    assert s[-1] / s[0] < 1e-7 < s[-2] / s[0]
    v = Vt[-1]  # the degenerate direction
    fit = fit_probes(cache.features, Y, "regression", recipe(TrialSpec(layer=2, neuron=0)), splits)
    assert all(i["rank"] == 127 for i in fit.info)
    W32 = fit.weight[:, 0].double().numpy()
    assert np.max(np.abs(W32 @ v) / np.linalg.norm(W32, axis=1)) < 1e-7  # float32 storage
    _, W64, *_ = _ridge(torch.as_tensor(X), Y, splits)
    W64 = W64.numpy().T
    np.testing.assert_allclose(W64 - np.outer(W64 @ v, v), W64, rtol=0, atol=1e-9 * np.linalg.norm(W64, axis=1).max())
    assert np.max(np.abs(W64 @ v) / np.linalg.norm(W64, axis=1)) < 1e-9
    # λ: numpy's ridge at every candidate, the tie rule applied here
    from nsr_sweep.core.fit import RIDGE_GRID, TIE

    mu, sd = Y[tr].mean(0), Y[tr].std(0)
    Zc = (Y[tr] - mu) / sd
    Zc = Zc - Zc.mean(0)
    val = []
    for rel in RIDGE_GRID:
        if rel == 0:
            B = np.linalg.lstsq(Xc, Zc, rcond=RANK_CUTOFF)[0]
        else:
            B = np.linalg.solve(Xc.T @ Xc + rel * s[0] ** 2 * np.eye(X.shape[1]), Xc.T @ Zc)
        pred = ((X[va] - X[tr].mean(0)) @ B + ((Y[tr] - mu) / sd).mean(0)) * sd + mu
        val.append(((pred - Y[va]) ** 2).mean(0))
    val = np.array(val)
    base = ((Y[va] - mu) ** 2).mean(0)
    expect = np.argmax(val <= val.min(0) + TIE * base, 0)  # the first (weakest) of the ties
    got = np.array([RIDGE_GRID.index(i["l2_relative"]) for i in fit.info])
    assert (got == expect).mean() >= 0.99, np.nonzero(got != expect)  # near-ties may flip at the TIE boundary
    assert np.abs(W32).max() < 100  # no rounding direction: weights of the features' own scale


# -- token heads: the same bins, K = 10 --------------------------------------------------------------


def test_a_perfect_digit_answer_scores_the_binning_ceiling():
    """Token heads bin as classification with K = 10 (whatever n_bins says). A model that puts all its
    digit probability on the true bin predicts that bin's value, so its r is the ceiling."""
    rng = np.random.default_rng(0)
    y = np.concatenate([rng.gamma(0.5, size=3000) - 0.2, np.full(500, -0.17)])  # skewed, ties at the floor
    rng.shuffle(y)
    splits = split_indices(len(y))
    tr, te = splits["train"], splits["test"]
    h = HeadMap("token", y[tr], n_bins=4)
    assert h.n_out == 10
    lab, values = quantile_bins(y[tr], 10)
    np.testing.assert_array_equal(h.labels(y), lab(y))
    logits = torch.as_tensor(1e3 * np.eye(10)[h.labels(y[te])])  # p = one-hot of the true bin
    pred = h.predict(logits).numpy()
    np.testing.assert_allclose(pred, values[lab(y[te])], rtol=0, atol=1e-12)
    assert np.corrcoef(pred, y[te])[0, 1] == pytest.approx(ceiling(y, splits), abs=1e-12)


def test_a_perfect_staircase_has_the_population_patch_slope():
    """A perfect staircase (pred = value of the activation's bin) on a standard normal neuron, patched to
    the default grid (train quantiles at k/8): its slope is 0.955 by quadrature — below 1 because the end
    bins' values (±1.75) sit inside their bins, so a text in a tail moves less than its activation. The
    measured slope over 64 000 texts (a HeadMap on 200 000 train draws) agrees to 0.01."""
    from scipy import integrate

    phi, Phi = stats.norm.pdf, stats.norm.cdf
    q = stats.norm.ppf(np.linspace(0, 1, 11))  # decile edges
    vals = (phi(q[:-1]) - phi(q[1:])) / (Phi(q[1:]) - Phi(q[:-1]))  # E[Y | bin]
    grid = stats.norm.ppf((np.arange(N_GRID) + 1) / (N_GRID + 1))
    stair = lambda x: vals[np.clip(np.searchsorted(q[1:-1], x, side="right"), 0, 9)]  # noqa: E731

    def moment(f):  # E over X ~ N(0, 1) of the mean over the grid of f(g, x)
        tot = 0.0
        for lo, hi in zip(q[:-1], q[1:]):  # piecewise smooth: integrate bin by bin
            a, b = max(lo, -9), min(hi, 9)
            tot += integrate.quad(lambda x: np.mean([f(g, x) for g in grid]) * phi(x), a, b)[0]
        return tot

    dx, dy = lambda g, x: g - x, lambda g, x: stair(g) - stair(x)  # noqa: E731
    mx, my = moment(dx), moment(dy)
    cov = moment(lambda g, x: dx(g, x) * dy(g, x)) - mx * my
    var = moment(lambda g, x: dx(g, x) ** 2) - mx**2
    population = cov / var
    assert 0.95 < population < 0.96  # ≈ 1, quantified: 0.955

    rng = np.random.default_rng(1)
    y_train = rng.normal(size=200_000)
    h = HeadMap("token", y_train)
    grid_emp = np.quantile(y_train, (np.arange(N_GRID) + 1) / (N_GRID + 1))
    staircase = lambda x: h.values[h.labels(x)]  # noqa: E731
    measured = patch_slope(patch_points(staircase, rng.normal(size=64_000), grid_emp))
    assert measured == pytest.approx(population, abs=0.01)
