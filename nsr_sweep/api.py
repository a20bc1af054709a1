"""The Python API (`import nsr_sweep`): the CLI's behaviour, returning objects a notebook works with.

    spec = nsr_sweep.load_sweep("sweeps/quickstart.yaml")      # or a dict: the same validation as the CLI
    cache = nsr_sweep.build_cache(spec)                           # ActivationCache (built once, then loaded)
    r = nsr_sweep.run_trial(cache, nsr_sweep.TrialSpec(layer=1, neuron=3))   # TrialResult: .metrics, .preds, .head
    res = nsr_sweep.launch(spec_dict_or_path, out="results")      # the same run as `nsr-sweep launch`
    res = nsr_sweep.open_results("results/quickstart")            # Results: DataFrames, .trial(id)

`launch` runs `nsr-sweep launch` in a child process, so the calling process (a notebook kernel) keeps
its network namespace, environment and threads: Ray, the isolation and the offline hub all live and
die in the child.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .core.errors import NsrError

if TYPE_CHECKING:
    from .report.neuron import NeuronPage
    from .results.store import TrialStore


def load_sweep(sweep: str | Path | dict, *, check_model: bool = True):
    """A validated `SweepSpec` from a sweep file or a dict: the CLI's validation pass (fields, the model's
    config, the corpus source, the cross-model's positions), before anything is loaded."""
    if not check_model:
        from .core.spec import load_sweep as load_file
        from .core.spec import parse_sweep

        return parse_sweep(sweep, source="sweep") if isinstance(sweep, dict) else load_file(sweep)
    from .sweep.validate import checked_sweep

    return checked_sweep(sweep)


def build_cache(spec, *, root: str | Path | None = None, progress: bool = True):
    """The sweep's `ActivationCache` (built once per model × corpus × layers, then loaded from `root`)."""
    from .sweep.inputs import build_cache as build

    return build(load_sweep(spec) if isinstance(spec, (str, Path, dict)) else spec, root=root, progress=progress)


def run_trial(cache, spec, model=None, *, outsider=None):
    """One trial without Ray (`TrialResult`: `.metrics` dict, `.preds` DataFrame, `.head` tensors, `.patch`).
    `model` defaults to the cache's own model (loaded once per process); a cross_model trial loads its other
    model the same way."""
    from .core.models import ModelSpec, load_model
    from .core.trial import run_trial as run

    if model is None:
        ident = cache.meta["model"]
        model = load_model(ModelSpec(name=ident["name"], init=ident["init"], seed=ident.get("seed") or 0))
    if outsider is None and spec.control == "cross_model" and spec.freeze != "none":
        outsider = load_model(spec.cross_model)
    return run(cache, model, spec, outsider=outsider)


