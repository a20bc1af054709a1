"""`sweeps/every-neuron.yaml` as written: every neuron of nsr-tiny asks "better than an outsider?" (targets:
≤ 10 minutes on 2 CPU cores with the report; ≤ 1,000 files and ≤ 200 MB of results).

    python benchmarks/every_neuron.py [--hook pre] [--per-trial-k 0] [--out DIR]

A real launch on local Ray (the activation cache is built inside it, as from a fresh clone). Prints the
wall clock (total with the report, the trials, the report), the results directory's files and size, the
checks of issue 18 (every probe row has a finite exact patch slope; cross-model and input-only rows for
every neuron), and the first-order estimate's agreement with exact patching per layer and head.
`--hook pre` runs the same sweep on `blocks.L.mlp.hook_pre`; `--per-trial-k K` also runs the sweep with
one neuron per unit of work (`resources.batch_neurons: 1`) on the top K neurons of each layer.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from _launch import launch

REPO = Path(__file__).resolve().parents[1]


def checks(d: Path) -> list[str]:
    df = pd.read_parquet(d / "tables" / "trials.parquet")
    probes = df[df["freeze"] == "none"]
    real = probes[probes["control"].isna()]
    lines = [f"probe rows {len(probes)}, with a finite exact patch_slope: {int(np.isfinite(probes['patch_slope']).sum())}",
             f"status: {df['status'].value_counts().to_dict()}"]
    for c in ("cross_model", "input_only", "shuffled"):
        have = set(zip(probes.loc[probes["control"] == c, "layer"], probes.loc[probes["control"] == c, "neuron"]))
        lines.append(f"neurons with {c} rows: {len(have)} of {len(set(zip(real['layer'], real['neuron'])))}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hook", choices=["post", "pre"], default="post")
    ap.add_argument("--per-trial-k", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="nsr-every-"))
    out.mkdir(parents=True, exist_ok=True)
    sweep = yaml.safe_load((REPO / "sweeps" / "every-neuron.yaml").read_text())
    if args.hook == "pre":
        sweep = {**sweep, "name": "every-neuron-pre", "target": {"hook": "pre"}}
    runs = {"units": launch(sweep, out)}
    if args.per_trial_k:
        runs["neuron per unit"] = launch({**sweep, "name": f"{sweep['name']}-per-neuron",
                                          "neurons": [{"select": "top_variance", "k": args.per_trial_k}],
                                          "resources": {**sweep.get("resources", {}), "batch_neurons": 1}}, out)
    print(f"{'path':<16} {'neurons':>8} {'trials':>7} {'wall s':>8} {'cache s':>8} {'trials s':>9} {'report s':>9} "
          f"{'files':>6} {'MB':>7} {'neurons/s':>10}")
    for name, r in runs.items():
        print(f"{name:<16} {r['neurons']:>8} {r['trials']:>7} {r['wall_s']:>8.1f} {r['cache_s']:>8.1f} "
              f"{r['trials_s']:>9.1f} {r['report_s'] or 0.0:>9.1f} {r['files']:>6} {r['mb']:>7.1f} "
              f"{r['neurons'] / r['wall_s']:>10.2f}")
    d = runs["units"]["dir"]
    print("\n" + "\n".join(checks(d)))
    agree = pd.read_parquet(d / "tables" / "patch_estimate.parquet")
    print("\nfirst-order estimate vs exact patch slope (tables/patch_estimate.parquet):")
    print(agree.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    comp = pd.read_parquet(d / "tables" / "comparison_by_layer.parquet")
    cols = ["layer", "head", "n_neurons", "self_r", "cross_r", "input_only_r", "n_gap_cross_r_positive",
            "n_gap_cross_r_negative", "n_gap_input_only_r_positive"]
    print("\nself vs outsiders per layer (tables/comparison_by_layer.parquet):")
    print(comp[[c for c in cols if c in comp]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nresults under {out}")


if __name__ == "__main__":
    main()
