"""The sweep's grid: from a sweep file and its resolved neurons to the trials it owes, and how they are batched.

    layers × neurons × (head, freeze) + controls ─▶ groups (`GridPoint`s, sample 0)
      ─▶ samples per group (`n_samples`) ─▶ trials, or units of exact probes (`batch_key`, `unit_size`)
      ─▶ `TrialBatch`es, which travel through Tune as their JSON (`tune_config`, `batch_of`)

Nothing here imports Ray or Optuna: `launch --dry-run` prints the grid without them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from typing import Any, Iterator, Sequence, overload

from ..core.controls import control_of
from ..core.spec import GridPoint, NeuronSelect, SweepSpec, TrialBatch, TrialSettings


def expand(spec: SweepSpec, neurons: dict[int, list[int]]) -> Grid:
    """One group per (layer, neuron, head, freeze), plus its controls; invalid combinations are left out.

    Each control accompanies the groups of its freeze modes (`core.controls`: `shuffled` every group,
    `random_model` and `early_features` — which swap a frozen-base head's features — the freeze-none groups,
    `cross_model` the freeze none and all groups: the other model has no target layer), in the sweep file's order,
    the other model's group last; `input_only` is one ridge regression on the text's tokens per (layer, neuron),
    the same comparator for every head.
    """
    chosen = [control_of(c) for c in spec.control_names]
    per_cell = sorted((c for c in chosen if c.per_cell), key=lambda c: c.other_model)
    templates = []
    for h, f in spec.combos():
        base = GridPoint(layer=0, neuron=0, head=h, freeze=f)
        templates.append(base)
        templates += [base.model_copy(update={"control": c.name, "cross_model": spec.cross_model if c.other_model else None})
                      for c in per_cell if f in c.freezes]
    templates += [GridPoint(layer=0, neuron=0, head="regression", freeze="none", control=c.name)
                  for c in chosen if not c.per_cell]
    return Grid({L: neurons[L] for L in spec.layers}, templates)


class Grid(Sequence[GridPoint]):
    """The groups of a sweep in their order — per layer, per neuron, its groups — without an object per group until
    one is read: every neuron has the same groups (`templates`, each at layer 0, neuron 0), so a layer of
    hundreds of thousands of probes costs its list of neurons (a launch plans every neuron of a model)."""

    def __init__(self, neurons: dict[int, list[int]], templates: list[GridPoint]):
        self.neurons, self.templates = {L: list(ns) for L, ns in neurons.items()}, templates

    def __len__(self) -> int:
        return sum(map(len, self.neurons.values())) * len(self.templates)

    @overload
    def __getitem__(self, i: int) -> GridPoint: ...

    @overload
    def __getitem__(self, i: slice) -> list[GridPoint]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = i + len(self) if i < 0 else i
        per_neuron = len(self.templates)
        for L, ns in self.neurons.items():
            if i < len(ns) * per_neuron:
                return placed(self.templates[i % per_neuron], L, ns[i // per_neuron])
            i -= len(ns) * per_neuron
        raise IndexError("grid index out of range")

    def __iter__(self) -> Iterator[GridPoint]:
        for L, ns in self.neurons.items():
            for n in ns:
                yield from (placed(t, L, n) for t in self.templates)

    def batched(self, spec: SweepSpec) -> list[GridPoint]:
        """The groups of each neuron that run in units (`batch_key`), in their order."""
        return [t for t in self.templates if batch_key(spec, t) is not None]


def placed(template: GridPoint, layer: int, neuron: int) -> GridPoint:
    """A group's template at a layer and neuron."""
    return template.model_copy(update={"layer": layer, "neuron": neuron})


def n_samples(spec: SweepSpec, group: GridPoint) -> int:
    """Hyperparameter samples of a group. An exact probe (freeze none, solver exact) has no lr, epochs,
    batch size, weight decay or patience: every sample would be the same fit, so it is solved once —
    unless the space searches n_bins of a binned head."""
    exact = group.freeze == "none" and spec.training.solver == "exact"
    searched = "n_bins" in spec.search.space and group.head != "regression"
    return 1 if exact and not searched else spec.search.num_samples


def expected_trials(spec: SweepSpec, grid: Grid) -> Iterator[str]:
    """Every trial id the sweep owes, each group's samples in the grid's order (`GridPoint.trial_id`, spelled out
    here without a GridPoint per trial)."""
    suffixes = [(f"-{t.group_id.split('-', 2)[2]}-s", n_samples(spec, t)) for t in grid.templates]
    for L, ns in grid.neurons.items():
        for n in ns:
            for suffix, k in suffixes:
                yield from (f"L{L}-N{n}{suffix}{s}" for s in range(k))


