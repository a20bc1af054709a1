"""Sweep files: a typed, validated description of a sweep (pydantic), checked before Ray starts.

Every error names the field, the bad value and what is allowed. `load_sweep` reads YAML with
a size-, depth- and alias-limited `yaml.SafeLoader`. Values only: what depends on the model (layers and neurons
against its config.json, hook names its surface knows) is checked by the validation pass, `sweep.validate`.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import NsrError

Head = Literal["regression", "classification", "token"]
Freeze = Literal["none", "after_target", "all"]
NamedControl = Literal["shuffled", "random_model", "early_features", "input_only"]
"""The controls a sweep file names by name; `{cross_model: <model>}` is the one with a value."""
Control = Literal[NamedControl, "cross_model"]
Metric = Literal["val_mse", "val_pearson_r", "val_loss", "val_skill"]
Selector = Literal["top_variance", "top_kurtosis", "top_max", "all"]
TargetHook = Literal["post", "pre"]
Position = Literal["last"]
Init = Literal["pretrained", "random"]
Processing = Literal["none"]  # weights as trained; `compat` (LayerNorm folding) was removed
HEADS: tuple[str, ...] = get_args(Head)
SCALE_FREE = ("val_pearson_r", "val_skill")  # comparable across neurons, whose activations have other units
HYPERPARAMETERS = ("lr", "epochs", "batch_size", "weight_decay", "n_bins", "patience")
GROUP_COLUMNS = ("layer", "neuron", "head", "freeze", "control")
"""A group: the trials of one (layer, neuron, head, freeze, control) that differ only in their search sample."""
CELL_COLUMNS = GROUP_COLUMNS[:4]
"""A cell: the (layer, neuron, head, freeze) that a real group and its controls share."""
METHOD_VERSION = 3
"""How a trial's stored numbers are computed for a given sweep file; bumped when they change meaning, so a resume
never mixes two (1: quantile bins; 2: binned heads' bins by the hard-bin ceiling; 3: intervals' degrees of freedom
from the tail shape over test ∪ val, `<metric>_kurtosis`; issue 27). Recorded in
sweep_state.json; `--resume` of a directory made by another version is refused."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelCfg(Strict):
    name: str = "nsr-tiny"
    init: Init = "pretrained"
    processing: Processing = "none"
    seed: int = 0


class CorpusCfg(Strict):
    source: str = "builtin:python-docs"
    n_texts: int = Field(2000, ge=30)
    max_tokens: int = Field(64, ge=2, le=8192)
    seed: int = 0


class TargetCfg(Strict):
    hook: TargetHook = "post"
    position: Position = "last"


HOOK_NAME = re.compile(r"^(blocks\.\d+\.)?([a-z_0-9]+\.)*hook_[a-z_0-9]+$")  # a TransformerLens hook name


def is_feature_hook(name: str) -> bool:
    """Whether `name` is a hook name a probe's `features.hook` may give: a TransformerLens hook name, not
    hook_mlp_out (the one check the schema and the cache spec share)."""
    return bool(HOOK_NAME.match(name)) and "hook_mlp_out" not in name


class FeaturesCfg(Strict):
    hook: str = "ln_final.hook_out"
    """What a frozen-base probe (freeze none) reads: a TransformerLens hook name the model surface knows.
    Unfrozen trials always read `ln_final.hook_out`, the unembedding's input, so the final norm trains."""

    @field_validator("hook")
    @classmethod
    def _hook_name(cls, v):
        if not is_feature_hook(v):
            raise ValueError(f"{v!r} is not a TransformerLens hook name (e.g. blocks.3.ln2.hook_normalized, "
                             "ln_final.hook_out, blocks.3.hook_resid_post)")
        return v


class NeuronSelect(Strict):
    select: Selector
    """Rank the layer's neurons on the cache (variance, kurtosis or max activation) and take the top k —
    or take every neuron of the layer (`all`; `neurons: all` is short for `[{select: all}]`)."""
    k: Optional[int] = Field(None, ge=1, le=100000)
    """How many to take (required by the ranking selectors)."""

    @model_validator(mode="after")
    def _k_for_rankings(self):
        if self.select != "all" and self.k is None:
            raise ValueError(f"select {self.select} needs k (how many neurons)")
        if self.select == "all" and self.k is not None:
            raise ValueError("select all takes every neuron: no k")
        return self


class SplitsCfg(Strict):
    train: float = Field(0.7, gt=0, lt=1)
    val: float = Field(0.15, gt=0, lt=1)
    test: float = Field(0.15, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self):
        if abs(self.train + self.val + self.test - 1) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {self.train + self.val + self.test:g}")
        return self

    @property
    def fractions(self) -> tuple[float, float, float]:
        return (self.train, self.val, self.test)


