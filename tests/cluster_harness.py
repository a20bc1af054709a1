"""A two-node Ray cluster on this machine, and a driver whose results directory no worker can see.

    unshare --pid --fork --mount-proc python tests/cluster_harness.py cluster CONFIG.json

`cluster` (pid 1 of a new pid namespace, so every process it starts dies with it) enters a new
network namespace (loopback only), starts a head node and a worker node with `ray start`, then runs
`driver` under `unshare -m`: a private tmpfs over the results directory (the workers' view of that
path stays empty), `nsr-sweep launch --address`, optionally killing the worker node's raylet and then
the driver mid-sweep and resuming; finally the private results are copied out for the test to read.
Needs root (CI runs as root).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PORT = 6391
NODE2_PORT = 46391  # the worker node's node-manager port: how its raylet is found


def run(cmd: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)


def raylet_pid(port: int) -> int | None:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"raylet") and f"--node_manager_port={port}".encode() in cmd:
                return int(p.name)
    return None


def cluster(cfg: dict) -> None:
    from nsr_sweep.sweep.localray import isolate_network

    isolate_network()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "500",
           "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "4",
           "RAY_health_check_initial_delay_ms": "1000"}
    gpu = json.dumps({"sim_gpu": 1})
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", f"--resources={gpu}", "--disable-usage-stats"]
    head = run(["ray", "start", "--head", f"--port={PORT}", "--include-dashboard=false", *common], env)
    node2 = run(["ray", "start", f"--address=127.0.0.1:{PORT}", f"--node-manager-port={NODE2_PORT}", *common], env)
    out = Path(cfg["copy"])
    out.mkdir(parents=True, exist_ok=True)
    if head.returncode or node2.returncode:
        (out / "harness.json").write_text(json.dumps({"error": head.stderr[-3000:] + node2.stderr[-3000:]}))
        return
    results = Path(cfg["results"])
    results.mkdir(parents=True, exist_ok=True)
    driver = run(["unshare", "-m", sys.executable, __file__, "driver", json.dumps(cfg)], env, timeout=900)
    report = json.loads((out / "harness.json").read_text()) if (out / "harness.json").is_file() else {}
    report["driver_stderr"] = driver.stderr[-3000:]
    report["workers_view"] = sorted(str(p.relative_to(results)) for p in results.rglob("*"))  # must stay empty
    (out / "harness.json").write_text(json.dumps(report))


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def driver(cfg: dict) -> None:
    results, out = Path(cfg["results"]), Path(cfg["copy"])
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(results)], check=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "NSR_CACHE_DIR": cfg["cache"]}
    launch = [sys.executable, "-m", "nsr_sweep.cli", "launch", cfg["sweep"], "--out", str(results),
              "--address", f"127.0.0.1:{PORT}", *cfg.get("args", [])]
    runs = results / cfg["name"] / "runs.jsonl"
    report: dict = {"launches": []}
    log = open(out / "driver.log", "w")
    p = subprocess.Popen(launch, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    for step in cfg.get("kill", []):  # [{"after": n, "what": "node" | "driver"}], in order
        while lines(runs) < step["after"] and p.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        if p.poll() is not None:
            report["error"] = f"the sweep ended before {step['what']} could be killed"
            break
        if step["what"] == "node":
            pid = raylet_pid(NODE2_PORT)
            report["killed_raylet"], report["records_at_node_kill"] = pid, lines(runs)
            if pid:
                os.kill(pid, signal.SIGKILL)
        else:
            p.kill()
            report["launches"].append({"rc": p.wait(), "records_before": lines(runs)})
            time.sleep(2)
            p = subprocess.Popen([*launch, "--resume"], env=env, stdout=log, stderr=subprocess.STDOUT)
    report["launches"].append({"rc": p.wait(timeout=max(1, deadline - time.time()))})
    log.close()
    shutil.copytree(results, out / "results", dirs_exist_ok=True)
    (out / "harness.json").write_text(json.dumps(report))


if __name__ == "__main__":
    {"cluster": cluster, "driver": driver}[sys.argv[1]](json.loads(Path(sys.argv[2]).read_text())
                                                       if sys.argv[1] == "cluster" else json.loads(sys.argv[2]))
