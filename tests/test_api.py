"""The Python API: docs/python.md's example runs as written, and `launch` leaves the caller's process alone."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import nsr_sweep
from nsr_sweep.core.errors import NsrError

REPO = Path(__file__).resolve().parents[1]

CHECKS = '''
# -- the test's own checks, in the same process ------------------------------------------------------------
import os, socket, threading
import pandas as pd
import torch

for name in ("trials", "best", "comparison", "comparison_by_layer"):  # DataFrames equal to the Parquet tables
    pd.testing.assert_frame_equal(getattr(res, name), pd.read_parquet(res.path / "tables" / f"{name}.parquet"))
assert res.state["status"] == "finished" and res.report_path.is_file()
assert len(p.preds) == p.metrics["n_test"] and set(p.preds["split"]) == {"test"}   # a batched probe: test split
assert torch.is_tensor(p.head["weight"]) and p.patch["delta_pred"].notna().all() and p.model_path is None
assert p.spec["freeze"] == "none" and not (res.path / "trials" / p.trial_id).exists()  # rows, not a directory
assert set(f.preds["split"]) == {"train", "val", "test"} and f.head["weight"].shape[-1] == 128
text = res.trials.query("control == 'input_only'").iloc[0]["trial_id"]
assert res.trial(text).head is None and res.trial(text).metrics["patch_slope"] == 0.0

def process_state():
    kids = [p for p in os.listdir("/proc") if p.isdigit() and
            open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == str(os.getpid())]
    return os.readlink("/proc/self/ns/net"), dict(os.environ), len(os.listdir("/proc/self/task")), kids

before = process_state()
nsr_sweep.launch({**sweep, "name": "second", "freeze": ["none"], "heads": ["regression"]}, out=out, quiet=True)
after = process_state()
assert after[0] == before[0], "the network namespace changed"
assert after[1] == before[1], "the environment changed"
assert after[2] == before[2] and after[3] == [], (after[2], before[2], after[3])  # no thread, no child left
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)  # the host's loopback still answers
socket.create_connection(server.getsockname(), timeout=5).close(); server.close()
try:
    nsr_sweep.launch({**sweep, "layers": [9]}, out=out, quiet=True)
except nsr_sweep.core.errors.NsrError as e:  # bad input: the CLI's one-line message, raised
    assert "layers: 9 is out of range" in str(e), e
else:
    raise AssertionError("a bad sweep launched")
print("CHECKS OK")
'''


@pytest.mark.slow
def test_the_python_page_runs_as_written_and_launch_leaves_the_process_alone():
    """docs/python.md's example in a fresh process (a trial, a launch, open_results, .trial on a batched probe and
    on an unfrozen trial), then a second launch: the caller's network namespace, environment, threads and
    children are as they were, and the host's loopback still answers."""
    page = (REPO / "docs" / "python.md").read_text()
    code = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(code) == 1
    env = {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    import os

    env.update({k: v for k, v in os.environ.items() if k in ("NSR_CACHE_DIR", "PYTHONPATH", "VIRTUAL_ENV")})
    r = subprocess.run([sys.executable, "-c", code[0] + CHECKS], capture_output=True, text=True, timeout=900,
                       env=env, cwd=REPO)
    assert r.returncode == 0 and "CHECKS OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


def test_the_public_names_are_listed_and_load_lazily():
    import importlib

    assert {"load_sweep", "build_cache", "TrialSpec", "run_trial", "launch", "open_results"} <= set(nsr_sweep.__all__)
    for name in nsr_sweep.__all__:
        assert getattr(nsr_sweep, name) is not None
    out = subprocess.run([sys.executable, "-c", "import sys, nsr_sweep; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # `import nsr_sweep` (and the CLI) stay light
    assert importlib.import_module("nsr_sweep").TrialSpec(layer=1, neuron=2).training.lr == 1e-3  # the sweep file's default


def test_load_sweep_is_the_cli_validation_pass(tmp_path):
    good = {"name": "x", "layers": [1], "neurons": [3], "heads": ["regression"], "freeze": ["none"]}
    spec = nsr_sweep.load_sweep(good)
    assert spec.model.name == "nsr-tiny" and spec.corpus.n_texts == 2000
    with pytest.raises(NsrError, match=r"layers: 7 is out of range for nsr-tiny: allowed 0\.\.3"):
        nsr_sweep.load_sweep({**good, "layers": [7]})
    with pytest.raises(NsrError, match="unknown key"):
        nsr_sweep.load_sweep({**good, "lyers": [1]})
    with pytest.raises(NsrError, match="unknown option 'worker'"):
        nsr_sweep.launch(good, out=tmp_path, worker=2)
    with pytest.raises(NsrError, match="is not a sweep directory"):
        nsr_sweep.open_results(tmp_path)
