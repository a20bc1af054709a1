"""Model workers: Ray actors that load the base model once and run trials next to it.

One worker per GPU (or a configured number on CPU). Worker 0 builds or loads the activation
cache; its arrays go into the object store once and every worker reads them zero-copy.
Trials (Tune's trial functions) borrow a free worker from `WorkerPool` and send it their
config; the heavy work never leaves the worker that holds the model.
"""

from __future__ import annotations

import asyncio
import math
import os
import time

import numpy as np
import ray

from .cache import ActivationCache


class ModelWorker:
    def __init__(self, model_spec_kw: dict, threads: int):
        import torch

        from .models import BaseModel, ModelSpec

        torch.set_num_threads(max(1, threads))
        self.model = BaseModel(ModelSpec(**model_spec_kw))  # resident for the whole sweep
        self.loads = 1
        self.other: BaseModel | None = None  # the cross_model control's model, loaded on first use
        self.cache: ActivationCache | None = None
        self.running = 0
        self.epochs: dict[str, list[dict]] = {}  # per running trial: its validation records so far
        self.stopping: set[str] = set()  # trials a scheduler stopped

    def build_cache(self, sweep_dict: dict, cache_root: str | None) -> dict:
        """Build or load the sweep's cache; the returned arrays go to the object store (owned by the caller)."""
        from .config import SweepSpec
        from .sweep import build_cache

        cache = build_cache(SweepSpec.model_validate(sweep_dict), root=cache_root, progress=False, model=self.model)
        return cache.to_arrays()

    def set_cache(self, arrays: dict) -> int:
        self.cache = ActivationCache.from_arrays(arrays)  # zero-copy views into the object store
        return self.cache.n_texts

    def _outsider(self, name: str | None):
        """The cross_model control's other model, loaded once on first use (None for every other trial)."""
        if name is None:
            return None
        if self.other is None or self.other.spec.name != name:
            from .models import BaseModel, ModelSpec

            self.other = BaseModel(ModelSpec(name=name, device=self.model.spec.device))
        return self.other

    def load_count(self) -> int:
        return self.loads

    def wait_idle(self, timeout: float) -> bool:
        """Block until no trial runs here (a trial a scheduler stopped may still be saving)."""
        deadline = time.time() + timeout
        while self.running and time.time() < deadline:
            time.sleep(0.05)
        return not self.running

    def progress(self, trial_id: str, since: int) -> list[dict]:
        """Validation records of a running trial after the first `since` (served while `run` works)."""
        return list(self.epochs.get(trial_id, [])[since:])

    def stop(self, trial_id: str) -> None:
        self.stopping.add(trial_id)

    def run(self, config: dict, sweep_dir: str) -> dict:
        """Run one trial (or a batch: `members`), write its directory (theirs), return its row (a summary)."""
        from .config import trial_spec

        if "members" in config:
            return self._run_batch(config, sweep_dir)
        spec = trial_spec(config)
        tid = config["trial_id"]
        self.epochs[tid] = []
        self.running += 1
        try:
            return self._run(spec, tid, config, sweep_dir)
        finally:
            self.running -= 1
            self.epochs.pop(tid, None)

    def _run(self, spec, tid: str, config: dict, sweep_dir: str) -> dict:
        from .sweepdir import log_run, save_trial, trial_dir
        from .tables import trial_row
        from .trial import run_trial

        cut = []

        def on_epoch(record: dict) -> bool:
            self.epochs[tid].append(record)
            if tid in self.stopping:
                cut.append(record["epoch"])
            return not cut

        assert self.cache is not None, "set_cache first"
        result = run_trial(self.cache, self.model, spec, on_epoch=on_epoch, outsider=self._outsider(spec.cross_model))
        result.metrics["scheduler_stopped"] = bool(cut)  # training was cut short (a late stop changes nothing)
        self.stopping.discard(tid)
        save_trial(result, trial_dir(sweep_dir, tid), tid, config.get("sample", 0))
        log_run(sweep_dir, tid)
        return trial_row(config, result.status, result.metrics, result.reason,
                         seconds=result.metrics.get("seconds"), worker=os.getpid())

    def _run_batch(self, config: dict, sweep_dir: str) -> dict:
        """Many neurons' probes fitted together (`run_trials`); each member gets its own directory and row
        (no per-trial chart: at this scale the report summarises). Returns a summary row for Tune."""
        from .config import trial_spec
        from .sweepdir import RECORD, log_run, save_trial, trial_dir
        from .trial import run_trials

        members = [m for m in config["members"]  # a retried batch does not rerun what it already finished
                   if not (trial_dir(sweep_dir, m["trial_id"]) / RECORD).is_file()]
        if not members:
            return {"trial_id": config["trial_id"], "status": "ok", "n_members": 0, "worker": os.getpid()}
        specs = [trial_spec(m) for m in members]
        assert self.cache is not None, "set_cache first"
        self.running += 1
        try:
            results = run_trials(self.cache, self.model, specs, outsider=self._outsider(specs[0].cross_model))
            for m, result in zip(members, results):
                result.metrics["scheduler_stopped"] = False
                save_trial(result, trial_dir(sweep_dir, m["trial_id"]), m["trial_id"], m["sample"], plot=False)
                log_run(sweep_dir, m["trial_id"])
        finally:
            self.running -= 1
        ok = [r.metrics for r in results if r.status == "ok"]
        summary = {k: float(np.nanmean([m.get(k, np.nan) for m in ok])) if ok else float("nan")
                   for k in ("val_mse", "val_loss", "val_pearson_r", "val_skill", "pearson_r")}
        return {"trial_id": config["trial_id"], "status": "ok" if ok else "failed", "n_members": len(members),
                "n_ok": len(ok), **summary, "worker": os.getpid()}


