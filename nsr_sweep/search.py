"""One Optuna study per (layer, neuron, head, freeze) group, inside a single Tune run.

Exact frozen-base probes have nothing to search: the groups of one layer, head and control are
handed out together as one batch (`members` in the config) that a worker fits in one call.

Tune takes one search algorithm per run; a sweep needs an independent hyperparameter search
per group. `GroupedSearch` keeps one study per group and hands out samples round-robin by
sample index, so every group's first sample runs before any group's second (the later ones then
profit from the earlier results). On resume, finished trials are told to their studies first.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import numpy as np
import optuna
from ray.tune.search import Searcher

from .config import Dist, SweepSpec
from .sweepdir import trial_id

optuna.logging.set_verbosity(optuna.logging.WARNING)


def distribution(d: Dist) -> optuna.distributions.BaseDistribution:
    if d.loguniform is not None:
        return optuna.distributions.FloatDistribution(d.loguniform[0], d.loguniform[1], log=True)
    if d.uniform is not None:
        return optuna.distributions.FloatDistribution(d.uniform[0], d.uniform[1])
    if d.int is not None:
        return optuna.distributions.IntDistribution(d.int[0], d.int[1])
    return optuna.distributions.CategoricalDistribution(d.choice or [])


def stable_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def n_samples(spec: SweepSpec, group: dict) -> int:
    """Hyperparameter samples of a group. An exact probe (freeze none, solver exact) has no lr, epochs,
    batch size, weight decay or patience: every sample would be the same fit, so it is solved once —
    unless the space searches n_bins of a binned head."""
    exact = group["freeze"] == "none" and spec.training.solver == "exact"
    searched = "n_bins" in spec.search.space and group["head"] != "regression"
    return 1 if exact and not searched else spec.search.num_samples


def group_key(g: dict) -> tuple:
    return (g["layer"], g["neuron"], g["head"], g["freeze"], g.get("control") or "")


def batch_key(spec: SweepSpec, g: dict) -> tuple | None:
    """Groups with the same key run as one batch: exact frozen-base probes with nothing searched, of one
    layer, head and control (`trial.run_trials` fits them together). None: the group runs alone."""
    if g["freeze"] != "none" or spec.training.solver != "exact" or n_samples(spec, g) != 1 or \
            spec.resources.batch_neurons == 1:
        return None
    return (g["layer"], g["head"], g.get("control") or "", g.get("cross_model") or "")


def exact_subset(n: int, k: int) -> set[int]:
    """The members of a batch of n that are patched exactly: k evenly spread (first and last included)."""
    return set(np.linspace(0, n - 1, k).round().astype(int).tolist()) if k and n else set()


def batch_id(members: list[dict]) -> str:
    """`L<layer>-<head>-none[-<control>]-N<first>..<last>-batch` (a name no trial directory has)."""
    first, last = members[0], members[-1]
    ctl = f"-{first['control']}" if first.get("control") else ""
    return f"L{first['layer']}-{first['head']}-none{ctl}-N{first['neuron']}..{last['neuron']}-batch"


class GroupedSearch(Searcher):
    def __init__(self, spec: SweepSpec, groups: list[dict], finished: list[dict]):
        super().__init__(metric=spec.search.metric, mode=spec.search.mode)
        self.spec, self.groups = spec, groups
        self.dists = {k: distribution(v) for k, v in spec.search.space.items()}
        direction: Literal["minimize", "maximize"] = "minimize" if spec.search.mode == "min" else "maximize"
        self.studies: dict[tuple, optuna.Study] = {}
        self.taken: dict[tuple, set[int]] = {}
        for g in groups:
            k = group_key(g)
            seed = stable_seed(spec.seed, k)
            sampler = (optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, spec.search.num_samples // 3))
                       if spec.search.algorithm == "optuna" else optuna.samplers.RandomSampler(seed=seed))
            self.studies[k] = optuna.create_study(direction=direction, sampler=sampler)
            self.taken[k] = set()
        batched = {group_key(g) for g in groups if batch_key(spec, g) is not None}
        for row in finished:  # resume: what already ran informs the search and is never rerun
            k = group_key(row)
            if k not in self.studies or row.get("status") == "damaged":  # a damaged record is run again
                continue
            self.taken[k].add(int(row["sample"]))
            if k in batched:
                continue  # nothing searched there: no study to inform
            value = row.get(self.metric)
            ok = row.get("status") == "ok" and isinstance(value, (int, float)) and math.isfinite(value)
            params = {p: row[p] for p in self.dists}
            self.studies[k].add_trial(optuna.trial.create_trial(
                params=params, distributions=self.dists, value=value if ok else None,
                state=optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL))
        self.queue = [(s, g) for s in range(spec.search.num_samples) for g in groups
                      if s < n_samples(spec, g) and s not in self.taken[group_key(g)]]
        self.live: dict[str, tuple] = {}

    @property
    def n_remaining(self) -> int:
        return len(self.queue)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # metric and mode come from the sweep file

    def suggest(self, tune_trial_id: str):
        if not self.queue:
            return Searcher.FINISHED
        sample, group = self.queue.pop(0)
        key = batch_key(self.spec, group)
        if key is not None:  # it and the queued groups of its batch, as one unit of work
            idx = [i for i, (_, g) in enumerate(self.queue) if batch_key(self.spec, g) == key][: self.spec.resources.batch_neurons - 1]
            mates, taken = [self.queue[i] for i in idx], set(idx)
            self.queue = [q for i, q in enumerate(self.queue) if i not in taken]
            members = [self._config(s, g, {}) for s, g in [(sample, group), *mates]]
            exact = exact_subset(len(members), self.spec.analysis.exact_patch_neurons)
            for i, m in enumerate(members):
                m["exact_patch"] = i in exact
            return {"trial_id": batch_id(members), "sample": 0, "members": members}
        study = self.studies[group_key(group)]
        ot = study.ask(self.dists)
        self.live[tune_trial_id] = (study, ot)
        return self._config(sample, group, ot.params)

    def _config(self, sample: int, group: dict, params: dict) -> dict:
        """A trial's whole config: training defaults, its group, its sampled parameters, id and seed."""
        return {**self.spec.training.model_dump(), **group, **params, "sample": sample,
                "trial_id": trial_id(group, sample), "seed": stable_seed(self.spec.seed, group_key(group), sample)}

    def on_trial_complete(self, tune_trial_id: str, result=None, error: bool = False):
        study, ot = self.live.pop(tune_trial_id, (None, None))
        if study is None:
            return
        value = (result or {}).get(self.metric)
        if error or not isinstance(value, (int, float)) or not math.isfinite(value):
            study.tell(ot, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(ot, value)
