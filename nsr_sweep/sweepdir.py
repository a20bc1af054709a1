"""The sweep directory's owner: its lock, its state file and its resolved sweep file.

Neither Ray nor Optuna is imported here, so `nsr-sweep status` and `report` stay light.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import yaml

from .config import SweepSpec, dump_sweep
from .errors import NsrError
from .results import atomic_write, write_json

STATE = "sweep_state.json"
LOCK = "sweep.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(sweep_dir: Path, spec: SweepSpec, resume: bool) -> None:
    """Refuse a directory whose sweep is running, or that holds another sweep; then lock it."""
    lock = sweep_dir / LOCK
    if lock.is_file():
        owner = json.loads(lock.read_text() or "{}")
        if owner.get("host") == socket.gethostname() and _alive(int(owner.get("pid", -1))):
            raise NsrError(f"{sweep_dir}: sweep {spec.name!r} is still running (pid {owner['pid']}); "
                           "wait for it or stop it first")
    resolved = sweep_dir / "sweep.yaml"
    if resolved.is_file():
        if not resume:
            raise NsrError(f"{sweep_dir} already holds sweep {spec.name!r}: pass --resume to finish it, "
                           "or choose another name")
        before = yaml.safe_load(resolved.read_text())
        if before != yaml.safe_load(dump_sweep(spec)):
            raise NsrError(f"{sweep_dir}: the sweep file changed since the first launch; --resume needs the "
                           "same file (or use a new name)")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(lock, {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
    atomic_write(resolved, lambda tmp: tmp.write_text(dump_sweep(spec)))


def release(sweep_dir: Path) -> None:
    lock = sweep_dir / LOCK
    if lock.is_file() and json.loads(lock.read_text() or "{}").get("pid") == os.getpid():
        lock.unlink()


def read_state(sweep_dir: Path) -> dict:
    f = Path(sweep_dir) / STATE
    return json.loads(f.read_text()) if f.is_file() else {}


def update_state(sweep_dir: Path, **kw) -> dict:
    state = {**read_state(sweep_dir), **kw}
    write_json(Path(sweep_dir) / STATE, state)
    return state
