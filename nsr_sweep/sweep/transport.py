"""Trial records travel to the driver through Ray: no worker's disk is assumed to be the driver's.

    model worker (any node): a trial's directory, or a unit's Parquet files, packed in memory
      (`pack_trial`, `pack_unit`) ─▶ `Inbox`, an actor on the driver's node ─▶ the driver takes what
      arrived (`Inbox.take`) ─▶ results/<name>/trials/<id>/ or probes/ (`write_bundle`, the record
      last) and one line per trial in runs.jsonl

Saved weights (`training.save_weights`) are the one large artefact: with `--storage` (a path or a
pyarrow.fs URI: s3://…, gs://…) workers upload them there and the record names where (`model_uri`);
without it they travel to the driver like everything else.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from ..core.spec import TrialBatch
from ..results.layout import PROBES, TRIALS, log_run
from ..results.records import write_files


def pack_trial(result, trial_id: str, sample: int, *, plot: bool, storage: str | None, sweep: str) -> dict:
    """A finished trial's directory as {path under the results directory: bytes}, its row for Tune, who ran it."""
    from ..results.records import spec_json, trial_files, trial_row

    if storage and result.save_model is not None:  # uploaded from here; the record says where
        uri = upload_dir(result.save_model, storage, f"{sweep}/{TRIALS}/{trial_id}/model")
        result = replace(result, save_model=None, metrics={**result.metrics, "model_uri": uri})
    from ..report.plots import trial_chart

    files = {f"{TRIALS}/{trial_id}/{k}": v for k, v in trial_files(result, trial_id, sample, trial_chart if plot else None).items()}
    row = trial_row({**spec_json(result.spec, trial_id), "sample": sample}, result.status, result.metrics, result.reason, seconds=result.metrics.get("seconds"))
    return {"unit": None, "trial_ids": [trial_id], "files": files, "rows": [row], "worker": worker_identity()}


def pack_unit(done: list[tuple], unit: str) -> dict:
    """A unit of batched probes — `done` holds (result, trial id, sample) — as its Parquet files and rows."""
    from ..results.records import unit_files

    files = unit_files(done, unit)
    import pandas as pd

    rows = pd.read_parquet(io.BytesIO(files[f"{PROBES}/records/{unit}.parquet"])) \
        .drop(columns=["spec_json", "history_json"]).to_dict("records")
    return {"unit": unit, "trial_ids": [tid for _, tid, _ in done], "files": files, "rows": rows,
            "worker": worker_identity()}


def worker_identity() -> dict:
    import ray

    ctx = ray.get_runtime_context() if ray.is_initialized() else None
    return {"pid": os.getpid(), "node": ctx.get_node_id() if ctx else None}


