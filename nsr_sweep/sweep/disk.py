"""A full disk, said in one line. Before Ray starts, what a sweep will write is estimated from its grid and the
bytes a probe and a trial were measured to write, and a results root that cannot hold it is refused; an
ENOSPC met later (a record, a table, Tune's or Optuna's state, sweep_state.json, the report) ends the launch
with one line naming the directory, its free space and the command that finishes the sweep.

Measured: benchmarks/RESULTS.md's every-neuron run (173.7 MB for 14,336 probes with 300 test texts each, in 16
units) and the tests' small sweep (4.8 MB for 12 fine-tuned trials and 3 one-probe units: each trial's directory
≈ 76 kB, Tune's experiment state ≈ 80 kB per Tune trial, a unit's records file ≈ 60 kB whatever its size, the
report 1.9 MB, figures and tables 0.6 MB).
"""

from __future__ import annotations

import errno
import logging
import math
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ..core.errors import NsrError
from ..core.spec import SweepSpec, split_sizes

PROBE_BYTES = 7_600  # a batched probe: head, patch points, record, its rows in the tables
PROBE_TEST_TEXT_BYTES = 14  # … and its predictions, per test text
UNIT_BYTES = 150_000  # a unit of probes: its files' fixed part, and its Tune trial's share of Tune's state
TRIAL_BYTES = 160_000  # a trial run alone: its directory (record, head, patch points, chart) and Tune's state
TRIAL_TEXT_BYTES = 16  # … and its predictions, every split, per text
SWEEP_BYTES = 2_500_000  # the sweep's own files: the report, its figures and tables, the studies, the state
UNITS_PER_LAYER = 4  # at least (`grid.unit_size` keeps every worker busy)
FULL = (errno.ENOSPC, errno.EDQUOT)


def estimate_bytes(spec: SweepSpec) -> int:
    """What the sweep will write into its results directory, at most (selectors counted at their k)."""
    from .grid import batch_key, expand, most_neurons, n_samples

    per_layer = most_neurons(spec)
    n_test = split_sizes(spec.corpus.n_texts, (spec.splits.train, spec.splits.val, spec.splits.test))[2]
    total = SWEEP_BYTES
    weights = _weight_bytes(spec) if spec.training.save_weights else 0
    batched, cells = False, per_layer * len(spec.layers)
    for g in expand(spec, {L: [0] for L in spec.layers}).templates:  # every (layer, neuron) has the same groups
        n = n_samples(spec, g) * cells
        if batch_key(spec, g) is not None:
            total, batched = total + n * (PROBE_BYTES + PROBE_TEST_TEXT_BYTES * n_test), True
        else:
            total += n * (TRIAL_BYTES + TRIAL_TEXT_BYTES * spec.corpus.n_texts + (weights if g.freeze != "none" else 0))
    units = min(per_layer, max(math.ceil(per_layer / spec.resources.batch_neurons), UNITS_PER_LAYER))
    return total + (UNIT_BYTES * units * len(spec.layers) if batched else 0)


def _weight_bytes(spec: SweepSpec) -> int:
    """A fine-tuned model's safetensors (float32), from its config: embeddings and 12·d² per block."""
    from ..core.models import model_shape

    s = model_shape(spec.model.name)
    d = s.get("d_model") or 0
    return 4 * ((s.get("d_vocab") or 0) * d + (s.get("n_ctx") or 0) * d + 12 * (s.get("n_layers") or 0) * d * d)


def check_room(spec: SweepSpec, sweep_dir: Path, storage: str | None = None) -> None:
    """Refuse, in one line, a results root whose free space cannot hold what the sweep still has to write (a
    resumed sweep's directory already holds part of it). Saved weights that go to --storage are not counted."""
    need, where, usage = _room(spec, sweep_dir, storage)
    if usage.free < need:
        raise NsrError(f"--out: {where} has {human(usage.free)} free (of {human(usage.total)}), and sweep "
                       f"{spec.name!r} will write about {human(need)}: free space there or choose another --out")


def room_line(spec: SweepSpec, sweep_dir: Path, storage: str | None = None) -> str:
    """What --dry-run says of the results directory."""
    need, where, usage = _room(spec, sweep_dir, storage)
    return f"  results: about {human(need)} to write into {sweep_dir} ({human(usage.free)} free there)"


def _room(spec: SweepSpec, sweep_dir: Path, storage: str | None):
    if storage and spec.training.save_weights:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"save_weights": False})})
    where = _existing(sweep_dir)
    return max(0, estimate_bytes(spec) - _size(sweep_dir)), where, shutil.disk_usage(where)


def _existing(path: Path) -> Path:
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _size(path: Path) -> int:
    """Bytes already under `path` (nothing when it does not exist)."""
    if not Path(path).is_dir():
        return 0
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and not f.is_symlink())


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def disk_full_error(e: BaseException | None) -> OSError | None:
    """The ENOSPC (or quota) error behind `e` — itself, or what it was raised from or while handling — or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None)  # Ray's RayTaskError: the exception the worker raised (a cache build's)
        if isinstance(inner, BaseException) and id(inner) not in seen:
            e = inner
            continue
        if isinstance(e, OSError) and (e.errno in FULL or "No space left on device" in str(e)):
            return e
        e = e.__cause__ or e.__context__
    return None


class DiskFull(NsrError):
    """The launch stopped because a disk filled: one line naming where, its free space, and what to run."""

    @classmethod
    def of(cls, error: OSError, sweep_dir: Path, resume: str) -> DiskFull:
        where = _where(error, sweep_dir)
        usage = shutil.disk_usage(where)
        return cls(f"no space left on device: {where} has {human(usage.free)} free (of {human(usage.total)}); "
                   f"the records written so far are kept: free space there, then `{resume}`")


def _where(error: OSError, sweep_dir: Path) -> Path:
    """The directory of the file that could not be written, or the results directory."""
    for name in (error.filename, error.filename2):
        if isinstance(name, (str, Path)) and str(name):
            return _existing(Path(name).parent if not Path(name).is_dir() else Path(name))
    return _existing(sweep_dir)


class _FullDiskLogs(logging.Filter):
    """Ray's and Tune's own log records of a full disk (Tune's syncer logs its experiment state's ENOSPC with a
    traceback, and goes on): not printed — the launch's one line says it — but passed to `note`, which stops
    the launch."""

    def __init__(self, note: Callable[[OSError], None]):
        super().__init__()
        self.note = note

    def filter(self, record: logging.LogRecord) -> bool:
        full = disk_full_error(record.exc_info[1]) if record.exc_info else None
        if full is None and "No space left on device" in str(record.msg):
            full = OSError(errno.ENOSPC, str(record.msg)[:300])
        if full is not None:
            self.note(full)
        return full is None


@contextmanager
def full_disk_logs_noted(note: Callable[[OSError], None]):
    """While it lasts, every handler of Ray's logger and of the root logger drops a full disk's records and
    passes their error to `note` (a handler's filter sees what Tune's many loggers send up to it)."""
    quiet = _FullDiskLogs(note)
    handlers = [*logging.getLogger("ray").handlers, *logging.getLogger().handlers]
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)