def launch(sweep: str | Path | dict, out: str | Path = "results", *, resume: bool = False, quiet: bool = False,
           **options) -> Results:
    """Run a sweep exactly as `nsr-sweep launch` does — in a child process, which leaves this one as it found
    it — and open its results. `options` are the CLI's, in Python form: address, dashboard (bool),
    dashboard_host, cache_root, ray_network, storage, optuna_storage, tensorboard (bool), mlflow (URI or "").
    A launch that ends with missing trials or bad input raises NsrError with the CLI's message."""
    from .sweep.options import LaunchOptions

    with tempfile.TemporaryDirectory(prefix="nsr-launch-") as tmp:
        if isinstance(sweep, dict):
            import yaml

            path = Path(tmp) / "sweep.yaml"
            path.write_text(yaml.safe_dump(sweep, sort_keys=False))
        else:
            path = Path(sweep)
        cmd = [sys.executable, "-m", "nsr_sweep.cli", "launch",
               *LaunchOptions.of(sweep_file=str(path), out=str(out), resume=resume, **options).cli_args()]
        proc = subprocess.Popen(cmd, stdout=None if not quiet else subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        _, err = proc.communicate()
    if proc.returncode != 0:
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        raise NsrError(lines[-1][len("error: "):] if lines else f"nsr-sweep launch exited {proc.returncode}: "
                       f"{err.strip()[-2000:]}")
    name = load_sweep(sweep, check_model=False).name
    return open_results(Path(out) / name)


def open_results(path: str | Path) -> Results:
    """A sweep's results directory as DataFrames and trial records, whatever the storage layout underneath."""
    from .results.layout import resolved_spec

    path = Path(path)
    resolved_spec(path)  # a clear error for a directory that is not a sweep's
    return Results(path)


class Results:
    """A results directory: `.trials`, `.best`, `.comparison`, `.comparison_by_layer` (DataFrames equal to the
    Parquet tables), `.state` (dict), `.report_path`, `.trial(trial_id)` and `.store` (the records as stored)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Results({str(self.path)!r}: {self.state.get('status', '?')}, {len(self.trials)} trials)"

    def _table(self, name: str) -> pd.DataFrame:
        f = self.path / "tables" / f"{name}.parquet"
        if not f.is_file():
            if name == "trials":
                return self._trials_from_records()
            raise NsrError(f"{f} does not exist yet: `nsr-sweep report {self.path}` builds the tables")
        return pd.read_parquet(f)

    def _trials_from_records(self) -> pd.DataFrame:
        from .results.layout import resolved_spec
        from .results.tables import trial_table

        spec = resolved_spec(self.path)
        return trial_table(self.store, spec.search.metric, spec.search.mode)

    @cached_property
    def store(self) -> TrialStore:
        """The trials as stored (`results.store`), whatever their layout; one per Results, so a batched probe's
        unit is looked up in an index read once."""
        from .results.store import open_store

        return open_store(self.path)

    @cached_property
    def trials(self) -> pd.DataFrame:
        """One row per trial and control (tables/trials.parquet; docs/results.md lists the columns)."""
        return self._table("trials")

    @cached_property
    def best(self) -> pd.DataFrame:
        return self._table("best")

    @cached_property
    def comparison(self) -> pd.DataFrame:
        """Per neuron × head/freeze: self vs cross-model vs input-only, gaps, intervals, p- and q-values."""
        return self._table("comparison")

    @cached_property
    def comparison_by_layer(self) -> pd.DataFrame:
        return self._table("comparison_by_layer")

    @property
    def state(self) -> dict:
        from .results.layout import read_state

        return read_state(self.path)

    @property
    def report_path(self) -> Path | None:
        f = self.path / "report.html"
        return f if f.is_file() else None

    def neuron(self, layer: int, neuron: int, *, top: int = 8, sample: int = 8) -> NeuronPage:
        """One neuron whole — `.comparison`, `.probes`, `.predictions`, `.patch`, `.cosines`, `.texts` (DataFrames;
        `.texts` with the neuron's activation on every token), `.notes` — shown inline in a notebook as the page
        `nsr-sweep neuron` writes (`.write(path)` writes it; `.html()` is the page)."""
        from .report.neuron import neuron_page

        return neuron_page(self.path, layer, neuron, top=top, sample=sample)

    def trial(self, trial_id: str) -> TrialRecord:
        """One trial's record, predictions, patching points, head and saved model — a directory or a unit's rows."""
        rec = self.store.record(trial_id)
        if rec is None:
            raise NsrError(f"trial {trial_id!r} is not in {self.path} (see .trials['trial_id'])")
        return TrialRecord(self.path, trial_id, rec, self.store)


@dataclass
class TrialRecord:
    """A finished trial as stored: `.metrics`, `.spec`, `.status`, `.history`, `.preds`, `.patch`, `.head`,
    `.model_path`."""

    sweep_dir: Path
    trial_id: str
    record: dict
    store: TrialStore | None = field(default=None, repr=False, compare=False)  # None: opened when first read

    def _store(self) -> TrialStore:
        if self.store is None:
            from .results.store import open_store

            self.store = open_store(self.sweep_dir)
        return self.store

    @property
    def metrics(self) -> dict:
        return self.record["metrics"]

    @property
    def spec(self) -> dict:
        return self.record["spec"]

    @property
    def status(self) -> str:
        return self.record["status"]

    @property
    def history(self) -> list:
        return self.record.get("history", [])

    @cached_property
    def preds(self) -> pd.DataFrame:
        """text_id, actual_orig, actual_ft, pred, readout (and split): every split for a trial run alone, the test
        split for a batched probe (the one its metrics use)."""
        return self._store().predictions(self.trial_id)

    @cached_property
    def patch(self) -> pd.DataFrame | None:
        return self._store().patch_points(self.trial_id)

    @cached_property
    def head(self) -> dict[str, Any] | None:
        """The head's tensors: weight, bias, and mu/sigma (regression) or bin_edges/bin_values (binned)."""
        return self._store().head(self.trial_id)

    @property
    def model_path(self) -> str | Path | None:
        """The fine-tuned model (an HF-format directory, or the --storage URI it was uploaded to), or None."""
        return self._store().model_dir(self.trial_id) or self.metrics.get("model_uri")
