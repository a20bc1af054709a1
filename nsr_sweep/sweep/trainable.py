"""Tune's trainable, in a module of its own: every Tune trial actor imports it, so it imports only Ray (the
model workers' module imports torch; the trial actors never need it)."""

from __future__ import annotations

import math

import ray


def _rankable(value: float, mode: str) -> float:
    """A NaN metric (a constant prediction has no correlation) ranks last, never first."""
    return value if math.isfinite(value) else (-math.inf if mode == "max" else math.inf)


def trial_function(config: dict, *, pool, metric: str, mode: str, stream: bool) -> None:
    """Tune's trainable: run the trial on a free model worker (through the pool), report its row.

    With `stream` (a scheduler such as ASHA), each epoch's validation record is reported as it
    comes; when the scheduler stops the trial, Tune's next report raises SystemExit, the worker is
    told to stop after the current epoch, and the trial's directory still records what it reached."""
    from ray import tune

    tid = config["trial_id"]
    ref = pool.run.remote(config)
    seen = 0
    try:
        while stream:
            done, _ = ray.wait([ref], timeout=0.05)
            for record in ray.get(pool.progress.remote(tid, seen)):
                seen += 1
                tune.report({metric: _rankable(record[metric], mode), "intermediate": True, "epoch": record["epoch"]})
            if done:
                break
    except BaseException:
        pool.stop.remote(tid)
        raise
    row = ray.get(ref)
    row["nsr_trial_id"] = row.pop("trial_id")  # Tune owns the `trial_id` key of a result
    row[metric] = _rankable(row.get(metric, math.nan), mode)  # Tune stops the whole run on a result without it
    tune.report({k: v for k, v in row.items() if isinstance(v, (int, float, str, bool)) or v is None})
