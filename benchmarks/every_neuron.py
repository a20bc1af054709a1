"""`sweeps/every-neuron.yaml` against the per-trial path, side by side in one run (issue 12's target: ≥ 20×
the neurons per second, and the whole sweep ≤ 10 minutes on 2 CPU cores, report included).

    python benchmarks/every_neuron.py [--per-trial-k 8] [--out DIR]

1. the sweep as written: all 2,048 neurons of nsr-tiny × (regression, classification) × (real,
   shuffled), batched probes, analyses on;
2. the same sweep with `resources.batch_neurons: 1` (one trial per neuron, the path before batching)
   on the top `--per-trial-k` neurons by variance of each layer.
Both are real launches on local Ray; the activation cache is built by the first and loaded by the
second. Prints wall-clock seconds (total with report, and the trials alone) and neurons per second.
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

import yaml

REPO = Path(__file__).resolve().parents[1]


def launch(sweep: dict, out: Path) -> dict:
    f = out / f"{sweep['name']}.yaml"
    f.write_text(yaml.safe_dump(sweep))
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "nsr_sweep.cli", "launch", str(f), "--out", str(out), "--no-dashboard"],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    state = json.loads((out / sweep["name"] / "sweep_state.json").read_text())
    n = sum(len(v) for v in state["neurons"].values())
    return {"neurons": n, "trials": sum(state["counts"].values()), "wall_s": time.time() - t0,
            "trials_s": state["timings"]["trials_wall_s"], "report_s": state.get("report_s", 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-trial-k", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="nsr-every-"))
    out.mkdir(parents=True, exist_ok=True)
    sweep = yaml.safe_load((REPO / "sweeps" / "every-neuron.yaml").read_text())
    batched = launch(sweep, out)
    per_trial = launch({**sweep, "name": "every-neuron-per-trial",
                        "neurons": [{"select": "top_variance", "k": args.per_trial_k}],
                        "resources": {**sweep.get("resources", {}), "batch_neurons": 1}}, out)
    print(f"{'path':<11} {'neurons':>8} {'trials':>7} {'wall s':>8} {'trials s':>9} {'report s':>9} "
          f"{'neurons/s (wall)':>17} {'neurons/s (trials)':>19}")
    for name, r in (("batched", batched), ("per trial", per_trial)):
        print(f"{name:<11} {r['neurons']:>8} {r['trials']:>7} {r['wall_s']:>8.1f} {r['trials_s']:>9.1f} "
              f"{r['report_s']:>9.1f} {r['neurons'] / r['wall_s']:>17.2f} {r['neurons'] / r['trials_s']:>19.2f}")
    ratio_wall = (batched["neurons"] / batched["wall_s"]) / (per_trial["neurons"] / per_trial["wall_s"])
    ratio_trials = (batched["neurons"] / batched["trials_s"]) / (per_trial["neurons"] / per_trial["trials_s"])
    print(f"\nbatched / per trial: {ratio_wall:.1f}× neurons per second (wall), {ratio_trials:.1f}× (trials)")
    print(f"results under {out}")


if __name__ == "__main__":
    main()
