"""Trial records: what a finished trial leaves in the results directory, written here (`store` reads them back,
one implementation per layout behind one interface; `schema` is what a record and a row hold).

Two layouts. A trial that runs alone (an unfrozen trial, or a probe with a search) keeps a
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

Every number in the trial table is recomputable from these files (`TrialStore.test_predictions`, `.patch_points`).
Neither Ray nor torch's training code is needed to read them.
"""

from __future__ import annotations

import io
import json
from itertools import groupby
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from ..core.files import atomic_write, json_bytes, write_json
from ..core.spec import TrialSpec
from .layout import PROBES, RECORD, TRIALS
from .schema import PATCH_COLUMNS, PRED_COLUMNS, record, spec_json, trial_row


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
    finished = [(r, tid) for r, tid, _ in done if r.status == "ok"]
    preds, patch = _test_predictions(finished), _patch_points([(r.patch, tid) for r, tid in finished if r.patch is not None])
    heads = {}
    for result, tid in finished:
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
        f"{PROBES}/preds/{unit}.parquet": _parquet(_typed(preds if len(preds) else empty_preds)),
        f"{PROBES}/patch/{unit}.parquet": _parquet(_typed(patch if len(patch) else empty_patch)),
        f"{PROBES}/heads/{unit}.safetensors": save(heads),
        f"{PROBES}/records/{unit}.parquet": _parquet(_typed_records(rows)),
    }
    return files


def _test_predictions(finished: list[tuple]) -> pd.DataFrame:
    """The test predictions of a unit's finished probes — (result, trial id) — one probe after another, each in text
    order: sliced from their unit's stacked predictions (`core.finish.Predictions.test_rows`), once per run of
    probes that share them."""
    import numpy as np

    parts = []
    for _, same in groupby(finished, key=lambda f: id(f[0].predictions)):
        run = list(same)
        rows = run[0][0].predictions.test_rows([r.column for r, _ in run])
        ids = np.repeat(np.array([tid for _, tid in run], dtype=object), len(rows["text_id"]) // len(run))
        parts.append(pd.DataFrame({"trial_id": ids, **{c: rows[c] for c in PRED_COLUMNS}}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _patch_points(patched: list[tuple]) -> pd.DataFrame:
    """The patching points of a unit's patched probes — (points, trial id) — one probe after another."""
    import numpy as np

    if not patched:
        return pd.DataFrame()
    ids = np.repeat(np.array([tid for _, tid in patched], dtype=object), [len(p) for p, _ in patched])
    return pd.DataFrame({"trial_id": ids, **{c: np.concatenate([p[c].to_numpy() for p, _ in patched])
                                             for c in PATCH_COLUMNS}})


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