def upload_dir(write, storage: str, relative: str) -> str:
    """`write(local_dir)` fills a temp directory that is copied to `<storage>/<relative>`; returns where."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage)  # the driver made a local path absolute
    dest = f"{root.rstrip('/')}/{relative}"
    with tempfile.TemporaryDirectory(prefix="nsr-upload-") as tmp:
        write(tmp)
        fs.create_dir(dest, recursive=True)
        pafs.copy_files(tmp, dest, destination_filesystem=fs)
    return f"{storage.rstrip('/')}/{relative}"


def write_bundle(sweep_dir: Path, bundle: dict) -> list[dict]:
    """Write a trial's (or a unit's) files under the driver's results directory, the record last; log each
    trial's run. Returns the rows written — none when the record is already there (a retried trial whose
    first run had arrived is kept once; a damaged record is replaced)."""
    from ..results.store import bundle_rows

    if any(r["status"] in ("ok", "failed") for r in bundle_rows(sweep_dir, bundle["unit"], bundle["trial_ids"])):
        return []
    write_files(sweep_dir, bundle["files"])
    for tid in bundle["trial_ids"]:
        log_run(sweep_dir, tid, bundle.get("worker", {}))
    return bundle_rows(sweep_dir, bundle["unit"], bundle["trial_ids"])


TABLE_EVERY_S = 10.0
TABLE_SHARE = 0.05  # most of the driver's time the trial table's snapshots may take, however many rows it has
SNAPSHOT_ROWS = 50_000
"""Past this many trials, no snapshot of the table while the sweep runs (building one holds the whole table: the
driver would grow with the sweep) and none left stale: readers rebuild it from the records, and the launch writes it
at the end."""


class Tally:
    """What the progress lines count: trials by status, and the best test r so far (its trial id)."""

    def __init__(self, rows: list[dict]):
        self.counts: Counter = Counter()
        self.best: tuple[float, str] | None = None
        self.add(rows)

    def add(self, rows: list[dict]) -> None:
        self.counts.update(r.get("status") for r in rows)
        for r in rows:
            v = r.get("pearson_r")
            if r.get("status") == "ok" and isinstance(v, (int, float)) and math.isfinite(v) \
                    and (self.best is None or v > self.best[0]):
                self.best = (float(v), r["trial_id"])

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class Collector:
    """The driver's end of the transport: writes what arrived in the inbox under the results directory (the
    results code's writers, records last), the records of trials that failed, and a snapshot of the trial table
    (built from the records); remembers what could not be written here or was lost with its worker. It keeps no
    row once it is shown: the driver's memory stays flat however many probes a sweep has."""

    def __init__(self, sweep_dir: Path, spec, rows: list[dict], inbox, pool):
        self.sweep_dir, self.spec, self.inbox, self.pool = sweep_dir, spec, inbox, pool
        self.tally = Tally(rows)  # rows: what a resumed launch found finished
        self.next_table = 0.0  # when tables/trials.parquet may be written again
        self.unwritten: dict[str, str] = {}  # trial id → why its record could not be written here
        self.lost: dict[str, str] = {}  # trial id → how it was lost (its worker or node died on every rerun)
        self.unshown: dict[str, dict] = {}  # rows recorded by this launch, until a progress line shows them
        self.disk_full: OSError | None = None  # the ENOSPC that stopped a write here

    def collect(self) -> list[dict]:
        """Write every record that arrived in the inbox; returns their rows (never raises: a write that fails is
        remembered, and the sweep's final count reports the trial missing)."""
        import ray

        rows = []
        for bundle in ray.get(self.inbox.take.remote()):
            try:
                rows += write_bundle(self.sweep_dir, bundle)
            except OSError as e:
                self.unwritten.update((t, f"{type(e).__name__}: {e}") for t in bundle["trial_ids"])
                self.note_disk_full(e)
        return self._keep(rows)

    def shown(self, trial_ids: list[str]) -> list[dict]:
        """The rows of these trials recorded by this launch and not shown yet (then forgotten)."""
        return [row for t in trial_ids if (row := self.unshown.pop(t, None)) is not None]

    def note_disk_full(self, error: OSError) -> None:
        """A full disk ends the sweep (`Launch.run_trials` stops Tune): what is left cannot be written."""
        from .disk import disk_full_error

        self.disk_full = self.disk_full or disk_full_error(error)

    def _keep(self, rows: list[dict]) -> list[dict]:
        """Rows counted and held until shown; the table on disk now and then (at most every TABLE_EVERY_S, at most
        TABLE_SHARE of the time: it is rebuilt from the records; not past SNAPSHOT_ROWS), and whole at the end."""
        from ..results.tables import write_trials_table

        self.tally.add(rows)
        self.unshown.update((r["trial_id"], r) for r in rows)
        if self.tally.total > SNAPSHOT_ROWS:  # a stale snapshot would be read as the table: readers rebuild it
            (self.sweep_dir / "tables" / "trials.parquet").unlink(missing_ok=True)
        elif rows and time.time() >= self.next_table:
            t0 = time.time()
            try:  # a snapshot for readers while the sweep runs; the final table is written at the end
                write_trials_table(self.sweep_dir, self.spec.search.metric, self.spec.search.mode)
            except OSError as e:
                self.note_disk_full(e)
            self.next_table = time.time() + max(TABLE_EVERY_S, (time.time() - t0) / TABLE_SHARE)
        return rows

    def gave_up(self, batch: TrialBatch, tune_error: str) -> list[dict]:
        """Tune gave up on a trial or unit (it raised on every retry). The pool says how its last run ended, by
        the exception's type: the trial's own code raised — each member without a record is recorded failed with
        the reason, and the sweep goes on — or its worker or node died on every rerun, or it never reached a worker
        (its Tune actor died): lost, not a result — it stays missing, and --resume reruns it. A run still going
        sends its record when it ends. Returns every row written now: what had arrived meanwhile, and the failed."""
        import ray

        arrived = self.collect()  # a batch member that finished before its batch failed keeps its record
        how, reason = ray.get(self.pool.outcome.remote(batch.id))
        if how == "running":
            return arrived
        from ..results.store import bundle_rows

        recorded = {r["trial_id"] for r in bundle_rows(self.sweep_dir, batch.unit, [s.trial_id for s in batch.specs()])
                    if r["status"] in ("ok", "failed")}
        todo = [s for s in batch.specs() if s.trial_id not in recorded]
        if how != "failed":
            self.lost.update((s.trial_id, reason or tune_error) for s in todo)
            return arrived
        from ..results.records import failed_files, spec_json, trial_row

        try:
            write_files(self.sweep_dir, failed_files(todo, reason, batch.unit)) if todo else None
        except OSError as e:
            self.unwritten.update((s.trial_id, f"{type(e).__name__}: {e}") for s in todo)
            self.note_disk_full(e)
            return arrived
        return arrived + self._keep([trial_row(spec_json(s), "failed", {}, reason) for s in todo])


