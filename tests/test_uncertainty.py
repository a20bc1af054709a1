"""Intervals over test texts (jackknife-t), per-layer means, p-values and Benjamini–Hochberg.

The coverage study (slow tests below; the method comparison itself was run once, outside the suite)
-------------------------------------------------------------------------------------------------------
Each text has a latent z ~ N(0, 1); the neuron's activation is `actual = link(z)`; a predictor reads
w = z + σ·ε (ε ~ N(0, 1), independent per predictor and text):
  linear    a calibrated linear probe: E[actual] + β·w, β = cov(actual, w)/var(w) (× gain, + offset);
  binned    a binned head: K quantile bins of w, each predicting E[actual | bin] (a staircase);
  monotone  the link itself at w/√(1 + σ²).
Scenarios (self / other predictor; true values from 4·10⁶-text Monte-Carlo populations):
  normal     actual = z (bivariate normal r)       self linear σ=0.75 (r .80)  other linear σ=1.33 (r .60)
  gelu_skew  GELU(1.5z − 1): skew 3.2, kurt 12    self linear σ=0.5, gain .9, offset .02 (r .58)  other binned K=8 σ=0.5 (r .73)
  sparse80   GELU(3(z − 0.84)): 80% of texts in [−0.17, 0]   self monotone σ=0.5 (r .80)  other linear σ=0.5 (r .55)
  relu90     max(z − 1.28, 0): 90% exact zeros    self binned K=10 σ=0.3 (r .68)  other linear σ=0.3 (r .50)
  null_gap   sparse80 target, self and other the same linear probe σ=0.6 with independent noise (gap 0)
skill = 1 − MSE / MSE of a fixed train mean (the mean of 1,000 train texts, drawn per simulation; the true skill
is computed for that train mean). n = 45 and 300 test texts.

Method comparison (2,000 simulations per cell, B = 2,000, Monte-Carlo SE ≈ 0.5 points; an undefined interval
counts as a miss; 30 cells per size = 5 scenarios × {r self, r other, gap r, skill self, skill other, gap skill}):
                                                      n = 45: min, cells outside 93–97    n = 300: min, outside
  percentile bootstrap (what this module used)        80.7 (relu90 r self), 24/30         92.1, 2/30
  BCa, jackknife acceleration                         85.6 (sparse80 skill self), 23/30   92.3, 1/30
  bootstrap-t, Fisher z / log(1 − skill), delta SEs   80.7 (relu90 gap r), 14/30          91.2, 1/30
  symmetric bootstrap-t (same)                        84.8 (relu90 gap r), 13/30          93.7, 0/30
  Wald, Fisher z / log(1 − skill), delta SE, t(n−1)   80.7 (relu90 skill self), 23/30     92.8, 3/30
  jackknife-t, same scales, t(n − 1)                  88.8 (relu90 skill other), 9/30     93.7, 0/30
  jackknife-t, Satterthwaite df                       91.1 (relu90 skill other), 5/30     94.7, 0/30
  … and bias-corrected (chosen; 4,000 simulations)    91.0 (relu90 skill other), 5/30     94.7, 0/30
Tried on the chosen method at 45 texts (4,000 simulations; cells outside 93–97 of 30): skill df from the target's
kurtosis, min(Satterthwaite, 2n/(κ_y − 1)) 5; df from the baseline terms' kurtosis 8; geometric-mean df 5; a
second-order (Hall) skewness correction 5–13; infinitesimal-jackknife SE 9+ (r self 87–89 on the sparse targets);
half jackknife, half IJ variance 7; Fieller for skill's MSE ratio (unbounded in 28–77% of sparse sets) 5+; skill on
(1 − skill)^(1/3) or ^(1/2) instead of log 5; a double-bootstrap calibrated level (B = 200, where n_test_eff < 10)
5 and, with seeds shifted by 1, 7 (the over-covered gaps fixed, the sparse skill cells down to 89–92). Coverage of relu90 skill other by the number k of non-zero test
texts: 70% at k = 1, 86% at 2, 93–97% at 3–6, 87% at 7, 79% at 8, 56% at 10 — an error that depends on k in
both directions, which no one-sample quantile rule fits; its gap skill over-covers because the jackknife SE is
too large (95% of studentized errors within ±1.41). The same five cells fall outside with every seed shifted by 1.
The chosen method, 4,000 simulations per cell (asserted below; OUTSIDE lists the five cells out of 93–97) — since
issue 27 the gaps use MOVER (Zou 2007) from each predictor's own jackknife-t interval, chosen on the bundled model's
real neurons (benchmarks/coverage_real.py), where the symmetric jackknife-t gap missed one way (population above
the interval 7.6% of the time at 300 texts):
                 r self  r other  gap r  skill self  skill other  gap skill
  normal    45    95.8    96.3    96.3     95.6        95.3        95.5
  normal   300    95.0    95.0    95.1     95.0        94.8        95.1
  gelu_skew 45    96.5    95.7    96.6     95.4        94.1        96.0
  gelu_skew 300   95.8    95.6    95.8     96.2        96.2        95.7
  sparse80  45    94.4    96.0    96.9     92.2        94.2        94.5
  sparse80 300    95.6    95.3    95.5     95.5        95.6        95.5
  relu90    45    96.5    93.7    98.6     94.2        91.0        96.9
  relu90   300    96.5    95.9    97.0     96.7        95.4        97.0
  null_gap  45    95.7    96.1    97.3     94.5        94.6        96.1
  null_gap 300    95.7    95.7    95.3     96.1        96.7        95.5
Layer mean (50 neurons, shared text effect, 2,000 layers): r 96.4 / 95.5, skill 96.0 / 96.4, gap r 94.8 / 95.4,
gap skill 97.8 / 95.8 at 45 / 300 texts. Without the bias correction the layer's mean skill covered 86.7% at 45
texts (the per-neuron O(1/n) bias does not shrink with averaging while the standard error does).
"""

