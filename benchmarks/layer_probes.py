"""Probes for a whole layer at once against one neuron at a time (issue 12, first step: the solvers).

    python benchmarks/layer_probes.py [--n-texts 2000] [--layer 2] [--sample 16] [--features HOOK] [--threads 1]

nsr-tiny, default settings, features `--features` (default `ln_final.hook_out`, width 128; the known-answer
features are `blocks.2.mlp.hook_post`, width 512): `fit_probes` on all 512 neurons of the layer in one call,
and on `--sample` neurons one call each (the per-trial path's fit). Prints neurons per second for
regression and classification, real and shuffled targets, the largest difference between a neuron's
prediction fitted together and alone, and the mean solver iterations (classification: Newton iterations
at the chosen strength). Torch runs on `--threads` threads (1: one core's worth, comparable on a shared
machine); the load average is printed, since other work on the machine slows every number.
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
from nsr_sweep.core.trial import recipe, split_indices


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-texts", type=int, default=2000)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--sample", type=int, default=16)
    ap.add_argument("--features", default="ln_final.hook_out")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("nsr-tiny")
    cache = ActivationCache.build(model, load_corpus(n_texts=args.n_texts),
                                  CacheSpec(layers=(args.layer,), features=args.features), progress=False)
    splits = split_indices(cache.n_texts)
    real = np.asarray(cache.acts[args.layer], np.float64)
    X = torch.from_numpy(np.array(cache.features, np.float32))  # a private copy: the cache's arrays are read-only
    print(f"nsr-tiny layer {args.layer}: {real.shape[1]} neurons, {cache.n_texts} texts, features "
          f"{cache.meta['spec']['features']} ({cache.features.shape[1]}), {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print(f"{'head':<15} {'targets':<9} {'together n/s':>13} {'alone n/s':>10} {'ratio':>6} {'max |Δpred|':>12} "
          f"{'iters':>6}")
    for head in ("regression", "classification"):
        for control in ("real", "shuffled"):
            Y = real if control == "real" else np.random.default_rng(0).permutation(real)
            spec = TrialSpec(layer=args.layer, neuron=0, head=head, features={"hook": args.features})
            t0 = time.perf_counter()
            together = fit_probes(cache.features, Y, head, recipe(spec), splits)
            t_together = time.perf_counter() - t0
            sample = np.linspace(0, Y.shape[1] - 1, args.sample).astype(int)
            t0 = time.perf_counter()
            alone = [fit_probes(cache.features, Y[:, [j]], head, recipe(spec), splits) for j in sample]
            t_alone = time.perf_counter() - t0
            diff = max(float((a.maps[0].predict(a.head(0)(X)) - together.maps[j].predict(together.head(j)(X))).abs().max())
                       for a, j in zip(alone, sample))
            iters = np.mean([i.get("iterations", 0) for i in together.info])
            rate_t, rate_a = Y.shape[1] / t_together, len(sample) / t_alone
            print(f"{head:<15} {control:<9} {rate_t:>13.1f} {rate_a:>10.1f} {rate_t / rate_a:>6.1f} {diff:>12.1e} "
                  f"{iters:>6.1f}")


if __name__ == "__main__":
    main()
