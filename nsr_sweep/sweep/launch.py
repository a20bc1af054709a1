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
import os
import secrets
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from ..core.errors import NsrError, redacted
from ..core.files import write_json
from ..core.spec import METHOD_VERSION, SweepSpec
from ..results.layout import (
    STUDIES,
    backfill_runs,
    claim,
    read_state,
    release,
    update_state,
)
from ..results.store import open_store
from ..results.tables import write_trials_table
from .disk import DiskFull, disk_full_error, full_disk_logs_noted
from .options import Isolation, LaunchOptions
from .trackers import Trackers
from .validate import _check_writable, preflight

# -- the launch ----------------------------------------------------------------------------------


def launch(options: LaunchOptions, echo=print, isolation: Isolation | None = None) -> Path:
    """Run a sweep into `OUT/<name>/`. Raises NsrError (after the report is built) when trials are missing."""
    return Launch(options, echo, isolation).run()


class Launch:
    """One launch of a sweep, phase by phase:

        validate (no Ray) ─▶ claim OUT/<name>/ ─▶ open (studies, trackers, state `running`)
          ─▶ start_workers (Ray, the model workers, the cache) ─▶ plan (the grid, its search)
          ─▶ run_trials (Tune) ─▶ finish (the table, the count, the state) ─▶ stop (Ray, once) ─▶ report

    `run` runs them in order; whatever ends it early is recorded in sweep_state.json (`failed`, and why), and a
    full disk ends in one line (`disk.DiskFull`)."""

    def __init__(self, options: LaunchOptions, echo=print, isolation: Isolation | None = None):
        self.options, self.echo, self.isolation = options, echo, isolation or Isolation()
        self.times: dict[str, float] = {"start": time.time()}
        self.local: Any = None  # the LocalCluster this launch started
        self.worker_memory: float | None = None  # bytes each model worker can count on (`workers.worker_memory`)
        self.ray_started = False
        self.missing: list[str] = []
        self.table: Any = None  # the trial table finish wrote, until the report takes it

    def run(self) -> Path:
        import pyarrow as pa

        pa.set_memory_pool(pa.system_memory_pool())  # tables built once and let go: returned (mimalloc keeps them)
        self.validate()
        try:
            claim(self.sweep_dir, self.spec, self.options.resume)
        except OSError as e:  # a resume into a directory whose disk is still full
            release(self.sweep_dir)
            if (cause := disk_full_error(e)) is None:
                raise
            raise DiskFull.of(cause, self.sweep_dir, self.options.resume_command()) from None
        try:
            self.open()
            self.plan(self.start_workers())
            self.run_trials()
            self.finish()
            self.stop()  # leftovers killed, Ray's temp dir deleted, before the report is built
            self.report()
        except BaseException as e:  # recorded, so the directory never reads "running" after its launch is gone
            full = self.record_failure(e)
            if full is None:
                raise
            raise full from None
        finally:
            self.stop()
            release(self.sweep_dir)
        if self.missing:
            raise NsrError(f"{len(self.missing)} of {self.n_expected} trials missing from {self.sweep_dir}: "
                           f"{self.lost}. `{self.options.resume_command()}` reruns them")
        return self.sweep_dir

    def validate(self) -> None:
        """Everything checked before Ray starts (`validate.preflight`, shared with --dry-run: the sweep file, the
        model's weights, the corpus, the directories, the device, the disk's room), then the trackers' packages and
        the network the cluster will use."""
        o = self.options
        self.spec = preflight(o)
        self.storage = absolute_storage(o.storage)
        self.trackers = Trackers(o.tensorboard, o.mlflow)
        self.trackers.check()
        self.network = network_for(o.ray_network, [self.storage, o.mlflow], o.address, self.echo)
        self.sweep_dir = Path(o.out).resolve() / self.spec.name

    def open(self) -> None:
        """The studies' storage and the trackers (each fails here, before Ray starts), then the state `running`:
        a resume keeps its start and its uid (study names carry it: never shared) and starts clean."""
        from .search import study_storage  # Optuna and Ray load only once a launch goes ahead

        o, spec = self.options, self.spec
        self.studies = study_storage(o.optuna_storage or str(self.sweep_dir / STUDIES))
        self.callbacks = self.trackers.callbacks(self.sweep_dir, spec.name)
        before = read_state(self.sweep_dir)
        self.state = update_state(self.sweep_dir, name=spec.name, status="running",
                                  uid=before.get("uid") or secrets.token_hex(4),
                                  started=before.get("started", self.times["start"]),
                                  resumed=bool(before),  # a state before this launch: a resume
                                  optuna_storage=redacted(o.optuna_storage) or STUDIES, storage=self.storage,
                                  method_version=METHOD_VERSION,
                                  error=None, n_missing=None, missing=None, missing_reason=None)

    def start_ray(self) -> str | None:
        """Join a cluster, or start a local one, closed (see localray); returns the dashboard's URL. A cluster's
        workers get the driver's HF_*, NSR_* and TRANSFORMERS_* settings (Ray's runtime_env); a local one's
        inherit them."""
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our own progress lines replace Tune's tables
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        import ray

        self.ray_started = True
        if address := self.options.address or os.environ.get("RAY_ADDRESS"):
            from .workers import forwarded_env

            ctx = ray.init(address=address, log_to_driver=False, configure_logging=True,
                           logging_level=logging.ERROR, runtime_env={"env_vars": forwarded_env()})
            return getattr(ctx, "dashboard_url", None)
        from .localray import start_local_ray
        from .workers import cpu_count

        o, iso = self.options, self.isolation
        self.local = start_local_ray(cpu_count(), dashboard=o.dashboard, dashboard_host=o.dashboard_host,
                                     network=self.network, isolated=iso.isolated, not_isolated=iso.why,
                                     forward=iso.forward, echo=self.echo)
        return self.local.url

    def start_workers(self):
        """Ray, the model workers (one model load each) and the inbox of their records; returns the cache."""
        import ray

        from .. import __version__
        from .inputs import model_spec
        from .transport import start_inbox
        from .workers import WorkerLink, plan_workers, start_workers, worker_memory

        spec, r = self.spec, self.spec.resources
        self.url = self.start_ray()
        self.times["ray"] = time.time()
        if self.url:
            self.echo(f"Ray dashboard: http://{self.url}  (token: `ray get-auth-token`)")
        self.n_workers, device, threads = plan_workers(spec)
        self.rows = open_store(self.sweep_dir).finished_rows()
        backfill_runs(self.sweep_dir, [row["trial_id"] for row in self.rows if row.get("status") == "ok"])
        self.inbox = start_inbox([row["trial_id"] for row in self.rows if row.get("status") != "damaged"
                                  and not row.get("unit")])  # trials run alone (the inbox knows units by their id)
        link = WorkerLink(version=__version__, inbox=self.inbox, sweep=spec.name, storage=self.storage,
                          gpu_share=r.gpus_per_worker if device == "cuda" or r.gpu_resource != "GPU" else 0.0,
                          cuda=device == "cuda", trainable=any(f != "none" for _, f in spec.combos()), tf32=r.tf32)
        self.echo(f"starting {self.n_workers} model worker(s) on {device}, {threads} thread(s) each …")
        self.workers, info = start_workers(self.n_workers, asdict(model_spec(spec, device)), link, r.gpu_resource,
                                           threads)
        self.worker_memory = worker_memory(info, ray.nodes())
        self.echo(f"{self.n_workers} model worker(s) on {len({i['node'] for i in info})} node(s); building or "
                  "loading the cache …")
        update_state(self.sweep_dir, workers=self.n_workers, worker_info=info, device=device, dashboard_url=self.url)
        return self.load_cache()

    def load_cache(self):
        """Worker 0 builds or loads the cache; its arrays go to the object store once and every worker reads them
        zero-copy. The cache's identity goes to cache_keys.json."""
        import ray

        from ..core.cache import ActivationCache

        arrays_ref = self.workers[0].build_cache.remote(self.spec.model_dump(mode="json"), self.options.cache_root)
        ray.get([w.set_cache.remote(arrays_ref) for w in self.workers])
        cache = ActivationCache.from_arrays(ray.get(arrays_ref))
        self.times["cache"] = time.time()
        meta = cache.meta
        write_json(self.sweep_dir / "cache_keys.json", [{"key": meta["key"], "layers": sorted(cache.acts),
                                                         **{k: meta[k] for k in CACHE_KEYS}}])
        _gauge("nsr_sweep_cache_tokens_per_second", self.spec.name, meta["tokens_per_second"])
        return cache

    def plan(self, cache) -> None:
        """The grid of the resolved neurons, what it owes, and the search that hands out what is left."""
        from .grid import expand, n_expected, unit_size
        from .inputs import resolve_neurons
        from .search import GroupedSearch

        spec = self.spec
        neurons = resolve_neurons(spec, cache)
        self.grid = groups = expand(spec, neurons)
        unit = unit_size(spec, neurons, self.n_workers, memory=self.worker_memory)
        self.searcher = GroupedSearch(spec, groups, self.rows, storage=self.studies,
                                      prefix=f"{spec.name}-{self.state['uid']}", unit_neurons=unit)
        self.n_expected = n_expected(spec, groups)
        skipped = len(spec.skipped_combos()) * sum(len(v) for v in neurons.values())
        self.echo(f"{len(groups)} groups, {self.n_expected} trials ({spec.search.num_samples} samples per searched "
                  f"group, exact probes once; {len(self.rows)} already finished, {skipped} invalid head+freeze "
                  f"trials skipped); units of ≤ {unit} neurons"
                  + (f" (a worker's memory {self.worker_memory / 1e9:.1f} GB)" if self.worker_memory else ""))
        update_state(self.sweep_dir, n_expected=self.n_expected, n_groups=len(groups), unit_neurons=unit,
                     worker_memory_gb=self.worker_memory and round(self.worker_memory / 1e9, 2),
                     neurons={str(k): v for k, v in neurons.items()}, cache_key=cache.meta["key"])

    def run_trials(self) -> None:
        """Tune runs what is left; the collector writes each record as it arrives. A disk that filled stops Tune
        (what is left cannot be written) and ends the launch."""
        import ray

        from .progress import SweepProgress
        from .transport import Collector
        from .workers import start_pool

        self.pool = start_pool(self.workers)
        self.collector = Collector(self.sweep_dir, self.spec, self.rows, self.inbox, self.pool)
        progress = SweepProgress(self.collector, self.spec.name, self.spec.search.metric,
                                 len(self.rows) + self.searcher.n_remaining)
        self.work_before = work_seconds(pd.DataFrame(self.rows))
        if self.searcher.n_remaining:
            with full_disk_logs_noted(self.collector.note_disk_full):
                self.tuner(progress).fit()
            if self.collector.disk_full is None:  # a trial a scheduler stopped may still be sending its record
                ray.get(self.pool.each.remote("wait_idle", 600))
        progress.show(self.collector.collect())
        progress.close()
        self.times["trials"] = time.time()
        if self.collector.disk_full is not None:
            raise self.collector.disk_full

    def tuner(self, progress):
        """One Tune run: the grouped search, ASHA when asked, our trial function on the model workers' pool."""
        from ray import tune

        from .trainable import trial_function

        spec, s = self.spec, self.spec.search
        trainable = tune.with_resources(tune.with_parameters(
            trial_function, pool=self.pool, metric=s.metric, mode=s.mode, stream=s.scheduler == "asha"), {"cpu": 0.01})
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=self.searcher, scheduler=_asha(spec),
                                        num_samples=self.searcher.n_remaining, reuse_actors=True,
                                        trial_dirname_creator=_tune_dirname, metric=s.metric, mode=s.mode,
                                        max_concurrent_trials=spec.resources.max_concurrent or 2 * self.n_workers),
            run_config=tune.RunConfig(name="tune", storage_path=str(self.sweep_dir), verbose=0,
                                      stop=_stop_on_full_disk(self.collector),
                                      failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                      callbacks=[progress.callback, *self.callbacks]))

    def finish(self) -> None:
        """The trial table written whole, what is missing and why, the timings: the state `finished` or
        `incomplete`."""
        import ray

        from .grid import expected_trials

        loads = sum(ray.get(self.pool.each.remote("load_count")))
        self.table = df = write_trials_table(self.sweep_dir, self.spec.search.metric, self.spec.search.mode)
        counts = {k: int(v) for k, v in df["status"].value_counts().items()} if len(df) else {}
        self.missing = missing_trials(expected_trials(self.spec, self.grid), df)
        self.lost = missing_reason(self.missing, self.collector.unwritten, self.collector.lost)
        update_state(self.sweep_dir, status="incomplete" if self.missing else "finished", finished=time.time(),
                     model_loads=loads, counts=counts, n_missing=len(self.missing), missing=self.missing[:100],
                     missing_reason=self.lost, timings=self.timings(work_seconds(df) - self.work_before))
        self.echo(f"done: {counts.get('ok', 0)} ok, {counts.get('failed', 0)} failed, {len(self.missing)} missing; "
                  f"base model loaded {loads}× ({self.n_workers} worker(s)); table "
                  f"{self.sweep_dir / 'tables' / 'trials.parquet'}")

    def timings(self, trial_seconds: float) -> dict:
        """Where the launch's time went, from the phases' clocks and the workers' own seconds."""
        t = self.times
        return {"ray_init_s": round(t["ray"] - t["start"], 2), "cache_s": round(t["cache"] - t["ray"], 2),
                "trials_wall_s": round(t["trials"] - t["cache"], 2), "trial_work_s": round(trial_seconds, 2),
                "scheduling_overhead_s": round(t["trials"] - t["cache"] - trial_seconds / self.n_workers, 2),
                "total_s": round(time.time() - self.state["started"], 2)}

    def stop(self) -> None:
        """Ray down, once: a local cluster's leftovers killed and its temp dir deleted; a joined cluster left."""
        local, self.local, started, self.ray_started = self.local, None, self.ray_started, False
        if local is not None:
            local.stop()
        elif started:
            import ray

            ray.shutdown()

    def report(self) -> None:
        from ..core.memory import give_back
        from ..report.build import build_report

        table, self.table = self.table, None
        del self.searcher, self.collector, self.grid, self.rows  # the trials' state: let go, and handed back
        give_back()
        t = time.time()
        build_report(self.sweep_dir, echo=self.echo, table=table)  # finish's table; a full disk here: one line
        update_state(self.sweep_dir, report_s=round(time.time() - t, 2),
                     total_with_report_s=round(time.time() - self.times["start"], 2))

    def record_failure(self, e: BaseException) -> DiskFull | None:
        """sweep_state.json says why the launch ended early: `failed`, with the error — for a full disk the one
        line, which is returned (the state is rewritten in place when the disk has no room left for a new one)."""
        cause = disk_full_error(e)
        full = DiskFull.of(cause, self.sweep_dir, self.options.resume_command()) if cause is not None else None
        if full is None and read_state(self.sweep_dir).get("status") != "running":
            return None
        try:
            update_state(self.sweep_dir, status="failed", finished=time.time(),
                         error=str(full) if full else redacted(f"{type(e).__name__}: {e}"[:2000]))
        except OSError:
            pass  # the state cannot be written at all: the line still says why
        return full


