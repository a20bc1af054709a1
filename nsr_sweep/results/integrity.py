"""Whether a finished trial's or unit's files read back whole, for the store's `damage()` (`nsr-sweep status`).

Each file is read through, not only opened: a Parquet file's footer and every page, its columns and its rows per
trial against the record's `n_test`; a safetensors file's header and the heads its unit's records say it holds. A
damaged record leaves its trials missing, so `--resume` reruns them; a damaged file beside a whole record does not
(the trials count as finished), and deleting the record is what makes `--resume` rerun them.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .layout import RECORD
from .schema import ID_COLUMNS, PATCH_COLUMNS, PRED_COLUMNS

RECORD_COLUMNS = [*ID_COLUMNS, "status", "error", "unit", "spec_json", "history_json"]


@dataclass(frozen=True)
class Damage:
    """A file of a finished trial or unit that does not read back whole."""

    path: str  # under the results directory
    why: str
    trial_ids: tuple[str, ...]  # the trials whose file it is (as far as the readable files tell)
    record: str  # their record: the damaged file itself, or the one to delete so that --resume reruns them

    @property
    def rerun(self) -> bool:
        """Whether --resume reruns its trials by itself (the record is the damaged file: they count as missing)."""
        return self.path == self.record

    def resume(self) -> str:
        """What `--resume` does about it, in words."""
        n = len(self.trial_ids)
        them = f"its {n} trial{'s' if n != 1 else ''}" if n else "its trials (how many: no readable file says)"
        if self.rerun:
            return f"--resume reruns {them}"
        return (f"--resume keeps {them} (the record is whole): delete {self.record} and --resume reruns "
                f"{'it' if n == 1 else 'them'}")

    def line(self) -> str:
        return f"damaged: {self.path}: {self.why}; {self.resume()}"


def _why(e: Exception) -> str:
    """An exception in a few words: its first sentence, without the path (the line names the file)."""
    text = re.sub(r"^Could not open Parquet input source '[^']*': ", "", str(e).strip())
    first = re.split(r"(?<=[a-z])\. |\n", text)[0].rstrip(".")[:160]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def read_parquet_whole(f: Path, columns: list[str]):
    """The whole table (footer and every page), or ValueError naming what is missing."""
    import pyarrow.parquet as pq

    if not f.is_file():
        raise ValueError("missing")
    table = pq.read_table(f)
    lacking = [c for c in columns if c not in table.column_names]
    if lacking:
        raise ValueError(f"no column {', '.join(lacking)}")
    return table


def read_heads(f: Path) -> set[str]:
    """The trial ids a stacked heads file holds ("<trial_id>/<name>" keys), every tensor read."""
    from safetensors import safe_open

    if not f.is_file():
        raise ValueError("missing")
    with safe_open(str(f), framework="pt") as heads:
        keys = list(heads.keys())
        for k in keys:
            heads.get_tensor(k)
    return {k.split("/", 1)[0] for k in keys}


def rows_per_trial(table, want: dict[str, int | None]) -> str | None:
    """What is wrong with a predictions table's rows per trial (`want`: trial → its n_test, None if unknown)."""
    got = Counter(str(t) for t in table.column("trial_id").to_pylist())
    wrong = [t for t, n in want.items() if got.get(t, 0) != n and not (n is None and got.get(t, 0))]
    extra = sorted(set(got) - set(want))
    if wrong:
        return f"{len(wrong)} trial(s) without the test rows their record counts (e.g. {wrong[0]})"
    return f"rows of {len(extra)} trial(s) its unit does not record (e.g. {extra[0]})" if extra else None


