"""Model workers: Ray actors that load the base model once and run trials next to it.

One worker per GPU (or a configured number on CPU). Worker 0 builds or loads the activation
cache; its arrays go into the object store once and every worker reads them zero-copy.
Trials (Tune's trial functions) borrow a free worker from `WorkerPool` and send it their
config; the heavy work never leaves the worker that holds the model.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from ..core.cache import ActivationCache
from ..core.errors import NsrError

if TYPE_CHECKING:
    from ..core.spec import SweepSpec


class ModelWorker:
    def __init__(self, model_spec_kw: dict, threads: int, link: WorkerLink):
        import torch

        from ..core.models import LoadedModel, ModelSpec

        check_version(link.version)  # before the model loads: a mismatched node fails at once, by name
        torch.set_num_threads(max(1, threads))
        from threadpoolctl import threadpool_limits

        threadpool_limits(max(1, threads))  # numpy's BLAS too: workers sharing cores must not oversubscribe them
        self.link = link
        self.model = LoadedModel(ModelSpec(**model_spec_kw))  # resident for the whole sweep
        if self.model.spec.device == "cuda":
            check_gpu_share(self.model, link.gpu_share, trainable=link.trainable)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = link.tf32
        self.loads = 1
        self.other: LoadedModel | None = None  # the cross_model control's model, loaded on first use
        self.cache: ActivationCache | None = None
        from ..core.reuse import Reuse

        self.reuse = Reuse()  # patching engines and feature SVDs kept between units (bound to the cache and model)
        self.running = 0
        self.epochs: dict[str, list[dict]] = {}  # per running trial: its validation records so far
        self.stopping: set[str] = set()  # trials a scheduler stopped

    def describe(self) -> dict:
        """Where this worker runs and what it was given (the driver records it in sweep_state.json)."""
        from .. import __version__
        from .transport import worker_identity

        secret = ("TOKEN", "SECRET", "KEY", "PASSWORD")  # named, never copied into a shared state file
        return {**worker_identity(), "version": __version__, "device": self.model.spec.device,
                "env": {k: "***" if any(s in k for s in secret) else v for k, v in sorted(forwarded_env().items())}}

    def build_cache(self, sweep_dict: dict, cache_root: str | None) -> dict:
        """Build or load the sweep's cache; the returned arrays go to the object store (owned by the caller)."""
        from ..core.spec import SweepSpec
        from .inputs import build_cache

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
            from ..core.models import LoadedModel, ModelSpec

            self.other = LoadedModel(ModelSpec(name=name, device=self.model.spec.device))
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

    def run(self, config: dict) -> dict:
        """Run one trial or a unit of probes (`config` is `grid.tune_config`'s: the batch as JSON), send its
        records to the driver's inbox, return its row for Tune (a unit: a summary). Trials whose records already
        arrived (a retry) are not run again."""
        from .grid import batch_of

        batch = batch_of(config)
        specs = batch.specs()
        _injected_failure(specs)
        if batch.unit is not None:
            return self._run_unit(batch.unit, specs)
        tid = batch.id
        if tid in (done := ray.get(self.link.inbox.rows.remote([tid]))):
            return {**done[tid], "worker": os.getpid()}
        self.epochs[tid] = []
        self.running += 1
        try:
            return self._run(specs[0])
        finally:
            self.running -= 1
            self.epochs.pop(tid, None)

    def _run(self, spec) -> dict:
        from ..core.trial import run_trial

        tid, cut = spec.trial_id, []

        def on_epoch(record: dict) -> bool:
            self.epochs[tid].append(record)
            if tid in self.stopping:
                cut.append(record["epoch"])
            return not cut

        assert self.cache is not None, "set_cache first"
        result = run_trial(self.cache, self.model, spec, on_epoch=on_epoch, outsider=self._outsider(spec.cross_model),
                           reuse=self.reuse)
        result.metrics["scheduler_stopped"] = bool(cut)  # training was cut short (a late stop changes nothing)
        self.stopping.discard(tid)
        from .transport import pack_trial

        bundle = pack_trial(result, tid, spec.sample, plot=True, storage=self.link.storage, sweep=self.link.sweep)
        ray.get(self.link.inbox.put.remote([bundle]))  # arrived before the trial reports done
        return {**bundle["rows"][0], "worker": os.getpid()}

    def _run_unit(self, unit: str, specs: list) -> dict:
        """A unit of probes (one layer, a chunk of neurons, every head and control) fitted and patched together
        (`run_trials`); each probe gets its own record, as a row of the unit's Parquet files (no per-trial
        chart: at this scale the report summarises). Returns a summary row for Tune."""
        from ..core.trial import run_trials
        from .transport import pack_unit

        if ray.get(self.link.inbox.has_unit.remote(unit)):  # a retried unit whose records already arrived
            return {"trial_id": unit, "status": "ok", "n_members": 0, "worker": os.getpid()}
        assert self.cache is not None, "set_cache first"
        self.running += 1
        try:
            results = run_trials(self.cache, self.model, specs, reuse=self.reuse)
            for result in results:
                result.metrics["scheduler_stopped"] = False
            bundle = pack_unit([(r, s.trial_id, s.sample) for s, r in zip(specs, results)], unit)
            ray.get(self.link.inbox.put.remote([bundle]))
        finally:
            self.running -= 1
        ok = [r.metrics for r in results if r.status == "ok"]
        summary = {k: float(np.nanmean([m.get(k, np.nan) for m in ok])) if ok else float("nan")
                   for k in ("val_mse", "val_loss", "val_pearson_r", "val_skill", "pearson_r")}
        return {"trial_id": unit, "status": "ok" if ok else "failed", "n_members": len(specs),
                "n_ok": len(ok), **summary, "worker": os.getpid()}


