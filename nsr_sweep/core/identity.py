"""A trial's identity: its place in the sweep's grid (`GridPoint`), its id, its settings (`TrialSpec`), and the
trials that run as one call (`TrialBatch`). Trial ids are contracts: `GridPoint.trial_id` and `parse_trial_id`
read each other, byte for byte.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from pydantic import Field, model_validator

from .controls import ControlName, control_of
from .schema import AnalysisCfg, FeaturesCfg, Freeze, Head, SplitsCfg, Strict, SweepSpec, TrainingCfg, valid_combo

GROUP_COLUMNS = ("layer", "neuron", "head", "freeze", "control")
"""A group: the trials of one (layer, neuron, head, freeze, control) that differ only in their search sample."""
CELL_COLUMNS = GROUP_COLUMNS[:4]
"""A cell: the (layer, neuron, head, freeze) that a real group and its controls share."""



def stable_seed(*parts) -> int:
    """A seed from any values, the same on every machine and Python (not `hash`)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


class TrialSettings(Strict):
    """What a trial takes from the sweep file: the same sections under the same names, with the search's sampled
    values in `training`. The model, corpus and target define the cache and model a worker holds (they reach the
    trial as those); `search`, `resources`, `max_failures` and `batch_size_cache` decide how trials are run."""

    seed: int = 0
    """The sweep's seed: the train/val/test split, the shuffled control's permutation, and each trial's own seed
    (`TrialSpec.trial_seed`) derive from it."""
    training: TrainingCfg = TrainingCfg()
    features: FeaturesCfg = FeaturesCfg()
    splits: SplitsCfg = SplitsCfg()
    analysis: AnalysisCfg = AnalysisCfg()

    @classmethod
    def of(cls, sweep: SweepSpec, params: dict[str, Any] | None = None) -> TrialSettings:
        """A sweep's trial settings, the sampled hyperparameters `params` applied to its training section."""
        training = sweep.training.model_validate({**sweep.training.model_dump(), **(params or {})}) if params \
            else sweep.training
        return cls(seed=sweep.seed, training=training, features=sweep.features, splits=sweep.splits,
                   analysis=sweep.analysis)


class GridPoint(Strict):
    """A trial's place in the sweep's grid: one of its layers, neurons, heads and freeze modes, a control or
    none, and the search sample of its group."""

    layer: int = Field(ge=0)
    neuron: int = Field(ge=0)
    head: Head = "regression"
    freeze: Freeze = "none"
    control: ControlName | None = None
    """None for the real trial; else the control it is (docs/science.md)."""
    cross_model: str | None = None
    """The other model of a cross_model control."""
    sample: int = Field(0, ge=0)
    """Which hyperparameter sample of its group (0 for a group solved once)."""

    @property
    def group(self) -> tuple:
        """The group key: (layer, neuron, head, freeze, control or "")."""
        return group_of(self.model_dump(include=set(GROUP_COLUMNS)))

    @property
    def group_id(self) -> str:
        """`L<layer>-N<neuron>-<head>-<freeze>[-<control>]`."""
        return f"L{self.layer}-N{self.neuron}-{self.head}-{self.freeze}{f'-{self.control}' if self.control else ''}"

    @property
    def trial_id(self) -> str:
        """`<group_id>-s<sample>`; `parse_trial_id` reads it back."""
        return f"{self.group_id}-s{self.sample}"

    def at(self, sample: int) -> GridPoint:
        return self.model_copy(update={"sample": sample})


def group_of(row: dict) -> tuple:
    """The group key of a trial-table row, a record or a GridPoint: its GROUP_COLUMNS, control "" for none."""
    return (*(row[k] for k in GROUP_COLUMNS[:-1]), row.get("control") or "")


TRIAL_ID = re.compile(r"^L(\d+)-N(\d+)-([a-z]+)-([a-z_]+?)(?:-([a-z_]+))?-s(\d+)$")


def parse_trial_id(tid: str) -> dict | None:
    """The group and sample a trial id names, or None for a name that is not one."""
    m = TRIAL_ID.match(tid)
    if m is None:
        return None
    L, n, head, freeze, control, sample = m.groups()
    return {"trial_id": tid, "layer": int(L), "neuron": int(n), "head": head, "freeze": freeze,
            "control": control, "sample": int(sample)}


class TrialSpec(TrialSettings, GridPoint):
    """One trial, as the worker runs it: its place in the grid and its settings, the sweep file's names.

    `TrialSpec(layer=2, neuron=7, head="classification", features={"hook": "blocks.2.mlp.hook_post"},
    training={"n_bins": 5})` — every section defaults as in a sweep file."""

    @model_validator(mode="after")
    def _valid(self):
        if not valid_combo(self.head, self.freeze):
            raise ValueError("head token with freeze none is not a valid trial: a frozen model has nothing to "
                             "train for a token head; use freeze after_target or all")
        c = control_of(self.control)
        if c.needs_freeze_none and self.freeze != "none":
            raise ValueError(f"control {self.control} swaps the head's features: it needs freeze none")
        if c.other_model and (self.freeze not in c.freezes or not self.cross_model):
            raise ValueError(f"control {self.control} needs cross_model (the other model) and freeze in "
                             f"{', '.join(c.freezes)}, got freeze {self.freeze!r}")
        return self

    @classmethod
    def in_sweep(cls, sweep: SweepSpec, **point: Any) -> TrialSpec:
        """A trial with a sweep's settings at a place of its grid: `TrialSpec.in_sweep(spec, layer=1, neuron=3)`."""
        return cls.model_validate({**TrialSettings.of(sweep).model_dump(), **point})

    @property
    def trial_seed(self) -> int:
        """The trial's own randomness (a frozen head's init, minibatch order): from the sweep's seed, its group
        and its sample."""
        return stable_seed(self.seed, self.group, self.sample)

    @property
    def reads_model(self) -> bool:
        """Whether the head reads this model's features (the real trial and the shuffled control)."""
        return control_of(self.control).reads_model

    @property
    def read_hook(self) -> str:
        """The point the head reads: the probe's feature hook, or the unembedding's input for unfrozen trials."""
        return self.features.hook if self.freeze == "none" else "ln_final.hook_out"

    def check(self, model=None) -> None:
        if model is not None:
            model.check_layer(self.layer)
            model.check_neuron(self.neuron)


class TrialBatch(Strict):
    """Trials that run as one call on one worker, with their settings once: a unit of frozen-base probes (one
    layer, a chunk of its neurons, every head and control; `unit` names it), or a trial alone (`unit` None).
    This is what travels through Tune, as its JSON: the worker rebuilds the same `TrialSpec`s."""

    unit: str | None = None
    settings: TrialSettings
    points: list[GridPoint] = Field(min_length=1)

    @property
    def id(self) -> str:
        """The unit's id, or the trial's."""
        return self.unit if self.unit is not None else self.points[0].trial_id

    def specs(self) -> list[TrialSpec]:
        s = self.settings.model_dump()
        return [TrialSpec.model_validate({**s, **p.model_dump()}) for p in self.points]