import numpy as np
import pytest
from scipy import special, stats

from nsr_sweep.core.multiple import bh_adjusted, bh_reject, gap_pvalues
from nsr_sweep.core.uncertainty import (
    effective_texts,
    gap_interval,
    gap_tests,
    layer_mean_intervals,
    loo_pearson,
    loo_skill,
    metric_interval_arrays,
    metric_intervals,
    slope_interval,
    tail_kurtosis,
)

# -- simulated neurons --------------------------------------------------------------------------------------------


def gelu(x):
    return 0.5 * x * (1 + special.erf(x / np.sqrt(2)))


LINKS = {
    "normal": lambda z: z,
    "gelu_skew": lambda z: gelu(1.5 * z - 1.0),
    "sparse80": lambda z: gelu(3.0 * (z - 0.8416)),
    "relu90": lambda z: np.maximum(z - 1.2816, 0.0),
}


class Pred:
    def __init__(self, kind, sigma, K=8, gain=1.0, offset=0.0):
        self.kind, self.sigma, self.K, self.gain, self.offset = kind, sigma, K, gain, offset

    def calibrate(self, link, rng, m=1_000_000):
        z = rng.normal(size=m)
        w, y = z + self.sigma * rng.normal(size=m), link(z)
        self.link, self.sw = link, np.sqrt(1 + self.sigma**2)
        if self.kind == "linear":
            self.mu, self.beta = y.mean(), np.cov(w, y)[0, 1] / w.var()
        elif self.kind == "binned":
            self.edges = self.sw * stats.norm.ppf(np.arange(1, self.K) / self.K)
            b = np.searchsorted(self.edges, w)
            self.values = np.bincount(b, weights=y, minlength=self.K) / np.bincount(b, minlength=self.K)
        return self

    def __call__(self, z, eps):
        w = z + self.sigma * eps
        if self.kind == "linear":
            p = self.mu + self.beta * w
        elif self.kind == "binned":
            p = self.values[np.searchsorted(self.edges, w)]
        else:
            p = self.link(w / self.sw)
        return self.gain * p + self.offset


def _null():
    p = Pred("linear", 0.6)
    return ("sparse80", p, p)


SCENARIOS = {
    "normal": lambda: ("normal", Pred("linear", 0.75), Pred("linear", 1.33)),
    "gelu_skew": lambda: ("gelu_skew", Pred("linear", 0.5, gain=0.9, offset=0.02), Pred("binned", 0.5, K=8)),
    "sparse80": lambda: ("sparse80", Pred("monotone", 0.5), Pred("linear", 0.5)),
    "relu90": lambda: ("relu90", Pred("binned", 0.3, K=10), Pred("linear", 0.3)),
    "null_gap": _null,
}