CACHE_KEYS = ("n_texts", "n_tokens", "tokens_per_second", "identity", "model", "corpus")  # cache_keys.json


def missing_trials(expected: Iterable[str], table: pd.DataFrame) -> list[str]:
    """The trials the sweep owes that have no finished record (ok or failed) in the trial table."""
    finished = set(table.loc[table["status"].isin(["ok", "failed"]), "trial_id"]) if len(table) else set()
    return sorted(t for t in expected if t not in finished)


def _asha(spec: SweepSpec):
    """ASHA over epochs (search.scheduler asha), or None."""
    if spec.search.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    max_epochs = max([spec.training.epochs] + [int(d.int[1]) for k, d in spec.search.space.items()
                                               if k == "epochs" and d.int])
    return ASHAScheduler(time_attr="training_iteration", max_t=max_epochs + 1, grace_period=spec.search.grace_period,
                         reduction_factor=spec.search.reduction_factor)


def _stop_on_full_disk(collector):
    """A Tune stopper that ends the whole run once the collector met a full disk."""
    from ray.tune.stopper import Stopper

    class StopOnFullDisk(Stopper):
        def __init__(self, collector):
            self.collector = collector

        def __getstate__(self):  # Tune saves its stopper in tune/: the live collector (every row so far) stays out
            return {}

        def __setstate__(self, state):
            self.collector = None

        def __call__(self, trial_id, result) -> bool:
            return False

        def stop_all(self) -> bool:
            return self.collector is not None and self.collector.disk_full is not None
    return StopOnFullDisk(collector)


