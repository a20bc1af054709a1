"""Sweep files and trials, by the names the rest of the package and its users import: one place to import from.

Three modules do the work, one job each: `schema` (the sweep file's sections, pydantic), `identity` (a trial's
place in the grid, its id and settings: `GridPoint`, `TrialSpec`, `TrialBatch`) and `sweepfile` (reading YAML
safely: `load_sweep`, `dump_sweep`). What each control is: `controls`.
"""

from __future__ import annotations

from .controls import ControlName, NamedControl
from .identity import (
    CELL_COLUMNS,
    GROUP_COLUMNS,
    TRIAL_ID,
    GridPoint,
    TrialBatch,
    TrialSettings,
    TrialSpec,
    group_of,
    parse_trial_id,
    stable_seed,
)
from .schema import (
    HEADS,
    HOOK_NAME,
    HYPERPARAMETERS,
    METHOD_VERSION,
    SCALE_FREE,
    AnalysisCfg,
    CorpusCfg,
    CrossModelCfg,
    Dist,
    FeaturesCfg,
    Freeze,
    Head,
    Init,
    Metric,
    ModelCfg,
    NeuronSelect,
    Position,
    Processing,
    ResourcesCfg,
    SearchCfg,
    Selector,
    SplitsCfg,
    Strict,
    SweepSpec,
    TargetCfg,
    TargetHook,
    TrainingCfg,
    is_feature_hook,
    split_sizes,
    valid_combo,
)
from .sweepfile import (
    MAX_YAML_ALIASES,
    MAX_YAML_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    dump_sweep,
    load_sweep,
    parse_sweep,
    read_yaml,
)

__all__ = ["ControlName", "NamedControl", "CELL_COLUMNS", "GROUP_COLUMNS", "TRIAL_ID", "GridPoint", "TrialBatch",
           "TrialSettings", "TrialSpec", "group_of", "parse_trial_id", "stable_seed", "HEADS", "HOOK_NAME",
           "HYPERPARAMETERS", "METHOD_VERSION", "SCALE_FREE", "AnalysisCfg", "CorpusCfg", "CrossModelCfg", "Dist",
           "FeaturesCfg", "Freeze", "Head", "Init", "Metric", "ModelCfg", "NeuronSelect", "Position", "Processing",
           "ResourcesCfg", "SearchCfg", "Selector", "SplitsCfg", "Strict", "SweepSpec", "TargetCfg", "TargetHook",
           "TrainingCfg", "is_feature_hook", "split_sizes", "valid_combo", "MAX_YAML_ALIASES", "MAX_YAML_BYTES",
           "MAX_YAML_DEPTH", "MAX_YAML_NODES", "dump_sweep", "load_sweep", "parse_sweep", "read_yaml"]
