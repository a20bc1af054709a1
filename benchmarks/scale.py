"""Flat at ten times the rows (issue 29, deliverable 7): the launch's memory and speed at 32k and ~300k probes.

    python benchmarks/scale.py [--width 73728] [--small 8192] [--texts 600] [--tokens 32] [--analysis]
                               [--only small|large]

A wide random model of nsr-tiny's shape (GPT-2 blocks, d_model 128, 4 layers) whose MLPs have `--width` neurons,
saved to a temp directory; one layer's neurons probed by regression and classification heads beside their
shuffled controls (4 probes a neuron; `--analysis` patches every probe too — the probes' own cost is
`real_layer.py`'s question, this one's is the launch's at scale): first `--small` neurons (32,768 probes at 8,192),
then every neuron of the layer (294,912 at 73,728). Two real launches on local Ray, offline, with the
report. While each runs, the memory of the launch's own process, of each model worker and of the inbox (an
actor on the driver's node) is sampled every second (RSS, psutil). Prints, per run: probes, probes/s over the
trials phase, the launch process's RSS at the start of the trials, its peak during them, during the finish and
during the report (and the report's seconds), the workers' and inbox's peaks, the unit size, the results' files and
size — then what every neuron of GPT-2 small and XL would write and hold (`footprints`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil
from _launch import launch

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "nsr_sweep" / "models" / "nsr-tiny"
PROBES_PER_NEURON = 4  # regression and classification, each beside its shuffled control
GPT2 = {"GPT-2 small": (12, 768, 3072, 124e6), "GPT-2 XL": (48, 1600, 6400, 1.56e9)}  # layers, d_model, d_mlp, params


def wide_model(width: int, out: Path) -> Path:
    """nsr-tiny's config and tokenizer with `width` MLP neurons a layer, random weights (seed 0), in HF format."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    d = out / f"wide-{width}"
    d.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / f, d / f)
    config = json.loads((TINY / "config.json").read_text())
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**{**config, "n_inner": width})).save_pretrained(d)
    return d


class Watch:
    """Samples the RSS of the launch's processes every `every` seconds: the launch's own (the isolated child when
    there is one), each model worker, the inbox."""

    ROLES = {"launch": ("nsr_sweep.sweep.child",), "worker": ("ModelWorker",), "inbox": ("Inbox",)}

    def __init__(self, every: float = 1.0):
        self.every, self.samples, self.stopped, self.torch = every, [], threading.Event(), False
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def role(self, p: psutil.Process) -> str | None:
        text = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        for role, marks in self.ROLES.items():
            if any(m in text for m in marks):
                return role
        return "cli" if "nsr_sweep.cli" in text and "launch" in text else None

    def loop(self) -> None:
        while not self.stopped.wait(self.every):
            now, got = time.time(), {}
            for p in psutil.process_iter(["pid", "cmdline", "name"]):
                try:
                    if (role := self.role(p)) is not None:
                        got.setdefault(role, []).append(p.memory_info().rss)
                        if role == "launch" and not self.torch:  # the launch's own process never needs torch
                            self.torch = any("libtorch" in m.path for m in p.memory_maps())
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.samples.append((now, got))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()

    def peak(self, role: str, t0: float = 0.0, t1: float = float("inf")) -> float:
        """The largest RSS (MB) of one process in `role` between t0 and t1."""
        return max((max(v) for t, g in self.samples if t0 <= t <= t1 for r, v in g.items() if r == role),
                   default=0) / 1e6

    def at(self, role: str, t: float) -> float:
        """The RSS (MB) of the first sample of `role` at or after t."""
        return next((max(g[role]) for s, g in self.samples if s >= t and role in g), 0) / 1e6

    def launch_role(self) -> str:
        return "launch" if any("launch" in g for _, g in self.samples) else "cli"


def run(name: str, model: Path, neurons, args, out: Path) -> dict:
    sweep = {"name": name, "model": str(model), "corpus": {"n_texts": args.texts, "max_tokens": args.tokens},
             "layers": [args.layer], "neurons": neurons, "heads": ["regression", "classification"],
             "freeze": ["none"], "controls": ["shuffled"], "resources": {"workers": args.workers},
             "analysis": {"enabled": args.analysis}}
    with Watch() as w:
        r = launch(sweep, out)
    (out / f"{name}-memory.json").write_text(json.dumps(w.samples))  # (time, {role: [RSS, …]}) every second
    state = json.loads((r["dir"] / "sweep_state.json").read_text())
    t = state["timings"]
    start = r["t0"] + t["ray_init_s"] + t["cache_s"]  # the trials phase, on the launch's clock
    end = start + t["trials_wall_s"]
    role = w.launch_role()
    report = time.time() if "report_s" not in state else state["started"] + state["total_with_report_s"] - \
        state["report_s"]  # the report's start, on the launch's clock
    units = sorted((r["dir"] / "probes" / "records").glob("*.parquet"))
    return {**r, "probes": r["trials"], "probes_per_s": r["trials"] / t["trials_wall_s"],
            "launch_at_trials_mb": w.at(role, start), "launch_trials_peak_mb": w.peak(role, start, end),
            "launch_after_peak_mb": w.peak(role, end), "launch_finish_peak_mb": w.peak(role, end, report),
            "launch_report_peak_mb": w.peak(role, report), "report_s": state.get("report_s", float("nan")),
            "worker_peak_mb": w.peak("worker"),
            "inbox_peak_mb": w.peak("inbox"), "units": len(units), "state": state, "role": role, "torch": w.torch}


