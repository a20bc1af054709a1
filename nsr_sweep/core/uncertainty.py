"""Uncertainty over test texts: intervals for r, skill, the patching slope and paired gaps, with their p-values;
per-layer means (`multiple`: many neurons' p-values and Benjamini–Hochberg).

Method (chosen by a coverage study, `tests/test_uncertainty.py`): a **bias-corrected, studentized jackknife
interval on a variance-stabilising scale with Satterthwaite degrees of freedom** ("jackknife-t"):

1. every statistic is recomputed with each test text left out (from centred per-text sums: all n leave-one-out
   values cost O(n));
2. on the scale `g` — Fisher z = atanh for r, log(1 − skill) = log(MSE / baseline MSE) for skill, the raw
   scale for slopes and layer-mean gaps — the jackknife standard error is `se = sqrt((n − 1)/n · Σ dᵢ²)`,
   dᵢ = g(θ₍ᵢ₎) − mean g(θ₍.₎);
3. the interval is `g⁻¹(c ± t_{df} · se)`, c = n·g(θ̂) − (n − 1)·mean g(θ₍.₎) the jackknife bias-corrected value
   (r, skill and gaps; not the slope), with `df = 2n / (κ − 1)` (clipped to [1, n − 1]), κ = n Σdᵢ⁴ / (Σdᵢ²)² the
   kurtosis of the leave-one-out deviations: the Satterthwaite degrees of freedom of the variance estimate. For
   normal data κ ≈ 3 and df ≈ n; when a few texts carry a sparse neuron (most texts ≈ 0), κ is large, the
   variance estimate rests on those few texts, and df shrinks accordingly. The bias correction matters for
   means over many neurons (their O(1/n) bias does not average away while their standard error does);
4. a trial's r and skill (and the gaps built from them) take df as the smaller of the test texts' and that of
   κ measured over test ∪ validation texts (`tail_kurtosis`, the trial's `<metric>_kurtosis`): a heavy-tailed
   neuron's rare texts are missing from most test sets, whose own κ then overstates how steady their variance
   estimate is. Chosen on real neurons (`benchmarks/coverage_real.py`), where test-only df left
   well-populated neurons at 91–93% coverage.

In the study (skewed and sparse GELU / ReLU-like neurons, 45 and 300 test texts, r, skill and gaps) the percentile
bootstrap this module used, BCa and the bootstrap-t fell under 93% coverage in 13–24 of 30 cells at 45 texts
(down to 81%); this method was within 93–97% in all 30 cells at 300 texts and 25 of 30 at 45 (lowest: 91% for the
skill of a binned head on a neuron with 90% zeros). It has no resampling noise and no seed: the result is a
deterministic function of the data, ~0.3 ms per call at 300 texts, and p-values are analytic (a bootstrap
p-value from 2,000 resamples cannot go below 1/2001 ≈ 5e-4, while Benjamini–Hochberg over 512 neurons at
q = 0.05 needs ≈ 1e-4 for the smallest).

A gap (metric(a) − metric(b) on the same texts) is Zou's MOVER interval from the two predictors' own jackknife-t
intervals and the correlation of their leave-one-out values — paired: the same text is left out of both. Chosen
on real neurons (`benchmarks/coverage_real.py`; docs/science.md, Uncertainty), where the symmetric raw-scale
jackknife-t gap missed one way 7–8% of the time. A per-layer mean over neurons that share their test texts is jackknifed jointly — one text left out of every neuron
at once — so the interval carries the text sampling that all neurons share (a t interval over neurons does not).

The `seed` arguments are kept for callers and have no effect.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats

LEVEL = 0.95
"""Coverage of every interval."""

METRICS = ("pearson_r", "skill")
_TINY = 1e-12  # a leave-one-out sum of squares below _TINY × the full one is taken as 0 (rounding, not data)
_R_MAX = np.nextafter(1.0, 0.0)  # atanh(±1) is infinite: |r| is clipped here (an exact fit then has a [1, 1] interval)


def _pair_sums(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], 1)



# -- leave-one-text-out statistics (last axis = texts; any leading axes, e.g. neurons) ----------------------------


def loo_pearson(pred, actual) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r over the last axis, and r with each text left out: (r (...), r₍ᵢ₎ (..., n)).

    Computed from centred sums (r equals np.corrcoef to rounding); a constant series gives NaN, and so does a
    leave-one-out whose remaining texts are constant."""
    x, y = np.asarray(pred, np.float64), np.asarray(actual, np.float64)
    n = x.shape[-1]
    x = x - x.mean(-1, keepdims=True)
    y = y - y.mean(-1, keepdims=True)
    sxx, syy, sxy = (x * x).sum(-1), (y * y).sum(-1), (x * y).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = sxy / np.sqrt(sxx * syy)
        r = np.where((sxx > 0) & (syy > 0), r, np.nan)
        k = n / (n - 1)  # removing text i moves the mean by −xᵢ/(n − 1): the centred sums lose k·xᵢ², k·xᵢyᵢ
        lxx, lyy = sxx[..., None] - k * x * x, syy[..., None] - k * y * y
        lxy = sxy[..., None] - k * x * y
        ok = (lxx > _TINY * sxx[..., None]) & (lyy > _TINY * syy[..., None])
        loo = np.where(ok, lxy / np.sqrt(np.where(ok, lxx * lyy, 1.0)), np.nan)
    return np.clip(r, -1.0, 1.0), np.clip(loo, -1.0, 1.0)


