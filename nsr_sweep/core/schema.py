"""The sweep file's schema: typed, validated sections (pydantic), checked before Ray starts.

Every error names the field, the bad value and what is allowed. Values only: what depends on the model (layers
and neurons against its config.json, hook names its surface knows) is checked by the validation pass,
`sweep.validate`. A trial's place in the grid and its id: `identity`; reading a sweep file: `sweepfile`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .controls import CROSS_MODEL, NamedControl

Head = Literal["regression", "classification", "token"]
Freeze = Literal["none", "after_target", "all"]
Metric = Literal["val_mse", "val_pearson_r", "val_loss", "val_skill"]
Selector = Literal["top_variance", "top_kurtosis", "top_max", "all"]
TargetHook = Literal["post", "pre"]
Position = Literal["last"]
Init = Literal["pretrained", "random"]
Processing = Literal["none"]  # weights as trained; `compat` (LayerNorm folding) was removed
HEADS: tuple[str, ...] = get_args(Head)
SCALE_FREE = ("val_pearson_r", "val_skill")  # comparable across neurons, whose activations have other units
HYPERPARAMETERS = ("lr", "epochs", "batch_size", "weight_decay", "n_bins", "patience")
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
    busy, and so that a unit's own arrays take at most a quarter of a worker's memory: its node's over the workers
    there); 1 runs a unit per neuron (for comparison)."""

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
        return [c if isinstance(c, str) else str(CROSS_MODEL.name) for c in self.controls]

    @property
    def cross_model(self) -> str | None:
        return next((c.cross_model for c in self.controls if isinstance(c, CrossModelCfg)), None)

    def combos(self) -> list[tuple[str, str]]:
        return [(h, f) for h in self.heads for f in self.freeze if valid_combo(h, f)]

    def skipped_combos(self) -> list[tuple[str, str]]:
        return [(h, f) for h in self.heads for f in self.freeze if not valid_combo(h, f)]


def split_sizes(n: int, fractions) -> tuple[int, int, int]:
    """Texts in train / val / test for `n` texts (the split's own rounding)."""
    n_train, n_val = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    return n_train, n_val, n - n_train - n_val


def valid_combo(head: str, freeze: str) -> bool:
    return not (head == "token" and freeze == "none")  # a frozen model has nothing to train for a token head