class TrainingCfg(Strict):
    """Hyperparameter defaults; `search.space` overrides the ones it names."""

    lr: float = Field(1e-3, gt=0, le=10)
    epochs: int = Field(20, ge=1, le=10000)
    batch_size: int = Field(64, ge=1, le=65536)
    weight_decay: float = Field(0.0, ge=0, le=10)
    patience: int = Field(3, ge=1, le=10000)
    n_bins: int = Field(10, ge=2, le=1000)
    solver: Literal["exact", "adamw"] = "exact"
    """Frozen-base probes (freeze none): `exact` solves them to convergence — exact ridge for regression, the
    ordinal head (a logistic regression of the bins on the ridge readout, Newton to a gradient tolerance) for
    classification — with the L2 strength chosen on validation; `adamw` trains a full linear head from zero
    (lr, epochs, batch_size, weight_decay, patience). Unfrozen trials always train with AdamW."""
    suffix: str = " Question: how strongly does neuron {neuron} of layer {layer} fire on this text, from 0 to 9? Answer:"
    """The token head's question after each text; placeholders {layer} and {neuron} only."""
    save_weights: bool = False
    """Unfrozen trials: save the final model as an HF-format directory (trials/<id>/model/)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Unfrozen trials: `bf16` runs the trained blocks' forward and backward under torch.autocast(bfloat16)
    (weights, optimizer state, head and loss stay float32), at bf16's 3 significant digits in activations;
    meant for GPUs with bf16 tensor cores (its speed-up is not measured yet). Evaluation, metrics and patching always run in float32. Probes
    (freeze none) are exact solves in float64 and ignore it."""

    @field_validator("suffix")
    @classmethod
    def _placeholders(cls, v):
        try:
            v.format(layer=0, neuron=0)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"suffix may use only the placeholders {{layer}} and {{neuron}} ({e!s})") from None
        return v


Integer = int  # the field `int` below shadows the builtin inside the class body


class AnalysisCfg(Strict):
    """Activation patching on the trial's final model (docs/science.md)."""

    patch_grid: Literal["quantiles", "scale"] = "quantiles"
    n_grid: int = Field(7, ge=2, le=101)
    scales: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0, 1.5, 2.0], min_length=2)
    patch_texts: int = Field(64, ge=2, le=4096)
    enabled: bool = True
    exact_patch_neurons: Optional[int] = Field(None, ge=0, le=100000)
    """Obsolete (accepted so older sweep files still load; it changes nothing): every probe is now patched
    exactly, beside its first-order estimate `patch_slope_est`."""