class Inbox:
    """Trial records on their way to the driver. It lives on the driver's node (a worker's node may die),
    and remembers every trial run alone (its row) and every unit that arrived, so a retry is neither written nor
    run twice (a unit's probes are not kept one by one: a layer has hundreds of thousands)."""

    def __init__(self, finished: list[str]):
        self.waiting: dict[str, dict] = {}
        self.arrived: dict[str, dict] = {t: {"trial_id": t, "status": "ok"} for t in finished}  # id → its row
        self.units: set[str] = set()

    def put(self, bundles: list[dict]) -> int:
        """Keep the bundles that have not arrived yet; returns how many were new."""
        new = [b for b in bundles if not self._has(b)]
        for b in new:
            if b["unit"] is None:
                self.arrived.update((r["trial_id"], r) for r in b["rows"])
            else:
                self.units.add(b["unit"])
            self.waiting[b["unit"] or b["trial_ids"][0]] = b
        return len(new)

    def _has(self, bundle: dict) -> bool:
        return bundle["unit"] in self.units if bundle["unit"] is not None else \
            all(t in self.arrived for t in bundle["trial_ids"])

    def rows(self, trial_ids: list[str]) -> dict[str, dict]:
        """The rows of those trials (run alone) that already arrived."""
        return {t: self.arrived[t] for t in trial_ids if t in self.arrived}

    def has_unit(self, unit: str) -> bool:
        """Whether that unit's records already arrived."""
        return unit in self.units

    def take(self) -> list[dict]:
        """Everything that arrived since the last take (the driver writes it)."""
        out, self.waiting = list(self.waiting.values()), {}
        return out


def on_this_node():
    """A scheduling strategy that keeps an actor on the caller's node (the driver's)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def start_inbox(finished: list[str]):
    import ray

    actor = ray.remote(num_cpus=0)(Inbox)  # type: ignore[call-overload]
    return actor.options(scheduling_strategy=on_this_node()).remote(finished)

