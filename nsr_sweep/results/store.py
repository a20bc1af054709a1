"""The trials a results directory holds, read through one interface whatever their layout (`records` writes them).

    open_store(sweep_dir) ─▶ a TrialStore: finished_rows · test_predictions · predictions · patch_points · head ·
                             record · model_dir · damage
        TrialDirs    trials/<trial_id>/…           a trial run alone keeps a directory
        ProbeUnits   probes/<kind>/<unit>.…        the batched probes of a unit of work: rows of Parquet datasets,
                                                   found through a trial → unit index read once per store
        SweepStore   both, when a directory holds both (each trial is in one)

Only these classes know where a layout keeps what: the trial table, the comparison, a neuron's page, `Results` and
`nsr-sweep status` ask a store. `damage()` names every file of a finished trial or unit that cannot be read whole
(`integrity`), with what `--resume` will do about it.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import pandas as pd

from . import integrity
from .integrity import Damage
from .layout import PROBES, RECORD, TRIALS
from .schema import HP_COLUMNS, ID_COLUMNS, PRED_COLUMNS, damaged_row, plain, record, trial_row

__all__ = ["Damage", "ProbeUnits", "SweepStore", "TrialDirs", "TrialStore", "open_store", "read_trial_dir"]


def open_store(sweep_dir: Path | str, trials: pd.DataFrame | None = None) -> TrialStore:
    """The store of a results directory, in the layout(s) it holds. `trials`, a trial table already read, says in
    its `unit` column where each batched probe is (sparing the store a read of every unit's record to find one)."""
    root = Path(sweep_dir)
    units = dict(zip(trials["trial_id"], trials["unit"])) if trials is not None and "unit" in trials else None
    parts: list[TrialStore] = [s for s in (TrialDirs(root), ProbeUnits(root, units)) if s.present()]
    return parts[0] if len(parts) == 1 else SweepStore(parts)


def bundle_rows(sweep_dir: Path | str, unit: str | None, trial_ids: list[str]) -> list[dict]:
    """The rows a unit's records file holds, or (`unit` None) a trial's directory: what one bundle of the
    transport writes, read alone (not the whole directory)."""
    if unit is not None:
        return ProbeUnits(Path(sweep_dir)).unit_rows(unit)
    return [r for r in [read_trial_dir(Path(sweep_dir) / TRIALS / trial_ids[0])] if r is not None]


class TrialStore(ABC):
    """Finished trials as one layout keeps them. Per-trial reads answer None for a trial the store does not hold."""

    @abstractmethod
    def finished_rows(self) -> list[dict]:
        """The trial-table row of every finished trial, ok or failed (a trial whose record is damaged: `damaged`)."""

    def finished_frame(self) -> pd.DataFrame:
        """`finished_rows` as one frame (the trial table's input): a store of many rows builds it by columns."""
        return pd.DataFrame(self.finished_rows())

    @abstractmethod
    def holds(self, trial_id: str) -> bool:
        """Whether the trial is kept here."""

    @abstractmethod
    def pred_frames(self, trial_ids: set[str] | None, columns: Sequence[str] = PRED_COLUMNS) -> Iterator[pd.DataFrame]:
        """Test predictions (trial_id and `columns`, of PRED_COLUMNS) of these trials (all when None), a frame per
        stored file, read as they are asked for (a reader of a layer's probes holds one file at a time). trial_id may
        be categorical (a unit's ids are read once each, not once per text)."""

    @abstractmethod
    def patch_points(self, trial_id: str) -> pd.DataFrame | None:
        """A trial's raw patching points with their deltas (delta_act, delta_pred); None if it has none."""

    @abstractmethod
    def head(self, trial_id: str) -> dict | None:
        """A trial's head tensors (weight, bias and its head map); None if not kept."""

    @abstractmethod
    def record(self, trial_id: str) -> dict | None:
        """A trial's record (`schema.record`: the schema of metrics.json)."""

    @abstractmethod
    def damage(self) -> list[Damage]:
        """Every file of a finished trial or unit that cannot be read whole, and what --resume does about it."""

    def test_predictions(self, trial_ids: Iterable[str] | None = None) -> pd.DataFrame:
        """The test-split predictions of trials (all when `trial_ids` is None): trial_id, text_id, actual_orig,
        actual_ft, pred, readout — a trial's rows together, trials in no promised order."""
        frames = list(self.pred_frames(None if trial_ids is None else {str(t) for t in trial_ids}))
        if not frames:
            return pd.DataFrame(columns=["trial_id", *PRED_COLUMNS])
        out = pd.concat(frames, ignore_index=True)
        out["trial_id"] = out["trial_id"].astype(str)
        return out

    def predictions(self, trial_id: str) -> pd.DataFrame:
        """A trial's predictions as stored, with `split`: a batched probe keeps its test split (the one its metrics
        use), a trial run alone every split."""
        p = self.test_predictions([trial_id]).drop(columns="trial_id")
        return p.assign(split="test").sort_values("text_id").reset_index(drop=True)

    def model_dir(self, trial_id: str) -> Path | None:
        """The trial's fine-tuned model, saved here in HF format (None: none saved here)."""
        return None

    def present(self) -> bool:
        return True


class SweepStore(TrialStore):
    """A directory that holds both layouts: each question goes to the store that holds the trial."""

    def __init__(self, parts: list[TrialStore]):
        self.parts = parts

    def _holder(self, trial_id: str) -> TrialStore | None:
        return next((p for p in self.parts if p.holds(trial_id)), None)

    def finished_rows(self) -> list[dict]:
        return [r for p in self.parts for r in p.finished_rows()]

    def finished_frame(self) -> pd.DataFrame:
        frames = [f for f in (p.finished_frame() for p in self.parts) if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def holds(self, trial_id: str) -> bool:
        return self._holder(trial_id) is not None

    def pred_frames(self, trial_ids: set[str] | None, columns: Sequence[str] = PRED_COLUMNS) -> Iterator[pd.DataFrame]:
        if trial_ids is None:
            yield from (f for p in self.parts for f in p.pred_frames(None, columns))
            return
        left = set(trial_ids)
        for p in self.parts:  # each asked only for its own trials (a probe's unit is looked up only if it is one)
            mine = {t for t in left if p.holds(t)}
            left -= mine
            yield from p.pred_frames(mine, columns) if mine else ()

    def _ask(self, trial_id: str, what: str):
        p = self._holder(trial_id)
        return None if p is None else getattr(p, what)(trial_id)

    def patch_points(self, trial_id: str) -> pd.DataFrame | None:
        return self._ask(trial_id, "patch_points")

    def head(self, trial_id: str) -> dict | None:
        return self._ask(trial_id, "head")

    def record(self, trial_id: str) -> dict | None:
        return self._ask(trial_id, "record")

    def predictions(self, trial_id: str) -> pd.DataFrame:
        p = self._holder(trial_id)
        return super().predictions(trial_id) if p is None else p.predictions(trial_id)

    def model_dir(self, trial_id: str) -> Path | None:
        return self._ask(trial_id, "model_dir")

    def damage(self) -> list[Damage]:
        return [d for p in self.parts for d in p.damage()]


# -- a trial alone: a directory ----------------------------------------------------------------


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


class TrialDirs(TrialStore):
    """trials/<trial_id>/: metrics.json (the record, written last), preds.parquet (every split), patch.parquet,
    head.safetensors, diagnostics.png, model/."""

    def __init__(self, root: Path):
        self.root, self.base = Path(root), Path(root) / TRIALS

    def present(self) -> bool:
        return self.base.is_dir()

    def _dirs(self) -> list[Path]:
        """Every trial's directory (not a partial write's temp: those start with a dot)."""
        return [d for d in sorted(self.base.iterdir()) if not d.name.startswith(".")] if self.present() else []

    def finished_rows(self) -> list[dict]:
        return [r for r in map(read_trial_dir, self._dirs()) if r is not None]

    def holds(self, trial_id: str) -> bool:
        return (self.base / trial_id).is_dir()

    def pred_frames(self, trial_ids: set[str] | None, columns: Sequence[str] = PRED_COLUMNS) -> Iterator[pd.DataFrame]:
        dirs = self._dirs() if trial_ids is None else [self.base / t for t in sorted(trial_ids)]
        for d in dirs:
            if (d / "preds.parquet").is_file():
                p = pd.read_parquet(d / "preds.parquet", columns=["split", *columns])
                p = p[p["split"] == "test"]
                yield pd.DataFrame({"trial_id": d.name, **{c: p[c].to_numpy() for c in columns}})

    def predictions(self, trial_id: str) -> pd.DataFrame:
        f = self.base / trial_id / "preds.parquet"
        return pd.read_parquet(f) if f.is_file() else super().predictions(trial_id)

    def patch_points(self, trial_id: str) -> pd.DataFrame | None:
        f = self.base / trial_id / "patch.parquet"
        return pd.read_parquet(f) if f.is_file() else None  # written with its deltas

    def head(self, trial_id: str) -> dict | None:
        from safetensors.torch import load_file

        f = self.base / trial_id / "head.safetensors"
        return load_file(str(f)) if f.is_file() else None

    def record(self, trial_id: str) -> dict | None:
        f = self.base / trial_id / RECORD
        return json.loads(f.read_text()) if f.is_file() else None

    def model_dir(self, trial_id: str) -> Path | None:
        d = self.base / trial_id / "model"
        return d if (d / "config.json").is_file() else None

    def damage(self) -> list[Damage]:
        out = []
        for d in self._dirs():
            if (d / RECORD).is_file():
                out += integrity.trial_dir_damage(self.root, d, read_trial_dir(d))
        return out


# -- a unit of probes: rows of Parquet datasets ----------------------------------------------------


def _plain_rows(frame: pd.DataFrame) -> list[dict]:
    """Trial-table rows (`_table_frame`'s) as plain Python values."""
    return [{k: plain(v) for k, v in r.items()} for r in frame.to_dict("records")]


def _table_frame(records: pd.DataFrame) -> pd.DataFrame:
    """Unit records as trial-table rows, by columns: without the record-only JSON columns, each column of strings
    typed as a frame of the rows' Python values types it (the trial table's columns whatever the layout)."""
    rows = records.drop(columns=[c for c in RECORD_ONLY if c in records])
    for c in rows.columns:
        col = rows[c]
        if isinstance(col.dtype, pd.StringDtype) and col.notna().any():
            rows[c] = col.astype("str")  # strings beside missing values: NaN for missing, as a frame of rows infers
        elif isinstance(col.dtype, pd.StringDtype) or col.dtype == object:  # none at all, or mixed: as Python values
            rows[c] = pd.Series([plain(v) for v in col.tolist()], index=rows.index, dtype=object if
                                col.isna().all() else None)
    return rows


def _by_trial_id(tables: list):
    """Arrow tables (emptied: they are let go here) as one, its rows in trial-id order (stable), column by column:
    each column is let go once its sorted copy is made, so the table is held about once, without a pandas copy."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.concat_tables(tables, promote_options="default")  # a unit lacks the columns none of its probes has
    tables.clear()
    order, pool, metadata = pc.sort_indices(table["trial_id"]), pa.default_memory_pool(), table.schema.metadata
    columns = {}
    for i, name in enumerate(table.column_names):
        columns[name] = table[name].take(order).combine_chunks()
        table = table.drop_columns([name])
        if i % 8 == 7:
            pool.release_unused()  # the allocator keeps what was let go unless told (it would hold the table twice)
    pool.release_unused()
    return pa.table(columns, metadata=metadata)  # pandas' own (the columns' dtypes, as the units were written)


RECORD_ONLY = ("spec_json", "history_json")  # a unit record's columns that are not the trial table's


class ProbeUnits(TrialStore):
    """probes/records/<unit>.parquet (one row per probe, written last: present = the unit finished) beside its
    preds/, patch/ and heads/ files. A probe is found by its unit: `index` reads each unit's trial ids once (or the
    trial table says, `units`), and reads only the units it has not read when asked for a trial it does not know."""

    def __init__(self, root: Path, units: Mapping[str, str] | None = None):
        self.root, self.base = Path(root), Path(root) / PROBES
        self.known = {str(t): str(u) for t, u in (units or {}).items() if isinstance(u, str)}
        self._index: dict[str, str] = {}  # trial id → unit, from the records files read so far
        self._read: set[str] = set()  # units whose records file the index has read (or found unreadable)

    def present(self) -> bool:
        return self.base.is_dir()

    def path(self, kind: str, unit: str) -> Path:
        return self.base / kind / f"{unit}{'.safetensors' if kind == 'heads' else '.parquet'}"

    def units(self) -> list[str]:
        """Every finished unit (its records file present; a partial write's temp starts with a dot)."""
        d = self.base / "records"
        return sorted(f.stem for f in d.glob("*.parquet") if not f.name.startswith(".")) if d.is_dir() else []

    def _records(self, unit: str, columns: list[str] | None = None) -> pd.DataFrame | None:
        """A unit's records (None when unreadable: its probes count as missing, and --resume reruns them whole)."""
        try:
            return pd.read_parquet(self.path("records", unit), columns=columns)
        except Exception:  # noqa: BLE001 - a damaged file must not stop a reader
            return None

    def _learn(self, unit: str, rows: pd.DataFrame | None) -> None:
        self._read.add(unit)
        if rows is not None and len(rows):
            self._index.update(zip(rows["trial_id"].astype(str), rows["unit"].astype(str)))

    def index(self) -> dict[str, str]:
        """trial id → unit for every finished unit: each unit's records read once per store (two columns)."""
        for unit in self.units():
            if unit not in self._read:
                self._learn(unit, self._records(unit, ["trial_id", "unit"]))
        return self._index

    def unit_of(self, trial_id: str) -> str | None:
        return self.known.get(trial_id) or self._index.get(trial_id) or self.index().get(trial_id)

    def finished_rows(self) -> list[dict]:
        return _plain_rows(self.finished_frame())

    def finished_frame(self) -> pd.DataFrame:
        """Every unit's records (without the JSON columns, read only for a record) in one frame, read as Arrow
        tables and converted once: at a layer's scale (hundreds of thousands of probes) no row becomes Python
        objects, and the frame is held about once."""
        tables = [t for t in map(self._table, self.units()) if t is not None]
        if not tables:
            return pd.DataFrame()
        return _table_frame(_by_trial_id(tables).to_pandas(self_destruct=True, split_blocks=True))

    def _table(self, unit: str):
        """A unit's records as an Arrow table of the trial table's columns (None when unreadable)."""
        import pyarrow.parquet as pq

        try:
            f = pq.ParquetFile(self.path("records", unit))
            return f.read(columns=[c for c in f.schema_arrow.names if c not in RECORD_ONLY and
                                   not c.startswith("__index_level")])
        except Exception:  # noqa: BLE001 - a damaged file must not stop a reader (its probes count as missing)
            return None

    def unit_rows(self, unit: str) -> list[dict]:
        """The rows of one unit's records (none while it is unfinished or unreadable)."""
        rows = self._records(unit)
        return [] if rows is None else _plain_rows(_table_frame(rows))

    def holds(self, trial_id: str) -> bool:
        return self.unit_of(trial_id) is not None

    def pred_frames(self, trial_ids: set[str] | None, columns: Sequence[str] = PRED_COLUMNS) -> Iterator[pd.DataFrame]:
        import pyarrow.parquet as pq

        units = self.units() if trial_ids is None else sorted({u for u in map(self.unit_of, trial_ids) if u})
        wanted = None if trial_ids is None else pd.Index(list(trial_ids))  # looked up by each file's ids: built once
        for unit in units:
            try:  # trial_id as a dictionary: each probe's id once, not once per text
                df = pq.read_table(self.path("preds", unit), columns=["trial_id", *columns],
                                   read_dictionary=["trial_id"]).to_pandas()
            except Exception:  # noqa: BLE001 - a damaged file must not stop a reader (`damage` names it)
                continue
            if wanted is not None:
                ids = df["trial_id"].cat
                df = df[(wanted.get_indexer(ids.categories) >= 0)[ids.codes] & (ids.codes >= 0)]
            yield df

    def patch_points(self, trial_id: str) -> pd.DataFrame | None:
        unit = self.unit_of(trial_id)
        f = None if unit is None else self.path("patch", unit)
        if f is None or not f.is_file():
            return None
        p = pd.read_parquet(f, filters=[("trial_id", "==", trial_id)]).drop(columns="trial_id").reset_index(drop=True)
        if p.empty:
            return None
        p["delta_act"] = p["act_patched"] - p["act_base"]
        p["delta_pred"] = p["pred_patched"] - p["pred_base"]
        return p

    def head(self, trial_id: str) -> dict | None:
        from safetensors import safe_open

        unit = self.unit_of(trial_id)
        f = None if unit is None else self.path("heads", unit)
        if f is None or not f.is_file():
            return None
        with safe_open(str(f), framework="pt") as stacked:  # only this probe's tensors are read
            got = {k.split("/", 1)[1]: stacked.get_tensor(k) for k in stacked.keys() if k.startswith(f"{trial_id}/")}
        return got or None

    def record(self, trial_id: str) -> dict | None:
        unit = self.unit_of(trial_id)
        rows = None if unit is None else self._records(unit)
        if rows is None or trial_id not in set(rows["trial_id"]):
            return None
        row = rows[rows["trial_id"] == trial_id].iloc[-1].to_dict()
        spec, history = json.loads(row.pop("spec_json")), json.loads(row.pop("history_json"))
        skip = set(ID_COLUMNS + HP_COLUMNS) | {"status", "error", "unit"}
        metrics = {k: plain(v) for k, v in row.items() if k not in skip}
        return record(trial_id=trial_id, sample=int(row["sample"]), spec=spec, status=row["status"],
                      reason=plain(row["error"]), metrics=metrics, history=history)

    def damage(self) -> list[Damage]:
        return [d for unit in self.units() for d in integrity.unit_damage(self.root, unit, self.path)]
