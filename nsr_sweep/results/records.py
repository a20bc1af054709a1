"""Trial records: what a finished trial leaves in the results directory, written and read in one place.

Two layouts, one reader. A trial that runs alone (an unfrozen trial, or a probe with a search) keeps a
directory; the batched probes of a unit of work (one layer, a chunk of its neurons, every head and
control) are rows of Parquet datasets — results grow with rows, not files:

    trials/<trial_id>/metrics.json        the record (written last: present = finished, ok or failed)
                      head.safetensors · preds.parquet (every split) · patch.parquet · diagnostics.png · model/
    probes/records/<unit>.parquet         one row per probe: the trial-table row, its spec and history (JSON);
                                          written last: present = the whole unit finished
    probes/preds/<unit>.parquet           test split: trial_id, text_id, actual_orig, actual_ft, pred, readout
    probes/patch/<unit>.parquet           trial_id, text_id, grid_value, act_base, act_patched, pred_base, pred_patched
    probes/heads/<unit>.safetensors       "<trial_id>/<name>": weight, bias and the head map (mu, sigma or
                                          bin_edges, bin_values); input-only heads (token-count weights, 3× the
                                          vocabulary wide) are not kept

Every number in the trial table is recomputable from these files (`test_predictions`, `patch_points`).
Neither Ray nor torch's training code is needed to read them.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from ..core.files import atomic_write, json_bytes, write_json
from ..core.spec import TrialSpec, parse_trial_id
from .layout import PROBES, RECORD, TRIALS

ID_COLUMNS = ["trial_id", "layer", "neuron", "head", "freeze", "control", "cross_model", "sample", "seed"]
HP_COLUMNS = ["solver", "lr", "epochs", "batch_size", "weight_decay", "patience", "n_bins"]
KINDS = ("records", "preds", "patch", "heads")  # the datasets of probes/, one file per unit each
PRED_COLUMNS = ["text_id", "actual_orig", "actual_ft", "pred", "readout"]
PATCH_COLUMNS = ["text_id", "grid_value", "act_base", "act_patched", "pred_base", "pred_patched"]


# -- one record's schema -----------------------------------------------------------------------


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


def write_record(d: Path, **fields) -> Path:
    """A record alone (a trial that failed before it produced anything else)."""
    return write_json(Path(d) / RECORD, record(**fields))


def _spec_dict(result) -> dict:
    return result.spec.model_dump(mode="json")


def _parquet(df: pd.DataFrame) -> bytes:
    """Parquet with zstd; float columns byte-stream-split (lossless: a quarter smaller for predictions)."""
    floats = [c for c in df.columns if pd.api.types.is_float_dtype(df[c])]
    buf = io.BytesIO()
    df.to_parquet(buf, index=False, compression="zstd", use_byte_stream_split=floats,
                  use_dictionary=[c for c in df.columns if c not in floats])
    return buf.getvalue()


# -- a trial alone: a directory ----------------------------------------------------------------


def trial_files(result, trial_id: str, sample: int = 0, chart: Callable | None = None) -> dict[str, bytes]:
    """A trial's directory in memory: metrics.json (the record), head.safetensors, preds.parquet, patch.parquet,
    diagnostics.png (`chart(result)` draws it: the worker passes `report.plots.trial_chart`; results code
    imports no plotting) and model/… (saved weights, if any); the record last."""
    import tempfile
    import time

    from safetensors.torch import save

    t0 = time.perf_counter()
    files: dict[str, bytes] = {}
    if result.status == "ok":
        files["preds.parquet"] = _parquet(result.preds)
        files["head.safetensors"] = save({k: v.detach().cpu().contiguous() for k, v in result.head.items()})
        if result.patch is not None:
            files["patch.parquet"] = _parquet(result.patch)
        if result.save_model is not None:
            with tempfile.TemporaryDirectory(prefix="nsr-model-") as tmp:
                result.save_model(tmp)
                files.update({f"model/{p.relative_to(tmp).as_posix()}": p.read_bytes()
                              for p in sorted(Path(tmp).rglob("*")) if p.is_file()})
        if chart is not None:
            files["diagnostics.png"] = chart(result)
    result.metrics["artefact_seconds"] = time.perf_counter() - t0
    files[RECORD] = json_bytes(record(trial_id=trial_id, sample=sample, spec=_spec_dict(result), status=result.status,
                                      reason=result.reason, metrics=result.metrics, history=result.history))
    return files


def save_trial(result, trial_dir: Path, trial_id: str | None = None, sample: int = 0,
               chart: Callable | None = None) -> Path:
    """A trial's files (`trial_files`) written to `trial_dir`; trial_id defaults to the directory's name."""
    return write_files(trial_dir, trial_files(result, trial_id or Path(trial_dir).name, sample, chart))


# -- a unit of probes: rows of Parquet datasets ----------------------------------------------------


def unit_files(done: list[tuple], unit: str) -> dict[str, bytes]:
    """A unit's four files in memory, keyed by their path under the results directory (records last):
    `done` holds (result, trial id, sample) for every probe of the unit, ok or failed."""
    import time

    import numpy as np
    from safetensors.torch import save

    t0 = time.perf_counter()
    preds, patch, heads = [], [], {}
    for result, tid, _ in done:
        if result.status != "ok":
            continue
        p = result.preds
        test = p[p["split"] == "test"]
        preds.append(pd.DataFrame({"trial_id": tid, **{c: test[c].to_numpy() for c in PRED_COLUMNS}}))
        if result.patch is not None:
            patch.append(pd.DataFrame({"trial_id": tid, **{c: result.patch[c].to_numpy() for c in PATCH_COLUMNS}}))
        if result.spec.control != "input_only":
            heads.update({f"{tid}/{k}": v.detach().cpu().contiguous() for k, v in result.head.items()})
    seconds = (time.perf_counter() - t0) / max(len(done), 1)
    rows = []
    for result, tid, sample in done:
        result.metrics["artefact_seconds"] = seconds
        row = trial_row(spec_json(result.spec, tid), result.status, result.metrics, result.reason, seconds=result.metrics.get("seconds"))
        row.update(unit=unit, spec_json=json.dumps(_spec_dict(result)), history_json=json.dumps(result.history))
        rows.append(row)
    empty_preds = pd.DataFrame({"trial_id": pd.Series(dtype=str), **{c: pd.Series(dtype=np.float64) for c in PRED_COLUMNS}})
    empty_patch = pd.DataFrame({"trial_id": pd.Series(dtype=str), **{c: pd.Series(dtype=np.float64) for c in PATCH_COLUMNS}})
    files = {
        f"{PROBES}/preds/{unit}.parquet": _parquet(_typed(pd.concat(preds, ignore_index=True) if preds else empty_preds)),
        f"{PROBES}/patch/{unit}.parquet": _parquet(_typed(pd.concat(patch, ignore_index=True) if patch else empty_patch)),
        f"{PROBES}/heads/{unit}.safetensors": save(heads),
        f"{PROBES}/records/{unit}.parquet": _parquet(_typed_records(rows)),
    }
    return files


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """The same column types in every unit's file (so a folder reads as one dataset): trial ids as strings
    (Parquet dictionary-encodes them), text ids int32, values float64."""
    df = df.copy()
    df["trial_id"] = df["trial_id"].astype("string")
    df["text_id"] = df["text_id"].astype("int32")
    return df


STRING_COLUMNS = ("trial_id", "head", "freeze", "control", "cross_model", "solver", "status", "error", "unit",
                  "spec_json", "history_json")


def _typed_records(rows: list[dict]) -> pd.DataFrame:
    """Records with string columns typed as strings even where every value is null."""
    df = pd.DataFrame(rows)
    for c in STRING_COLUMNS:
        if c in df:
            df[c] = df[c].astype("string")
    return df


def is_record(path: str) -> bool:
    """The file whose presence means finished: a trial's metrics.json, or a unit's records file."""
    return path.endswith(RECORD) or path.startswith(f"{PROBES}/records/")


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    """Each file atomically under `root`, the record(s) last: their presence means the trial (or unit) finished."""
    for name in sorted(files, key=is_record):
        data = files[name]
        atomic_write(Path(root) / name, lambda tmp: tmp.write_bytes(data))
    return Path(root)


@dataclass
class FailedTrial:
    """A trial that left nothing but its reason (it raised on every retry), shaped as a result for the writers."""

    spec: TrialSpec
    reason: str
    status: str = "failed"
    metrics: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    preds: None = None
    patch: None = None
    head: dict = field(default_factory=dict)


def failed_files(specs: list[TrialSpec], reason: str, unit: str | None) -> dict[str, bytes]:
    """The records of trials that failed without a result: one unit's files for a unit's probes, else the trial's
    metrics.json."""
    if unit is not None:
        return unit_files([(FailedTrial(s, reason), s.trial_id, s.sample) for s in specs], unit)
    s = specs[0]
    return {f"{TRIALS}/{s.trial_id}/{RECORD}": json_bytes(record(
        trial_id=s.trial_id, sample=s.sample, spec=s.model_dump(mode="json"), status="failed", reason=reason,
        metrics={}, history=[]))}


def save_unit(done: list[tuple], sweep_dir: Path, unit: str) -> Path:
    return write_files(sweep_dir, unit_files(done, unit))


# -- reading --------------------------------------------------------------------------------------


def read_trial_dir(d: Path) -> dict | None:
    """The row of a finished trial (ok or failed), None while it has not finished, or — for a record that
    cannot be read — a `damaged` row named after the directory (a reader never crashes on one bad file)."""
    f = d / RECORD
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_text())
        row = trial_row({**m["spec"], "trial_id": m.get("trial_id", d.name), "sample": m.get("sample", 0)},
                        m["status"], m.get("metrics", {}), m.get("reason"), seconds=m.get("metrics", {}).get("seconds"))
    except (OSError, ValueError, KeyError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        return damaged_row(d.name, f"unreadable {RECORD}: {type(e).__name__}")
    return row


def damaged_row(trial_id: str, why: str) -> dict | None:
    """A row for a trial whose record is damaged, its identity read from the trial id (None if that fails too)."""
    config = parse_trial_id(trial_id)
    return None if config is None else trial_row(config, "damaged", {}, why)


def unit_records(sweep_dir: Path) -> pd.DataFrame:
    """Every row of probes/records (an unreadable unit file is left out: its probes count as missing, and
    --resume reruns them into a whole file)."""
    files = sorted((Path(sweep_dir) / PROBES / "records").glob("*.parquet"))
    frames = []
    for f in files:
        try:
            frames.append(pd.read_parquet(f))
        except Exception:  # noqa: BLE001 - a damaged file must not stop a reader
            continue
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def finished_rows(sweep_dir: Path) -> list[dict]:
    """The rows of every finished trial, both layouts."""
    trials = Path(sweep_dir) / TRIALS
    rows = [read_trial_dir(d) for d in sorted(trials.iterdir())] if trials.is_dir() else []
    units = unit_records(sweep_dir)
    if len(units):
        units = units.drop(columns=["spec_json", "history_json"], errors="ignore")
        rows += [{k: _plain(v) for k, v in r.items()} for r in units.to_dict("records")]
    return [r for r in rows if r is not None]


def _plain(v):
    """A Parquet value as a record holds it (NaN for a missing number stays NaN; a missing string is None)."""
    return None if v is pd.NA or (v is None) else (v.item() if hasattr(v, "item") else v)


def test_predictions(sweep_dir: Path, trial_ids=None, units=None) -> pd.DataFrame:
    """The test-split predictions of trials (both layouts): trial_id, text_id, actual_orig, actual_ft, pred,
    readout; all trials when `trial_ids` is None. `units`, when given, are the only units whose files are read
    (the trial table's `unit` column names a batched probe's)."""
    want = None if trial_ids is None else set(trial_ids)
    frames = []
    files = sorted((Path(sweep_dir) / PROBES / "preds").glob("*.parquet"))
    if units is not None:
        units = set(units)
        files = [f for f in files if f.stem in units]
    for f in files:
        try:
            df = pd.read_parquet(f)
        except Exception:  # noqa: BLE001
            continue
        df["trial_id"] = df["trial_id"].astype(str)
        frames.append(df if want is None else df[df["trial_id"].isin(want)])
    trials = Path(sweep_dir) / TRIALS
    for d in sorted(trials.iterdir()) if trials.is_dir() else []:
        if (want is None or d.name in want) and (d / "preds.parquet").is_file():
            p = pd.read_parquet(d / "preds.parquet")
            p = p[p["split"] == "test"]
            frames.append(pd.DataFrame({"trial_id": d.name, **{c: p[c].to_numpy() for c in PRED_COLUMNS}}))
    if not frames:
        return pd.DataFrame(columns=["trial_id", *PRED_COLUMNS])
    return pd.concat(frames, ignore_index=True)


def patch_points(sweep_dir: Path, trial_id: str, unit: str | None = None) -> pd.DataFrame | None:
    """A trial's raw patching points with their deltas, from either layout (None if it has none); `unit` (a
    batched probe's, if known) spares reading every unit's record to find it."""
    d = Path(sweep_dir) / TRIALS / trial_id
    if (d / "patch.parquet").is_file():
        return pd.read_parquet(d / "patch.parquet")
    unit = unit or _unit_of(sweep_dir, trial_id)
    rows = Path(sweep_dir) / PROBES / "patch" / f"{unit}.parquet"
    if unit is None or not rows.is_file():
        return None
    p = pd.read_parquet(rows, filters=[("trial_id", "==", trial_id)]).drop(columns="trial_id").reset_index(drop=True)
    if p.empty:
        return None
    p["delta_act"] = p["act_patched"] - p["act_base"]
    p["delta_pred"] = p["pred_patched"] - p["pred_base"]
    return p


def head_state(sweep_dir: Path, trial_id: str) -> dict | None:
    """A trial's head tensors (weight, bias and its head map), from either layout (None if not kept)."""
    from safetensors.torch import load_file

    f = Path(sweep_dir) / TRIALS / trial_id / "head.safetensors"
    if f.is_file():
        return load_file(str(f))
    unit = _unit_of(sweep_dir, trial_id)
    stacked = Path(sweep_dir) / PROBES / "heads" / f"{unit}.safetensors"
    if unit is None or not stacked.is_file():
        return None
    got = {k.split("/", 1)[1]: v for k, v in load_file(str(stacked)).items() if k.startswith(f"{trial_id}/")}
    return got or None


def probe_record(sweep_dir: Path, trial_id: str) -> dict | None:
    """A batched probe's record (the schema of metrics.json) from its unit's row."""
    units = unit_records(sweep_dir)
    if units.empty or trial_id not in set(units["trial_id"]):
        return None
    row = units[units["trial_id"] == trial_id].iloc[-1].to_dict()
    spec, history = json.loads(row.pop("spec_json")), json.loads(row.pop("history_json"))
    skip = set(ID_COLUMNS + HP_COLUMNS) | {"status", "error", "unit"}
    metrics = {k: _plain(v) for k, v in row.items() if k not in skip}
    return record(trial_id=trial_id, sample=int(row["sample"]), spec=spec, status=row["status"],
                  reason=_plain(row["error"]), metrics=metrics, history=history)


def _unit_of(sweep_dir: Path, trial_id: str) -> str | None:
    units = unit_records(sweep_dir)
    if units.empty:
        return None
    hit = units.loc[units["trial_id"] == trial_id, "unit"]
    return str(hit.iloc[-1]) if len(hit) else None
