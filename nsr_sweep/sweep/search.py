"""One Optuna study per (layer, neuron, head, freeze) group, inside a single Tune run.

Exact frozen-base probes have nothing to search: the groups of a chunk of one layer's neurons — every
head and control — are handed out together as one unit of work (a `TrialBatch` named by its `unit` id) that a worker
fits and patches in one call.

Tune takes one search algorithm per run; a sweep needs an independent hyperparameter search
per group. `GroupedSearch` keeps one study per group and hands out samples round-robin by
sample index, so every group's first sample runs before any group's second (the later ones then
profit from the earlier results). The studies live in a storage (results/<name>/optuna.log, or a
database URL) that `optuna-dashboard` opens while the sweep runs; a resumed launch reloads them.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Iterator, Literal, NamedTuple

import optuna
from ray.tune.search import Searcher

from ..core.spec import Dist, GridPoint, SweepSpec, TrialBatch, TrialSettings, group_of, stable_seed
from .grid import Grid, n_samples, placed, tune_config, unit_id

optuna.logging.set_verbosity(optuna.logging.WARNING)
FAILED = optuna.trial.TrialState.FAIL


def distribution(d: Dist) -> optuna.distributions.BaseDistribution:
    if d.loguniform is not None:
        return optuna.distributions.FloatDistribution(d.loguniform[0], d.loguniform[1], log=True)
    if d.uniform is not None:
        return optuna.distributions.FloatDistribution(d.uniform[0], d.uniform[1])
    if d.int is not None:
        return optuna.distributions.IntDistribution(d.int[0], d.int[1])
    return optuna.distributions.CategoricalDistribution(d.choice or [])


def study_storage(location: str) -> optuna.storages.BaseStorage:
    """Where the studies live: a database URL (sqlite:///…, postgresql://…, mysql://…) or a JournalStorage file."""
    from ..core.errors import NsrError, redacted

    try:
        if "://" in location:
            return optuna.storages.RDBStorage(location)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(location))
    except Exception as e:  # a bad URL, a missing database driver, an unreachable server
        raise NsrError(redacted(f"--optuna-storage {location!r} cannot be opened: {type(e).__name__}: {e}"[:500])) from None


class Unit(NamedTuple):
    """A queued unit of work: a chunk of one layer's neurons, every batched group of each (`GroupedSearch.suggest`
    places them when it hands the unit out)."""

    layer: int
    neurons: list[int]