@ray.remote(num_cpus=0)
class WorkerPool:
    """Runs each trial on a free model worker: waits for one, runs, frees it.

    The pool (not Tune's trial function) holds the worker for the whole run, so a trial function
    that Tune stops or tears down can never leak a worker."""

    def __init__(self, workers: list):
        self.workers = workers
        self.free: asyncio.Queue = asyncio.Queue()
        for i in range(len(workers)):
            self.free.put_nowait(i)
        self.where: dict[str, int] = {}

    async def run(self, config: dict, sweep_dir: str) -> dict:
        i = await self.free.get()
        self.where[config["trial_id"]] = i
        try:
            return await self.workers[i].run.remote(config, sweep_dir)
        finally:
            self.where.pop(config["trial_id"], None)
            self.free.put_nowait(i)

    async def progress(self, trial_id: str, since: int) -> list[dict]:
        i = self.where.get(trial_id)
        return [] if i is None else await self.workers[i].progress.remote(trial_id, since)

    async def stop(self, trial_id: str) -> None:
        i = self.where.get(trial_id)
        if i is not None:
            await self.workers[i].stop.remote(trial_id)


def start_workers(n: int, model_spec_kw: dict, gpus_per_worker: float, threads: int) -> list:
    # CPU workers reserve no Ray CPU: their number is chosen from the cores, and the thin trial
    # functions that call them must still be schedulable beside them
    # two threads: `run` trains while `progress`/`stop` answer the trial function (for ASHA)
    actor = ray.remote(num_cpus=0, num_gpus=gpus_per_worker, max_concurrency=2)(ModelWorker)  # type: ignore[call-overload]
    return [actor.options(name=None).remote(model_spec_kw, threads) for _ in range(n)]


def _rankable(value: float, mode: str) -> float:
    """A NaN metric (a constant prediction has no correlation) ranks last, never first."""
    return value if math.isfinite(value) else (-math.inf if mode == "max" else math.inf)


def trial_function(config: dict, *, sweep_dir: str, pool, metric: str, mode: str, stream: bool) -> None:
    """Tune's trainable: run the trial on a free model worker (through the pool), report its row.

    With `stream` (a scheduler such as ASHA), each epoch's validation record is reported as it
    comes; when the scheduler stops the trial, Tune's next report raises SystemExit, the worker is
    told to stop after the current epoch, and the trial's directory still records what it reached."""
    from ray import tune

    tid = config["trial_id"]
    ref = pool.run.remote(config, sweep_dir)
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
    tune.report({k: v for k, v in row.items() if isinstance(v, (int, float, str, bool)) or v is None})


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
