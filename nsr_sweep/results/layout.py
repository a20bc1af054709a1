"""The sweep directory's owner: its paths, lock, state file and resolved sweep file (the records inside it
are `records`'s).

    results/<name>/sweep.yaml · sweep_state.json · sweep.lock · runs.jsonl · optuna.log · trials/<trial_id>/ · probes/

Neither Ray nor Optuna is imported here, so `nsr-sweep status` and `report` stay light.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path

import yaml

from ..core.errors import NsrError
from ..core.files import atomic_write, json_bytes
from ..core.spec import METHOD_VERSION, SweepSpec, dump_sweep, load_sweep

STATE = "sweep_state.json"
LOCK = "sweep.lock"
RESOLVED = "sweep.yaml"
RUNS = "runs.jsonl"
TRIALS = "trials"
RECORD = "metrics.json"  # a trial's record, written last: finished (ok or failed) once it exists
PROBES = "probes"  # batched probes' records, predictions, patching points and heads: Parquet datasets (records.py)
STUDIES = "optuna.log"  # every searched group's Optuna study (a JournalStorage file; `optuna-dashboard` opens it)


def trial_dir(sweep_dir: Path | str, trial_id: str) -> Path:
    return Path(sweep_dir) / TRIALS / trial_id


def resolved_spec(sweep_dir: Path) -> SweepSpec:
    """The sweep a results directory holds, or an error saying it is not one."""
    if not (sweep_dir / RESOLVED).is_file():
        raise NsrError(f"{sweep_dir} is not a sweep directory (no {RESOLVED}): give results/<name>")
    return load_sweep(sweep_dir / RESOLVED)


def log_run(sweep_dir: Path | str, trial_id: str, worker: dict) -> None:
    """One line per trial record written (audits "exactly once"): the trial, and the worker (pid, node) that ran it."""
    with open(Path(sweep_dir) / RUNS, "a") as log:
        log.write(json.dumps({"trial_id": trial_id, **worker, "time": time.time()}) + "\n")


def backfill_runs(sweep_dir: Path, trial_ids: list[str]) -> int:
    """A line for each recorded trial runs.jsonl lacks (a launch killed between the record and its line)."""
    f = Path(sweep_dir) / RUNS
    logged = set()
    for line in f.read_text().splitlines() if f.is_file() else []:
        try:
            logged.add(json.loads(line)["trial_id"])
        except (ValueError, KeyError, TypeError):
            continue
    missing = [t for t in trial_ids if t not in logged]
    for t in missing:
        log_run(sweep_dir, t, {"backfilled": True})
    return len(missing)


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie — a killed launch its new parent has not reaped yet — does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): kill(0) is all there is
        return True


_HELD: dict[Path, int] = {}  # sweep dir → the open, flock-ed lock file of this process's launch


def _owner(lock: Path) -> dict:
    """The lock's owner record ({} when unreadable: a damaged lock is no reason to crash)."""
    try:
        owner = json.loads(lock.read_text() or "{}")
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _flocked(lock: Path) -> bool:
    """Whether some live process holds the lock (the kernel drops a flock when its holder dies)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own shared lock


def lock_holder(sweep_dir: Path) -> dict | None:
    """The owner of the launch running in `sweep_dir`, or None when none is alive (a stale lock is not one)."""
    lock = Path(sweep_dir) / LOCK
    if not lock.is_file():
        return None
    owner = _owner(lock)
    pid = owner.get("pid")
    same_host_alive = owner.get("host") == socket.gethostname() and isinstance(pid, int) and _alive(pid)
    return (owner or {"pid": "?"}) if _flocked(lock) or same_host_alive else None


def run_state(sweep_dir: Path) -> str:
    """running | finished | failed | interrupted (recorded as running, but no launch holds the directory)."""
    status = read_state(sweep_dir).get("status", "unknown")
    if status == "running" and lock_holder(sweep_dir) is None:
        return "interrupted"
    return status


def claim(sweep_dir: Path, spec: SweepSpec, resume: bool) -> None:
    """Lock the directory (an exclusive flock: two launches cannot both hold it), then refuse one that holds
    another sweep; a stale lock (its launch died) is taken over."""
    lock = sweep_dir / LOCK
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise NsrError(f"--out: cannot write the results directory {sweep_dir} ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = _owner(lock).get("pid", "?")
        raise NsrError(f"{sweep_dir}: sweep {spec.name!r} is still running (pid {pid}); wait for it or stop it "
                       "first") from None
    try:
        _check_same_sweep(sweep_dir, spec, resume)
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
    _HELD[sweep_dir] = fd
    remove_partial_writes(sweep_dir)
    atomic_write(sweep_dir / RESOLVED, lambda tmp: tmp.write_text(dump_sweep(spec)))


PARTIAL = re.compile(r"^\..+\.[A-Za-z0-9_]{8}")  # results.atomic_write's temp names: .<name>.<8 random>[suffix]


def remove_partial_writes(sweep_dir: Path) -> list[Path]:
    """What a killed launch was writing when it died (the whole file never landed): deleted by the next
    launch, which holds the lock, so nothing is being written now."""
    import shutil

    gone = []
    study_lock = sweep_dir / f"{STUDIES}.lock"  # the journal's lock, if a killed launch held it (Optuna would wait 30 s)
    if study_lock.is_symlink() or study_lock.exists():
        study_lock.unlink()
        gone.append(study_lock)
    gone += [f for f in (sweep_dir / RUNS, sweep_dir / STUDIES) if _cut_partial_line(f)]
    for d in (sweep_dir, sweep_dir / "tables", sweep_dir / TRIALS, *sweep_dir.glob(f"{TRIALS}/*/"),
              *sweep_dir.glob(f"{PROBES}/*/")):
        for p in d.iterdir() if d.is_dir() else []:
            if PARTIAL.match(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                gone.append(p)
    return gone


def _cut_partial_line(log: Path) -> bool:
    """An append-only log (runs.jsonl, the studies' journal) whose last line a full disk or a kill cut short: that
    line removed (the next append would run into it and make both unreadable). Whether it had one."""
    try:
        with open(log, "r+b") as f:
            if f.seek(0, os.SEEK_END) == 0 or (f.seek(-1, os.SEEK_END) >= 0 and f.read(1) == b"\n"):
                return False
            f.seek(0)
            f.truncate(f.read().rfind(b"\n") + 1)  # rare: read whole only when the last line is cut
            return True
    except FileNotFoundError:
        return False


def _check_same_sweep(sweep_dir: Path, spec: SweepSpec, resume: bool) -> None:
    """A directory that holds finished trials takes only --resume with the same sweep file; one where no
    trial has run yet (a launch that failed early) takes the fixed file."""
    resolved = sweep_dir / RESOLVED
    if not resolved.is_file() or not (any((sweep_dir / TRIALS).glob("*/" + RECORD)) or
                                      any((sweep_dir / PROBES / "records").glob("*.parquet"))):
        return
    if not resume:
        raise NsrError(f"{sweep_dir} already holds sweep {spec.name!r}: pass --resume to finish it, "
                       "or choose another name")
    state = read_state(sweep_dir)
    made_by = state.get("method_version", 1)  # directories from before the field: version 1
    if made_by != METHOD_VERSION and state.get("status") != "damaged":  # a damaged state cannot say: go on
        raise NsrError(f"{sweep_dir} was made by an nsr-sweep that computes trials differently (method {made_by}, "
                       f"this one {METHOD_VERSION}: binned heads' bins changed): --resume would mix the two; "
                       "launch it under a new name")
    try:  # with every default filled in, as this version fills them (a field added since is no change)
        before = yaml.safe_load(dump_sweep(load_sweep(resolved)))
    except NsrError:
        before = {}
    after = yaml.safe_load(dump_sweep(spec))
    if before != after:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)) \
            if isinstance(before, dict) else ["(unreadable)"]
        raise NsrError(f"{sweep_dir}: the sweep file changed since the first launch ({', '.join(changed)}); "
                       "--resume needs the same file (or use a new name)")


def release(sweep_dir: Path) -> None:
    """Drop this process's lock (the file goes first, so nobody reads a lock nobody holds)."""
    fd = _HELD.pop(sweep_dir, None)
    if fd is not None:
        (sweep_dir / LOCK).unlink(missing_ok=True)
        os.close(fd)


def read_state(sweep_dir: Path) -> dict:
    """sweep_state.json, or {"status": "damaged"} when it cannot be read (readers go on without it)."""
    f = Path(sweep_dir) / STATE
    if not f.is_file():
        return {}
    try:
        state = json.loads(f.read_text())
        return state if isinstance(state, dict) else {"status": "damaged"}
    except (OSError, ValueError):
        return {"status": "damaged"}


STATE_ROOM = 4096  # spare bytes (trailing spaces, which JSON ignores) that a full disk cannot take from the state


def update_state(sweep_dir: Path, **kw) -> dict:
    """sweep_state.json updated, written whole; on a full disk, rewritten in place within its spare room (so a
    launch stopped by the disk can still record why)."""
    state = {**read_state(sweep_dir), **kw}
    f, data = Path(sweep_dir) / STATE, json_bytes(state)
    try:
        atomic_write(f, lambda tmp: tmp.write_bytes(data + b" " * STATE_ROOM))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not _rewrite_in_place(f, data):
            raise
    return state


def _rewrite_in_place(f: Path, data: bytes) -> bool:
    """The state over the old file's own bytes, padded to its length (no new block is needed); False when it
    does not fit."""
    try:
        size = f.stat().st_size
    except OSError:
        return False
    if len(data) > size:
        return False
    with open(f, "r+b") as out:
        out.write(data + b" " * (size - len(data)))
        out.flush()
        os.fsync(out.fileno())
    return True