def loo_skill(pred, actual, train_mean) -> tuple[np.ndarray, np.ndarray]:
    """skill = 1 − Σ(pred − actual)² / Σ(train_mean − actual)² over the last axis, and with each text left out.
    `train_mean` broadcasts against the leading axes (one per neuron)."""
    p, y = np.asarray(pred, np.float64), np.asarray(actual, np.float64)
    m = np.asarray(train_mean, np.float64)[..., None]
    d2, e2 = (p - y) ** 2, (m - y) ** 2
    D, E = d2.sum(-1), e2.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(E > 0, 1 - D / E, np.nan)
        lE = E[..., None] - e2
        ok = lE > _TINY * E[..., None]
        loo = np.where(ok, 1 - np.maximum(D[..., None] - d2, 0.0) / np.where(ok, lE, 1.0), np.nan)
    return s, loo


def _loo(metric: str, pred, actual, train_mean):
    if metric == "pearson_r":
        return loo_pearson(pred, actual)
    if metric == "skill":
        return loo_skill(pred, actual, train_mean)
    raise ValueError(f"metric {metric!r}: allowed pearson_r, skill")


# -- the jackknife-t interval ---------------------------------------------------------------------------------------

_SCALES: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    # g, g⁻¹: the scale on which the interval is symmetric
    "fisher_z": (lambda r: np.arctanh(np.clip(r, -_R_MAX, _R_MAX)), np.tanh),
    "log_mse_ratio": (lambda s: np.log(np.maximum(1.0 - s, np.finfo(np.float64).tiny)), lambda u: 1.0 - np.exp(u)),
    "raw": (lambda v: v, lambda v: v),
}
SCALE_OF = {"pearson_r": "fisher_z", "skill": "log_mse_ratio", "gap": "raw", "slope": "raw"}
BOUNDS = {"pearson_r": (-1.0, 1.0), "gap_pearson_r": (-2.0, 2.0)}  # a statistic's whole range, where it has one


def _kurtosis(d: np.ndarray) -> np.ndarray:
    """κ = n Σdᵢ⁴ / (Σdᵢ²)² of deviations over the last axis (3 for normal; large when a few texts carry it)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return d.shape[-1] * (d**4).sum(-1) / ((d * d).sum(-1)) ** 2


def _satterthwaite(kappa: np.ndarray, n: int) -> np.ndarray:
    """The degrees of freedom of a jackknife variance over n texts whose leave-one-out deviations have kurtosis κ."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip(2 * n / (kappa - 1), 1.0, max(n - 1, 1))


