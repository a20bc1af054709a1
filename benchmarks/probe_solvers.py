"""Exact probes against AdamW probes: what convergence buys, and what it costs.

    python benchmarks/probe_solvers.py [--n-texts 2000] [--neurons 40 7 300]

For nsr-tiny's layer 2, probes on three feature hooks — `blocks.2.mlp.hook_post` (the neuron is a
feature: the exact answer is r = 1, patch slope = 1), `ln_final.hook_out` (the default) and the
same with permuted targets (the shuffled control: r ≈ 0, slope ≈ 0) — fit by `solver: exact` and by
`solver: adamw` at default settings. Prints r, patch slope, and seconds per trial (fit + analyses)
and per fit alone.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from nsr_sweep.core.cache import ActivationCache, CacheSpec
from nsr_sweep.core.corpus import load_corpus
from nsr_sweep.core.fit import fit_probes
from nsr_sweep.core.models import load_model
from nsr_sweep.core.spec import TrialSpec
from nsr_sweep.core.trial import recipe, run_trial, split_indices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-texts", type=int, default=2000)
    ap.add_argument("--neurons", type=int, nargs="+", default=[40, 7, 300])
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load_model("nsr-tiny")
    corpus = load_corpus(n_texts=args.n_texts)
    print(f"nsr-tiny layer 2, {args.n_texts} texts, 1 thread; median over neurons {args.neurons}\n")
    print(f"{'features':<24} {'head':<15} {'control':<9} {'solver':<7} {'r':>8} {'slope':>8} {'trial s':>8} {'fit s':>7}")
    for feature in ("blocks.2.mlp.hook_post", "ln_final.hook_out"):
        cache = ActivationCache.build(model, corpus, CacheSpec(layers=(2,), features=feature), progress=False)
        splits = split_indices(cache.n_texts)
        for head in ("regression", "classification"):
            for control in (None, "shuffled"):
                for solver in ("exact", "adamw"):
                    rows = []
                    for n in args.neurons:
                        spec = TrialSpec(layer=2, neuron=n, head=head, control=control, features={"hook": feature}, training={"solver": solver})
                        t0 = time.perf_counter()
                        m = run_trial(cache, model, spec).metrics
                        t_trial = time.perf_counter() - t0
                        t0 = time.perf_counter()
                        y = cache.activations(2, n).astype(np.float64)
                        if control == "shuffled":  # as run_trial permutes it
                            y = np.random.default_rng(spec.seed).permutation(y)
                        fit_probes(cache.features, y[:, None], head, recipe(spec), splits)
                        rows.append((m["pearson_r"], m["patch_slope"], t_trial, time.perf_counter() - t0))
                    r, slope, tt, tf = np.median(np.array(rows), 0)
                    print(f"{feature:<24} {head:<15} {control or '-':<9} {solver:<7} {r:>8.4f} {slope:>8.4f} "
                          f"{tt:>8.2f} {tf:>7.2f}")


if __name__ == "__main__":
    main()
