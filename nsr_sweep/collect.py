"""Trial records travel to the driver through Ray: no worker's disk is assumed to be the driver's.

    model worker (any node): a trial's directory packed in memory (`pack_trial`)
      ─▶ `Inbox`, an actor on the driver's node ─▶ the driver takes what arrived (`Inbox.take`)
      ─▶ results/<name>/trials/<id>/ (`write_bundle`, metrics.json last) and one line in runs.jsonl

Saved weights (`training.save_weights`) are the one large artefact: with `--storage` (a path or a
pyarrow.fs URI: s3://…, gs://…) workers upload them there and the record names where (`model_uri`);
without it they travel to the driver like everything else.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

from .sweepdir import TRIALS, log_run, trial_dir, trial_files, write_files


def pack_trial(result, trial_id: str, sample: int, *, plot: bool, storage: str | None, sweep: str) -> dict:
    """A finished trial's directory as {relative path: bytes}, plus its row for Tune and who ran it."""
    from .tables import trial_row
    from .trial import spec_dict

    if storage and result.save_model is not None:  # uploaded from here; the record says where
        uri = upload_dir(result.save_model, storage, f"{sweep}/{TRIALS}/{trial_id}/model")
        result = replace(result, save_model=None, metrics={**result.metrics, "model_uri": uri})
    files = trial_files(result, trial_id, sample, plot)
    config = {**spec_dict(result.spec), "trial_id": trial_id, "sample": sample}
    row = trial_row(config, result.status, result.metrics, result.reason, seconds=result.metrics.get("seconds"))
    return {"trial_id": trial_id, "files": files, "row": row, "worker": worker_identity()}


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


def write_bundle(sweep_dir: Path, bundle: dict) -> dict | None:
    """Write a trial's files under the driver's results directory, its record last; log the run. None when
    the trial already has a record (a retried trial whose first run had arrived: it is kept, once)."""
    from .tables import read_trial_dir

    d = trial_dir(sweep_dir, bundle["trial_id"])
    if (read_trial_dir(d) or {}).get("status") in ("ok", "failed"):  # a damaged record is replaced
        return None
    write_files(d, bundle["files"])
    log_run(sweep_dir, bundle["trial_id"], bundle.get("worker", {}))
    return read_trial_dir(d)


class Inbox:
    """Trial records on their way to the driver. It lives on the driver's node (a worker's node may die),
    and remembers every trial that arrived, so a retried trial is neither written nor run twice."""

    def __init__(self, finished: list[str]):
        self.waiting: dict[str, dict] = {}
        self.arrived: dict[str, dict] = {t: {"trial_id": t, "status": "ok"} for t in finished}  # id → its row

    def put(self, bundles: list[dict]) -> int:
        """Keep the bundles of trials that have not arrived yet; returns how many were new."""
        new = [b for b in bundles if b["trial_id"] not in self.arrived]
        for b in new:
            self.arrived[b["trial_id"]] = b["row"]
            self.waiting[b["trial_id"]] = b
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

