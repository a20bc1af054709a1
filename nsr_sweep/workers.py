"""Model workers: Ray actors that load the base model once and run trials next to it.

One worker per GPU (or a configured number on CPU). Worker 0 builds or loads the activation
cache; its arrays go into the object store once and every worker reads them zero-copy.
Trials (Tune's trial functions) borrow a free worker from `WorkerPool` and send it their
config; the heavy work never leaves the worker that holds the model.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

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
        self.cache: ActivationCache | None = None

    def build_cache(self, sweep_dict: dict, cache_root: str | None) -> dict:
        """Build or load the sweep's cache; the returned arrays go to the object store (owned by the caller)."""
        from .config import SweepSpec
        from .corpus import load_corpus

        spec = SweepSpec.model_validate(sweep_dict)
        c = spec.corpus
        corpus = load_corpus(c.source, n_texts=c.n_texts, seed=c.seed)
        cache = ActivationCache.build(self.model, corpus, spec.cache_spec(), root=cache_root,
                                      batch_size=spec.batch_size_cache, progress=False)
        if "random_model" in spec.controls:  # the control's features: same architecture, random weights
            from .models import BaseModel, ModelSpec

            m = self.model.spec
            random = BaseModel(ModelSpec(name=m.name, init="random", seed=spec.seed + 1, device=m.device))
            rc = ActivationCache.build(random, corpus, spec.cache_spec(), root=cache_root,
                                       batch_size=spec.batch_size_cache, progress=False)
            cache.extra["random_model_features"] = np.asarray(rc.features)
        return cache.to_arrays()

    def set_cache(self, arrays: dict) -> int:
        self.cache = ActivationCache.from_arrays(arrays)  # zero-copy views into the object store
        return self.cache.n_texts

    def load_count(self) -> int:
        return self.loads

    def run(self, config: dict, sweep_dir: str) -> dict:
        """Run one trial, write its directory, return its row."""
        from .results import save_trial
        from .tables import trial_row
        from .trial import TrialSpec, run_trial

        kw = {k: config[k] for k in TrialSpec.__dataclass_fields__ if k in config}
        kw.update({k: tuple(kw[k]) for k in ("splits", "scales") if k in kw})
        spec = TrialSpec(**kw)
        result = run_trial(self.cache, self.model, spec, feature_hook=config.get("feature_hook"))
        trial_dir = Path(sweep_dir) / "trials" / config["trial_id"]
        save_trial(result, trial_dir, extra={k: config[k] for k in ("trial_id", "sample") if k in config})
        with open(Path(sweep_dir) / "runs.jsonl", "a") as log:  # one line per completed run: audits "exactly once"
            log.write(json.dumps({"trial_id": config["trial_id"], "pid": os.getpid(), "time": time.time()}) + "\n")
        return trial_row(config, result.status, result.metrics, result.reason,
                         seconds=result.metrics.get("seconds"), worker=os.getpid())


@ray.remote(num_cpus=0)
class WorkerPool:
    """Hands out free worker indices; a trial waits here until one is free."""

    def __init__(self, n: int):
        self.free: asyncio.Queue = asyncio.Queue()
        for i in range(n):
            self.free.put_nowait(i)

    async def acquire(self) -> int:
        return await self.free.get()

    async def release(self, i: int) -> None:
        self.free.put_nowait(i)


def start_workers(n: int, model_spec_kw: dict, gpus_per_worker: float, threads: int) -> list:
    # CPU workers reserve no Ray CPU: their number is chosen from the cores, and the thin trial
    # functions that call them must still be schedulable beside them
    actor = ray.remote(num_cpus=0, num_gpus=gpus_per_worker)(ModelWorker)
    return [actor.options(name=None).remote(model_spec_kw, threads) for _ in range(n)]


def trial_function(config: dict, *, sweep_dir: str, workers: list, pool) -> None:
    """Tune's trainable: borrow a worker, run the trial there, report its row."""
    from ray import tune

    i = ray.get(pool.acquire.remote())
    try:
        row = ray.get(workers[i].run.remote(config, sweep_dir))
    finally:
        pool.release.remote(i)
    row["nsr_trial_id"] = row.pop("trial_id")  # Tune owns the `trial_id` key of a result
    tune.report({k: v for k, v in row.items() if isinstance(v, (int, float, str, bool)) or v is None})


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
