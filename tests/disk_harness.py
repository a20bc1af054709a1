"""A launch whose results root is a small filesystem that fills, then a --resume once there is room again.

    unshare -m python tests/disk_harness.py CONFIG.json

In a mount namespace of its own (nothing outside it sees the mount) it mounts a tmpfs of `size` over `results`,
runs `nsr-sweep launch`, and fills the tmpfs at the point `fill` names: `before` (the tmpfs is too small from the
start), `records` (once the first trial's record is in runs.jsonl) or `report` (once sweep_state.json says the
trials are done, before the report is built). Then it makes room (the tmpfs remounted at `room`, the filler
deleted), runs the same launch with --resume, and copies the results out to `copy` with harness.json: each
launch's exit code and output, and the state the failed launch left. Needs root (CI runs as root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def fill(directory: Path) -> int:
    """Write a filler file until the filesystem refuses another byte; returns how many it took."""
    fd, n = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o644), 0
    for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
        try:
            while True:
                n += os.write(fd, b"\0" * chunk)
        except OSError:
            continue
    os.close(fd)
    return n


def wait_for(what, p: subprocess.Popen, timeout: float = 600) -> bool:
    deadline = time.time() + timeout
    while p.poll() is None and time.time() < deadline:
        if what():
            return True
        time.sleep(0.02)
    return False


def status(sweep_dir: Path) -> str | None:
    try:
        return json.loads((sweep_dir / "sweep_state.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def main(cfg: dict) -> None:
    results, out = Path(cfg["results"]), Path(cfg["copy"])
    sweep_dir = results / cfg["name"]
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={cfg['size']}", "tmpfs", str(results)], check=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "NSR_CACHE_DIR": cfg["cache"]}
    launch = [sys.executable, "-m", "nsr_sweep.cli", "launch", cfg["sweep"], "--out", str(results), "--no-dashboard"]
    report: dict = {"launches": []}
    logs = [open(out / "first.out", "w+"), open(out / "first.err", "w+")]  # (pipes could fill while we wait)
    p = subprocess.Popen(launch, env=env, stdout=logs[0], stderr=logs[1], text=True)
    if cfg["fill"] == "records":
        runs = sweep_dir / "runs.jsonl"
        report["filled"] = wait_for(lambda: runs.is_file() and runs.stat().st_size > 0, p) and fill(results)
    elif cfg["fill"] == "report":
        report["filled"] = wait_for(lambda: status(sweep_dir) in ("finished", "incomplete"), p) and fill(results)
    p.wait(timeout=600)
    stdout, stderr = ((f.seek(0), f.read())[1] for f in logs)
    report["launches"].append({"rc": p.returncode, "stdout": stdout[-5000:], "stderr": stderr[-5000:]})
    report["state"] = json.loads((sweep_dir / "sweep_state.json").read_text()) if status(sweep_dir) else None
    report["runs_before"] = (sweep_dir / "runs.jsonl").read_text() if (sweep_dir / "runs.jsonl").is_file() else ""
    (results / "filler").unlink(missing_ok=True)
    subprocess.run(["mount", "-o", f"remount,size={cfg['room']}", str(results)], check=True)
    r = subprocess.run([*launch, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    report["launches"].append({"rc": r.returncode, "stdout": r.stdout[-5000:], "stderr": r.stderr[-5000:]})
    if sweep_dir.is_dir():
        shutil.copytree(sweep_dir, out / "results", dirs_exist_ok=True)
    (out / "harness.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
