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
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from ..results.layout import PROBES, TRIALS, log_run, trial_dir
from ..results.records import write_files


def pack_trial(result, trial_id: str, sample: int, *, plot: bool, storage: str | None, sweep: str) -> dict:
    """A finished trial's directory as {path under the results directory: bytes}, its row for Tune, who ran it."""
    from ..results.records import trial_files, trial_row

    if storage and result.save_model is not None:  # uploaded from here; the record says where
        uri = upload_dir(result.save_model, storage, f"{sweep}/{TRIALS}/{trial_id}/model")
        result = replace(result, save_model=None, metrics={**result.metrics, "model_uri": uri})
    from ..report.plots import trial_chart

    chart = trial_chart(result) if plot and result.status == "ok" else None
    files = {f"{TRIALS}/{trial_id}/{k}": v for k, v in trial_files(result, trial_id, sample, chart).items()}
    config = {**result.spec.model_dump(mode="json"), "trial_id": trial_id, "sample": sample}
    row = trial_row(config, result.status, result.metrics, result.reason, seconds=result.metrics.get("seconds"))
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
    from ..results.records import finished_rows, read_trial_dir, unit_records

    if bundle["unit"] is None:
        tid = bundle["trial_ids"][0]
        if (read_trial_dir(trial_dir(sweep_dir, tid)) or {}).get("status") in ("ok", "failed"):
            return []
    elif (Path(sweep_dir) / PROBES / "records" / f"{bundle['unit']}.parquet").is_file():
        units = unit_records(sweep_dir)
        if len(units) and bundle["unit"] in set(units["unit"]):
            return []
    write_files(sweep_dir, bundle["files"])
    for tid in bundle["trial_ids"]:
        log_run(sweep_dir, tid, bundle.get("worker", {}))
    if bundle["unit"] is None:
        return [r for r in [read_trial_dir(trial_dir(sweep_dir, bundle["trial_ids"][0]))] if r is not None]
    want = set(bundle["trial_ids"])
    return [r for r in finished_rows(sweep_dir) if r["trial_id"] in want]


class Inbox:
    """Trial records on their way to the driver. It lives on the driver's node (a worker's node may die),
    and remembers every trial that arrived, so a retried trial is neither written nor run twice."""

    def __init__(self, finished: list[str]):
        self.waiting: dict[str, dict] = {}
        self.arrived: dict[str, dict] = {t: {"trial_id": t, "status": "ok"} for t in finished}  # id → its row

    def put(self, bundles: list[dict]) -> int:
        """Keep the bundles whose trials have not all arrived yet; returns how many were new."""
        new = [b for b in bundles if not all(t in self.arrived for t in b["trial_ids"])]
        for b in new:
            self.arrived.update((r["trial_id"], r) for r in b["rows"])
            self.waiting[b["unit"] or b["trial_ids"][0]] = b
        return len(new)

    def rows(self, trial_ids: list[str]) -> dict[str, dict]:
        """The rows of those trials that already arrived."""
        return {t: self.arrived[t] for t in trial_ids if t in self.arrived}

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

