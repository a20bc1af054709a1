"""One benchmark launch: `nsr-sweep launch` of a sweep dict on local Ray, offline, optionally time-boxed, and
what it produced (wall clock, timings, what arrived, the results directory's files and size)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml


def launch(sweep: dict, out: Path, limit_s: float | None = None) -> dict:
    """Launch `sweep` under `out`; with `limit_s`, stop it there and report what arrived (without, a launch that
    fails raises). Returns `dir`, `rc`, `wall_s`, `t0`, `t1`, `arrived`, `first_arrival_s`, `rate_per_s`,
    `expected`, `neurons`, `trials`, `timings`, `cache_s`, `trials_s`, `report_s`, `files`, `mb`, and from
    trials.parquet `status`, `probe_rows`, `finite_patch_slope`, `reasons`, `work`."""
    f = out / f"{sweep['name']}.yaml"
    f.write_text(yaml.safe_dump(sweep))
    t0 = time.time()
    with open(out / f"{sweep['name']}.log", "w") as log:
        p = subprocess.Popen([sys.executable, "-m", "nsr_sweep.cli", "launch", str(f), "--out", str(out),
                              "--no-dashboard"], env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        rc: int | str = stop_after(p, limit_s)
    wall = time.time() - t0
    if limit_s is None and rc != 0:
        raise RuntimeError(f"launch of {sweep['name']} exited {rc}: see {out / (sweep['name'] + '.log')}")
    d = out / sweep["name"]
    r = {"name": sweep["name"], "dir": d, "rc": rc, "wall_s": wall, "t0": t0, "t1": t0 + wall}
    runs = d / "runs.jsonl"
    arrived = [json.loads(x) for x in runs.read_text().splitlines()] if runs.exists() else []
    times = sorted(a["time"] for a in arrived)  # the arrival rate, also for a launch stopped at its time box
    state = json.loads((d / "sweep_state.json").read_text()) if (d / "sweep_state.json").exists() else {}
    files = [q for q in d.rglob("*") if q.is_file()]
    r.update(arrived=len(arrived), first_arrival_s=min((t - t0 for t in times), default=float("nan")),
             rate_per_s=(len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 and times[-1] > times[0] else None,
             expected=state.get("n_expected"), neurons=sum(len(v) for v in state.get("neurons", {}).values()),
             trials=sum(state.get("counts", {}).values()), timings=state.get("timings", {}),
             report_s=state.get("report_s"), files=len(files), mb=sum(q.stat().st_size for q in files) / 1e6)
    r["cache_s"], r["trials_s"] = r["timings"].get("cache_s"), r["timings"].get("trials_wall_s")
    r.update(trial_table(d / "tables" / "trials.parquet"))
    return r


def stop_after(p: subprocess.Popen, limit_s: float | None) -> int | str:
    """Wait for the launch; past `limit_s`, interrupt it (its own path: it stops Ray and keeps what arrived), then
    kill it if it lingers."""
    try:
        return p.wait(timeout=None if limit_s is None else max(1.0, limit_s))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGINT)
        try:
            rc = p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # Tune's first SIGINT waits for the running trials
            os.killpg(p.pid, signal.SIGKILL)
            rc = p.wait()
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
        return f"stopped at {limit_s:.0f} s (rc {rc})"


def trial_table(trials: Path) -> dict:
    """Status counts, probe rows with a finite exact patch slope, the commonest failure reasons, summed work."""
    if not trials.exists():
        return {}
    import pandas as pd

    df = pd.read_parquet(trials)
    r: dict = {"status": df["status"].value_counts().to_dict() if "status" in df else {}}
    probes = df[df["freeze"] == "none"] if "freeze" in df else df.iloc[:0]
    if len(probes) and "patch_slope" in probes:  # (analysis off: none)
        r["finite_patch_slope"] = int(probes["patch_slope"].notna().sum())
        r["probe_rows"] = len(probes)
    bad = df[df["status"] != "ok"] if "status" in df else df.iloc[:0]
    if len(bad) and "error" in bad:
        r["reasons"] = bad["error"].astype(str).str[:300].value_counts().head(3).to_dict()
    cols = [c for c in ("seconds", "train_seconds", "patch_seconds", "artefact_seconds") if c in df]
    r["work"] = {c: float(df[c].sum()) for c in cols}
    return r