def tail_kurtosis(metric: str, pred, actual, train_mean) -> np.ndarray:
    """The kurtosis κ of a metric's leave-one-out deviations on its stabilising scale, over the texts given (last
    axis; NaN where a leave-one-out value is undefined or none deviates): the tail shape of the per-text influence.

    Measured over test ∪ validation texts (both unseen by the fitted weights) it is passed to the test texts'
    jackknife (`kurtosis=`), whose degrees of freedom it lowers when the wider set shows a heavier tail than the
    test texts alone — most test sets of a heavy-tailed neuron miss the rare texts that carry its variance, and
    their own κ then promises a variance estimate steadier than it is (docs/science.md, Uncertainty)."""
    return metric_jackknife(metric, pred, actual, train_mean).kappa


class Jackknife:
    """A statistic's jackknife-t ingredients on its scale g, from its value and its leave-one-out values (last axis):
    the centre `c` (g(point), or with `bias_correct` the jackknife bias-corrected n·g(point) − (n − 1)·mean g(loo)),
    the standard error `se = sqrt((n − 1)/n · Σ dᵢ²)` and the Satterthwaite degrees of freedom `df`; `bounds(q)` is
    the interval c ± q·se mapped back, for a t quantile q. Arrays over the leading axes. `kurtosis`, where given
    (per leading index; NaN: none), is the tail shape of the same statistic measured on more held-out texts
    (`tail_kurtosis`); df is then the smaller of the two Satterthwaite degrees of freedom. `kappa`: the texts' own κ
    (NaN where a leave-one-out value is undefined)."""

    def __init__(self, point, loo, scale: str = "raw", bias_correct: bool = False, kurtosis=None):
        g, self.ginv = _SCALES[scale]
        self.point, self.loo = np.asarray(point, np.float64), np.asarray(loo, np.float64)
        loo = self.loo
        n = loo.shape[-1]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            gp, gl = g(self.point), g(loo)
            self.ok = np.isfinite(gp) & np.isfinite(gl).all(-1) & (n >= 3)
            self.whole = np.isfinite(gp) & ~self.ok & (n >= 3)  # the statistic rests on one text: the data cannot bound it
            gm = gl.mean(-1)
            d = gl - gm[..., None]
            ss = (d * d).sum(-1)
            self.se = np.sqrt((n - 1) / n * ss)
            kappa = _kurtosis(d)
            self.kappa = np.where(np.isfinite(gl).all(-1) & np.isfinite(kappa), kappa, np.nan)  # `tail_kurtosis`
            df = np.where(ss > 0, _satterthwaite(kappa, n), max(n - 1, 1))
            self.df = np.where(np.isfinite(df), df, 1.0)
            if kurtosis is not None:  # the tail shape seen on more texts: never more df than the test texts show
                wide = _satterthwaite(np.asarray(kurtosis, np.float64), n)
                self.df = np.where(np.isfinite(wide), np.minimum(self.df, wide), self.df)
            self.c = n * gp - (n - 1) * gm if bias_correct else gp
        self.exact = ss == 0  # no spread: the statistic is the same on every leave-one-out (ginv(g(x)) need not be x)

    def quantile(self, level: float) -> np.ndarray:
        return stats.t.ppf((1 + level) / 2, self.df)

    def bounds(self, q, hold_point: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) at t quantile(s) q; NaN where undefined (`whole` included: the caller decides its range)."""
        with np.errstate(invalid="ignore", over="ignore"):
            a, b = self.ginv(self.c - q * self.se), self.ginv(self.c + q * self.se)
            lo = np.where(self.exact, self.point, np.minimum(a, b))
            hi = np.where(self.exact, self.point, np.maximum(a, b))
        if hold_point:
            lo, hi = np.minimum(lo, self.point), np.maximum(hi, self.point)
        nan = np.full(np.shape(self.ok), np.nan)
        return np.where(self.ok, lo, nan), np.where(self.ok, hi, nan)


def jackknife_t(point, loo, scale: str = "raw", level: float = LEVEL,
                bounds: tuple[float, float] | None = None, bias_correct: bool = False,
                hold_point: bool = False) -> dict[str, np.ndarray]:
    """The jackknife-t interval of a statistic from its value and its leave-one-out values (last axis).

    On the `scale` g (fisher_z, log_mse_ratio or raw) the interval is `c ± t_{df}·se`, mapped back (`Jackknife`).
    Returns arrays over the leading axes: `lo`, `hi`, `se` and `df`. A zero spread gives lo = hi = point. A non-finite point, or fewer than 3 texts, gives
    NaN. A finite point with an undefined leave-one-out value — the statistic rests on one text, e.g. r of a neuron
    with a single non-zero test text — gives `bounds` (the statistic's whole range: the data cannot bound it) if
    given, else NaN; its se, df and t are NaN. Intervals are clipped to `bounds`. With `hold_point` an interval that
    the bias correction moved past the point estimate is extended to it (rare: ≤ 0.2% of neurons at 45 texts in the
    study)."""
    return _interval(Jackknife(point, loo, scale, bias_correct), level, bounds, hold_point)


def _interval(jk: Jackknife, level: float, bounds: tuple[float, float] | None, hold_point: bool) -> dict[str, np.ndarray]:
    """`jackknife_t`'s result from the statistic's `Jackknife`."""
    lo, hi = jk.bounds(jk.quantile(level), hold_point)
    if bounds is not None:
        lo, hi = np.clip(lo, *bounds), np.clip(hi, *bounds)
        lo, hi = np.where(jk.whole, bounds[0], lo), np.where(jk.whole, bounds[1], hi)
    nan = np.full(np.shape(jk.ok), np.nan)
    return {"lo": lo, "hi": hi, "se": np.where(jk.ok, jk.se, nan), "df": np.where(jk.ok, jk.df, nan)}


def _f(x) -> float:
    return float(np.asarray(x))


# -- per neuron -----------------------------------------------------------------------------------------------------


def metric_interval_arrays(metric: str, pred, actual, train_mean, level: float = LEVEL,
                           kurtosis=None) -> dict[str, np.ndarray]:
    """`metric_intervals` for one metric, vectorised over leading axes (pred, actual (..., n); train_mean (...)):
    arrays `point`, `lo`, `hi`, `se`, `df` — bias-corrected jackknife-t on Fisher z (r) or log(1 − skill); the
    interval always holds the point."""
    return metric_interval_of(metric_jackknife(metric, pred, actual, train_mean, kurtosis), metric, level)


def metric_jackknife(metric: str, pred, actual, train_mean, kurtosis=None) -> Jackknife:
    """A metric's bias-corrected jackknife on its stabilising scale: what its interval and its gaps are built from;
    `kurtosis`: its `tail_kurtosis` over test ∪ validation texts (None: the test texts' own)."""
    point, loo = _loo(metric, pred, actual, train_mean)
    return Jackknife(point, loo, SCALE_OF[metric], bias_correct=True, kurtosis=kurtosis)


def metric_interval_of(jk: Jackknife, metric: str, level: float = LEVEL) -> dict[str, np.ndarray]:
    """`metric_interval_arrays` from the metric's `metric_jackknife`."""
    return {"point": jk.point, **_interval(jk, level, BOUNDS.get(metric), hold_point=True)}


def effective_texts(actual):
    """How many texts the target's variance rests on: (Σd²)² / Σd⁴, d = actual − its mean. n when every text
    deviates equally, about n/3 for a normal target, at most about k when k texts of a sparse neuron are active
    and the rest sit at one value (k when the active values are alike); 0 for a constant target. A description,
    not a correction: when it is a handful, so is the evidence behind the trial's r and skill and their
    intervals (docs/science.md, Uncertainty). Over the last axis: a float for one target, an array for many."""
    a = np.asarray(actual, np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # a non-finite target: NaN below
        d = a - a.mean(-1, keepdims=True)
        s2, s4 = (d**2).sum(-1), (d**4).sum(-1)
        n = np.where(s4 > 0, s2 * s2 / s4, 0.0)
    n = np.where(np.ptp(a, -1) == 0, 0.0, n)  # a constant: its float mean may be an ulp off (n equal deviations)
    n = np.where(np.isfinite(a).all(-1), n, np.nan)
    return float(n) if a.ndim == 1 else n


def metric_intervals(pred: np.ndarray, actual: np.ndarray, train_mean: float, seed: int = 0,
                     kurtosis: dict[str, float] | None = None) -> dict[str, float]:
    """`pearson_r_lo/hi` and `skill_lo/hi`: bias-corrected jackknife-t intervals over the (test) texts given (r on
    Fisher z, skill on log(1 − skill)); `kurtosis`: metric → its `tail_kurtosis` over test ∪ validation texts.
    `seed` is unused (kept for callers)."""
    out = {}
    for m in METRICS:
        iv = metric_interval_arrays(m, pred, actual, train_mean, kurtosis=(kurtosis or {}).get(m))
        out[f"{m}_lo"], out[f"{m}_hi"] = _f(iv["lo"]), _f(iv["hi"])
    return out


def slope_interval(text_id: np.ndarray, dx: np.ndarray, dy: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Jackknife-t interval of the least-squares slope of dy on dx over all points, leaving out whole texts (each
    text's grid of patched values stays together). `seed` is unused (kept for callers)."""
    texts, inv = np.unique(text_id, return_inverse=True)
    per_text = np.zeros((len(texts), 6))
    np.add.at(per_text, inv, _pair_sums(np.asarray(dx, np.float64), np.asarray(dy, np.float64)))

    def slope(S):
        n, sx, sy, sxx, _, sxy = np.moveaxis(S, -1, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            v = sxx - sx**2 / n
            return np.where(v > _TINY * np.abs(sxx), (sxy - sx * sy / n) / v, np.nan)
    total = per_text.sum(0)
    iv = jackknife_t(slope(total), slope(total[None, :] - per_text), "raw")
    return _f(iv["lo"]), _f(iv["hi"])


def gap_tests(a_pred, b_pred, actual, metric: str, train_mean, alternative: str = "two-sided",
              level: float = LEVEL) -> dict[str, np.ndarray]:
    """metric(a) − metric(b) on the same texts, paired, over the last axis; any leading axes (neurons: a_pred,
    b_pred, actual N × n, train_mean N) are vectorised.

    The interval is Zou's MOVER (method of variance estimates recovery: Zou & Donner 2008; for correlations, Zou
    2007) built from the two predictors' own intervals — each the bias-corrected jackknife-t on its stabilising
    scale (Fisher z for r, log(1 − skill) for skill), so each keeps its asymmetry — and the correlation ρ of their
    leave-one-out values (the same text left out of both: the pairing):

        lo = gap − √((a − l_a)² + (u_b − b)² − 2ρ(a − l_a)(u_b − b)),
        hi = gap + √((u_a − a)² + (b − l_b)² − 2ρ(u_a − a)(b − l_b)).

    On real neurons a symmetric interval for the gap missed one way (docs/science.md, Uncertainty): an outsider's r
    is skewed below its estimate, and the gap inherits that skew.

    Returns `gap`, `gap_lo`, `gap_hi` and `gap_p`, the interval inverted: the p-value is the 1 − level at which the
    interval just reaches 0 (p < 0.05 exactly when the 95% interval excludes 0). Two-sided ("gap ≠ 0") is the
    default — it is dual to the intervals in the tables, and a self that reads its neuron worse than an outsider is a
    finding too; "greater" ("gap > 0", p < 0.025 exactly when the 95% interval's lower end is above 0) is for a
    direction fixed in advance. A gap that is the same on every leave-one-out (a predictor against itself) has
    interval [gap, gap] and p = 1 if it is 0; an r gap resting on one text has interval [−2, 2] and p = 1."""
    a, b = (metric_jackknife(metric, x, actual, train_mean) for x in (a_pred, b_pred))
    return gap_of(a, b, metric, alternative, level)


def gap_of(a: Jackknife, b: Jackknife, metric: str, alternative: str = "two-sided",
           level: float = LEVEL) -> dict[str, np.ndarray]:
    """`gap_tests` from the two predictors' `metric_jackknife` on the same texts."""
    if alternative not in ("two-sided", "greater"):
        raise ValueError(f"alternative {alternative!r}: allowed two-sided, greater")
    mover = _Mover(a, b)
    gap = mover.gap
    lo, hi = mover.bounds((1 + level) / 2)
    p = mover.p_two_sided()
    if alternative == "greater":  # one-sided: half the two-sided p on the side the gap lies, 1 − that on the other
        above = mover.bounds(0.5)[0] > 0
        p = np.where(above, p / 2, 1 - p / 2)
    whole = np.isfinite(gap) & (mover.a.whole | mover.b.whole)
    rng = BOUNDS.get(f"gap_{metric}")
    if rng is not None:
        lo, hi = np.clip(lo, *rng), np.clip(hi, *rng)
        lo, hi = np.where(whole, rng[0], lo), np.where(whole, rng[1], hi)
    p = np.where(whole, 1.0, p)
    return {"gap": gap, "gap_lo": lo, "gap_hi": hi, "gap_p": p}


class _Mover:
    """The MOVER interval of a − b from the two statistics' jackknife-t intervals (`gap_tests`)."""

    def __init__(self, a: Jackknife, b: Jackknife):
        self.a, self.b = a, b
        loo_gap = a.loo - b.loo  # the same text left out of both
        self.gap = a.point - b.point
        la, lb = self._loo_dev(a), self._loo_dev(b)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.rho = np.clip((la * lb).sum(-1) / np.sqrt((la * la).sum(-1) * (lb * lb).sum(-1)), -1.0, 1.0)
        self.rho = np.where(np.isfinite(self.rho), self.rho, 0.0)
        spread = np.ptp(loo_gap, axis=-1) if loo_gap.shape[-1] else np.zeros(np.shape(self.gap))
        self.exact = np.isfinite(spread) & (spread == 0)  # the gap is the same on every leave-one-out: known exactly
        self.ok = a.ok & b.ok

    @staticmethod
    def _loo_dev(j: Jackknife) -> np.ndarray:
        return j.loo - j.loo.mean(-1, keepdims=True)

    def bounds(self, prob) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) with each statistic's interval at t quantile t_df(prob); prob scalar or per leading index."""
        (la, ua), (lb, ub) = (j.bounds(stats.t.ppf(prob, j.df), hold_point=True) for j in (self.a, self.b))
        a, b, rho = self.a.point, self.b.point, self.rho
        with np.errstate(invalid="ignore", over="ignore"):  # p-value bisection reaches levels whose ends are infinite
            lo = self.gap - np.sqrt(np.maximum((a - la) ** 2 + (ub - b) ** 2 - 2 * rho * (a - la) * (ub - b), 0.0))
            hi = self.gap + np.sqrt(np.maximum((ua - a) ** 2 + (b - lb) ** 2 - 2 * rho * (ua - a) * (b - lb), 0.0))
        lo, hi = np.where(self.exact, self.gap, lo), np.where(self.exact, self.gap, hi)
        nan = np.full(np.shape(self.gap), np.nan)
        return np.where(self.ok, lo, nan), np.where(self.ok, hi, nan)

    def p_two_sided(self, steps: int = 64) -> np.ndarray:
        """The α at which the (1 − α) interval's end reaches 0: bisection on log α (the interval widens with 1 − α)."""
        lo_x, hi_x = np.full(np.shape(self.gap), np.log(1e-300)), np.zeros(np.shape(self.gap))
        for _ in range(steps):
            mid = (lo_x + hi_x) / 2
            lo, hi = self.bounds(1 - np.exp(mid) / 2)
            excludes = (lo > 0) | (hi < 0)  # at α = e^mid the interval misses 0: p ≤ α
            hi_x, lo_x = np.where(excludes, mid, hi_x), np.where(excludes, lo_x, mid)
        lo, hi = self.bounds(0.5)
        p = np.where((lo > 0) | (hi < 0), np.exp(hi_x), 1.0)  # at level 0 the interval still holds 0: p = 1
        p = np.where(self.exact, np.where(self.gap == 0, 1.0, 0.0), p)
        return np.where(self.ok & np.isfinite(self.gap), p, np.nan)


def gap_interval(a_pred, b_pred, actual, metric: str, train_mean: float, seed: int = 0) -> dict[str, float]:
    """metric(a) − metric(b) on the same texts, with its paired jackknife-t interval: `gap`, `gap_lo`, `gap_hi`.
    `seed` is unused (kept for callers); `gap_tests` has the p-value."""
    if metric not in METRICS:
        raise ValueError(f"gap metric {metric!r}: allowed pearson_r, skill")
    g = gap_tests(a_pred, b_pred, actual, metric, train_mean)
    return {"gap": _f(g["gap"]), "gap_lo": _f(g["gap_lo"]), "gap_hi": _f(g["gap_hi"])}


# -- per layer: a joint jackknife over the texts the neurons share -------------------------------------------------


def layer_mean_intervals(preds: np.ndarray, actual: np.ndarray, train_mean: np.ndarray,
                         others: dict[str, np.ndarray] | None = None, seed: int = 0,
                         level: float = LEVEL) -> dict[str, float]:
    """Mean over a layer's neurons of r, skill and the gaps self − other, with jackknife-t intervals from leaving
    each shared test text out of every neuron at once.

    preds, actual: N neurons × n texts, column j the same text for every neuron (and in every `others` array);
    train_mean: (N,); others: name → N × n predictions of the same neurons on the same texts (NaN rows for
    neurons without one). Returns, for stat in pearson_r, skill and gap_<name>_pearson_r, gap_<name>_skill:
    `stat` (the mean over neurons), `stat_lo`, `stat_hi`, and `stat_n` (neurons in the mean: those whose
    statistic and leave-one-out values are all finite). The mean of r is intervalled on Fisher z, of skill on
    log(1 − skill), gaps on the raw scale (a mean over many neurons is close to normal; one neuron's gap is skewed,
    which `gap_tests`' MOVER interval follows) — with one neuron, r and skill are that neuron's own intervals
    exactly. Neurons are taken LAYER_CHUNK at a time (a layer's leave-one-out arrays are never held whole; the
    result is the same to the bit). `seed` is unused (kept for symmetry with the per-neuron functions)."""
    preds, actual = np.atleast_2d(np.asarray(preds, np.float64)), np.atleast_2d(np.asarray(actual, np.float64))
    train_mean = np.atleast_1d(np.asarray(train_mean, np.float64))
    if preds.shape != actual.shape or train_mean.shape != preds.shape[:1]:
        raise ValueError(f"preds {preds.shape}, actual {actual.shape} and train_mean {train_mean.shape} disagree")
    others = {k: np.atleast_2d(np.asarray(v, np.float64)) for k, v in (others or {}).items()}
    for name, other in others.items():
        if other.shape != preds.shape:
            raise ValueError(f"others[{name!r}] {other.shape} != preds {preds.shape}")
    means = LayerMeans()
    for s in range(0, len(preds), LAYER_CHUNK):
        at = slice(s, s + LAYER_CHUNK)
        means.add(preds[at], actual[at], train_mean[at], {k: v[at] for k, v in others.items()})
    return means.result(level)


LAYER_CHUNK = 4096
"""Neurons whose leave-one-out arrays `layer_mean_intervals` (and the comparison) hold at once."""


class LayerMeans:
    """`layer_mean_intervals` fed a block of a layer's neurons at a time (the same numbers to the bit, whatever the
    blocks): `add` each block's rows (preds, actual, train_mean and the `others`, the same names every time), then
    `result`."""

    def __init__(self) -> None:
        self.means: dict[str, _LayerMean] = {}

    def add(self, preds: np.ndarray, actual: np.ndarray, train_mean: np.ndarray,
            others: dict[str, np.ndarray] | None = None) -> None:
        own = {m: _loo(m, preds, actual, train_mean) for m in METRICS}
        for m, (point, loo) in own.items():
            self.means.setdefault(m, _LayerMean(SCALE_OF[m], BOUNDS.get(m), hold_point=True)).add(point, loo)
        for name, other in (others or {}).items():
            for m in METRICS:  # a mean over many neurons: raw-scale jackknife-t (see `layer_mean_intervals`)
                (pa, la), (pb, lb) = own[m], _loo(m, other, actual, train_mean)
                self.means.setdefault(f"gap_{name}_{m}", _LayerMean("raw", BOUNDS.get(f"gap_{m}"))).add(pa - pb, la - lb)

    def result(self, level: float = LEVEL) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, mean in self.means.items():
            mean.put(out, key, level)
        return out


class _LayerMean:
    """A layer mean's running parts, neurons a chunk at a time: each neuron's statistic and whether it counts
    (finite, with every leave-one-out value finite), and the sum of the counted neurons' leave-one-out values,
    added row after row as `mean(axis=0)` adds them (so the chunked mean is the whole one to the bit)."""

    def __init__(self, scale: str, bounds: tuple[float, float] | None, hold_point: bool = False):
        self.scale, self.bounds, self.hold_point = scale, bounds, hold_point
        self.points: list[np.ndarray] = []
        self.oks: list[np.ndarray] = []
        self.loo_sum: np.ndarray | None = None

    def add(self, point: np.ndarray, loo: np.ndarray) -> None:
        ok = np.isfinite(point) & np.isfinite(loo).all(-1)
        self.points.append(point)
        self.oks.append(ok)
        rows = loo[ok] if self.loo_sum is None else np.concatenate([self.loo_sum[None], loo[ok]])
        self.loo_sum = rows.sum(0) if len(rows) else self.loo_sum

    def put(self, out: dict, key: str, level: float) -> None:
        point, ok, loo_sum = np.concatenate(self.points), np.concatenate(self.oks), self.loo_sum
        _put(out, key, ok, point, lambda k: jackknife_t(point[k].mean(), np.asarray(loo_sum) / int(k.sum()),
                                                        self.scale, level, self.bounds, bias_correct=True,
                                                        hold_point=self.hold_point))  # (called only when k has one)


def _put(out: dict, key: str, ok: np.ndarray, point: np.ndarray, interval) -> None:
    """A layer mean over the neurons in `ok`, with `interval(ok)`'s lo and hi, and how many neurons it holds."""
    out[f"{key}_n"] = int(ok.sum())
    if not ok.any():
        out[key] = out[f"{key}_lo"] = out[f"{key}_hi"] = float("nan")
        return
    iv = interval(ok)
    out[key], out[f"{key}_lo"], out[f"{key}_hi"] = float(point[ok].mean()), _f(iv["lo"]), _f(iv["hi"])