def _tune_dirname(trial) -> str:
    """tune/<our trial or unit id>-<Tune's id> (Tune's default spells out the config)."""
    return f"{trial.config['trial_id']}-{trial.trial_id}"


def isolate_here(options: LaunchOptions) -> bool:
    """Whether this `launch` starts a local cluster in a network namespace of its own (Linux, no cluster
    address, --ray-network not host, no remote URI to reach): then what needs the network (an `hf:` corpus) is
    fetched here, and the launch goes on in a child (`localray.spawn_isolated`). The whole validation pass runs
    here first, so a bad sweep file is refused by this process, before any child starts."""
    if sys.platform != "linux" or options.address or os.environ.get("RAY_ADDRESS"):
        return False
    spec = preflight(options)
    storage = absolute_storage(options.storage)
    if network_for(options.ray_network, [storage, options.mlflow], None, lambda _: None) == "host":
        return False  # (the launch itself says why)
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


def network_for(network: str, uris: list[str | None], address: str | None, echo) -> str:
    """A local cluster in its own network namespace cannot reach a remote --storage or --mlflow URI."""
    remote = [u for u in uris if u and "://" in u and not u.startswith(("file:", "sqlite:"))]
    if not remote or address or os.environ.get("RAY_ADDRESS") or network == "host":
        return network
    if network == "isolated":
        raise NsrError(f"--ray-network isolated cannot reach {remote[0]}: use --ray-network host (or auto)")
    echo(f"Ray's ports on the host's network: the workers must reach {remote[0]}")
    return "host"


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


def work_seconds(table: pd.DataFrame) -> float:
    """Seconds workers spent on these trials: training and evaluation, then their artefacts."""
    cols = [c for c in ("seconds", "artefact_seconds") if c in table]
    return float(sum(pd.to_numeric(table[c], errors="coerce").where(np.isfinite).sum() for c in cols))


def _gauge(name: str, sweep: str, value: float) -> None:
    from ray.util.metrics import Gauge

    g = Gauge(name, description=name.replace("_", " "), tag_keys=("sweep",))
    g.set(value, tags={"sweep": sweep})


# -- the launch's own process (localray.spawn_isolated) ------------------------------------------


def _echo(text: str) -> None:
    print(text, flush=True)


def run_isolated_launch(options: LaunchOptions, isolation: Isolation) -> int:
    """The launch inside the child process `localray.spawn_isolated` started (after it entered its namespace)."""
    if isolation.isolated:  # what needs the network was fetched by the parent: nothing here reaches it
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        sweep_dir = launch(options, echo=_echo, isolation=isolation)
    except NsrError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    _echo(f"results: {sweep_dir}")
    return 0