class GroupedSearch(Searcher):
    def __init__(self, spec: SweepSpec, groups: Grid, finished: list[dict],
                 storage: optuna.storages.BaseStorage | None = None, prefix: str | None = None,
                 unit_neurons: int | None = None):
        super().__init__(metric=spec.search.metric, mode=spec.search.mode)
        self.unit_neurons = unit_neurons or spec.resources.batch_neurons
        self.spec, self.storage = spec, storage
        self.prefix = prefix or spec.name  # studies are named <prefix>/<group id>
        self.dists = {k: distribution(v) for k, v in spec.search.space.items()}
        self.direction: Literal["minimize", "maximize"] = "minimize" if spec.search.mode == "min" else "maximize"
        self.studies: dict[tuple, optuna.Study] = {}  # opened on first use: batched groups search nothing
        self.batched = groups.batched(spec)
        searched = [t for t in groups.templates if t not in self.batched]
        self.group_of = {g.group: g for L, ns in groups.neurons.items() for n in ns for g in
                         (placed(t, L, n) for t in searched)}  # searched groups only: a unit's are placed when it goes
        self.taken: dict[tuple, set[int]] = {k: set() for k in self.group_of}
        self.done: set[str] = set()  # batched probes that finished (a resume runs them no more)
        told: dict[tuple, list[dict]] = {}
        for row in finished:  # resume: what already ran informs the search and is never rerun
            if row.get("status") == "damaged":  # a damaged record is run again
                continue
            k = group_of(row)
            if k not in self.taken:
                self.done.add(row["trial_id"])
                continue
            self.taken[k].add(int(row["sample"]))
            told.setdefault(k, []).append(row)
        stored = set(optuna.get_all_study_names(storage)) if storage is not None else set()
        for k in self.group_of:  # every study this sweep stored, also one whose only trial was left running
            if k in told or self._name(k) in stored:
                self._reconcile(self._study(k), told.get(k, []))
        self.queue: deque[Unit | tuple[int, GridPoint]] = deque(self._first_round(groups, searched))
        self.queue += [(s, g) for s in range(1, spec.search.num_samples) for g in self.group_of.values()
                       if s < n_samples(spec, g) and s not in self.taken[g.group]]
        self.n_remaining = sum(len(self._members(q)) if isinstance(q, Unit) else 1 for q in self.queue) \
            if self.done else sum(len(q.neurons) * len(self.batched) if isinstance(q, Unit) else 1 for q in self.queue)
        self.live: dict[str, tuple] = {}
        self.settings = TrialSettings.of(spec)

    def _first_round(self, groups: Grid, searched: list[GridPoint]) -> Iterator[Unit | tuple[int, GridPoint]]:
        """Every group's first sample in the grid's order, a unit in the place of its first group (each chunk of
        `unit_neurons` neurons of a layer is one unit, its batched groups every head and control of each)."""
        for L, ns in groups.neurons.items():
            for lo in range(0, len(ns), self.unit_neurons):
                chunk = ns[lo : lo + self.unit_neurons]
                if not searched:  # probes only: the chunk is its unit
                    yield Unit(L, chunk)
                    continue
                unit_due = bool(self.batched)
                for n in chunk:
                    for t in groups.templates:
                        if t in searched:
                            g = self.group_of[placed(t, L, n).group]
                            if 0 not in self.taken[g.group]:
                                yield 0, g
                        elif unit_due:
                            yield Unit(L, chunk)
                            unit_due = False

    def _members(self, unit: Unit) -> list[GridPoint]:
        """A unit's probes that have not finished."""
        points = [placed(t, unit.layer, n) for n in unit.neurons for t in self.batched]
        return [p for p in points if p.trial_id not in self.done] if self.done else points

    def _study(self, k: tuple) -> optuna.Study:
        if k not in self.studies:
            seed = stable_seed(self.spec.seed, k)
            sampler = (optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, self.spec.search.num_samples // 3))
                       if self.spec.search.algorithm == "optuna" else optuna.samplers.RandomSampler(seed=seed))
            self.studies[k] = optuna.create_study(study_name=self._name(k),
                                                  storage=self.storage, direction=self.direction, sampler=sampler,
                                                  load_if_exists=True)
        return self.studies[k]

    def _name(self, k: tuple) -> str:
        return f"{self.prefix}/{self.group_of[k].group_id}"

    def _reconcile(self, study: optuna.Study, rows: list[dict]) -> None:
        """A resumed study holds each finished trial once: what a stored study already has is kept, a trial the
        last launch left running is told its record (or FAIL), and one it never heard of is added."""
        by_id = {r["trial_id"]: r for r in rows}
        known = set()
        for t in study.get_trials(deepcopy=False):
            tid = t.user_attrs.get("trial_id")
            known.add(tid)
            if t.state == optuna.trial.TrialState.RUNNING:
                value = self._value(by_id.get(tid))
                study.tell(t.number, value) if value is not None else study.tell(t.number, state=FAILED)
        for tid, row in by_id.items():
            if tid not in known:
                value = self._value(row)
                study.add_trial(optuna.trial.create_trial(
                    params={p: row[p] for p in self.dists}, distributions=self.dists, value=value,
                    user_attrs={"trial_id": tid}, state=FAILED if value is None else optuna.trial.TrialState.COMPLETE))

    def _value(self, row: dict | None) -> float | None:
        value = (row or {}).get(self.metric)
        ok = (row or {}).get("status") == "ok" and isinstance(value, (int, float)) and math.isfinite(value)
        return float(value) if ok else None  # type: ignore[arg-type]

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # metric and mode come from the sweep file

    def suggest(self, tune_trial_id: str):
        while self.queue:
            entry = self.queue.popleft()
            if isinstance(entry, Unit):  # every head and control of a chunk of neurons, minus what finished
                points = self._members(entry)
                self.n_remaining -= len(points)
                if points:
                    return tune_config(TrialBatch(unit=unit_id(points), settings=self.settings, points=points))
                continue
            sample, group = entry
            self.n_remaining -= 1
            study = self._study(group.group)
            ot = study.ask(self.dists)
            point = group.at(sample)
            ot.set_user_attr("trial_id", point.trial_id)  # a resumed launch matches studies to records by it
            self.live[tune_trial_id] = (study, ot)
            return tune_config(TrialBatch(settings=TrialSettings.of(self.spec, ot.params), points=[point]), ot.params)
        return Searcher.FINISHED

    def on_trial_complete(self, tune_trial_id: str, result=None, error: bool = False):
        study, ot = self.live.pop(tune_trial_id, (None, None))
        if study is None:
            return
        value = (result or {}).get(self.metric)
        if error or not isinstance(value, (int, float)) or not math.isfinite(value):
            study.tell(ot, state=FAILED)
        else:
            study.tell(ot, value)
