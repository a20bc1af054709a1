"""The same frozen-base sweep run by `nsr-sweep launch` and by a deliberately naive pipeline.

    python benchmarks/sweep_vs_naive.py [--naive-trials 3] [--quickstart]

Sweep: nsr-tiny, 2,000 built-in texts, layers 1 and 2 × the 32 highest-variance neurons ×
{regression, classification} × freeze none × 2 Optuna samples = 256 trials, analyses off (the
naive pipeline has none; the quickstart line below shows a sweep with them on).

Naive pipeline, per trial (what the earlier hand-written scripts did): boot the model with
TransformerLens, run every text alone through `run_with_cache`, read the neuron and the feature
vector, train the head (the same fitting code as nsr-sweep, so only the pipeline differs).
Every naive trial costs the same, so `--naive-trials` of them are timed and the mean is
multiplied by the number of trials (`--naive-trials 256` runs them all: hours).

`--quickstart` also runs sweeps/quickstart.yaml and reports Ray/Tune scheduling overhead as a
share of its wall time: trials wall − Σ(worker time per trial) / workers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SWEEP = """
name: frozen256
model: nsr-tiny
corpus: {n_texts: 2000, max_tokens: 64}
layers: [1, 2]
neurons: [{select: top_variance, k: 32}]
heads: [regression, classification]
freeze: [none]
training: {epochs: 20, batch_size: 64, patience: 3}
search: {num_samples: 2, space: {lr: {loguniform: [1.0e-3, 3.0e-2]}}}
analysis: {enabled: false}   # the naive pipeline does no analyses: the same work on both sides
"""


def run_launch(sweep_file: Path, out: Path) -> tuple[float, dict]:
    env = {**os.environ, "NSR_CACHE_DIR": str(out / "cache")}  # a cold cache: the build is counted
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nsr_sweep.cli", "launch", str(sweep_file), "--out", str(out),
                    "--no-dashboard"], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    state = json.loads(next(out.glob("*/sweep_state.json")).read_text())
    return wall, state


def naive_trial(trial: dict, texts: list[str], model_dir: str, max_tokens: int) -> float:
    from transformer_lens.model_bridge import TransformerBridge

    from nsr_sweep.core.trial import TrialSpec, fit_probes, recipe, split_indices

    t0 = time.perf_counter()
    bridge = TransformerBridge.boot_transformers(model_dir, device="cpu")  # loaded again for every trial
    acts, feats = [], []
    with torch.no_grad():
        for text in texts:  # one text at a time
            tokens = bridge.to_tokens(text)[:, :max_tokens]
            _, cache = bridge.run_with_cache(tokens)
            acts.append(cache[f"blocks.{trial['layer']}.mlp.hook_post"][0, -1, trial["neuron"]].item())
            feats.append(cache["ln_final.hook_normalized"][0, -1].numpy())
    spec = TrialSpec(layer=trial["layer"], neuron=trial["neuron"], head=trial["head"], training={"lr": trial["lr"], "epochs": 20})
    fit_probes(np.stack(feats), np.array(acts)[:, None], trial["head"], recipe(spec), split_indices(len(texts)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--naive-trials", type=int, default=3)
    ap.add_argument("--quickstart", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)

    from nsr_sweep.core.corpus import load_corpus
    from nsr_sweep.core.models import bundled_models

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "frozen256.yaml").write_text(SWEEP)
        wall, state = run_launch(tmp / "frozen256.yaml", tmp / "res")
        rows = __import__("pandas").read_parquet(tmp / "res" / "frozen256" / "tables" / "trials.parquet")
        n_trials = len(rows)
        sample = rows.sample(min(args.naive_trials, n_trials), random_state=0).to_dict("records")
        texts = load_corpus(n_texts=2000).texts
        naive = [naive_trial(t, texts, str(bundled_models()["nsr-tiny"]), 64) for t in sample]
        naive_total = float(np.mean(naive)) * n_trials
        print(f"frozen-base sweep: nsr-tiny, 2000 texts, {n_trials} trials ({(rows.status == 'ok').sum()} ok), "
              f"2 CPU cores, {state['workers']} workers")
        print(f"{'pipeline':<44}{'seconds':>10}{'per trial':>11}")
        print(f"{'nsr-sweep launch (cold cache, Ray init incl.)':<44}{wall:>10.1f}{wall / n_trials:>11.3f}")
        label = f"naive ({len(naive)} timed, × {n_trials})"
        print(f"{label:<44}{naive_total:>10.0f}{np.mean(naive):>11.2f}")
        print(f"speed-up: {naive_total / wall:.0f}×  (target ≥ 50×); nsr-sweep timings {state['timings']}")

        if args.quickstart:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "nsr_sweep.cli", "launch", str(REPO / "sweeps" / "quickstart.yaml"),
                            "--out", str(tmp / "q"), "--no-dashboard"], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env={**os.environ, "NSR_CACHE_DIR": str(tmp / "qcache")})
            q_wall = time.perf_counter() - t0
            t = json.loads((tmp / "q" / "quickstart" / "sweep_state.json").read_text())["timings"]
            print(f"quickstart: {q_wall:.0f} s wall (command), trials wall {t['trials_wall_s']:.0f} s, worker time "
                  f"{t['trial_work_s']:.0f} s; scheduling overhead {t['scheduling_overhead_s']:.1f} s = "
                  f"{t['scheduling_overhead_s'] / q_wall:.1%} of wall (target ≤ 10%)")


if __name__ == "__main__":
    main()