class Neuron:
    """One scenario: `draw(z, rng)` gives (actual, self pred, other pred); true r and MSEs from 4·10⁶ texts."""

    def __init__(self, name, seed=123, population=4_000_000, chunk=1_000_000):
        link, a, b = SCENARIOS[name]()
        rng = np.random.default_rng(seed)
        self.link = LINKS[link]
        self.a = a.calibrate(self.link, rng)
        self.b = self.a if b is a else b.calibrate(self.link, rng)
        acc = 0.0
        for _ in range(population // chunk):
            y, pa, pb = self.draw(rng.normal(size=chunk), rng)
            acc = acc + np.stack([y, pa, pb, y * y, pa * pa, pb * pb, pa * y, pb * y, (pa - y) ** 2,
                                  (pb - y) ** 2]).sum(1)
        my, ma, mb, yy, aa, bb, ay, by, da, db = acc / population
        self.mu, self.var = my, yy - my**2
        self.r_a = (ay - ma * my) / np.sqrt((aa - ma**2) * self.var)
        self.r_b = (by - mb * my) / np.sqrt((bb - mb**2) * self.var)
        self.mse_a, self.mse_b = da, db
        if b is a:  # the same predictor twice: the gap is 0 exactly
            self.r_a = self.r_b = (self.r_a + self.r_b) / 2
            self.mse_a = self.mse_b = (self.mse_a + self.mse_b) / 2

    def draw(self, z, rng):
        return self.link(z), self.a(z, rng.normal(size=z.shape)), self.b(z, rng.normal(size=z.shape))

    def skill(self, train_mean):
        base = self.var + (self.mu - train_mean) ** 2
        return 1 - self.mse_a / base, 1 - self.mse_b / base


def _covered(iv, truth):
    """Whether each interval (`lo`/`hi` of jackknife_t, `gap_lo`/`gap_hi` of gap_tests) holds the truth; an undefined
    (NaN) interval does not."""
    lo, hi = (iv["gap_lo"], iv["gap_hi"]) if "gap_lo" in iv else (iv["lo"], iv["hi"])
    return (lo <= truth) & (truth <= hi)


def _coverages(neuron, n, sims, rng):
    """Coverage of r (self, other), skill (self, other) and the gaps over `sims` simulated test sets."""
    y, a, b = neuron.draw(rng.normal(size=(sims, n)), rng)
    train_mean = neuron.link(rng.normal(size=(sims, 1000))).mean(1)
    s_a, s_b = neuron.skill(train_mean)
    ok = (y.std(1) > 0) & (a.std(1) > 0) & (b.std(1) > 0)  # a test set with a constant neuron has no r at all
    cover = {
        "r_self": _covered(metric_interval_arrays("pearson_r", a, y, train_mean), neuron.r_a),
        "r_other": _covered(metric_interval_arrays("pearson_r", b, y, train_mean), neuron.r_b),
        "gap_r": _covered(gap_tests(a, b, y, "pearson_r", train_mean), neuron.r_a - neuron.r_b),
        "skill_self": _covered(metric_interval_arrays("skill", a, y, train_mean), s_a),
        "skill_other": _covered(metric_interval_arrays("skill", b, y, train_mean), s_b),
        "gap_skill": _covered(gap_tests(a, b, y, "skill", train_mean), s_a - s_b),
    }
    return {k: float(v[ok].mean()) for k, v in cover.items()}, int((~ok).sum())


SIMS = 4000
NOMINAL = (0.93, 0.97)
# The cells where the chosen method misses 93–97% (measured with these SIMS and seeds), all at 45 texts: bounds
# that hold the measured value. Under: skill of sparse neurons (a few texts carry them; the truth is above the
# interval). Over: gaps on relu90 (≈ 4.5 non-zero texts of 45; an r resting on one text gets its whole range) and
# skill gaps — conservative.
OUTSIDE = {
    ("sparse80", 45, "skill_self"): (0.915, 0.97),    # 92.2
    ("relu90", 45, "skill_other"): (0.90, 0.97),      # 91.0
    ("relu90", 45, "gap_r"): (0.93, 0.99),            # 98.6 (MOVER; 98.0 with the jackknife-t gap before it)
    ("relu90", 300, "gap_r"): (0.93, 0.975),          # 97.05
    ("null_gap", 45, "gap_r"): (0.93, 0.98),          # 97.3: MOVER is conservative when both intervals are alike
}


@pytest.mark.slow
def test_coverage_study_every_scenario_and_size():
    """Every scenario × n ∈ {45, 300}: the 95% intervals of r, skill and the gaps cover the truth 93–97% of the
    time (4,000 simulated test sets per cell: Monte-Carlo SE 0.34 points), except the cells in OUTSIDE."""
    table, failures = {}, []
    for i, name in enumerate(SCENARIOS):
        neuron = Neuron(name)
        for n in (45, 300):
            cov, degenerate = _coverages(neuron, n, SIMS, np.random.default_rng(1000 * i + n))
            table[name, n] = cov
            for stat, c in cov.items():
                lo, hi = OUTSIDE.get((name, n, stat), NOMINAL)
                if not lo <= c <= hi:
                    failures.append((name, n, stat, c))
            assert degenerate <= 0.02 * SIMS, (name, n, degenerate)
    print("\n".join(f"{k}: " + " ".join(f"{s} {100 * c:.1f}" for s, c in v.items()) for k, v in table.items()))
    assert not failures, failures


LAYER_TYPES = ("normal", "gelu_skew", "sparse80", "null_gap")


def _layer_coverage(neurons, n, sims, rng, n_neurons=50, rho=0.5):
    """A simulated layer: `n_neurons` neurons (types cycling through LAYER_TYPES) on the same n texts, each
    neuron's latent z = √ρ·c + √(1 − ρ)·e with c a per-text effect that all neurons share. Returns the coverage of
    the layer-mean intervals (joint jackknife)."""
    types = np.arange(n_neurons) % len(neurons)
    ra = np.array([nr.r_a for nr in neurons])[types]
    rb = np.array([nr.r_b for nr in neurons])[types]
    hits = {k: 0 for k in ("pearson_r", "skill", "gap_other_pearson_r", "gap_other_skill")}
    for _ in range(sims):
        z = np.sqrt(rho) * rng.normal(size=n) + np.sqrt(1 - rho) * rng.normal(size=(n_neurons, n))
        Y, A, B = np.empty((3, n_neurons, n))
        train_mean = np.empty(n_neurons)
        for t, nr in enumerate(neurons):
            rows = types == t
            Y[rows], A[rows], B[rows] = nr.draw(z[rows], rng)
            train_mean[rows] = nr.mu + np.sqrt(nr.var / 1000) * rng.normal(size=rows.sum())
        sa, sb = np.empty(n_neurons), np.empty(n_neurons)
        for t, nr in enumerate(neurons):
            rows = types == t
            sa[rows], sb[rows] = nr.skill(train_mean[rows])
        out = layer_mean_intervals(A, Y, train_mean, {"other": B})
        truth = {"pearson_r": ra.mean(), "skill": sa.mean(), "gap_other_pearson_r": (ra - rb).mean(),
                 "gap_other_skill": (sa - sb).mean()}
        for k, v in truth.items():
            assert out[f"{k}_n"] == n_neurons, (k, out[f"{k}_n"])
            hits[k] += out[f"{k}_lo"] <= v <= out[f"{k}_hi"]
    return {k: v / sims for k, v in hits.items()}


LAYER_SIMS = 2000
LAYER_OUTSIDE = {(45, "gap_other_skill"): (0.93, 0.985)}  # 97.8


@pytest.mark.slow
def test_layer_mean_coverage_with_a_shared_text_effect():
    """50 neurons sharing their test texts (a common text effect, ρ = 0.5; types normal, gelu_skew, sparse80,
    null_gap): the joint-jackknife intervals of the layer's mean r, skill and gaps cover 93–97% at 45 and 300 texts
    (2,000 layers each: MC SE 0.5 points), except the cell in LAYER_OUTSIDE."""
    neurons = [Neuron(name) for name in LAYER_TYPES]
    table = {n: _layer_coverage(neurons, n, LAYER_SIMS, np.random.default_rng(77 + n)) for n in (45, 300)}
    print(table)
    failures = [(n, k, c) for n, cov in table.items() for k, c in cov.items()
                if not LAYER_OUTSIDE.get((n, k), NOMINAL)[0] <= c <= LAYER_OUTSIDE.get((n, k), NOMINAL)[1]]
    assert not failures, failures


# -- fast: exact values, the method as specified, pairing, p-values, BH, the layer API ---------------------------


def _neuron_data(n=60, seed=0):
    """A skewed, sparse neuron (GELU of a shifted latent) with two noisy predictors and a train mean."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=n)
    actual = gelu(3 * (z - 0.5))
    good = 0.8 * actual + 0.3 * rng.normal(size=n)
    bad = 0.5 * actual + 0.8 * rng.normal(size=n)
    return actual, good, bad, float(actual.mean() + 0.05)


def _kappa(values_loo, g):
    """n Σd⁴ / (Σd²)² of brute-force leave-one-out values on the scale g."""
    gl = g(np.asarray(values_loo))
    d = gl - gl.mean()
    return len(d) * np.sum(d**4) / np.sum(d**2) ** 2


def _by_hand(values_loo, point, g, ginv, bias_correct=True, level=0.95, wide_kappa=None):
    """The bias-corrected jackknife-t interval written out: brute-force leave-one-out values on the scale g; with
    `wide_kappa` (the tail shape on more texts), the smaller of the two Satterthwaite degrees of freedom."""
    n = len(values_loo)
    gl = g(np.asarray(values_loo))
    d = gl - gl.mean()
    se = np.sqrt((n - 1) / n * np.sum(d**2))
    df = min(max(2 * n / (_kappa(values_loo, g) - 1), 1.0), n - 1)
    if wide_kappa is not None:
        df = min(df, min(max(2 * n / (wide_kappa - 1), 1.0), n - 1))
    c = n * g(point) - (n - 1) * gl.mean() if bias_correct else g(point)
    q = stats.t.ppf((1 + level) / 2, df)
    a, b = ginv(c - q * se), ginv(c + q * se)
    return min(a, b), max(a, b), se, df


def _corr(x, y):
    return np.corrcoef(x, y)[0, 1]


def _skill(p, y, m):
    return 1 - np.mean((p - y) ** 2) / np.mean((m - y) ** 2)


def test_effective_texts_known_answers():
    """(Σd²)²/Σd⁴: n for equal deviations, ≈ k for k active texts, ≈ n/3 for a normal target, 0 for a constant;
    and the medians docs/science.md quotes for the simulated neurons at 45 test texts."""
    assert effective_texts(np.tile([1.0, -1.0], 20)) == pytest.approx(40)
    y = np.r_[np.full(3, 2.5), np.zeros(297)]  # 3 active texts of 300
    p = 3 / 300
    want = (3 * (1 - p)) ** 2 / (3 * (1 - p) ** 4 + 297 * p**4) * 2.5**4 / 2.5**4
    assert effective_texts(y) == pytest.approx(want) and 2.9 < effective_texts(y) < 3.2
    for c in (0.7, 0.1, 0.3, -0.17):  # constants whose float mean is an ulp off as well as exact ones
        assert effective_texts(np.full(45, c)) == 0.0 and effective_texts(np.full(300, c)) == 0.0
    assert np.isnan(effective_texts(np.r_[np.ones(5), np.nan]))
    z = np.random.default_rng(0).normal(size=(4000, 45))
    med = {k: np.median([effective_texts(LINKS[k](row)) for row in z]) for k in ("normal", "sparse80", "relu90")}
    assert med["normal"] == pytest.approx(16.4, abs=0.4) and med["sparse80"] == pytest.approx(3.7, abs=0.2)
    assert med["relu90"] == pytest.approx(2.2, abs=0.2)
    big = np.random.default_rng(1).normal(size=30000)
    assert effective_texts(big) == pytest.approx(10000, rel=0.03)


def test_point_estimates_and_leave_one_out_values_are_exact():
    actual, good, bad, m = _neuron_data()
    n = len(actual)
    r, r_loo = loo_pearson(good, actual)
    s, s_loo = loo_skill(good, actual, m)
    assert r == pytest.approx(_corr(good, actual), abs=1e-14)
    assert s == pytest.approx(_skill(good, actual, m), abs=1e-14)
    keep = ~np.eye(n, dtype=bool)
    np.testing.assert_allclose(r_loo, [_corr(good[k], actual[k]) for k in keep], rtol=0, atol=1e-12)
    np.testing.assert_allclose(s_loo, [_skill(good[k], actual[k], m) for k in keep], rtol=0, atol=1e-12)
    g = gap_tests(good, bad, actual, "pearson_r", m)
    assert g["gap"] == pytest.approx(_corr(good, actual) - _corr(bad, actual), abs=1e-14)
    gs = gap_interval(good, bad, actual, "skill", m)
    assert gs["gap"] == pytest.approx(_skill(good, actual, m) - _skill(bad, actual, m), abs=1e-14)


def test_intervals_are_the_bias_corrected_jackknife_t_computed_by_hand():
    actual, good, bad, m = _neuron_data(n=80, seed=3)
    keep = ~np.eye(len(actual), dtype=bool)
    iv = metric_intervals(good, actual, m)
    lo, hi, _, df = _by_hand([_corr(good[k], actual[k]) for k in keep], _corr(good, actual), np.arctanh, np.tanh)
    assert (iv["pearson_r_lo"], iv["pearson_r_hi"]) == pytest.approx((lo, hi), abs=1e-10)
    assert 1 < df < len(actual) - 1  # the sparse neuron's kurtosis lowered the degrees of freedom
    lo, hi, _, _ = _by_hand([_skill(good[k], actual[k], m) for k in keep], _skill(good, actual, m),
                            lambda s: np.log(1 - s), lambda u: 1 - np.exp(u))
    assert (iv["skill_lo"], iv["skill_hi"]) == pytest.approx((lo, hi), abs=1e-10)
    # the gap: MOVER from each predictor's own interval (held to its point) and the correlation of their
    # leave-one-out values (Zou 2007)
    g = gap_interval(good, bad, actual, "pearson_r", m)
    ends = {}
    for name, x in (("a", good), ("b", bad)):
        loo = np.array([_corr(x[k], actual[k]) for k in keep])
        r = _corr(x, actual)
        lo, hi, _, _ = _by_hand(loo, r, np.arctanh, np.tanh)
        ends[name] = (r, min(lo, r), max(hi, r), loo)
    (ra, la, ua, lla), (rb, lb, ub, llb) = ends["a"], ends["b"]
    rho = _corr(lla, llb)
    lo = ra - rb - np.sqrt((ra - la) ** 2 + (ub - rb) ** 2 - 2 * rho * (ra - la) * (ub - rb))
    hi = ra - rb + np.sqrt((ua - ra) ** 2 + (rb - lb) ** 2 - 2 * rho * (ua - ra) * (rb - lb))
    assert (g["gap_lo"], g["gap_hi"]) == pytest.approx((lo, hi), abs=1e-10)
    # the slope: whole texts left out, no bias correction (its interval always holds the point)
    rng = np.random.default_rng(4)
    texts = np.repeat(np.arange(30), 4)
    dx = rng.normal(size=120)
    dy = 0.7 * dx + rng.normal(size=30)[texts] * dx + 0.2 * rng.normal(size=120)
    slope = np.polyfit(dx, dy, 1)[0]
    loo = [np.polyfit(dx[texts != t], dy[texts != t], 1)[0] for t in range(30)]
    lo, hi, _, _ = _by_hand(loo, slope, lambda v: v, lambda v: v, bias_correct=False)
    assert slope_interval(texts, dx, dy) == pytest.approx((lo, hi), abs=1e-10)


def test_the_tail_shape_of_more_texts_lowers_the_degrees_of_freedom_by_hand():
    """`tail_kurtosis` over test ∪ validation texts is κ of brute-force leave-one-out values on the metric's scale;
    passed to the test texts' interval it sets df = min(the test texts' df, 2n/(κ − 1)) — a wider interval when the
    wider set holds a heavier tail, the same interval when it does not (or when κ is undefined)."""
    actual, good, _, m = _neuron_data(n=120, seed=7)
    test, held = slice(0, 60), slice(0, 120)  # the first 60 texts are the test split, all 120 test ∪ val
    keep_all, keep = ~np.eye(120, dtype=bool), ~np.eye(60, dtype=bool)
    scales = {"pearson_r": (_corr, np.arctanh, np.tanh),
              "skill": (lambda p, y: _skill(p, y, m), lambda s: np.log(1 - s), lambda u: 1 - np.exp(u))}
    for metric, (stat, g, ginv) in scales.items():
        wide = _kappa([stat(good[k], actual[k]) for k in keep_all], g)
        assert tail_kurtosis(metric, good[held], actual[held], m) == pytest.approx(wide, rel=1e-9)
        p, y = good[test], actual[test]
        loo = [stat(p[k], y[k]) for k in keep]
        for kappa in (wide, 50.0, 1.5, float("nan")):  # 1.5: a lighter tail than the test texts' own: no change
            iv = metric_intervals(p, y, m, kurtosis={metric: kappa})
            lo, hi, _, df = _by_hand(loo, stat(p, y), g, ginv, wide_kappa=None if np.isnan(kappa) else kappa)
            assert (iv[f"{metric}_lo"], iv[f"{metric}_hi"]) == pytest.approx((lo, hi), abs=1e-10)
        narrow = metric_intervals(p, y, m)
        heavy = metric_intervals(p, y, m, kurtosis={metric: 50.0})
        assert heavy[f"{metric}_hi"] - heavy[f"{metric}_lo"] > narrow[f"{metric}_hi"] - narrow[f"{metric}_lo"]
        assert metric_intervals(p, y, m, kurtosis={metric: 1.5}) == narrow


def test_metric_intervals_equal_the_vectorised_arrays_row_by_row():
    rng = np.random.default_rng(5)
    actual = np.maximum(rng.normal(size=(4, 50)) - 0.8, 0)
    pred = actual + 0.3 * rng.normal(size=(4, 50))
    tm = np.array([0.1, 0.2, 0.0, 0.3])
    arrs = {m: metric_interval_arrays(m, pred, actual, tm) for m in ("pearson_r", "skill")}
    for i in range(4):
        iv = metric_intervals(pred[i], actual[i], tm[i])
        for m in ("pearson_r", "skill"):
            assert (iv[f"{m}_lo"], iv[f"{m}_hi"]) == (arrs[m]["lo"][i], arrs[m]["hi"][i])
            assert arrs[m]["lo"][i] < arrs[m]["point"][i] < arrs[m]["hi"][i]


def test_a_predictor_against_itself_has_gap_exactly_zero():
    actual, good, _, m = _neuron_data()
    for metric in ("pearson_r", "skill"):
        assert gap_interval(good, good, actual, metric, m) == {"gap": 0.0, "gap_lo": 0.0, "gap_hi": 0.0}
        assert gap_tests(good, good, actual, metric, m)["gap_p"] == 1.0
    with pytest.raises(ValueError):
        gap_interval(good, good, actual, "mse", m)


def test_the_gap_interval_is_paired():
    """Two predictors that share almost all their error: their gap is known far better than either r. (MOVER's width
    at ρ → 1 tends to the difference of the two intervals' asymmetries, not to 0: here, r ≈ 0.96 on 300 texts, 0.29 of
    one r's width, against 0.9 or more for two unrelated predictors of the same accuracy.)"""
    rng = np.random.default_rng(0)
    actual = rng.normal(size=300)
    good, bad = actual + 0.3 * rng.normal(size=300), actual + 2.0 * rng.normal(size=300)
    g = gap_interval(good, bad, actual, "pearson_r", 0.0)
    assert 0 < g["gap_lo"] < g["gap"] < g["gap_hi"]
    twin = good + 0.02 * rng.normal(size=300)
    g = gap_interval(good, twin, actual, "pearson_r", 0.0)
    iv = metric_intervals(good, actual, 0.0)
    assert g["gap_hi"] - g["gap_lo"] < 0.35 * (iv["pearson_r_hi"] - iv["pearson_r_lo"]), (g, iv)
    other = actual + 0.3 * rng.normal(size=300)  # as accurate as `good`, its own error: no pairing to gain from
    g = gap_interval(good, other, actual, "pearson_r", 0.0)
    assert g["gap_hi"] - g["gap_lo"] > 0.9 * (iv["pearson_r_hi"] - iv["pearson_r_lo"]), (g, iv)


def test_p_values_are_dual_to_the_intervals_and_resolve_below_a_bootstraps_floor():
    rng = np.random.default_rng(1)
    N, n = 400, 100
    z = rng.normal(size=(N, n))
    actual = gelu(2 * z - 1)
    self_p = z + rng.uniform(0.1, 2.0, size=(N, 1)) * rng.normal(size=(N, n))
    other = z + rng.uniform(0.1, 2.0, size=(N, 1)) * rng.normal(size=(N, n))
    for metric in ("pearson_r", "skill"):
        g = gap_tests(self_p, other, actual, metric, actual.mean(1))
        excl = (g["gap_lo"] > 0) | (g["gap_hi"] < 0)
        assert 50 < excl.sum() < N - 50, excl.sum()  # both kinds present
        assert np.array_equal(g["gap_p"] < 0.05, excl)
        one = gap_tests(self_p, other, actual, metric, actual.mean(1), alternative="greater")
        assert np.array_equal(one["gap_p"] < 0.025, g["gap_lo"] > 0)
        np.testing.assert_array_equal(gap_pvalues(self_p, other, actual, metric, actual.mean(1)), g["gap_p"])
    # a clear gap on 300 texts: p far below 1/2001, the floor of a bootstrap p-value with 2,000 resamples
    a = rng.normal(size=300)
    p = gap_tests(a + 0.3 * rng.normal(size=300), a + 2.0 * rng.normal(size=300), a, "pearson_r", 0.0)["gap_p"]
    assert p < 1e-6, p
    with pytest.raises(ValueError):
        gap_tests(a, a, a, "pearson_r", 0.0, alternative="less")


def test_gap_p_values_hold_their_level_under_the_null():
    """Same predictor twice (independent noise) on a skewed neuron, 4,000 simulated neurons × 100 texts: at most 5%
    of p-values fall under 0.05, two-sided and one-sided — valid, and for r close to exact (measured: 3.4% two-sided,
    4.4% one-sided; MOVER is conservative when the two predictors' intervals are alike and skewed)."""
    rng = np.random.default_rng(2)
    N, n = 4000, 100
    z = rng.normal(size=(N, n))
    actual = gelu(1.5 * z - 1)
    a, b = z + 0.6 * rng.normal(size=(N, n)), z + 0.6 * rng.normal(size=(N, n))
    for alternative in ("two-sided", "greater"):
        p = gap_pvalues(a, b, actual, "pearson_r", actual.mean(1), alternative)
        assert 0.03 <= np.mean(p < 0.05) <= 0.055, (alternative, np.mean(p < 0.05))


@pytest.mark.parametrize("q", [0.05, 0.1, 0.25])
def test_bh_equals_scipy(q):
    rng = np.random.default_rng(int(q * 100))
    cases = [
        rng.uniform(size=512),
        np.concatenate([rng.uniform(size=400), rng.uniform(0, 1e-3, size=112)]),
        np.concatenate([np.full(20, 1e-5), np.full(30, 0.01), rng.uniform(size=50)]),  # ties
        np.ones(10),
        np.array([0.001, 0.02, 0.03, 0.04, 0.05]),
    ]
    for p in cases:
        expected = stats.false_discovery_control(p) <= q
        assert np.array_equal(bh_reject(p, q), expected)
        np.testing.assert_allclose(bh_adjusted(p), stats.false_discovery_control(p), rtol=1e-12)
        np.testing.assert_allclose(bh_adjusted(p, "any"), stats.false_discovery_control(p, method="by"), rtol=1e-12)
        assert np.array_equal(bh_reject(p, q, "any"), stats.false_discovery_control(p, method="by") <= q)
    assert bh_reject(cases[1], q).sum() > 50 and not bh_reject(cases[0], q).all()
    # NaN p-values (undefined gaps) are not tests: BH over the finite ones
    p = cases[1].copy()
    p[::7] = np.nan
    fin = np.isfinite(p)
    rej = bh_reject(p, q)
    assert not rej[~fin].any()
    assert np.array_equal(rej[fin], stats.false_discovery_control(p[fin]) <= q)


def test_a_layer_of_one_neuron_has_that_neurons_intervals():
    actual, good, bad, m = _neuron_data(n=70, seed=7)
    lay = layer_mean_intervals(good[None], actual[None], np.array([m]), {"cross": bad[None]})
    iv = metric_intervals(good, actual, m)
    for metric in ("pearson_r", "skill"):
        assert (lay[f"{metric}_lo"], lay[f"{metric}_hi"]) == (iv[f"{metric}_lo"], iv[f"{metric}_hi"])
        g = gap_interval(good, bad, actual, metric, m)
        key = f"gap_cross_{metric}"
        assert lay[key] == g["gap"]
        # a layer's mean gap is the raw-scale jackknife-t (one neuron's gap: MOVER)
        keep = ~np.eye(len(actual), dtype=bool)
        stat = _corr if metric == "pearson_r" else (lambda p, y: _skill(p, y, m))
        loo = [stat(good[k], actual[k]) - stat(bad[k], actual[k]) for k in keep]
        lo, hi, _, _ = _by_hand(loo, g["gap"], lambda v: v, lambda v: v)
        assert (lay[f"{key}_lo"], lay[f"{key}_hi"]) == pytest.approx((lo, hi), abs=1e-10)
        assert lay[f"{key}_n"] == lay[f"{metric}_n"] == 1


def test_a_layer_mean_leaves_out_undefined_neurons_and_jackknifes_the_shared_texts_jointly():
    rng = np.random.default_rng(8)
    N, n = 20, 120
    text = rng.normal(size=n)  # a strong text effect that every neuron shares
    z = 0.9 * text + np.sqrt(1 - 0.81) * rng.normal(size=(N, n))
    actual = gelu(2 * z - 1)
    preds = z + 0.7 * rng.normal(size=(N, n))
    other = z + 1.5 * rng.normal(size=(N, n))
    preds[3] = 1.0  # a constant prediction has no r (skill is defined)
    other[5] = np.nan  # no other trial for this neuron
    tm = actual.mean(1)
    out = layer_mean_intervals(preds, actual, tm, {"x": other})
    r = np.array([_corr(preds[j], actual[j]) for j in range(N) if j != 3])
    assert out["pearson_r_n"] == N - 1 and out["pearson_r"] == pytest.approx(r.mean(), abs=1e-13)
    assert out["skill_n"] == N and out["gap_x_skill_n"] == N - 1 and out["gap_x_pearson_r_n"] == N - 2
    assert out["pearson_r_lo"] < out["pearson_r"] < out["pearson_r_hi"]
    # the same neurons with their texts shuffled independently (no shared text any more): a narrower interval —
    # the joint jackknife carries the shared text sampling
    perm = np.array([rng.permutation(n) for _ in range(N)])
    shuf = layer_mean_intervals(np.take_along_axis(preds, perm, 1), np.take_along_axis(actual, perm, 1), tm)
    assert shuf["pearson_r"] == pytest.approx(out["pearson_r"], abs=1e-13)
    width = out["pearson_r_hi"] - out["pearson_r_lo"]
    assert shuf["pearson_r_hi"] - shuf["pearson_r_lo"] < 0.8 * width
    with pytest.raises(ValueError):
        layer_mean_intervals(preds, actual[:, :-1], tm)


def test_undefined_and_uninformative_test_sets():
    rng = np.random.default_rng(9)
    actual = np.zeros(45)
    actual[7] = 3.0  # one non-zero text: r is defined but rests on it — the whole range
    pred = rng.normal(size=45)
    iv = metric_intervals(pred, actual, 0.1)
    assert (iv["pearson_r_lo"], iv["pearson_r_hi"]) == (-1.0, 1.0)
    g = gap_tests(pred, pred + rng.normal(size=45), actual, "pearson_r", 0.1)
    assert (g["gap_lo"], g["gap_hi"], g["gap_p"]) == (-2.0, 2.0, 1.0)
    iv = metric_intervals(pred, np.zeros(45), 0.1)  # a constant neuron: no r
    assert np.isnan(iv["pearson_r_lo"]) and np.isnan(iv["pearson_r_hi"])
    assert all(np.isnan(v) for v in metric_intervals(pred[:2], pred[:2] + 1, 0.0).values())  # two texts


def test_the_api_is_deterministic():
    actual, good, bad, m = _neuron_data()
    texts = np.repeat(np.arange(20), 3)
    calls = [
        lambda s: metric_intervals(good, actual, m, seed=s),
        lambda s: gap_interval(good, bad, actual, "skill", m, seed=s),
        lambda s: slope_interval(texts, good, actual, seed=s),
        lambda s: layer_mean_intervals(np.stack([good, bad]), np.stack([actual, actual]), np.array([m, m]),
                                       {"o": np.stack([bad, good])}, seed=s),
    ]
    for call in calls:
        first = call(0)
        assert call(0) == first and call(1) == first  # no randomness at all: the seed changes nothing
        assert all(np.isfinite(v) for v in (first.values() if isinstance(first, dict) else first))


def test_r_interval_covers_the_true_r_at_its_nominal_rate():
    """2,000 bivariate-normal test sets of 150 texts with r = 0.5: the 95% interval covers it 93–97% of the time."""
    rho, n, sims = 0.5, 150, 2000
    rng = np.random.default_rng(10_000)
    x = rng.normal(size=(sims, n))
    y = rho * x + np.sqrt(1 - rho**2) * rng.normal(size=(sims, n))
    iv = metric_interval_arrays("pearson_r", x, y, 0.0)
    assert 0.93 <= np.mean((iv["lo"] <= rho) & (rho <= iv["hi"])) <= 0.97


def test_patch_slope_interval_covers_the_true_slope():
    """300 patching experiments (40 texts × 5 grid points, text-level slope noise): coverage 92–98%."""
    true, hits, sims = 0.7, 0, 300
    for seed in range(sims):
        rng = np.random.default_rng(seed)
        texts = np.repeat(np.arange(40), 5)
        dx = np.tile(np.linspace(-1, 1, 5), 40) * rng.uniform(0.5, 2, size=200)
        dy = true * dx + rng.normal(size=40)[texts] * 0.3 * dx + 0.1 * rng.normal(size=200)
        lo, hi = slope_interval(texts, dx, dy, seed=seed)
        hits += lo <= true <= hi
    assert 0.92 <= hits / sims <= 0.98, hits
