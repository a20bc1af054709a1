"""A real model's layer: the probes' worker time against the cache build (issue 29, deliverable 6).

    python benchmarks/real_layer.py [--neurons 96] [--texts 1000] [--unit 48] [--workers 2] [--layer 8]

GPT-2 small's shapes with random weights (`{name: openai-community/gpt2, init: random}`, offline), the
bundled python-docs corpus at 64 tokens, `every-neuron-gpt2.yaml`'s probes (regression and classification
beside their shuffled controls, the cross-model `nsr-tiny-seed1` and input-only), every probe patched
exactly, on the first `--neurons` neurons of `--layer`, in units of `--unit` neurons as a model worker runs
them (`run_trials`), dealt in turn to `--workers` workers' memos, one after another in this process. Prints the cache build's seconds (a fresh cache root; the cross-model's features
included), the probes' worker seconds split into fit / patch / finish, and their ratio to the cache build.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml
from gpu import RANDOM_GPT2, REPO

from nsr_sweep.core import trial
from nsr_sweep.core.identity import TrialSpec
from nsr_sweep.core.reuse import Reuse
from nsr_sweep.core.sweepfile import parse_sweep
from nsr_sweep.sweep.grid import expand
from nsr_sweep.sweep.inputs import build_cache, load_model, model_spec

PHASES = {"fit": "probe_fits", "patch": "_patch_probes"}


def sweep(layer: int, texts: int):
    data = yaml.safe_load((REPO / "sweeps" / "every-neuron-gpt2.yaml").read_text())
    data.update(model=RANDOM_GPT2, layers=[layer], controls=["shuffled", {"cross_model": "nsr-tiny-seed1"},
                                                             "input_only"])
    data["corpus"] = {**data["corpus"], "n_texts": texts}
    return parse_sweep(data)


def timed(seconds: dict[str, float]) -> None:
    """Wrap each phase's function in `core.trial` so its seconds add up in `seconds`."""
    for phase, name in PHASES.items():
        inner = getattr(trial, name)

        def wrapped(*a, _inner=inner, _phase=phase, **k):
            t0 = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                seconds[_phase] += time.perf_counter() - t0
        setattr(trial, name, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--neurons", type=int, default=96)
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--unit", type=int, default=48, help="neurons per unit of work")
    ap.add_argument("--layer", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2, help="model workers the units are dealt to in turn (each "
                    "keeps its own patching engine, as `sweep.workers.ModelWorker` does)")
    args = ap.parse_args()
    spec = sweep(args.layer, args.texts)
    model = load_model(model_spec(spec))
    t0 = time.perf_counter()
    cache = build_cache(spec, root=tempfile.mkdtemp(prefix="nsr-real-layer-"), progress=False, model=model)
    build = time.perf_counter() - t0
    points = expand(spec, {args.layer: list(range(args.neurons))})
    seconds: dict[str, float] = defaultdict(float)
    timed(seconds)
    reuses, failed, t0 = [Reuse() for _ in range(args.workers)], 0, time.perf_counter()
    for k, lo in enumerate(range(0, args.neurons, args.unit)):
        unit = [p for p in points if lo <= p.neuron < lo + args.unit]
        results = trial.run_trials(cache, model, [TrialSpec.in_sweep(spec, **p.model_dump()) for p in unit],
                                   reuse=reuses[k % args.workers])
        failed += sum(r.status != "ok" for r in results)
    probes = time.perf_counter() - t0
    seconds["finish"] = probes - seconds["fit"] - seconds["patch"]
    print(f"GPT-2-small shape (random), layer {args.layer}, {args.neurons} neurons × {len(points) // args.neurons} "
          f"probes = {len(points)} probes ({failed} failed), {cache.n_texts} texts, units of {args.unit} neurons on {args.workers} workers, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"cache build {build:.1f} s; probes {probes:.1f} s = {probes / build:.2f}× the build "
          f"({probes / len(points):.3f} s a probe)")
    for phase in ("fit", "patch", "finish"):
        print(f"  {phase:<7} {seconds[phase]:7.1f} s  {seconds[phase] / build:.2f}× the build")


if __name__ == "__main__":
    main()