def _injected_failure(specs: list) -> None:
    """Fault injection for the tests of the failure path (not the trial code's): NSR_SWEEP_FAIL_TRIALS lists
    groups as L<layer>-N<neuron>-<head>-<freeze>; a trial or unit holding one raises here, in the worker."""
    wanted = set(filter(None, os.environ.get("NSR_SWEEP_FAIL_TRIALS", "").split(",")))
    for s in specs:
        key = f"L{s.layer}-N{s.neuron}-{s.head}-{s.freeze}"
        if key in wanted:
            raise RuntimeError(f"injected failure for {key} (NSR_SWEEP_FAIL_TRIALS)")


RERUNS_ON_DEAD_WORKER = 2  # a trial that kills every worker it touches (OOM, a CUDA fault) stops here
LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
        ray.exceptions.ObjectLostError)
"""Infrastructure, not the trial: a dead or unreachable actor (ActorDiedError, ActorUnavailableError), a crashed
worker process, a dead node, lost objects (OwnerDiedError among them)."""


class NoWorkerLeft(RuntimeError):
    """Every model worker died: what was still queued cannot run in this launch."""


class WorkerPool:
    """Runs each trial on a free model worker: waits for one, runs, frees it.

    The pool (not Tune's trial function) holds the worker for the whole run, so a trial function
    that Tune stops or tears down can never leak a worker. A worker that died (its node went down)
    is dropped and the trial runs on another; the pool lives on the driver's node."""

    def __init__(self, workers: list):
        self.workers = workers
        self.alive = set(range(len(workers)))
        self.free: asyncio.Queue = asyncio.Queue()
        for i in range(len(workers)):
            self.free.put_nowait(i)
        self.where: dict[str, int] = {}
        self.inflight: dict[str, asyncio.Task] = {}  # trial id → its run (a retried trial joins it)
        self.outcomes: dict[str, tuple[str, str]] = {}  # trial id → how its last run ended (`outcome`)

    async def run(self, config: dict) -> dict:
        tid = config["trial_id"]
        if tid not in self.inflight:  # Tune retries a trial whose function died with its node: never run it twice
            self.outcomes.pop(tid, None)
            self.inflight[tid] = asyncio.ensure_future(self._run(config))
            self.inflight[tid].add_done_callback(lambda _: self.inflight.pop(tid, None))
        return await asyncio.shield(self.inflight[tid])

    async def _run(self, config: dict) -> dict:
        tid = config["trial_id"]
        for attempt in range(RERUNS_ON_DEAD_WORKER + 1):
            try:
                i = await self._borrow()
            except NoWorkerLeft as e:
                self.outcomes[tid] = ("lost", str(e))
                raise
            self.where[tid] = i
            try:
                row = await self.workers[i].run.remote(config)
                self.outcomes[tid] = ("ok", "")
                return row
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if e.cause is not None else e
                lost = isinstance(cause, LOST)  # the worker lost an actor or object it needed (the inbox's node)
                self.outcomes[tid] = ("lost" if lost else "failed", f"{type(cause).__name__}: {cause}"[:2000])
                raise  # else the trial's own code raised: a result (failed)
            except ray.exceptions.ActorDiedError as e:  # its node died (or it was killed): drop it, run on another
                self.alive.discard(i)
                if attempt == RERUNS_ON_DEAD_WORKER:
                    self.outcomes[tid] = ("lost", f"{type(e).__name__}: {e}"[:500])
                    raise
            except LOST as e:  # unreachable for now (ActorUnavailableError), a crashed process, lost objects: the
                self.outcomes[tid] = ("lost", f"{type(e).__name__}: {e}"[:500])  # worker may still run it: never
                raise                                                            # rerun here (--resume does)
            finally:
                self.where.pop(tid, None)
                if i in self.alive:
                    self.free.put_nowait(i)
        raise AssertionError("unreachable")

    def outcome(self, trial_id: str) -> tuple[str, str]:
        """How the last run of a trial (or unit) ended: ("failed", reason) when the trial's code raised, ("lost",
        reason) when its worker or node died on every rerun, ("running", "") while it runs, ("ok", "") when it
        returned, or ("unseen", "") when no run reached this pool (its Tune actor died first)."""
        if trial_id in self.inflight:
            return ("running", "")
        return self.outcomes.get(trial_id, ("unseen", ""))

    async def _borrow(self) -> int:
        while True:
            if not self.alive:
                raise NoWorkerLeft("every model worker is gone (their nodes died)")
            try:
                return await asyncio.wait_for(self.free.get(), timeout=5)
            except asyncio.TimeoutError:
                continue

    async def progress(self, trial_id: str, since: int) -> list[dict]:
        i = self.where.get(trial_id)
        try:
            return [] if i is None else await self.workers[i].progress.remote(trial_id, since)
        except ray.exceptions.RayActorError:
            return []  # the run's own call reports the death

    async def stop(self, trial_id: str) -> None:
        i = self.where.get(trial_id)
        try:
            if i is not None:
                await self.workers[i].stop.remote(trial_id)
        except ray.exceptions.RayActorError:
            pass

    async def each(self, method: str, *args) -> list:
        """`method(*args)` on every live worker (a worker that died meanwhile is dropped)."""
        out = []
        for i in sorted(self.alive):
            try:
                out.append(await getattr(self.workers[i], method).remote(*args))
            except ray.exceptions.RayActorError:
                self.alive.discard(i)
        return out


