"""What a trial record holds, whatever its layout: the record's schema, a trial-table row's columns, and the
columns of the predictions and patching points kept per trial (`records` writes them, `store` reads them)."""

from __future__ import annotations

import pandas as pd

from ..core.spec import TrialSpec, parse_trial_id

ID_COLUMNS = ["trial_id", "layer", "neuron", "head", "freeze", "control", "cross_model", "sample", "seed"]
HP_COLUMNS = ["solver", "lr", "epochs", "batch_size", "weight_decay", "patience", "n_bins"]
KINDS = ("records", "preds", "patch", "heads")  # the datasets of probes/, one file per unit each
PRED_COLUMNS = ["text_id", "actual_orig", "actual_ft", "pred", "readout"]
PATCH_COLUMNS = ["text_id", "grid_value", "act_base", "act_patched", "pred_base", "pred_patched"]


def record(*, trial_id: str, sample: int, spec: dict, status: str, reason: str | None, metrics: dict,
           history: list) -> dict:
    """The one schema of a trial record, finished or failed (metrics.json; a row of probes/records)."""
    return {"trial_id": trial_id, "sample": sample, "spec": spec, "status": status, "reason": reason,
            "metrics": metrics, "history": history}


def trial_row(spec: dict, status: str, metrics: dict, error: str | None, **extra) -> dict:
    """A trial's row of the trial table: its identity, hyperparameters, status and every metric. `spec` is the
    trial's TrialSpec as JSON with its `trial_id` (a record's spec; flat keys — a record of an older version, or a
    trial id read back — are read as they are)."""
    row = spec_columns(spec)
    row.update({"status": status, "error": error})
    row.update({k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                for k, v in sorted(metrics.items()) if k != "seconds"})
    row.update(extra)
    return row


def spec_columns(spec: dict) -> dict:
    """The identity and hyperparameter columns (ID_COLUMNS, HP_COLUMNS) of a trial's spec: the hyperparameters
    from its training section, `seed` the trial's own seed."""
    if not isinstance(spec.get("training"), dict):
        return {k: spec.get(k) for k in ID_COLUMNS + HP_COLUMNS}
    trial = TrialSpec.model_validate({k: v for k, v in spec.items() if k != "trial_id"})
    row = {k: spec.get(k) for k in ID_COLUMNS}
    row.update(trial_id=spec.get("trial_id", trial.trial_id), seed=trial.trial_seed)
    row.update({k: getattr(trial.training, k) for k in HP_COLUMNS})
    return row


def spec_json(spec: TrialSpec, trial_id: str | None = None) -> dict:
    """A TrialSpec as a record holds it, with its trial id."""
    return {**spec.model_dump(mode="json"), "trial_id": trial_id or spec.trial_id}


def damaged_row(trial_id: str, why: str) -> dict | None:
    """A row for a trial whose record is damaged, its identity read from the trial id (None if that fails too)."""
    config = parse_trial_id(trial_id)
    return None if config is None else trial_row(config, "damaged", {}, why)


def plain(v):
    """A Parquet value as a record holds it (NaN for a missing number stays NaN; a missing string is None)."""
    return None if v is pd.NA or (v is None) else (v.item() if hasattr(v, "item") else v)
