"""What a running sweep shows: a progress bar, one concise line per finished trial or unit, the Ray dashboard's
counters — and the Tune callback that hands each finished or failed trial to the collector (`transport.Collector`),
which writes its records."""

from __future__ import annotations

import numpy as np

from .grid import batch_of
from .transport import Collector


class SweepProgress:
    """A progress bar plus one line per finished trial; `callback` is the Tune callback that drives it."""

    def __init__(self, collector: Collector, name: str, metric: str, total: int):
        from ray.tune import Callback
        from tqdm.auto import tqdm

        self.collector, self.metric = collector, metric
        self.bar = tqdm(total=total, initial=collector.tally.total, unit="trial", desc=name, dynamic_ncols=True)
        self.running = 0
        self.counters = _counters(name)
        outer = self

        class _Callback(Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                outer.running += 1

            def on_trial_result(self, iteration, trials, trial, result, **info):
                if not result.get("intermediate"):  # the final row: its record is here, so write it before
                    outer.show(outer.collector.collect())  # the study is told (Tune tells the searcher next)

            def on_trial_complete(self, iteration, trials, trial, **info):
                outer.finished(trial.config)

            def on_trial_error(self, iteration, trials, trial, **info):
                outer.errored(trial)

        self.callback = _Callback()

    def show(self, rows: list[dict]) -> None:
        self.bar.update(len(rows))
        for row in rows:
            self.counters["finished" if row.get("status") == "ok" else "failed"].inc()

    def finished(self, config: dict) -> None:
        """A trial (or a unit) is complete, also when a scheduler stopped it (its record may come later)."""
        self.running -= 1
        self.show(self.collector.collect())
        if rows := self.collector.shown([s.trial_id for s in batch_of(config).points]):
            self._line(rows, config)

    def errored(self, trial) -> None:
        """A trial (or a unit) that raised on every retry: the collector records it failed or lost."""
        self.running -= 1
        rows = self.collector.gave_up(batch_of(trial.config), str(getattr(trial, "error_msg", None) or ""))
        self.show(rows)
        if mine := self.collector.shown([p.trial_id for p in batch_of(trial.config).points]):
            self._line(mine, trial.config)

    def _line(self, rows: list[dict], config: dict) -> None:
        counts, best = self.collector.tally.counts, self.collector.tally.best
        if batch_of(config).unit is not None:  # a unit: how many, and the median over them
            good = [r for r in rows if r.get("status") == "ok"]
            r_med = float(np.median([r["pearson_r"] for r in good])) if good else float("nan")
            what = f"{len(good)}/{len(rows)} ok, median test r {r_med:+.3f}"
        elif rows[0].get("status") == "ok":
            row = rows[0]
            what = (f"{self.metric} {row.get(self.metric, float('nan')):.4g}  "
                    f"test r {row.get('pearson_r', float('nan')):+.3f}")
        else:
            what = f"FAILED: {str(rows[0].get('error'))[:80]}"
        best_s = f"  best r {best[0]:+.3f} ({best[1]})" if best else ""
        self.bar.write(f"{config['trial_id']:<42} {what}  | done {counts['ok']} failed {counts['failed']} "
                       f"running {max(self.running, 0)}{best_s}")

    def close(self):
        self.bar.close()


def _counters(sweep: str) -> dict:
    """Sweep counters for the Ray dashboard's metrics view."""
    from ray.util.metrics import Counter as RayCounter

    tags = {"sweep": sweep}
    out = {k: RayCounter(f"nsr_sweep_trials_{k}", description=f"trials {k}", tag_keys=("sweep",))
           for k in ("finished", "failed")}
    for c in out.values():
        c.set_default_tags(tags)
    return out