def start_pool(workers: list):
    from .transport import on_this_node

    pool = ray.remote(num_cpus=0)(WorkerPool)  # type: ignore[call-overload]
    return pool.options(scheduling_strategy=on_this_node()).remote(workers)


@dataclass(frozen=True)
class WorkerLink:
    """What a model worker needs besides its model: the driver's version and inbox, where large artefacts
    go, and its share of a GPU."""
    version: str
    inbox: Any
    sweep: str
    storage: str | None = None
    gpu_share: float = 0.0  # the fraction of one GPU this worker reserves (resources.gpus_per_worker)
    cuda: bool = False  # the workers run on CUDA
    tf32: bool = False  # resources.tf32: float32 matmuls on TF32 tensor cores (CUDA only)
    trainable: bool = False  # some trial fine-tunes the model (optimizer state on the GPU)


def start_workers(n: int, model_spec_kw: dict, link: WorkerLink, gpu_resource: str,
                  threads: int) -> tuple[list, list[dict]]:
    """n model workers, each reserving `link.gpu_share` of `gpu_resource` (GPU, or a custom resource that
    stands for one); spread over the nodes. Returns them and their `describe()` once every worker has
    loaded its model, or fails with the first worker's error (a version mismatch names the node)."""
    # CPU workers reserve no Ray CPU: their number is chosen from the cores, and the thin trial
    # functions that call them must still be schedulable beside them
    # two threads: `run` trains while `progress`/`stop` answer the trial function (for ASHA)
    share = link.gpu_share
    reserve: dict[str, Any] = {}
    if share and gpu_resource != "GPU":
        reserve["resources"] = {gpu_resource: share}
    if share and (gpu_resource == "GPU" or link.cuda):  # a GPU reserved: Ray sets CUDA_VISIBLE_DEVICES
        reserve["num_gpus"] = share
    actor = ray.remote(num_cpus=0, max_concurrency=2)(ModelWorker)  # type: ignore[call-overload]
    workers = [actor.options(scheduling_strategy="SPREAD", **reserve).remote(model_spec_kw, threads, link)
               for _ in range(n)]
    try:
        return workers, ray.get([w.describe.remote() for w in workers])
    except ray.exceptions.RayActorError as e:
        cause = getattr(e, "cause", None) or e
        raise NsrError(f"a model worker could not start: {str(cause).strip().splitlines()[-1]}") from None