def footprints(launch_mb: float, texts: int = 4000, probes: int = 7, worker_gb: float = 16.0) -> None:
    """What every neuron of GPT-2 small and XL would write and hold under every-neuron-gpt2.yaml (4,000 texts;
    regression and classification beside their shuffled controls, the cross-model and input-only: 7 probes a
    neuron): the results by the launch's own disk estimate (`sweep.disk`), the cache (float32: each layer's
    neurons, the features and the residuals the cache keeps per layer), a worker's model and unit."""
    from nsr_sweep.core.spec import split_sizes
    from nsr_sweep.sweep import disk
    from nsr_sweep.sweep.grid import PROBE_TEXT_BYTES, UNIT_SHARE

    n_test = split_sizes(texts, (0.7, 0.15, 0.15))[2]
    print(f"\nevery neuron, as sweeps/every-neuron-gpt2.yaml ({texts:,} texts, {probes} probes a neuron); a worker "
          f"of {worker_gb:.0f} GB; the launch's own process measured above at {launch_mb:,.0f} MB whatever the count:")
    print(f"{'model':<12} {'probes':>10} {'results GB':>11} {'cache GB':>9} {'weights GB':>11} "
          f"{'unit of 1,024 GB':>17} {'unit from memory':>17}")
    for name, (layers, d_model, d_mlp, params) in GPT2.items():
        n = layers * d_mlp * probes
        results = disk.SWEEP_BYTES + n * (disk.PROBE_BYTES + disk.PROBE_TEST_TEXT_BYTES * n_test) + \
            disk.UNIT_BYTES * layers * max(4, -(-d_mlp // 1024))
        cache = 4 * texts * (layers * d_mlp + (2 + 2 * layers) * d_model)
        per_neuron = probes * texts * PROBE_TEXT_BYTES
        fits = min(1024, int(worker_gb * 1e9 * UNIT_SHARE // per_neuron))
        print(f"{name:<12} {n:>10,} {results / 1e9:>11.1f} {cache / 1e9:>9.2f} {4 * params / 1e9:>11.2f} "
              f"{1024 * per_neuron / 1e9:>17.1f} {f'{fits} neurons':>17}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=73728, help="MLP neurons a layer of the wide model")
    ap.add_argument("--small", type=int, default=8192, help="neurons of the first run (32,768 probes at 8,192)")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--texts", type=int, default=600)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--workers", default="auto")
    ap.add_argument("--analysis", action="store_true", help="patch every probe (analysis enabled)")
    ap.add_argument("--only", choices=["small", "large", "none"], help="none: only the GPT-2 footprints")
    ap.add_argument("--out")
    args = ap.parse_args()
    args.workers = args.workers if args.workers == "auto" else int(args.workers)
    out = Path(args.out or tempfile.mkdtemp(prefix="nsr-scale-"))
    if args.only == "none":
        return footprints(float("nan"))
    model = wide_model(args.width, out)
    runs = {}
    if args.only != "large":
        runs["small"] = run("scale-small", model, list(range(args.small)), args, out)
    if args.only != "small":
        runs["large"] = run("scale-large", model, "all", args, out)
    print(f"\n{'run':<6} {'probes':>8} {'units':>6} {'wall s':>7} {'cache s':>8} {'trials s':>9} {'probes/s':>9} "
          f"{'launch MB: trials start':>24} {'trials peak':>12} {'finish peak':>12} {'report peak':>12} "
          f"{'report s':>9} {'worker peak MB':>15} "
          f"{'inbox MB':>9} {'files':>6} {'MB':>7} {'kB/probe':>9}")
    for name, r in runs.items():
        print(f"{name:<6} {r['probes']:>8} {r['units']:>6} {r['wall_s']:>7.0f} {r['cache_s']:>8.1f} "
              f"{r['trials_s']:>9.1f} {r['probes_per_s']:>9.1f} {r['launch_at_trials_mb']:>24.0f} "
              f"{r['launch_trials_peak_mb']:>12.0f} {r['launch_finish_peak_mb']:>12.0f} {r['launch_report_peak_mb']:>12.0f} "
              f"{r['report_s']:>9.1f} {r['worker_peak_mb']:>15.0f} "
              f"{r['inbox_peak_mb']:>9.0f} {r['files']:>6} {r['mb']:>7.1f} {1e3 * r['mb'] / r['probes']:>9.2f}")
    if len(runs) == 2:
        s, big = runs["small"], runs["large"]
        print(f"\nprobes/s large / small: {big['probes_per_s'] / s['probes_per_s']:.2f} (target ≥ 0.80); launch "
              f"process peak at {big['probes']} probes: {max(big['launch_trials_peak_mb'], big['launch_after_peak_mb']):.0f} MB "
              "(target ≤ 1,000)")
    footprints(launch_mb=max(r["launch_trials_peak_mb"] for r in runs.values()))
    first = runs[next(iter(runs))]
    print(f"\nresults under {out} (launch process: `{first['role']}`, torch loaded in it: "
          f"{any(r['torch'] for r in runs.values())})")


if __name__ == "__main__":
    main()
