"""Distributed for real: a two-node Ray cluster (`ray start`) and a driver whose results directory no
worker can see (its own mount namespace with a tmpfs; see cluster_harness.py). Needs root, as CI has."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest

HARNESS = Path(__file__).with_name("cluster_harness.py")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: it starts Ray nodes in their own pid and "
                                "network namespaces and a driver in a private mount namespace (CI runs it as root)")

SWEEP = """
name: dist
model: nsr-tiny
corpus: {n_texts: 160, max_tokens: 24}
layers: [1]
neurons: {neurons}
heads: [regression]
freeze: [none, after_target]
training: {epochs: 2, batch_size: 16, save_weights: true}
search: {num_samples: 2, space: {lr: {loguniform: [1.0e-3, 1.0e-2]}}}
resources: {gpus_per_worker: 0.5, gpu_resource: sim_gpu, device: cpu, batch_neurons: 1}
max_failures: 3
"""


def n_trials(neurons: list) -> int:
    return len(neurons) * (1 + 2)  # the probe (freeze none) once, the fine-tuned head twice


def _harness(tmp_path: Path, neurons: list, **cfg) -> tuple[dict, Path]:
    sweep = tmp_path / "dist.yaml"
    sweep.write_text(SWEEP.replace("{neurons}", json.dumps(neurons)))
    cfg = {"name": "dist", "sweep": str(sweep), "results": str(tmp_path / "results"), "copy": str(tmp_path / "copy"),
           "cache": str(tmp_path / "cache"), **cfg}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(HARNESS), "cluster",
                        str(tmp_path / "cfg.json")], capture_output=True, text=True, timeout=1200)
    report_file = tmp_path / "copy" / "harness.json"
    assert report_file.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(report_file.read_text())
    log = (tmp_path / "copy" / "driver.log").read_text() if (tmp_path / "copy" / "driver.log").is_file() else ""
    assert "error" not in report, report.get("error", "") + log[-3000:]
    return report, tmp_path / "copy" / "results" / "dist"


def _check_results(sweep_dir: Path, n: int) -> pd.DataFrame:
    """Every trial's row, record and artefacts are in the driver's private results directory, once."""
    df = pd.read_parquet(sweep_dir / "tables" / "trials.parquet")
    assert len(df) == n and df["trial_id"].is_unique and (df["status"] == "ok").all(), df[["trial_id", "error"]]
    runs = Counter(json.loads(line)["trial_id"] for line in (sweep_dir / "runs.jsonl").read_text().splitlines())
    assert sorted(runs) == sorted(df["trial_id"]) and set(runs.values()) == {1}  # every trial recorded once
    from nsr_sweep.results.store import open_store

    store = open_store(sweep_dir)
    preds = store.test_predictions()
    for t, freeze in zip(df["trial_id"], df["freeze"]):
        d = sweep_dir / "trials" / t
        if freeze == "none":  # a probe: a row of its unit's Parquet files, which travelled through Ray too
            assert store.record(t)["status"] == "ok" and store.head(t) is not None
            assert (preds["trial_id"] == t).any() and not d.exists()
        else:
            assert all((d / f).is_file() for f in ("metrics.json", "head.safetensors", "preds.parquet",
                                                    "diagnostics.png"))
    state = json.loads((sweep_dir / "sweep_state.json").read_text())
    assert state["status"] == "finished" and state["n_expected"] == n and state["n_missing"] == 0
    studies = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep_dir / "optuna.log")))
    names = [s.study_name for s in optuna.get_all_study_summaries(studies)]
    assert names and all(name.endswith("-after_target") for name in names)  # an exact probe searches nothing
    for name in names:  # what `optuna-dashboard results/dist/optuna.log` shows
        done = [t for t in optuna.load_study(study_name=name, storage=studies).trials if t.state.name == "COMPLETE"]
        assert len(done) == 2 and len({t.user_attrs["trial_id"] for t in done}) == 2, name
    assert (sweep_dir / "report.html").is_file()
    return df


@pytest.mark.slow
def test_results_reach_a_driver_that_shares_no_disk_with_the_workers(tmp_path):
    """Four model workers on two nodes, two per simulated GPU (`gpus_per_worker: 0.5` of a custom resource);
    saved weights travel through Ray like everything else (no --storage)."""
    report, sweep_dir = _harness(tmp_path, [3, 7, 11])
    assert [x["rc"] for x in report["launches"]] == [0], report["driver_stderr"]
    assert report["workers_view"] == []  # the workers' side of the results path: nothing was written there
    _check_results(sweep_dir, n_trials([3, 7, 11]))
    state = json.loads((sweep_dir / "sweep_state.json").read_text())
    nodes = Counter(w["node"] for w in state["worker_info"])
    assert state["workers"] == 4 and sorted(nodes.values()) == [2, 2]  # two workers share each simulated GPU
    assert all(w["env"].get("NSR_CACHE_DIR") == str(tmp_path / "cache") for w in state["worker_info"])  # runtime_env
    assert any((tmp_path / "cache").iterdir())  # the workers built the cache where the driver said
    after = sweep_dir / "trials" / "L1-N3-regression-after_target-s0"
    assert (after / "model" / "model.safetensors").is_file() and (after / "model" / "config.json").is_file()
    runs = [json.loads(line) for line in (sweep_dir / "runs.jsonl").read_text().splitlines()]
    assert len({r["node"] for r in runs}) == 2  # both nodes ran trials


@pytest.mark.slow
def test_a_node_and_then_the_driver_die_mid_sweep_and_nothing_is_lost(tmp_path):
    """The worker node's raylet is killed after 3 records, the driver after 8 (of 15); `--resume` finishes the sweep on
    the head node alone: every trial exactly once. Saved weights go to --storage (a path both nodes see)."""
    storage = tmp_path / "store"
    neurons = [3, 7, 11, 19, 23]
    report, sweep_dir = _harness(tmp_path, neurons, args=["--storage", str(storage)],
                                 kill=[{"after": 3, "what": "node"}, {"after": 8, "what": "driver"}])
    assert report["killed_raylet"], report
    rcs = [x["rc"] for x in report["launches"]]
    assert rcs == [-9, 0], report["driver_stderr"]  # the first launch was SIGKILLed, the resume succeeded
    # the first launch went on after the node died (its trials reran on the head node), then was killed
    assert report["records_at_node_kill"] < report["launches"][0]["records_before"] < n_trials(neurons)
    assert report["workers_view"] == []
    df = _check_results(sweep_dir, n_trials(neurons))
    state = json.loads((sweep_dir / "sweep_state.json").read_text())
    assert state["workers"] == 2 and len({w["node"] for w in state["worker_info"]}) == 1  # the head node alone
    for t in df.loc[df["freeze"] == "after_target", "trial_id"]:
        uri = json.loads((sweep_dir / "trials" / t / "metrics.json").read_text())["metrics"]["model_uri"]
        assert uri == f"{storage}/dist/trials/{t}/model" and (Path(uri) / "model.safetensors").is_file()
        assert not (sweep_dir / "trials" / t / "model").exists()