FORWARDED_PREFIXES = ("HF_", "NSR_", "TRANSFORMERS_")


def forwarded_env() -> dict[str, str]:
    """The driver's settings every worker must share (Ray's runtime_env): HF_HUB_OFFLINE, HF_HOME,
    NSR_CACHE_DIR and the rest of the HF_*, NSR_* and TRANSFORMERS_* variables."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}


def check_version(driver: str) -> None:
    """A worker runs the driver's nsr-sweep version, or refuses to start (results would mix two codes)."""
    from .. import __version__

    if __version__ != driver:
        import socket

        raise NsrError(f"the model worker on {socket.gethostname()} has nsr-sweep {__version__}, the driver "
                       f"{driver}: install the same version on every node")


def check_gpu_share(model, share: float, trainable: bool) -> None:
    """The model must fit in this worker's share of its GPU, or the sweep stops now with the setting to change."""
    import torch

    total = torch.cuda.get_device_properties(torch.device(model.spec.device)).total_memory
    gpu_budget(sum(p.numel() * p.element_size() for p in model.hf.parameters()), total, share, trainable)


def gpu_budget(weight_bytes: int, total_bytes: int, share: float, trainable: bool) -> None:
    """Weights, ×4 when fine-tuning (gradients and Adam's two moments), plus a quarter for activations."""
    need = weight_bytes * (4 if trainable else 1) * 1.25
    have = total_bytes * min(share or 1.0, 1.0)  # a worker's model lives on one device, whatever it reserves
    if need > have:
        what = f"the model needs ≈{need / 2**30:.1f} GiB ({'fine-tuning' if trainable else 'weights'})"
        if need > total_bytes:
            raise NsrError(f"resources.gpus_per_worker {share:g}: {what}, more than a whole "
                           f"{total_bytes / 2**30:.0f} GiB GPU: use bigger GPUs or device cpu")
        raise NsrError(f"resources.gpus_per_worker {share:g}: {what}, its share of a {total_bytes / 2**30:.0f} GiB "
                       f"GPU is {have / 2**30:.1f} GiB; allowed ≥ {need / total_bytes:.2f}")


def plan_workers(spec: SweepSpec) -> tuple[int, str, int]:
    """(number of workers, device, torch threads per worker) from the cluster's resources: with
    `gpus_per_worker`, one worker per share of `gpu_resource` (fractions put several on one GPU)."""
    res = ray.cluster_resources()
    r = spec.resources
    gpus = res.get(r.gpu_resource, 0)
    use_gpu = r.gpu_resource == "GPU" and (r.device == "cuda" or (r.device == "auto" and gpus > 0 and r.gpus_per_worker > 0))
    if r.device == "cuda" and res.get("GPU", 0) == 0:
        raise NsrError("resources.device is cuda but the Ray cluster has no GPU")
    if r.gpus_per_worker and r.gpu_resource != "GPU" and not gpus:
        raise NsrError(f"resources.gpu_resource {r.gpu_resource!r}: no node of the Ray cluster has it "
                       f"(it has {', '.join(sorted(k for k in res if not k.startswith('node:')))})")
    threads = max(1, int(r.cpus_per_trial))
    if r.workers != "auto":
        n = r.workers
    elif r.gpus_per_worker and (use_gpu or r.gpu_resource != "GPU"):
        n = max(1, int(gpus / r.gpus_per_worker + 1e-9))
    else:
        n = max(1, int(res.get("CPU", 1) // threads))
    return n, ("cuda" if use_gpu or r.device == "cuda" else "cpu"), threads


def worker_memory(info: list[dict], nodes: list[dict]) -> float | None:
    """The memory (bytes) each model worker can count on: its node's Ray `memory` resource (what Ray leaves to
    tasks and actors, within a container's limit) over the workers on that node; the least of them (None: unknown).
    `info`: the workers' `describe()`; `nodes`: `ray.nodes()`."""
    per_node = {n.get("NodeID"): float((n.get("Resources") or {}).get("memory") or 0) for n in nodes
                if n.get("Alive", True)}
    counts = Counter(i["node"] for i in info)
    shares = [per_node[node] / k for node, k in counts.items() if per_node.get(node)]
    return min(shares) if shares else None


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
