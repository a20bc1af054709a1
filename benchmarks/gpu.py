"""The GPU path on GPT-2-small shapes (random init, offline): trials/hour, probes/s, cache tokens/s.

    python benchmarks/gpu.py [--minutes 8] [--out DIR]

On a machine with CUDA it launches two sweeps on local Ray, each a slice of a bundled sweep file with
`model: {name: openai-community/gpt2, init: random}` (GPT-2 small's shapes, no download) and
`resources.device: cuda`:

- `layer8.yaml`'s shape: layer 8, every head × freeze mode, a few neurons and Optuna samples
  → trials/hour (unfrozen fine-tuning dominates);
- `every-neuron-gpt2.yaml`'s shape: every neuron of some layers, regression and classification probes
  with shuffled, cross-model and input-only controls, exact patching → probes/s. The outsider is the
  bundled `nsr-tiny-seed1` (the random GPT-2 borrows nsr-tiny's tokenizer; the hub sibling would need
  the network).

Each sweep gets about half of `--minutes` (default 8); the sizes below were chosen to fit an H100.
Prints a table in the format of `benchmarks/RESULTS.md`. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from every_neuron import launch  # noqa: E402  (the same launch and directory measures as the CPU benchmark)

RANDOM_GPT2 = {"name": "openai-community/gpt2", "init": "random"}


def layer8_shape(neurons: int, samples: int) -> dict:
    sweep = yaml.safe_load((REPO / "sweeps" / "layer8.yaml").read_text())
    sweep.update(name="gpu-layer8", model=RANDOM_GPT2, neurons=[{"select": "top_variance", "k": neurons}])
    sweep["corpus"] = {**sweep["corpus"], "n_texts": 2000}
    sweep["search"] = {**sweep["search"], "num_samples": samples, "space": {"lr": {"loguniform": [1e-4, 3e-2]},
                                                                           "epochs": {"int": [2, 4]}}}
    sweep["resources"] = {**sweep["resources"], "device": "cuda"}
    return sweep


def every_neuron_shape(layers: list[int]) -> dict:
    sweep = yaml.safe_load((REPO / "sweeps" / "every-neuron-gpt2.yaml").read_text())
    sweep.update(name="gpu-every-neuron", model=RANDOM_GPT2, layers=layers,
                 controls=["shuffled", {"cross_model": "nsr-tiny-seed1"}, "input_only"])
    sweep["corpus"] = {**sweep["corpus"], "max_tokens": 64}
    sweep["resources"] = {**sweep["resources"], "device": "cuda"}
    return sweep


def cache_tokens_per_second(d: Path) -> float:
    return float(json.loads((d / "cache_keys.json").read_text())[0]["tokens_per_second"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device on this machine (torch.cuda.is_available() is False); nothing to measure")
        return 0
    out = Path(args.out or tempfile.mkdtemp(prefix="nsr-gpu-"))
    out.mkdir(parents=True, exist_ok=True)
    scale = args.minutes / 8.0  # the sizes below fill about 8 minutes on one H100
    t0 = time.time()
    runs = {"layer8 shape": launch(layer8_shape(max(1, round(4 * scale)), 2), out)}
    left = args.minutes * 60 - (time.time() - t0)
    runs["every-neuron shape"] = launch(every_neuron_shape([8] if left < 300 else [7, 8]), out)
    device = torch.cuda.get_device_name(0)
    print(f"device: {device}, torch {torch.__version__}\n")
    print("| sweep | trials | neurons | wall s | cache s | cache tokens/s | trials s | trials/hour | probes/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['trials']:,} | {r['neurons']:,} | {r['wall_s']:.1f} | {r['cache_s']:.1f} | "
              f"{cache_tokens_per_second(r['dir']):,.0f} | {r['trials_s']:.1f} | "
              f"{3600 * r['trials'] / r['trials_s']:,.0f} | {r['trials'] / r['trials_s']:.1f} |")
    print(f"\nresults under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
