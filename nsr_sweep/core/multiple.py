"""Many neurons at once: each neuron's gap p-value, and Benjamini–Hochberg (or Benjamini–Yekutieli) over a layer's
neurons — the multiple-comparison control behind the comparison table's q-values and its counts of calls."""

from __future__ import annotations

import numpy as np

from .uncertainty import gap_tests


def gap_pvalues(self_preds, other_preds, actual, metric: str, train_mean, alternative: str = "two-sided"):
    """p-value per neuron (rows of N × n arrays; train_mean (N,)) for the paired gap metric(self) − metric(other):
    `gap_tests(...)["gap_p"]`. NaN where the gap is undefined (pass those to `bh_reject`: they are never rejected)."""
    return gap_tests(np.atleast_2d(self_preds), np.atleast_2d(other_preds), np.atleast_2d(actual), metric,
                     np.atleast_1d(train_mean), alternative)["gap_p"]


def bh_reject(pvalues, q: float = 0.05, dependence: str = "prds") -> np.ndarray:
    """Benjamini–Hochberg at false discovery rate q: a bool per p-value (True = rejected = a discovery).

    Apply it to the neurons of one layer (one family). Those neurons share their test texts, so their gap statistics
    are dependent. BH controls the FDR under positive regression dependence (PRDS, Benjamini & Yekutieli 2001); that
    two-sided gap tests on shared texts satisfy it is not proven, so it is measured on the bundled model's real
    neurons (`benchmarks/coverage_real.py`: the directional FDR of the layer's "gap > 0" calls over fresh test
    draws; docs/science.md, Uncertainty). `dependence="any"` is Benjamini–Yekutieli, q / Σ₁ᵐ 1/k: valid under any
    dependence, at a loss of power. NaN p-values are not rejected and do not count towards the number of tests m."""
    return bh_adjusted(pvalues, dependence) <= q  # step-up BH rejects exactly the p-values whose adjusted value is ≤ q


def bh_adjusted(pvalues, dependence: str = "prds") -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values; NaN stays NaN): rejected at q ⇔ adjusted ≤ q. With
    `dependence="any"`, Benjamini–Yekutieli's (BH's times Σ₁ᵐ 1/k, capped at 1)."""
    if dependence not in ("prds", "any"):
        raise ValueError(f"dependence {dependence!r}: allowed prds (Benjamini–Hochberg), any (Benjamini–Yekutieli)")
    p = np.asarray(pvalues, np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return out
    pv = p[ok]
    order = np.argsort(pv, kind="stable")
    scale = m * (np.sum(1.0 / np.arange(1, m + 1)) if dependence == "any" else 1.0)
    adj = np.minimum.accumulate((pv[order] * scale / np.arange(1, m + 1))[::-1])[::-1]
    res = np.empty(m)
    res[order] = np.minimum(adj, 1.0)
    out[ok] = res
    return out