def unit_damage(root: Path, unit: str, path: Callable[[str, str], Path]) -> list[Damage]:
    """A finished unit's files: its records, then (when they read) its predictions, patching points and heads."""
    rec = path("records", unit)
    rel = lambda f: f.relative_to(root).as_posix()  # noqa: E731
    try:
        table = read_parquet_whole(rec, RECORD_COLUMNS)
        if table.num_rows == 0 or set(table.column("unit").to_pylist()) != {unit}:
            raise ValueError(f"{table.num_rows} rows, not one per probe of unit {unit}")
    except Exception as e:  # noqa: BLE001 - any failure to read is damage
        return [Damage(rel(rec), _why(e), _ids_beside(unit, path), rel(rec))]
    col = lambda c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows  # noqa: E731
    ids = tuple(str(t) for t in col("trial_id"))
    ok = [i for i, s in enumerate(col("status")) if s == "ok"]
    n_test, control = col("n_test"), col("control")
    want = {ids[i]: _count(n_test[i]) for i in ok}
    heads = {ids[i] for i in ok if control[i] != "input_only"}
    out = []
    for kind, check in (("preds", lambda f: rows_per_trial(read_parquet_whole(f, ["trial_id", *PRED_COLUMNS]), want)),
                        ("patch", lambda f: _foreign(read_parquet_whole(f, ["trial_id", *PATCH_COLUMNS]), set(ids))),
                        ("heads", lambda f: _heads_differ(read_heads(f), heads))):
        f = path(kind, unit)
        try:
            why = check(f)
        except Exception as e:  # noqa: BLE001
            why = _why(e)
        if why:
            out.append(Damage(rel(f), why, ids, rel(rec)))
    return out


def _count(n) -> int | None:
    """A record's n_test as a count (None where it has none: NaN or missing)."""
    return None if n is None or n != n else int(n)


def _foreign(table, ids: set[str]) -> str | None:
    extra = sorted({str(t) for t in table.column("trial_id").to_pylist()} - ids)
    return f"rows of {len(extra)} trial(s) its unit does not record (e.g. {extra[0]})" if extra else None


def _heads_differ(got: set[str], want: set[str]) -> str | None:
    if got == want:
        return None
    lacking, extra = sorted(want - got), sorted(got - want)
    return f"{len(lacking)} head(s) missing, {len(extra)} not recorded" + (f" (e.g. {(lacking or extra)[0]})")


def _ids_beside(unit: str, path: Callable[[str, str], Path]) -> tuple[str, ...]:
    """A unit's trial ids as its other files tell them, when its records cannot (a failed probe is in none)."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for kind in ("preds", "patch"):
        try:
            ids |= {str(t) for t in pq.read_table(path(kind, unit), columns=["trial_id"]).column(0).to_pylist()}
        except Exception:  # noqa: BLE001
            pass
    try:
        ids |= read_heads(path("heads", unit))
    except Exception:  # noqa: BLE001
        pass
    return tuple(sorted(ids))


def trial_dir_damage(root: Path, d: Path, row: dict | None) -> list[Damage]:
    """A finished trial's directory: its record (`row`, as `read_trial_dir` read it), and an ok trial's
    predictions, head and patching points."""
    rec = (d / RECORD).relative_to(root).as_posix()
    if row is None or row.get("status") == "damaged":
        return [Damage(rec, (row or {}).get("error") or f"unreadable {RECORD}", (d.name,), rec)]
    if row.get("status") != "ok":
        return []
    n_test = row.get("n_test")
    checks = {"preds.parquet": lambda f: _test_rows(read_parquet_whole(f, ["split", *PRED_COLUMNS]), n_test),
              "head.safetensors": lambda f: None if read_heads(f) else "no tensors",
              "patch.parquet": lambda f: _read_through(f, PATCH_COLUMNS)}
    out = []
    for name, check in checks.items():
        f = d / name
        if name == "patch.parquet" and not f.is_file():  # a trial without patching has none
            continue
        try:
            why = check(f)
        except Exception as e:  # noqa: BLE001
            why = _why(e)
        if why:
            out.append(Damage(f.relative_to(root).as_posix(), why, (d.name,), rec))
    return out


def _read_through(f: Path, columns: list[str]) -> None:
    read_parquet_whole(f, columns)


def _test_rows(table, n_test) -> str | None:
    n = sum(1 for s in table.column("split").to_pylist() if s == "test")
    return None if n_test is None or n == int(n_test) else f"{n} test rows, its record counts {int(n_test)}"
