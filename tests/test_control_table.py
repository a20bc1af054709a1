"""What a control is lives in one table (`core/controls.py`): no other module spells a set of control names, and
the table's properties are what the grid makes of a sweep with every control."""

import ast
from pathlib import Path
from typing import get_args

from nsr_sweep.core.controls import (
    CONTROLS,
    FREEZES,
    OUTSIDERS,
    PREDICTORS,
    REAL,
    ControlName,
    NamedControl,
    control_of,
    names,
)
from nsr_sweep.core.spec import Freeze, GridPoint, TrialSpec, parse_sweep
from nsr_sweep.sweep.grid import expand

PACKAGE = Path(__file__).resolve().parents[1] / "nsr_sweep"
SPELLED = {s for c in PREDICTORS for s in (c.name, c.role, c.comparison) if s}
"""Every way the package names a predictor: control values, result roles, comparison sources (self, cross, ...)."""


def _strings(node: ast.AST) -> set[str]:
    """The string constants of a literal container, nested containers included."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_strings(e) for e in node.elts))
    if isinstance(node, ast.Dict):
        return set().union(*(_strings(e) for e in [*node.keys, *node.values] if e is not None))
    return set()


def test_no_module_but_the_table_spells_two_control_names_together():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "core/controls.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                named = _strings(node) & SPELLED
                if len(named) >= 2:
                    found.append(f"{rel}:{node.lineno} {sorted(named)}")
    assert found == []


def test_the_scan_sees_a_tuple_of_control_names():
    """The scan above can fail: a tuple, a nested pair and a dict of names are each seen."""
    for code in ('x in ("shuffled", "input_only")', 'for a, b in (("self", "s"), ("cross", "c")): pass',
                 'D = {"cross_model": 1, "random_model": 2}'):
        assert any(len(_strings(n) & SPELLED) >= 2 for n in ast.walk(ast.parse(code))), code


def test_the_grid_of_a_sweep_with_every_control_is_what_the_table_says():
    spec = parse_sweep({"name": "every", "layers": [0, 2], "neurons": [1, 3],
                        "heads": ["regression", "classification", "token"], "freeze": ["none", "after_target", "all"],
                        "controls": [*[n for n in CONTROLS if not CONTROLS[n].other_model],
                                     {"cross_model": "nsr-tiny-seed1"}]})
    neurons = {0: [1, 3], 2: [5]}
    groups = expand(spec, neurons)
    cells = {(g.layer, g.neuron, g.head, g.freeze) for g in groups if g.control is None}
    assert len(cells) == 3 * (3 * 3 - 1)  # token needs a trainable model: 8 (head, freeze) per neuron
    for name, c in CONTROLS.items():
        mine = [g for g in groups if g.control == name]
        assert all(g.freeze in c.freezes for g in mine), name
        assert all((g.cross_model is not None) == c.other_model for g in mine), name
        if c.per_cell:  # one per cell of its freeze modes
            assert {(g.layer, g.neuron, g.head, g.freeze) for g in mine} == \
                {cell for cell in cells if cell[3] in c.freezes}, name
        else:  # one regression probe per (layer, neuron)
            assert sorted((g.layer, g.neuron, g.head, g.freeze) for g in mine) == \
                sorted((L, n, "regression", "none") for L, ns in neurons.items() for n in ns), name
        assert c.needs_freeze_none == ({g.freeze for g in mine} == {"none"}), name
    assert len({g.trial_id for g in groups}) == len(groups)


def test_each_control_reads_patches_and_validates_as_the_table_says():
    for c in PREDICTORS:
        for f in ("none", "after_target", "all"):
            kw = {"cross_model": "nsr-tiny-seed1"} if c.other_model else {}
            try:
                spec = TrialSpec(layer=0, neuron=0, freeze=f, control=c.name, **kw)
            except ValueError:
                assert f not in c.freezes, (c.role, f)
                continue
            assert f in c.freezes, (c.role, f)
            assert spec.reads_model == c.reads_model == c.patched
    assert control_of(None) is control_of(float("nan")) is REAL
    assert set(get_args(ControlName)) == set(CONTROLS) and get_args(Freeze) == FREEZES  # the Literals: the table's
    assert set(get_args(NamedControl)) == {n for n, c in CONTROLS.items() if not c.other_model}
    assert names(patched=True) == ["shuffled"]
    assert [c.comparison for c in OUTSIDERS] == ["cross", "input_only"]  # the comparison table's column names
    assert GridPoint(layer=1, neuron=2, control="early_features").trial_id == "L1-N2-regression-none-early_features-s0"
