"""`nsr-sweep status`: what a sweep directory holds, running or finished, and which of its files are damaged."""

from __future__ import annotations

import time
from pathlib import Path

from .layout import read_state, run_state
from .store import open_store
from .tables import trial_table


def sweep_status(sweep_dir: Path) -> dict:
    from .layout import resolved_spec

    spec = resolved_spec(sweep_dir)
    state = read_state(sweep_dir)
    store = open_store(sweep_dir)
    df = trial_table(store, spec.search.metric, spec.search.mode)
    damage = store.damage()  # every finished trial's and unit's files, read through
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    expected = state.get("n_expected")
    status = run_state(sweep_dir)
    rerun = sum(len(d.trial_ids) for d in damage if d.rerun)
    if status == "finished" and any(d.rerun for d in damage):
        status = "incomplete"  # it did finish; a record has been damaged since
    running = status == "running"
    end = time.time() if running else state.get("finished") or _last_write(sweep_dir)
    best = []
    if len(df):
        cols = ["trial_id", spec.search.metric, "pearson_r", "skill"]
        b = df[df["best"]].sort_values("pearson_r", ascending=False)
        best = b[[c for c in cols if c in b]].head(10).to_dict("records")
    return {
        "name": spec.name, "dir": str(sweep_dir), "state": status,
        "counts": {k: int(v) for k, v in counts.items()}, "finished": int(len(df)), "expected": expected,
        "elapsed_s": round(end - state["started"], 1) if state.get("started") and end else None,
        "model_loads": state.get("model_loads"), "workers": state.get("workers"), "best": best,
        "timings": state.get("timings"), "error": state.get("error") or state.get("missing_reason") or None,
        "missing": state.get("n_missing"),
        "damaged": [{"path": d.path, "why": d.why, "trials": len(d.trial_ids), "rerun": d.rerun,
                     "resume": d.resume()} for d in damage],
        "next": _next(status, damage, rerun),
    }


def _next(status: str, damage: list, rerun: int) -> str | None:
    if any(d.rerun for d in damage) and status != "running":
        return (f"`nsr-sweep launch <sweep file> --resume` reruns the {rerun} trial(s) of the damaged records above "
                "(and any other missing)")
    return NEXT.get(status)


NEXT = {  # what a user does with a directory in each state
    "interrupted": "its launch is gone (killed or crashed); `nsr-sweep launch <sweep file> --resume` finishes it",
    "failed": "`nsr-sweep launch <sweep file> --resume` retries; a corrected sweep file is accepted while no trial "
              "has run",
    "incomplete": "some trials have no record (see missing_reason); `nsr-sweep launch <sweep file> --resume` reruns "
                  "them",
    "damaged": "sweep_state.json is unreadable; `--resume` rewrites it from the trial records",
}


def _last_write(sweep_dir: Path) -> float | None:
    """When an interrupted launch last wrote anything it records."""
    times = [p.stat().st_mtime for p in (sweep_dir / "sweep_state.json", sweep_dir / "runs.jsonl") if p.is_file()]
    return max(times, default=None)


def format_status(st: dict) -> str:
    counts = ", ".join(f"{v} {k}" for k, v in sorted(st["counts"].items())) or "none yet"
    lines = [f"sweep {st['name']} ({st['state']}): {st['finished']}/{st['expected'] or '?'} trials finished "
             f"({counts}); elapsed {st['elapsed_s']} s", f"  {st['dir']}"]
    if st.get("error"):
        lines.append(f"  error: {st['error']}")
    for d in st.get("damaged", []):
        lines.append(f"  damaged: {d['path']}: {d['why']}; {d['resume']}")
    if st.get("next"):
        lines.append(f"  next: {st['next']}")
    if st["model_loads"] is not None:
        lines.append(f"  base model loaded {st['model_loads']}× for {st['workers']} worker(s)")
    for b in st["best"]:
        lines.append("  best  " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{v}" for k, v in b.items()))
    return "\n".join(lines)
