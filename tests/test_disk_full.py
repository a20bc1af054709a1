"""A full disk, said in one line: a small tmpfs under the results root fills before the launch, while records are
written, and while the report is built (tests/disk_harness.py, in a mount namespace of its own). Each time: one
`error:` line naming the directory and its free space, exit code 2, no traceback, sweep_state.json `failed` with
that line (when the launch had started), and a --resume, once there is room, that finishes every trial once."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from nsr_sweep.sweep.disk import human

HARNESS = Path(__file__).with_name("disk_harness.py")

SWEEP = """
name: full
model: nsr-tiny
corpus: {n_texts: 160, max_tokens: 24}
layers: [1]
neurons: [3, 7, 12]
heads: [regression]
freeze: [none, after_target]
training: {epochs: 1, batch_size: 16}
search: {num_samples: 2, space: {lr: {loguniform: [1.0e-3, 1.0e-2]}}}
resources: {workers: 2, batch_neurons: 1}
"""
N_TRIALS = 3 * (1 + 2)  # per neuron: the exact probe once, the fine-tuned head twice


def _why_no_mount() -> str | None:
    """Why this machine cannot mount a private tmpfs (None: it can)."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs in a mount namespace of its own (CI runs as root)"
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount --make-rprivate / && mount -t tmpfs -o size=64k "
                            "tmpfs /mnt"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs here: {probe.stderr.strip()[:200]}"


WHY = _why_no_mount()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(WHY is not None, reason=WHY or "")]


def _harness(tmp_path: Path, fill: str, size: str) -> tuple[dict, Path]:
    sweep = tmp_path / "full.yaml"
    sweep.write_text(SWEEP)
    cfg = {"name": "full", "sweep": str(sweep), "results": str(tmp_path / "results"), "copy": str(tmp_path / "copy"),
           "cache": str(tmp_path / "cache"), "fill": fill, "size": size, "room": "64m"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = subprocess.run(["unshare", "-m", sys.executable, str(HARNESS), str(tmp_path / "cfg.json")],
                       capture_output=True, text=True, timeout=1500)
    report_file = tmp_path / "copy" / "harness.json"
    assert report_file.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(report_file.read_text()), tmp_path / "copy" / "results"


def _one_line(launch: dict) -> str:
    """The failed launch said why in one `error:` line, exit code 2, and no traceback."""
    errors = [line for line in launch["stderr"].splitlines() if line.startswith("error: ")]
    assert launch["rc"] == 2 and len(errors) == 1, launch["stderr"][-3000:]
    assert "Traceback" not in launch["stderr"] + launch["stdout"], launch["stderr"][-3000:]
    return errors[0]


def _resumed_once(report: dict, sweep_dir: Path) -> None:
    """The --resume finished every trial, each recorded once, every record valid."""
    resumed = report["launches"][1]
    assert resumed["rc"] == 0, resumed["stdout"][-3000:] + resumed["stderr"][-3000:]
    df = pd.read_parquet(sweep_dir / "tables" / "trials.parquet")
    assert len(df) == N_TRIALS and df["trial_id"].is_unique and (df["status"] == "ok").all(), df
    runs = Counter(json.loads(line)["trial_id"] for line in (sweep_dir / "runs.jsonl").read_text().splitlines())
    assert sorted(runs) == sorted(df["trial_id"]) and set(runs.values()) == {1}, runs
    state = json.loads((sweep_dir / "sweep_state.json").read_text())
    assert state["status"] == "finished" and state["n_missing"] == 0 and state["error"] is None
    assert (sweep_dir / "report.html").is_file()


@pytest.mark.timeout(1600)
def test_a_results_root_too_small_for_the_sweep_is_refused_before_ray(tmp_path):
    report, sweep_dir = _harness(tmp_path, "before", "1m")
    line = _one_line(report["launches"][0])
    assert f"--out: {tmp_path / 'results'} has " in line and f"free (of {human(2**20)})" in line
    assert "will write about" in line
    assert "starting" not in report["launches"][0]["stdout"] and report["state"] is None  # nothing started
    _resumed_once(report, sweep_dir)


@pytest.mark.timeout(1600)
@pytest.mark.parametrize("fill", ["records", "report"])
def test_a_disk_that_fills_ends_the_launch_in_one_line_and_resume_finishes_every_trial_once(tmp_path, fill):
    report, sweep_dir = _harness(tmp_path, fill, "24m")
    assert report["filled"], "the sweep ended before the disk could be filled"
    line = _one_line(report["launches"][0])
    assert line.startswith(f"error: no space left on device: {tmp_path / 'results'}")
    assert f" free (of {human(24 * 2**20)})" in line
    assert line.endswith(f"`nsr-sweep launch {tmp_path / 'full.yaml'} --out {tmp_path / 'results'} --no-dashboard "
                         "--resume`"), line
    state = report["state"]
    assert state["status"] == "failed" and state["error"] == line[len("error: "):]
    for row in report["runs_before"].split("\n")[:-1]:  # what was recorded before the disk filled stays readable
        json.loads(row)  # (a last line the disk cut short: no "\n", and the resume's claim removes it)
    _resumed_once(report, sweep_dir)
