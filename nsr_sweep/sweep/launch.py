"""`nsr-sweep launch`: a sweep file becomes hundreds of trials on local Ray or a cluster.

    validate ─▶ lock results/<name>/ ─▶ ray.init ─▶ model workers (one model load each)
      ─▶ worker 0 builds/loads the cache ─▶ object store (once) ─▶ every worker, zero-copy
      ─▶ Tune (one Optuna study per group; units of probes) ─▶ records + tables/trials.parquet as trials finish

Our own record of finished trials is in the results directory (`records`: a trial's `metrics.json`, a
unit's `probes/records/<unit>.parquet`, each written last), so `--resume` after a SIGKILL reruns nothing
that finished, whatever Tune's state says.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..core.errors import NsrError, redacted
from ..core.files import write_json
from ..core.spec import METHOD_VERSION, SweepSpec
from ..results.layout import (
    STUDIES,
    TRIALS,
    backfill_runs,
    claim,
    read_state,
    release,
    update_state,
)
from ..results.records import finished_rows
from ..results.tables import write_trials_table
from .validate import _check_writable, preflight

# -- Ray -------------------------------------------------------------------------------------


def init_ray(spec: SweepSpec, address: str | None, dashboard: bool, dashboard_host: str, network: str, echo,
             isolation: Isolation | None = None):
    """Join a cluster — (dashboard URL, None) — or start a local one, closed (see localray) —
    (its dashboard URL, the LocalCluster that stops it). A cluster's workers get the driver's HF_*,
    NSR_* and TRANSFORMERS_* settings (Ray's runtime_env); a local cluster's inherit them."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our own progress lines replace Tune's tables
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        from .workers import forwarded_env

        ctx = ray.init(address=address, log_to_driver=False, configure_logging=True, logging_level=logging.ERROR,
                       runtime_env={"env_vars": forwarded_env()})
        return getattr(ctx, "dashboard_url", None), None
    from .localray import start_local_ray
    from .workers import cpu_count

    iso = isolation or Isolation()
    local = start_local_ray(cpu_count(), dashboard=dashboard, dashboard_host=dashboard_host, network=network,
                            isolated=iso.isolated, not_isolated=iso.why, forward=iso.forward, echo=echo)
    return local.url, local


@dataclass
class Isolation:
    """Where a local launch's process stands (`localray.spawn_isolated` made it): in its own network namespace,
    or why not; and the dashboard listener its parent bound on the host's network."""
    isolated: bool = False
    why: str | None = "the launch was not started in a process of its own"
    forward: Any = None


def plan_workers(spec: SweepSpec) -> tuple[int, str, int]:
    """(number of workers, device, torch threads per worker) from the cluster's resources: with
    `gpus_per_worker`, one worker per share of `gpu_resource` (fractions put several on one GPU)."""
    import ray

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


# -- launch ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trackers:
    """Optional experiment trackers, fed every result Tune receives (a batch reports its summary)."""
    tensorboard: bool = False
    """Tune's TBX logger: event files under results/<name>/tune/ (`tensorboard --logdir results/<name>/tune`)."""
    mlflow: str | None = None
    """An MLflow tracking URI, or "" for results/<name>/mlruns/mlflow.db (SQLite: MLflow 3 refuses a plain
    mlruns/ file store by default); one MLflow experiment named after the sweep."""

    def check(self) -> None:
        """The packages they need, before anything starts."""
        import importlib.util

        for on, module, package in ((self.tensorboard, "tensorboardX", "tensorboardX"),
                                    (self.mlflow is not None, "mlflow", "mlflow-skinny")):
            if on and importlib.util.find_spec(module) is None:
                raise NsrError(f"--{'tensorboard' if module == 'tensorboardX' else 'mlflow'} needs {package}: "
                               f"pip install {package}")

    def mlflow_uri(self, sweep_dir: Path) -> str | None:
        if self.mlflow is None:
            return None
        if self.mlflow:
            return self.mlflow
        (sweep_dir / "mlruns").mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{sweep_dir / 'mlruns' / 'mlflow.db'}"

    def callbacks(self, sweep_dir: Path, name: str) -> list:
        """Tune callbacks; an MLflow store that cannot be opened fails here, before Ray starts."""
        out: list = []
        if self.tensorboard:
            from ray.tune.logger import TBXLoggerCallback

            out.append(TBXLoggerCallback())
        if (uri := self.mlflow_uri(sweep_dir)) is not None:
            import mlflow
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            try:
                mlflow.MlflowClient(uri).search_experiments(max_results=1)
            except Exception as e:
                raise NsrError(redacted(f"--mlflow {uri}: cannot be opened ({type(e).__name__}: {str(e)[:300]})")) from None
            out.append(_mlflow_callback(MLflowLoggerCallback)(tracking_uri=uri, experiment_name=name,
                                                               save_artifact=False))
        return out


def _mlflow_callback(base):
    """Ray's MLflow callback, logging `tracker_params` of a trial's config instead of the whole config."""
    from .grid import tracker_params

    class MLflowCallback(base):
        def log_trial_start(self, trial):
            if trial not in self._trial_runs:
                run = self.mlflow_util.start_run(tags={**self.tags, "trial_name": str(trial)}, run_name=str(trial))
                self._trial_runs[trial] = run.info.run_id
                self.mlflow_util.log_params(run_id=run.info.run_id, params_to_log=tracker_params(trial.config))
    return MLflowCallback


def launch(sweep_file: str, *, out_root: str = "results", address: str | None = None, resume: bool = False,
           dashboard: bool = True, dashboard_host: str = "127.0.0.1", cache_root: str | None = None,
           network: str = "auto", storage: str | None = None, optuna_storage: str | None = None,
           trackers: Trackers | None = None, echo=print, isolation: Isolation | None = None) -> Path:
    """Run a sweep into `out_root/<name>/`. Raises NsrError (after the report is built) when trials are missing."""
    t_start = time.time()
    spec = preflight(sweep_file, address, cache_root, out_root)  # every input error surfaces here, before Ray starts
    storage = absolute_storage(storage)
    trackers = trackers or Trackers()
    trackers.check()
    network = _network_for(network, [storage, trackers.mlflow], address, echo)
    sweep_dir = Path(out_root).resolve() / spec.name
    claim(sweep_dir, spec, resume)
    local = None
    try:
        from .search import study_storage  # Optuna and Ray load only once a launch goes ahead

        studies = study_storage(optuna_storage or str(sweep_dir / STUDIES))
        callbacks = trackers.callbacks(sweep_dir, spec.name)
        before = read_state(sweep_dir)  # a resume keeps its start and its uid (study names carry it: never shared)
        state = update_state(sweep_dir, name=spec.name, status="running",
                             uid=before.get("uid") or secrets.token_hex(4),
                             started=before.get("started", t_start), resumed=(sweep_dir / TRIALS).is_dir(),
                             optuna_storage=redacted(optuna_storage) or STUDIES, storage=storage,
                             method_version=METHOD_VERSION,
                             error=None, n_missing=None, missing=None, missing_reason=None)  # a resume starts clean
        url, local = init_ray(spec, address, dashboard, dashboard_host, network, echo, isolation)
        return _run(spec, sweep_dir, state, url, cache_root, local, echo, t_start, storage, studies, callbacks)
    except BaseException as e:  # recorded, so the directory never reads "running" after its launch is gone
        if read_state(sweep_dir).get("status") == "running":
            update_state(sweep_dir, status="failed", finished=time.time(), error=redacted(f"{type(e).__name__}: {e}"[:2000]))
        raise
    finally:
        if local is not None:  # a local cluster: shut down and its leftovers reaped before the lock goes
            local.stop()
        release(sweep_dir)


def _tune_dirname(trial) -> str:
    """tune/<our trial or unit id>-<Tune's id> (Tune's default spells out the config)."""
    return f"{trial.config['trial_id']}-{trial.trial_id}"


def isolate_here(options: dict, echo=print) -> bool:
    """Whether this `launch` starts a local cluster in a network namespace of its own (Linux, no cluster
    address, --ray-network not host, no remote URI to reach): then what needs the network (an `hf:` corpus) is
    fetched here, and the launch goes on in a child (`localray.spawn_isolated`). The whole validation pass runs
    here first, so a bad sweep file is refused by this process, before any child starts."""
    import sys

    if sys.platform != "linux" or options["address"] or os.environ.get("RAY_ADDRESS"):
        return False
    spec = preflight(options["sweep_file"], None, options["cache_root"], options["out_root"])
    network = _network_for(options["network"], [absolute_storage(options["storage"]), options["mlflow"]], None, echo)
    if network == "host":
        options["network"] = "host"
        return False
    from .localray import prefetch

    prefetch(spec)  # the child will have no network: what needs it is fetched here
    return True


def absolute_storage(storage: str | None) -> str | None:
    """`--storage`: a URI as given, a local path made absolute (workers resolve nothing against their cwd)."""
    if not storage or "://" in storage:
        return storage
    path = Path(storage).resolve()
    _check_writable(path, "--storage")
    return str(path)


def _network_for(network: str, uris: list[str | None], address: str | None, echo) -> str:
    """A local cluster in its own network namespace cannot reach a remote --storage or --mlflow URI."""
    remote = [u for u in uris if u and "://" in u and not u.startswith(("file:", "sqlite:"))]
    if not remote or address or os.environ.get("RAY_ADDRESS") or network == "host":
        return network
    if network == "isolated":
        raise NsrError(f"--ray-network isolated cannot reach {remote[0]}: use --ray-network host (or auto)")
    echo(f"Ray's ports on the host's network: the workers must reach {remote[0]}")
    return "host"


def _run(spec, sweep_dir, state, url, cache_root, local, echo, t_start, storage, studies, callbacks) -> Path:
    import ray
    from ray import tune

    from .. import __version__
    from ..core.cache import ActivationCache
    from .grid import expand, expected_trials, unit_size
    from .inputs import model_spec, resolve_neurons
    from .progress import SweepProgress
    from .trainable import trial_function
    from .transport import Collector, start_inbox
    from .workers import WorkerLink, start_pool, start_workers

    t_ray = time.time()
    if url:
        echo(f"Ray dashboard: http://{url}  (token: `ray get-auth-token`)")
    n_workers, device, threads = plan_workers(spec)
    model_kw = asdict(model_spec(spec, device))
    rows = finished_rows(sweep_dir)
    backfill_runs(sweep_dir, [r["trial_id"] for r in rows if r.get("status") == "ok"])
    inbox = start_inbox([r["trial_id"] for r in rows if r.get("status") != "damaged"])
    link = WorkerLink(version=__version__, inbox=inbox, sweep=spec.name, storage=storage,
                      gpu_share=spec.resources.gpus_per_worker if device == "cuda" or
                      spec.resources.gpu_resource != "GPU" else 0.0, cuda=device == "cuda",
                      trainable=any(f != "none" for _, f in spec.combos()), tf32=spec.resources.tf32)
    echo(f"starting {n_workers} model worker(s) on {device}, {threads} thread(s) each …")
    workers, info = start_workers(n_workers, model_kw, link, spec.resources.gpu_resource, threads)
    echo(f"{n_workers} model worker(s) on {len({i['node'] for i in info})} node(s); building or loading the cache …")
    arrays_ref = workers[0].build_cache.remote(spec.model_dump(mode="json"), cache_root)
    ray.get([w.set_cache.remote(arrays_ref) for w in workers])  # each worker: zero-copy views of one copy
    cache = ActivationCache.from_arrays(ray.get(arrays_ref))
    t_cache = time.time()
    meta = cache.meta
    write_json(sweep_dir / "cache_keys.json", [{"key": meta["key"], "layers": sorted(cache.acts),
                                                "n_texts": meta["n_texts"], "n_tokens": meta["n_tokens"],
                                                "tokens_per_second": meta["tokens_per_second"],
                                                "identity": meta["identity"], "model": meta["model"],
                                                "corpus": meta["corpus"]}])
    _gauge("nsr_sweep_cache_tokens_per_second", spec.name, meta["tokens_per_second"])
    neurons = resolve_neurons(spec, cache)
    groups = expand(spec, neurons)
    from .search import GroupedSearch

    searcher = GroupedSearch(spec, groups, rows, storage=studies, prefix=f"{spec.name}-{state['uid']}",
                             unit_neurons=unit_size(spec, neurons, n_workers))
    total = len(rows) + searcher.n_remaining
    skipped = len(spec.skipped_combos()) * sum(len(v) for v in neurons.values())
    expected = expected_trials(spec, groups)
    echo(f"{len(groups)} groups, {len(expected)} trials ({spec.search.num_samples} samples per searched group, exact "
         f"probes once; {len(rows)} already finished, {skipped} invalid head+freeze trials skipped)")
    update_state(sweep_dir, n_expected=len(expected), n_groups=len(groups), workers=n_workers, worker_info=info,
                 device=device, neurons={str(k): v for k, v in neurons.items()}, cache_key=meta["key"],
                 dashboard_url=url)
    pool = start_pool(workers)
    collector = Collector(sweep_dir, spec, rows, inbox, pool)
    progress = SweepProgress(collector, spec.name, spec.search.metric, total)
    trial_seconds_before = sum(_work(r) for r in rows)
    if searcher.n_remaining:
        asha = spec.search.scheduler == "asha"
        trainable = tune.with_resources(
            tune.with_parameters(trial_function, pool=pool, metric=spec.search.metric,
                                 mode=spec.search.mode, stream=asha), {"cpu": 0.01})
        scheduler = None
        if asha:
            from ray.tune.schedulers import ASHAScheduler

            max_epochs = max([spec.training.epochs] + [int(d.int[1]) for k, d in spec.search.space.items()
                                                       if k == "epochs" and d.int])
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_epochs + 1,
                                      grace_period=spec.search.grace_period,
                                      reduction_factor=spec.search.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=searcher.n_remaining,
                                        reuse_actors=True, trial_dirname_creator=_tune_dirname,
                                        max_concurrent_trials=spec.resources.max_concurrent or 2 * n_workers,
                                        metric=spec.search.metric, mode=spec.search.mode),
            run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                      callbacks=[progress.callback, *callbacks]),
        )
        tuner.fit()
        ray.get(pool.each.remote("wait_idle", 600))  # a trial a scheduler stopped may still be sending its record
    progress.show(collector.collect())
    progress.close()
    t_trials = time.time()
    loads = sum(ray.get(pool.each.remote("load_count")))
    df = write_trials_table(sweep_dir, finished_rows(sweep_dir), spec.search.metric, spec.search.mode)
    trial_seconds = sum(_work(r) for r in df.to_dict("records")) - trial_seconds_before
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    missing = sorted(expected - set(df.loc[df["status"].isin(["ok", "failed"]), "trial_id"] if len(df) else []))
    lost = missing_reason(missing, collector.unwritten, collector.lost)
    update_state(sweep_dir, status="incomplete" if missing else "finished", finished=time.time(), model_loads=loads,
                 counts={k: int(v) for k, v in counts.items()}, n_missing=len(missing), missing=missing[:100],
                 missing_reason=lost,
                 timings={"ray_init_s": round(t_ray - t_start, 2), "cache_s": round(t_cache - t_ray, 2),
                          "trials_wall_s": round(t_trials - t_cache, 2), "trial_work_s": round(trial_seconds, 2),
                          "scheduling_overhead_s": round(t_trials - t_cache - trial_seconds / n_workers, 2),
                          "total_s": round(time.time() - state["started"], 2)})
    echo(f"done: {counts.get('ok', 0)} ok, {counts.get('failed', 0)} failed, {len(missing)} missing; base model loaded "
         f"{loads}× ({n_workers} worker(s)); table {sweep_dir / 'tables' / 'trials.parquet'}")
    if local is not None:
        local.stop()  # leftovers killed, Ray's temp dir deleted, before the report is built
    else:
        ray.shutdown()
    from ..report.build import build_report

    t_report = time.time()
    build_report(sweep_dir, echo=echo)
    update_state(sweep_dir, report_s=round(time.time() - t_report, 2), total_with_report_s=round(time.time() - t_start, 2))
    if missing:
        raise NsrError(f"{len(missing)} of {len(expected)} trials missing from {sweep_dir}: {lost}. "
                       "`nsr-sweep launch <sweep file> --resume` reruns them")
    return sweep_dir