class Dist(Strict):
    """One search dimension: exactly one of the keys."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    int: tuple[Integer, Integer] | None = None
    choice: list[Any] | None = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("loguniform", "uniform", "int", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of loguniform, uniform, int, choice (got {given or 'none'})")
        kind = given[0]
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice needs at least one value")
            return self
        lo, hi = getattr(self, kind)
        if not lo < hi:
            raise ValueError(f"{kind} needs low < high, got [{lo}, {hi}]")
        if kind == "loguniform" and lo <= 0:
            raise ValueError(f"loguniform needs low > 0, got {lo}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "int", "choice") if getattr(self, k) is not None)


class SearchCfg(Strict):
    algorithm: Literal["optuna", "random"] = "optuna"
    num_samples: int = Field(4, ge=1, le=100000)
    metric: Metric = "val_mse"
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["none", "asha"] = "none"  # asha: Tune's ASHA stops weak trials between epochs
    grace_period: int = Field(1, ge=1)  # epochs before ASHA may stop a trial
    reduction_factor: float = Field(2.0, gt=1)
    space: dict[str, Dist] = Field(default_factory=dict)

    @field_validator("space")
    @classmethod
    def _known(cls, v):
        for k in v:
            if k not in HYPERPARAMETERS:
                raise ValueError(f"unknown hyperparameter {k!r}; allowed: {', '.join(HYPERPARAMETERS)}")
        return v

    @model_validator(mode="after")
    def _mode_fits_metric(self):
        want = "max" if self.metric in ("val_pearson_r", "val_skill") else "min"
        if self.mode != want:
            raise ValueError(f"mode {self.mode!r} does not fit metric {self.metric!r}; use mode: {want}")
        if self.scheduler == "asha" and self.metric not in SCALE_FREE:
            raise ValueError(f"scheduler asha ranks trials of different neurons against each other, so it needs a "
                             f"scale-free metric: allowed {', '.join(SCALE_FREE)} (mode max), got {self.metric!r}")
        return self


class ResourcesCfg(Strict):
    workers: Union[int, Literal["auto"]] = "auto"
    """Model workers (each loads the model once); auto: one per `gpus_per_worker` share of the cluster's GPUs,
    else one per `cpus_per_trial` CPUs."""
    gpus_per_worker: float = Field(0, ge=0, le=8)
    """The share of one GPU each model worker reserves: 1 is a worker per GPU, 0.25 puts four workers of a
    small model on one GPU (their weights, ×4 when fine-tuning, must fit in the share: checked when a
    worker starts). 0 (the default) reserves none: with device auto the workers then stay on CPU."""
    gpu_resource: str = Field("GPU", pattern=r"^[A-Za-z_][A-Za-z0-9_:.-]*$", max_length=100)
    """The Ray resource `gpus_per_worker` reserves: GPU, or a custom resource that stands for one (a
    cluster's own label, a test's stand-in). With a custom one set `device` yourself (auto means cpu);
    with device cuda the same share of GPU is reserved too, so Ray still assigns each worker its GPU."""
    cpus_per_trial: float = Field(1, gt=0, le=256)
    max_concurrent: int = Field(0, ge=0)
    """Most trials (or units of probes) running at once; 0: two per model worker (one queued hides Tune's latency)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tf32: bool = False
    """On CUDA, let float32 matrix products use TF32 tensor cores (Ampere and later), about 10 significant
    bits in their inputs. Off by default: the exact numbers of the suite are float32's."""
    batch_neurons: int = Field(1024, ge=1, le=100000)
    """Most neurons in one unit of work: the exact frozen-base probes of a chunk of one layer's neurons, every
    head and control, fitted and patched together (units are sized smaller when that keeps every worker
    busy); 1 runs a unit per neuron (for comparison)."""

    @field_validator("workers")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and v < 1:
            raise ValueError(f"workers must be >= 1 or 'auto', got {v}")
        return v


class CrossModelCfg(Strict):
    cross_model: str
    """Another model (a name or directory, as for `model`) that predicts this model's neuron on the same
    texts: probes on its features (freeze none), or it is fine-tuned with the same recipe (freeze all)."""


CROSS_FREEZES = ("none", "all")  # the other model has no "target layer": after_target has no counterpart


class SweepSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    model: ModelCfg = ModelCfg()
    corpus: CorpusCfg = CorpusCfg()
    target: TargetCfg = TargetCfg()
    layers: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    neurons: list[Union[Annotated[int, Field(ge=0)], NeuronSelect]] = Field(min_length=1)

    @field_validator("neurons", mode="before")
    @classmethod
    def _all_neurons(cls, v):
        v = [{"select": "all"}] if v == "all" else v
        if isinstance(v, list):  # a selector's own error, not the int branch's "should be a valid integer"
            return [NeuronSelect.model_validate(n) if isinstance(n, dict) else n for n in v]
        return v
    heads: list[Head] = Field(min_length=1)
    freeze: list[Freeze] = Field(min_length=1)
    features: FeaturesCfg = FeaturesCfg()
    splits: SplitsCfg = SplitsCfg()
    training: TrainingCfg = TrainingCfg()
    search: SearchCfg = SearchCfg()
    resources: ResourcesCfg = ResourcesCfg()
    analysis: AnalysisCfg = AnalysisCfg()
    controls: list[Union[NamedControl, CrossModelCfg]] = \
        Field(default_factory=list)
    """Control trials beside the real ones (docs/science.md): shuffled, random_model, early_features,
    input_only, and {cross_model: <model>}."""
    max_failures: int = Field(1, ge=0, le=100)
    batch_size_cache: int = Field(64, ge=1, le=65536)
    seed: int = 0

    @field_validator("model", mode="before")
    @classmethod
    def _model_str(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _space_within_training_bounds(self):
        """Every value a search dimension can take must be a valid value of the training field it overrides."""
        ints = {k for k, f in TrainingCfg.model_fields.items() if f.annotation is int}
        for name, d in self.search.space.items():
            if d.kind == "uniform" and name in ints:
                raise ValueError(f"search.space.{name}: {name} is an integer; use int, not uniform")
            values = d.choice if d.kind == "choice" else list(getattr(d, d.kind))
            for v in values or []:
                if isinstance(v, bool) or (name in ints and isinstance(v, float)):
                    raise ValueError(f"search.space.{name}: {v!r} is not a valid {name}")
                try:
                    TrainingCfg.model_validate({**self.training.model_dump(), name: v})
                except ValidationError as e:
                    raise ValueError(f"search.space.{name}: {v!r} is not a valid {name} "
                                     f"({e.errors()[0]['msg']})") from None
        return self

    @model_validator(mode="after")
    def _splits_fit_the_corpus(self):
        n = self.corpus.n_texts
        sizes = split_sizes(n, (self.splits.train, self.splits.val, self.splits.test))
        if min(sizes) < 2:
            raise ValueError(f"splits {self.splits.train:g}/{self.splits.val:g}/{self.splits.test:g} of corpus.n_texts "
                             f"{n} leave {min(sizes)} text(s) in a split; each needs ≥ 2 (raise n_texts)")
        return self

    @model_validator(mode="after")
    def _valid_combinations(self):
        for field_name in ("layers", "heads", "freeze", "control_names"):
            values = getattr(self, field_name)
            if len(set(values)) != len(values):
                raise ValueError(f"{field_name.replace('control_names', 'controls')} has duplicates: {values}")
        if not self.combos():
            raise ValueError(
                f"no valid (head, freeze) combination in heads {self.heads} × freeze {self.freeze}: "
                "token needs freeze after_target or all"
            )
        return self

    @property
    def control_names(self) -> list[str]:
        return [c if isinstance(c, str) else "cross_model" for c in self.controls]

    @property
    def cross_model(self) -> str | None:
        return next((c.cross_model for c in self.controls if isinstance(c, CrossModelCfg)), None)

    def combos(self) -> list[tuple[str, str]]:
        return [(h, f) for h in self.heads for f in self.freeze if valid_combo(h, f)]

    def skipped_combos(self) -> list[tuple[str, str]]:
        return [(h, f) for h in self.heads for f in self.freeze if not valid_combo(h, f)]


# -- one trial, and the trials that run together -------------------------------------------------------------


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
    control: Control | None = None
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
        if self.control in ("random_model", "early_features", "input_only") and self.freeze != "none":
            raise ValueError(f"control {self.control} swaps the head's features: it needs freeze none")
        if self.control == "cross_model" and (self.freeze not in CROSS_FREEZES or not self.cross_model):
            raise ValueError(f"control cross_model needs cross_model (the other model) and freeze in "
                             f"{', '.join(CROSS_FREEZES)}, got freeze {self.freeze!r}")
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


def split_sizes(n: int, fractions) -> tuple[int, int, int]:
    """Texts in train / val / test for `n` texts (the split's own rounding)."""
    n_train, n_val = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    return n_train, n_val, n - n_train - n_val


def valid_combo(head: str, freeze: str) -> bool:
    return not (head == "token" and freeze == "none")  # a frozen model has nothing to train for a token head


def _format_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "sweep"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key (check the spelling; docs/sweep-file.md lists the allowed keys)"
    bad = err.get("input")
    shown = "" if isinstance(bad, (dict, list)) else f" (got {bad!r})"
    if not err["loc"] and re.match(r"^[\w.]+:", msg):
        return msg  # a whole-sweep check whose message already starts with the field it names
    return f"{where}: {msg}{shown}"


def parse_sweep(data: Any, *, source: str = "sweep") -> SweepSpec:
    if not isinstance(data, dict):
        raise NsrError(f"{source}: a sweep file must be a mapping of keys, got {type(data).__name__}")
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        raise NsrError(f"{source}: {_format_error(e)}") from None
    return spec


MAX_YAML_BYTES = 1_000_000
MAX_YAML_DEPTH = 50
MAX_YAML_ALIASES = 50
MAX_YAML_NODES = 100_000  # after aliases are expanded: an alias bomb is small on disk, huge in memory


class _LimitedLoader(yaml.SafeLoader):
    """yaml.SafeLoader with limits on nesting and aliases (no file can exhaust the stack or memory)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth, self._aliases = 0, 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _count_nodes(data: Any, limit: int) -> int:
    """Nodes of the loaded data with aliases expanded, stopping once past `limit`."""
    stack, n = [data], 0
    while stack and n <= limit:
        x = stack.pop()
        n += 1
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return n


def read_yaml(path: Path) -> Any:
    """A YAML file read safely: size, depth, aliases and expanded size limited; never a Python object."""
    if path.stat().st_size > MAX_YAML_BYTES:
        raise NsrError(f"{path}: larger than {MAX_YAML_BYTES:,} bytes; a sweep file is a few lines")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_LimitedLoader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise NsrError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if _count_nodes(data, MAX_YAML_NODES) > MAX_YAML_NODES:
        raise NsrError(f"{path}: expands to more than {MAX_YAML_NODES:,} values (aliases); refused")
    return data


def load_sweep(path: str | Path) -> SweepSpec:
    """A sweep file's values checked against the schema (the model-dependent checks are the validation pass's:
    `sweep.validate`)."""
    path = Path(path)
    if not path.is_file():
        raise NsrError(f"sweep file {path} does not exist")
    return parse_sweep(read_yaml(path), source=str(path))


def dump_sweep(spec: SweepSpec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
