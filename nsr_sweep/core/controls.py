"""What each control is, written once: the real predictor ("self") and every control a sweep file can name.

Every place that needs to know which controls read this model's features, need `freeze: none`, are patched,
carry another model, which groups they accompany, or what the report and the neuron page call them, reads
this table (docs/science.md, "Controls", says what each one means).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

NamedControl = Literal["shuffled", "random_model", "early_features", "input_only"]
"""The controls a sweep file names by name; `{cross_model: <model>}` is the one with a value."""
ControlName = Literal[NamedControl, "cross_model"]
"""A trial's `control` (None for the real trial)."""
FREEZES = ("none", "after_target", "all")  # schema.Freeze's values, in the sweep file's order


@dataclass(frozen=True)
class Control:
    """One predictor role: the real trial (`name` None, role `self`) or a control."""

    name: str | None
    """A trial's `control` value (None: the real trial)."""
    role: str
    """Its name in results: the neuron page's `role` column (self, shuffled, cross_model, ...)."""
    display: str
    """What a reader sees: "cross-model", "input-only", ..."""
    about: str
    """One line on the neuron page: what this predictor is ({cross} is the other model's name)."""
    reads_model: bool
    """Reads this model's features (and so its analyses — cosines, projections, patching — read the neuron)."""
    freezes: tuple[str, ...]
    """The freeze modes of the groups it accompanies (a control that swaps the features needs `none`)."""
    per_cell: bool = True
    """One per (layer, neuron, head, freeze) group; False: one per (layer, neuron), a regression probe."""
    other_model: bool = False
    """Carries another model (`cross_model`): its group names it."""
    comparison: str | None = None
    """Its source name in tables/comparison.parquet (`<source>_r`, `gap_<source>_r`), or None: not compared."""
    on_page: bool = False
    """A panel on every neuron page, ran or not (other controls follow only when the sweep ran them)."""
    layer_features: bool = False
    """Its features are read at the neuron's layer (the residual before it): one feature set per layer."""

    @property
    def needs_freeze_none(self) -> bool:
        """Swaps the features a frozen-base head reads: only a probe (freeze none) has them."""
        return self.freezes == ("none",)

    @property
    def patched(self) -> bool:
        """Its analyses (patching, cosines, projections) run: only a predictor on this model's features can
        be moved by the neuron; for the others the patch slope is 0 by construction."""
        return self.reads_model


REAL = Control(None, "self", "self", "This model's own predictors of its neuron: probes on its residual stream (freeze "
               "none) and the model fine-tuned (after_target, all).", reads_model=True, freezes=FREEZES,
               comparison="self", on_page=True)
SHUFFLED = Control("shuffled", "shuffled", "shuffled", "The same predictors trained on the neuron's activations "
                   "permuted across texts: what fitting noise reaches (r ≈ 0 expected). Plotted against the permuted "
                   "target each was trained on.", reads_model=True, freezes=FREEZES, on_page=True)
RANDOM_MODEL = Control("random_model", "random_model", "random-model", "Probes on the features of the same "
                       "architecture with random weights.", reads_model=False, freezes=("none",))
EARLY_FEATURES = Control("early_features", "early_features", "early-features", "Probes on the residual stream before "
                         "the neuron's layer.", reads_model=False, freezes=("none",), layer_features=True)
CROSS_MODEL = Control("cross_model", "cross_model", "cross-model", "Another model ({cross}) trained the same way to "
                      "predict this model's neuron on the same texts.", reads_model=False, freezes=("none", "all"),
                      other_model=True, comparison="cross", on_page=True)
INPUT_ONLY = Control("input_only", "input_only", "input-only", "Ridge regression on the text's tokens, no transformer: "
                     "what the text alone predicts.", reads_model=False, freezes=("none",), per_cell=False,
                     comparison="input_only", on_page=True)

PREDICTORS: tuple[Control, ...] = (REAL, SHUFFLED, CROSS_MODEL, INPUT_ONLY, RANDOM_MODEL, EARLY_FEATURES)
"""Every predictor role, in the order a neuron page shows them."""
CONTROLS: dict[str, Control] = {c.name: c for c in PREDICTORS if c.name is not None}
"""The controls by name."""
OUTSIDERS: tuple[Control, ...] = tuple(c for c in PREDICTORS if c.comparison and c is not REAL)
"""The predictors the comparison sets against self: cross-model, input-only."""


def control_of(name: str | None) -> Control:
    """The table's entry for a trial's `control` (None, NaN or "" for the real trial); a name not in it is a
    KeyError naming the ones that are."""
    if not isinstance(name, str) or not name:
        return REAL
    if name not in CONTROLS:
        raise KeyError(f"control {name!r} is not one of {', '.join(CONTROLS)}")
    return CONTROLS[name]


def names(*, patched: bool | None = None) -> list[str]:
    """Control names (never the real trial's), those patched or not, in the table's order."""
    return [name for name, c in CONTROLS.items() if patched is None or c.patched == patched]


def gap_columns(metric: str = "r") -> list[str]:
    """The comparison table's gap columns of a metric (`gap_cross_r`, `gap_input_only_r`)."""
    return [f"gap_{c.comparison}_{metric}" for c in OUTSIDERS]

