"""A layer's probes as one batch against one trial per neuron: what a worker spends per neuron.

    python benchmarks/layer_batch.py [--n-texts 2000] [--layer 2] [--sample 24] [--analyses]

nsr-tiny, default features and settings, 2 threads. "per trial" is the path a sweep took for every
neuron before batching: `run_trial` then `save_trial` (with its chart) for `--sample` neurons spread
over the layer; "batch" is `run_trials` on all 512 neurons then their unit's Parquet files, as a sweep
records a unit. Both write to a temp dir. Prints neurons per second and the ratio, per (head, control);
`--analyses` turns the per-neuron analyses on (exact patching and cosines).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from nsr_sweep.core.cache import ActivationCache, CacheSpec
from nsr_sweep.core.corpus import load_corpus
from nsr_sweep.core.models import load_model
from nsr_sweep.core.spec import TrialSpec
from nsr_sweep.core.trial import run_trial, run_trials
from nsr_sweep.report.plots import trial_chart
from nsr_sweep.results.records import save_trial, save_unit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-texts", type=int, default=2000)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--sample", type=int, default=24)
    ap.add_argument("--analyses", action="store_true")
    args = ap.parse_args()
    model = load_model("nsr-tiny")
    cache = ActivationCache.build(model, load_corpus(n_texts=args.n_texts), CacheSpec(layers=(args.layer,)),
                                  progress=False)
    d_mlp = cache.acts[args.layer].shape[1]
    print(f"nsr-tiny layer {args.layer}: {d_mlp} neurons, {cache.n_texts} texts, analyses "
          f"{'on' if args.analyses else 'off'}\n")
    print(f"{'head':<15} {'control':<9} {'batch n/s':>10} {'per trial n/s':>14} {'ratio':>6}")
    out = Path(tempfile.mkdtemp(prefix="nsr-bench-"))
    for head in ("regression", "classification"):
        for control in (None, "shuffled"):
            def spec(n: int) -> TrialSpec:
                return TrialSpec(layer=args.layer, neuron=n, head=head, control=control, sample=n, analysis={"enabled": args.analyses})
            t0 = time.perf_counter()
            results = run_trials(cache, model, [spec(n) for n in range(d_mlp)])
            save_unit([(r, f"t{r.spec.neuron}", 0) for r in results], out, f"b-{head}-{control}")
            batch = d_mlp / (time.perf_counter() - t0)
            sample = np.linspace(0, d_mlp - 1, args.sample).astype(int)
            t0 = time.perf_counter()
            for n in sample:
                result = run_trial(cache, model, spec(int(n)))
                save_trial(result, out / f"t-{head}-{control}-{n}", chart=trial_chart)
            alone = len(sample) / (time.perf_counter() - t0)
            print(f"{head:<15} {control or '-':<9} {batch:>10.1f} {alone:>14.2f} {batch / alone:>6.1f}")


if __name__ == "__main__":
    main()
