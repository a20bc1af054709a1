"""The GPU path on GPT-2-small shapes (random init, offline), time-boxed to fit one device lease.

    python benchmarks/gpu.py [--minutes 9] [--out DIR] [--smoke]

On a machine with CUDA it launches, on local Ray, slices of the bundled sweep files with
`model: {name: openai-community/gpt2, init: random}` (GPT-2 small's shapes, no download) and
`resources.device: cuda`:

1. `every-neuron-gpt2.yaml` on one layer (8): all 3,072 neurons, 4,000 texts, regression and
   classification probes with shuffled, cross-model and input-only controls, every probe patched
   exactly → probes/s and the wall clock (issue 12's target: the layer in ≤ 5 minutes). The outsider is
   the bundled `nsr-tiny-seed1` (the random GPT-2 borrows nsr-tiny's tokenizer; the hub sibling would
   need the network).
2. Unfrozen trials (`layer8.yaml`'s shape, freeze after_target and all) with one model worker on the
   GPU and then four sharing it (`gpus_per_worker` 1 and 0.25) → trials/hour and the GPU's mean
   utilisation in each, to choose how many unfrozen-trial workers keep a GPU busy.

Each launch has its own time box; one that runs past it is stopped and reported with the trials that
arrived. `nvidia-smi` samples the GPU's utilisation every second (`smi.csv`). Prints a table in the
format of `benchmarks/RESULTS.md`; without CUDA it says so and exits 0 (`--smoke` runs tiny versions on
the CPU instead, to check the script itself).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml
from _launch import launch

REPO = Path(__file__).resolve().parents[1]
RANDOM_GPT2 = {"name": "openai-community/gpt2", "init": "random"}


def every_neuron_shape(layers: list[int], device: str) -> dict:
    sweep = yaml.safe_load((REPO / "sweeps" / "every-neuron-gpt2.yaml").read_text())
    sweep.update(name="gpu-every-neuron", model=RANDOM_GPT2, layers=layers,
                 controls=["shuffled", {"cross_model": "nsr-tiny-seed1"}, "input_only"])
    sweep["resources"] = {**sweep["resources"], "device": device}
    return sweep


def unfrozen_shape(neurons: int, samples: int, gpus_per_worker: float, device: str, heads: list[str],
                   n_texts: int) -> dict:
    sweep = yaml.safe_load((REPO / "sweeps" / "layer8.yaml").read_text())
    share = str(gpus_per_worker).replace(".", "")
    sweep.update(name=f"gpu-unfrozen-g{share}", model=RANDOM_GPT2, heads=heads,
                 freeze=["after_target", "all"], neurons=[{"select": "top_variance", "k": neurons}])
    sweep["corpus"] = {**sweep["corpus"], "n_texts": n_texts}
    sweep["search"] = {**sweep["search"], "num_samples": samples, "space": {"lr": {"loguniform": [1e-4, 3e-2]},
                                                                           "epochs": {"int": [2, 3]}}}
    sweep["resources"] = {**sweep["resources"], "device": device, "gpus_per_worker": gpus_per_worker,
                          "cpus_per_trial": 2}
    return sweep


def gpu_use(smi: Path, t0: float, t1: float) -> str:
    """Mean GPU utilisation (%) and peak memory (MiB) that nvidia-smi sampled between t0 and t1."""
    if not smi.exists():
        return "n/a"
    rows = []
    for row in csv.reader(smi.read_text().splitlines()):
        try:
            rows.append((float(row[0]), float(row[1]), float(row[2])))
        except (ValueError, IndexError):
            continue
    inside = [r for r in rows if t0 <= r[0] <= t1]
    if not inside:
        return "n/a"
    return f"{sum(r[1] for r in inside) / len(inside):.0f}% / {max(r[2] for r in inside):,.0f} MiB"


def sample_gpu(smi: Path) -> subprocess.Popen | None:
    """nvidia-smi every second, as `unix time, utilisation %, memory used MiB`."""
    script = ("import subprocess,time,sys\nwhile True:\n  q=subprocess.run(['nvidia-smi','--query-gpu=utilization.gpu,"
              "memory.used','--format=csv,noheader,nounits'],capture_output=True,text=True).stdout.strip()"
              ".splitlines()\n  print(f'{time.time()},{q[0] if q else \"\"}',flush=True)\n  time.sleep(1)\n")
    try:
        return subprocess.Popen([sys.executable, "-c", script], stdout=open(smi, "w"), stderr=subprocess.DEVNULL)
    except OSError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=9.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--shares", default="1,0.25", help="gpus_per_worker of the unfrozen launches, in order")
    ap.add_argument("--unfrozen", default="2,2,2000", help="neurons, Optuna samples and texts of each unfrozen launch")
    ap.add_argument("--smoke", action="store_true", help="tiny versions on the CPU (checks the script)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("benchmarks/gpu.py: no CUDA device on this machine (torch.cuda.is_available() is False); nothing to measure")
        return 0
    device = "cpu" if args.smoke else "cuda"
    out = Path(args.out or tempfile.mkdtemp(prefix="nsr-gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.minutes * 60
    smi = out / "smi.csv"
    sampler = None if args.smoke else sample_gpu(smi)
    every = every_neuron_shape([8], device)
    if args.smoke:
        every["corpus"] = {**every["corpus"], "n_texts": 200}
        every["neurons"] = [{"select": "top_variance", "k": 8}]
        every["resources"] = {**every["resources"], "gpus_per_worker": 0}
    shares = [float(x) for x in args.shares.split(",") if x]
    k, samples, n_texts = (int(x) for x in args.unfrozen.split(","))
    runs = [launch(every, out, min(330.0, deadline - time.time() - 75 * len(shares)))]
    print(json.dumps({k: v for k, v in runs[-1].items() if k != "dir"}, default=str), flush=True)
    heads = ["regression", "token"] if len(shares) > 1 else ["regression", "classification", "token"]
    for i, share in enumerate(shares):
        left = deadline - time.time()
        if left < 45:
            break
        sweep = unfrozen_shape(k, samples, share, device, heads, n_texts)
        if args.smoke:
            sweep["corpus"] = {**sweep["corpus"], "n_texts": 100, "max_tokens": 24}
            sweep["resources"] = {**sweep["resources"], "gpus_per_worker": 0, "workers": 1 if share == 1 else 2,
                                  "cpus_per_trial": 1}
        runs.append(launch(sweep, out, (left - 15) / (len(shares) - i)))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "dir"}, default=str), flush=True)
    if sampler:
        sampler.terminate()
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke)"
    print(f"\ndevice: {name}, torch {torch.__version__}\n")
    print("| sweep | rc | trials arrived/expected | neurons | wall s | ray s | cache s | trials s | trials/hour "
          "| probes/s | GPU util / peak mem |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        t = r["timings"]
        trials_s = t.get("trials_wall_s") or (r["arrived"] / r["rate_per_s"] if r["rate_per_s"] else r["wall_s"])
        print(f"| {r['name']} | {r['rc']} | {r['arrived']:,}/{r['expected']} | {r['neurons']:,} | {r['wall_s']:.1f} | "
              f"{t.get('ray_init_s', float('nan')):.1f} | {t.get('cache_s', float('nan')):.1f} | {trials_s:.1f} | "
              f"{3600 * r['arrived'] / trials_s:,.0f} | {r['arrived'] / trials_s:.1f} | {gpu_use(smi, r['t0'], r['t1'])} |")
    keep = out / "results.tar.gz"  # the tables, states and logs, small enough to come back from a lease
    with tarfile.open(keep, "w:gz") as tar:
        for r in runs:
            tar.add(out / f"{r['name']}.log", arcname=f"{r['name']}.log")
            for rel in ("sweep_state.json", "tables", "cache_keys.json", "runs.jsonl"):
                if (r["dir"] / rel).exists():
                    tar.add(r["dir"] / rel, arcname=f"{r['name']}/{rel}")
    print(f"\nresults under {out} (tables: {keep})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