def n_expected(spec: SweepSpec, grid: Grid) -> int:
    """How many trials the sweep owes."""
    return sum(map(len, grid.neurons.values())) * sum(n_samples(spec, t) for t in grid.templates)


def batch_key(spec: SweepSpec, g: GridPoint) -> tuple | None:
    """Groups with the same key may share a unit of work: exact frozen-base probes with nothing searched, of
    one layer (`core.trial.run_trials` fits every head and control of a chunk of its neurons together). None:
    the group runs alone."""
    if g.freeze != "none" or spec.training.solver != "exact" or n_samples(spec, g) != 1:
        return None
    return (g.layer,)


def unit_size(spec: SweepSpec, neurons: dict[int, list[int]], workers: int, per_worker: int = 4,
              memory: float | None = None) -> int:
    """Neurons per unit of work: enough units that every worker stays busy (≥ `per_worker` units each, the
    layers split evenly), at most `resources.batch_neurons`, and — given a worker's `memory` (bytes) — small
    enough that a unit's own arrays take at most UNIT_SHARE of it (`unit_bytes_per_neuron`)."""
    most = max((len(v) for v in neurons.values()), default=1)
    chunks = max(1, math.ceil(per_worker * workers / max(1, len(neurons))))
    fits = spec.resources.batch_neurons if memory is None else int(memory * UNIT_SHARE // unit_bytes_per_neuron(spec))
    return max(1, min(spec.resources.batch_neurons, fits, math.ceil(most / chunks)))


UNIT_SHARE = 0.25  # of a worker's memory, a unit's own arrays (its model, cache and patching engine beside them)
PROBE_TEXT_BYTES = 384  # a probe's arrays per text in a unit (targets, fits, predictions, metrics, records): 48 float64
"""Measured on a wide random model (600 texts, 4 probes a neuron): 0.71 MB a neuron, 296 bytes a probe per text
(`benchmarks/scale.py` records each worker's peak against it)."""


def unit_bytes_per_neuron(spec: SweepSpec) -> int:
    """What one neuron adds to a unit's memory: its batched probes (every head and control) × texts × bytes."""
    probes = len(expand(spec, {L: [0] for L in spec.layers}).batched(spec))
    return max(1, probes) * spec.corpus.n_texts * PROBE_TEXT_BYTES


def unit_id(points: list[GridPoint]) -> str:
    """`L<layer>-N<first>..<last>-<hash>` (the hash of its trial ids: a unit planned again names itself the same)."""
    ns = [p.neuron for p in points]
    digest = hashlib.sha256("\n".join(sorted(p.trial_id for p in points)).encode()).hexdigest()[:8]
    return f"L{points[0].layer}-N{min(ns)}..{max(ns)}-{digest}"


def tune_config(batch: TrialBatch, params: dict[str, Any] | None = None) -> dict:
    """What Tune holds for a trial or unit: its id, the batch as validated JSON (rebuilt, not re-assembled, by
    the worker: `batch_of`), and the sampled hyperparameters, shown by trackers (never read back)."""
    return {"trial_id": batch.id, "batch": batch_json(batch), "params": dict(params or {})}


def batch_json(batch: TrialBatch) -> str:
    """A batch's JSON; a unit's points as its neurons × their groups (every neuron of a unit has the same groups),
    less the ones `skip`ped (finished before a resume). Tune saves every trial's config in its experiment state,
    again and again: 4,096 points spelled out each made it 256 MB at 295k probes (3.5 MB a unit)."""
    layers = {p.layer for p in batch.points}
    if batch.unit is None or len(layers) != 1:
        return batch.model_dump_json()
    by_neuron: dict[int, list[GridPoint]] = {}
    for p in batch.points:
        by_neuron.setdefault(p.neuron, []).append(placed(p, 0, 0))
    neurons, groups = list(by_neuron), max(by_neuron.values(), key=len)  # a neuron with every group, in their order
    layer = layers.pop()
    full = [placed(g, layer, n) for n in neurons for g in groups]
    have = {p.trial_id for p in batch.points}
    if [p for p in full if p.trial_id in have] != batch.points:  # not a product in its order: spelled out
        return batch.model_dump_json()
    return json.dumps({"unit": batch.unit, "settings": batch.settings.model_dump(mode="json"), "layer": layer,
                       "neurons": neurons, "groups": [g.model_dump(mode="json", exclude={"layer", "neuron"})
                                                      for g in groups],
                       "skip": [p.trial_id for p in full if p.trial_id not in have]})


def batch_of(config: dict) -> TrialBatch:
    """The batch a Tune config holds (`batch_json`)."""
    data = json.loads(config["batch"])
    if "groups" not in data:
        return TrialBatch.model_validate_json(config["batch"])
    skip, groups = set(data["skip"]), [GridPoint.model_validate({**g, "layer": 0, "neuron": 0}) for g in data["groups"]]
    points = [p for n in data["neurons"] for p in (placed(g, data["layer"], n) for g in groups) if p.trial_id not in skip]
    return TrialBatch(unit=data["unit"], settings=TrialSettings.model_validate(data["settings"]), points=points)


def tracker_params(config: dict) -> dict:
    """What a tracker (MLflow) logs for a trial or unit: its id, its place in the grid (a unit's neurons as a
    range and count) and the sampled hyperparameters — not the batch's JSON, which for a unit runs to tens of
    kilobytes, past MLflow's 6,000-character limit for a parameter (the results directory has every setting)."""
    points = batch_of(config).points
    neurons = sorted({p.neuron for p in points})

    def values(field: str) -> str:
        return ",".join(sorted({"real" if (v := getattr(p, field)) is None else str(v) for p in points}))
    return {"trial_id": config["trial_id"], "layer": values("layer"), "head": values("head"),
            "freeze": values("freeze"), "control": values("control"), "n_trials": len(points),
            "neuron": str(neurons[0]) if len(neurons) == 1 else f"{neurons[0]}..{neurons[-1]} ({len(neurons)})",
            "params": config["params"]}


def most_neurons(spec: SweepSpec) -> int:
    """Neurons per layer at most, before the cache resolves the selectors (a selector counts its k; `all`, d_mlp)."""
    from ..core.models import model_shape

    d_mlp = model_shape(spec.model.name).get("d_mlp") if any(isinstance(n, NeuronSelect) and n.k is None
                                                            for n in spec.neurons) else None
    per_layer = sum((n.k or d_mlp or 0) if isinstance(n, NeuronSelect) else 1 for n in spec.neurons)
    return min(per_layer, d_mlp) if d_mlp else per_layer


def dry_run_text(spec: SweepSpec) -> str:
    """The grid `expand` would make (with ≤k neurons per selector), counted per (head, freeze) and control."""
    per_layer = most_neurons(spec)
    skipped = spec.skipped_combos()
    groups = expand(spec, {L: list(range(per_layer)) for L in spec.layers})
    trials: Counter[tuple] = Counter()
    for g in groups:
        trials[(g.head, g.freeze, g.control or "")] += n_samples(spec, g)
    real = sum(v for (_, _, c), v in trials.items() if not c)
    n_real = sum(1 for g in groups if not g.control)
    lines = [f"sweep {spec.name}: model {spec.model.name} ({spec.model.init}, processing {spec.model.processing})",
             f"  layers {spec.layers} × ≤{per_layer} neurons each × {len(spec.combos())} (head, freeze) = "
             f"≤{n_real} groups, ≤{real} trials ({spec.search.num_samples} samples per searched group; "
             "exact probes are solved once)",
             "  trials per (head, freeze), all layers:"]
    for h, f in spec.combos():
        lines.append(f"    {h:<15} {f:<13} {trials[(h, f, '')]}")
    for L in spec.layers:
        lines.append(f"  layer {L}: {real // len(spec.layers)} trials")
    if spec.controls:
        n_ctl = sum(v for (_, _, c), v in trials.items() if c)
        lines.append(f"  controls {', '.join(spec.control_names)}"
                     f"{f' (cross_model: {spec.cross_model})' if spec.cross_model else ''}: "
                     f"≤{len(groups) - n_real} more groups, ≤{n_ctl} more trials")
    lines.append(f"  skipped invalid combinations: {len(skipped)}"
                 + (f" ({', '.join(f'{h}+{f}' for h, f in skipped)}: token needs a trainable model)" if skipped else ""))
    from .inputs import cache_spec

    cs = cache_spec(spec)
    lines.append(f"  cache to build or load: 1 ({spec.corpus.source}, {spec.corpus.n_texts} texts ≤ "
                 f"{cs.max_tokens} tokens, layers {list(cs.layers)}, hook_{cs.hook}, features {cs.features}"
                 f"{', residual after each layer' if cs.store_resid else ''})")
    lines.append(f"  search: {spec.search.algorithm}, metric {spec.search.metric} ({spec.search.mode}), "
                 f"space {sorted(spec.search.space) or 'none (training defaults)'}")
    return "\n".join(lines)