def missing_reason(missing: list[str], unwritten: dict[str, str], lost: dict[str, str]) -> str:
    """Why trials have no record here: writes that failed on this disk, trials lost with their workers or
    nodes after every retry, or records that never arrived."""
    failed = [t for t in missing if t in unwritten]
    died = [t for t in missing if t in lost and t not in unwritten]
    parts = []
    if failed:
        parts.append(f"{len(failed)} could not be written here ({unwritten[failed[0]]})")
    if died:
        parts.append(f"{len(died)} lost with their workers or nodes on every retry ({lost[died[0]][:200]})")
    if rest := len(missing) - len(failed) - len(died):
        parts.append(f"{rest} never reached the driver (a worker still running at the end, or a record lost "
                     "on the way)")
    return "; ".join(parts)


def _work(row: dict) -> float:
    """Seconds a worker spent on a trial: training and evaluation, then its artefacts."""
    total = 0.0
    for v in (row.get("seconds"), row.get("artefact_seconds")):
        total += v if isinstance(v, (int, float)) and math.isfinite(v) else 0.0
    return total


def _gauge(name: str, sweep: str, value: float) -> None:
    from ray.util.metrics import Gauge

    g = Gauge(name, description=name.replace("_", " "), tag_keys=("sweep",))
    g.set(value, tags={"sweep": sweep})


# -- the launch's own process (localray.spawn_isolated) ------------------------------------------


def _echo(text: str) -> None:
    print(text, flush=True)


def run_isolated_launch(args: dict, isolated: bool, why: str | None, forward) -> int:
    """The launch inside the child process `localray.spawn_isolated` started (after it entered its namespace)."""
    if isolated:  # what needs the network was fetched by the parent: nothing here reaches it
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        sweep_dir = launch(args["sweep_file"], out_root=args["out_root"], address=None, resume=args["resume"],
                               dashboard=args["dashboard"], dashboard_host=args["dashboard_host"],
                               cache_root=args["cache_root"], network=args["network"], storage=args["storage"],
                               optuna_storage=args["optuna_storage"],
                               trackers=Trackers(args["tensorboard"], args["mlflow"]), echo=_echo,
                               isolation=Isolation(isolated, why, forward))
    except NsrError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    _echo(f"results: {sweep_dir}")
    return 0
