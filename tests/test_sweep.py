"""Sweep files, the trial grid, and whole sweeps on local Ray (2 CPUs): end to end, SIGKILL + resume."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from nsr_sweep.cli import main
from nsr_sweep.core.errors import NsrError
from nsr_sweep.core.spec import GridPoint, TrialBatch, TrialSettings, load_sweep, parse_sweep, parse_trial_id
from nsr_sweep.results.schema import spec_columns, spec_json
from nsr_sweep.sweep.grid import (
    PROBE_TEXT_BYTES,
    UNIT_SHARE,
    batch_of,
    dry_run_text,
    expand,
    expected_trials,
    n_expected,
    n_samples,
    tracker_params,
    tune_config,
    unit_size,
)
from nsr_sweep.sweep.options import LaunchOptions
from nsr_sweep.sweep.search import GroupedSearch
from nsr_sweep.sweep.workers import worker_memory

REPO = Path(__file__).resolve().parents[1]
BASE = {"name": "t", "model": "nsr-tiny", "layers": [1], "neurons": [3], "heads": ["regression"], "freeze": ["none"]}


def one(config):
    """The one trial a (non-unit) Tune config holds, as the worker rebuilds it."""
    (spec,) = batch_of(config).specs()
    return spec


def row_of(config, **kw) -> dict:
    """The trial-table row a finished trial of this config would leave (its identity and hyperparameters)."""
    return {**spec_columns(spec_json(one(config))), **kw}


def with_(**kw):
    d = json.loads(json.dumps(BASE))
    for k, v in kw.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    return d


MALFORMED = [
    (with_(colour="blue"), "colour: unknown key"),
    (with_(search={"num_samples": 2, "algoritm": "optuna"}), "search.algoritm: unknown key"),
    (with_(layers="1"), "layers"),
    (with_(layers=[]), "layers"),
    (with_(layers=[9]), "layers: 9 is out of range for nsr-tiny: allowed 0..3"),
    (with_(layers=[-1]), "layers.0"),
    (with_(layers=[1, 1]), "layers has duplicates"),
    (with_(neurons=[512]), "neurons: 512 is out of range for nsr-tiny: allowed 0..511"),
    (with_(neurons=[]), "neurons"),
    (with_(neurons=[{"select": "top_entropy", "k": 3}]), "neurons"),
    (with_(neurons=[{"select": "top_variance", "k": 600}]), "k=600 exceeds d_mlp=512"),
    (with_(heads=["linear"]), "heads.0"),
    (with_(heads=[]), "heads"),
    (with_(freeze=["some"]), "freeze.0"),
    (with_(heads=["token"], freeze=["none"]), "no valid (head, freeze) combination"),
    (with_(model="nobody/missing-model"), "'nobody/missing-model' was not found locally"),
    (with_(model={"name": "nsr-tiny", "processing": "folded"}), "model.processing"),
    (with_(search={"space": {"lr": {"loguniform": [0, 1]}}}), "loguniform needs low > 0"),
    (with_(search={"space": {"lr": {"loguniform": [1e-2, 1e-3]}}}), "low < high"),
    (with_(search={"space": {"lr": {"uniform": [0.1, 0.2], "int": [1, 2]}}}), "exactly one of"),
    (with_(search={"space": {"momentum": {"uniform": [0.1, 0.2]}}}), "unknown hyperparameter 'momentum'"),
    (with_(search={"metric": "val_mse", "mode": "max"}), "does not fit metric"),
    (with_(search={"metric": "test_mse"}), "search.metric"),
    (with_(search={"scheduler": "hyperband"}), "search.scheduler"),
    (with_(target={"hook": "mlp_out"}), "target.hook"),
    (with_(features={"hook": "resid final"}), "features.hook"),
    (with_(features={"hook": "blocks.1.attn.hook_z"}), "features.hook 'blocks.1.attn.hook_z' is not a hook nsr-sweep"),
    (with_(features={"hook": "blocks.7.hook_resid_post"}), "features.hook 'blocks.7.hook_resid_post': layer out"),
    (with_(corpus={"n_texts": 5}), "corpus.n_texts"),
    (with_(splits={"train": 0.8, "val": 0.15, "test": 0.15}), "train + val + test must be 1"),
    (with_(name="bad name/with slash"), "name"),
    (with_(name=None), "name: Field required"),
    (with_(resources={"workers": 0}), "workers must be >= 1"),
    ("just a string", "must be a mapping"),
    # search spaces are checked against the bounds and types of the training fields they override
    (with_(search={"space": {"lr": {"uniform": [-1, 1]}}}), "search.space.lr: -1.0 is not a valid lr"),
    (with_(search={"space": {"epochs": {"int": [-5, -1]}}}), "search.space.epochs: -5 is not a valid epochs"),
    (with_(search={"space": {"batch_size": {"choice": [0]}}}), "search.space.batch_size: 0 is not a valid"),
    (with_(search={"space": {"epochs": {"uniform": [1, 5]}}}), "epochs is an integer; use int"),
    (with_(search={"space": {"lr": {"choice": ["fast"]}}}), "search.space.lr: 'fast' is not a valid lr"),
    (with_(search={"space": {"lr": {"choice": [[1e-3]]}}}), "search.space.lr: [0.001] is not a valid lr"),
    (with_(search={"space": {"lr": {"uniform": [1e-3, float("inf")]}}}), "search.space.lr: inf is not a valid lr"),
    (with_(search={"space": {"lr": {"choice": [1000]}}}), "search.space.lr: 1000 is not a valid lr"),
    (with_(search={"space": {"weight_decay": {"choice": [1e6]}}}), "search.space.weight_decay: 1000000.0"),
    (with_(search={"scheduler": "asha"}), "needs a scale-free metric: allowed val_pearson_r, val_skill"),
    (with_(corpus={"source": "/nope/corpus.txt"}), "corpus.source '/nope/corpus.txt' not found"),
    (with_(corpus={"source": "builtin:wikipedia"}), "'builtin:wikipedia' is not a built-in corpus"),
    (with_(corpus={"n_texts": 30}, splits={"train": 0.9, "val": 0.05, "test": 0.05}), "each needs ≥ 2"),
    (with_(corpus={"max_tokens": 1000}), "corpus.max_tokens 1000 exceeds the 256 positions of nsr-tiny"),
    (with_(training={"suffix": " {foo} Answer:"}), "suffix may use only the placeholders"),
    (with_(training={"suffix": " {layer Answer:"}), "suffix may use only the placeholders"),
    (with_(training={"solver": "lstsq"}), "training.solver"),
    (with_(controls=[{"cross_model": "nobody/other"}]), "controls: cross_model: model 'nobody/other' was not found"),
    (with_(controls=["shuffled", "shuffled"]), "controls has duplicates"),
    ("a: " + "[" * 3000 + "]" * 3000, "nested deeper than 50 levels"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")), "more than 50 aliases"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(  # 45 aliases, 9⁶ values once expanded: a small bomb
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcde", "bcdef")), "expands to more than 100,000"),
]


@pytest.mark.parametrize("data, needle", MALFORMED, ids=[f"bad{i}" for i in range(len(MALFORMED))])
def test_malformed_sweep_files_are_rejected_before_ray(tmp_path, data, needle):
    import ray

    f = tmp_path / "bad.yaml"
    f.write_text(data if isinstance(data, str) and data.startswith("a:") else yaml.safe_dump(data))
    for extra in ([], ["--dry-run"]):  # --dry-run runs the same validation pass
        t0 = time.perf_counter()
        r = CliRunner().invoke(main, ["launch", str(f), "--out", str(tmp_path / "res"), *extra])
        elapsed = time.perf_counter() - t0
        assert r.exit_code == 2, r.output
        assert needle in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
        assert elapsed < 2.0 and not ray.is_initialized() and not (tmp_path / "res").exists()


def test_a_valid_sweep_file_has_defaults_and_expands():
    spec = parse_sweep(with_(heads=["regression", "token"], freeze=["none", "all"], layers=[0, 2], neurons=[1, 5]))
    assert spec.combos() == [("regression", "none"), ("regression", "all"), ("token", "all")]
    assert spec.skipped_combos() == [("token", "none")]
    groups = expand(spec, {0: [1, 5], 2: [1, 5]})
    assert len(groups) == 2 * 2 * 3 and all(isinstance(g, GridPoint) and g.sample == 0 for g in groups)
    text = dry_run_text(spec)
    # regression/none is an exact probe, solved once; the 8 unfrozen groups take 4 samples each
    assert "skipped invalid combinations: 1 (token+none" in text and "≤12 groups, ≤36 trials" in text
    assert sum(n_samples(spec, g) for g in groups) == 4 * 1 + 8 * 4


def test_bundled_sweep_files_are_valid():
    for f in ("quickstart.yaml", "layer8.yaml", "every-neuron.yaml", "every-neuron-gpt2.yaml"):
        load_sweep(REPO / "sweeps" / f)
    every = load_sweep(REPO / "sweeps" / "every-neuron.yaml")
    text = dry_run_text(every)
    assert "≤4096 groups, ≤4096 trials" in text
    assert "controls shuffled, cross_model, input_only (cross_model: nsr-tiny-seed1): ≤10240 more groups" in text
    q = load_sweep(REPO / "sweeps" / "quickstart.yaml")
    assert q.model.name == "nsr-tiny" and len(q.layers) == 2 and len(q.combos()) == 8
    assert sum(n.k for n in q.neurons) >= 2 and q.cross_model == "nsr-tiny-seed1" and "input_only" in q.control_names


def test_grouped_search_skips_finished_samples_and_tells_optuna():
    spec = parse_sweep(with_(search={"num_samples": 3, "space": {"lr": {"loguniform": [1e-4, 1e-2]}}},
                             heads=["regression", "classification"], training={"solver": "adamw"}))
    groups = expand(spec, {1: [3]})
    done = [{**groups[0].model_dump(), "trial_id": "L1-N3-regression-none-s1", "sample": 1, "status": "ok",
             "val_mse": 0.5, "lr": 1e-3}]
    s = GroupedSearch(spec, groups, done)
    assert s.n_remaining == 5
    configs = [s.suggest(f"t{i}") for i in range(5)]
    assert s.suggest("t5") == "FINISHED"
    ids = [c["trial_id"] for c in configs]
    assert "L1-N3-regression-none-s1" not in ids and len(set(ids)) == 5
    assert [one(c).sample for c in configs] == [0, 0, 1, 2, 2]  # first samples of every group go first
    assert all(1e-4 <= one(c).training.lr <= 1e-2 and c["params"]["lr"] == one(c).training.lr for c in configs)
    assert len(s.studies[(1, 3, "regression", "none", "")].trials) == 1 + 2


def test_studies_persist_and_a_resume_reloads_them_without_telling_twice(tmp_path):
    """Every searched group's study lives in results/<name>/optuna.log: a second launch finds what the first
    told, tells a trial the first left running its record (or FAIL), and adds only what the storage lacks."""
    import optuna

    from nsr_sweep.sweep.search import study_storage

    spec = parse_sweep(with_(search={"num_samples": 3, "space": {"lr": {"loguniform": [1e-4, 1e-2]}}},
                             training={"solver": "adamw"}, neurons=[3, 4]))
    groups = expand(spec, {1: [3, 4]})
    log = str(tmp_path / "optuna.log")
    first = GroupedSearch(spec, groups, [], storage=study_storage(log))
    configs = [first.suggest(f"t{i}") for i in range(4)]  # samples 0 and 1 of both groups
    rows = []
    for i, c in enumerate(configs[:3]):  # the 4th is still running when the launch dies
        value = 0.1 * (i + 1)
        first.on_trial_complete(f"t{i}", {"val_mse": value})
        rows.append(row_of(c, status="ok", val_mse=value))
    rows.append(row_of(configs[3], status="ok", val_mse=0.9))  # its record landed, the tell did not
    summaries = optuna.get_all_study_summaries(study_storage(log))  # what optuna-dashboard reads, mid-sweep
    assert sorted(x.study_name for x in summaries) == ["t/L1-N3-regression-none", "t/L1-N4-regression-none"]
    assert sum(x.n_trials for x in summaries) == 4

    second = GroupedSearch(spec, groups, rows, storage=study_storage(log))
    assert second.n_remaining == 2  # sample 2 of each group
    for name in ("t/L1-N3-regression-none", "t/L1-N4-regression-none"):
        trials = optuna.load_study(study_name=name, storage=study_storage(log)).trials
        assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]  # none added twice, none left running
        assert len({t.user_attrs["trial_id"] for t in trials}) == 2
    told = {t.user_attrs["trial_id"]: t.value for name in ("t/L1-N3-regression-none", "t/L1-N4-regression-none")
            for t in optuna.load_study(study_name=name, storage=study_storage(log)).trials}
    assert told == {r["trial_id"]: r["val_mse"] for r in rows}

    orphan = GroupedSearch(spec, groups, rows[:3], storage=study_storage(log))  # the 4th without a record
    del orphan
    lost = optuna.load_study(study_name=f"t/{configs[3]['trial_id'][:-3]}", storage=study_storage(log)).trials
    assert [t.state.name for t in lost] == ["COMPLETE", "COMPLETE"]  # told already: nothing changes


def test_a_trial_left_running_without_a_record_is_told_failed(tmp_path):
    """Also in a group that has no record at all (its only trial was running when the launch died)."""
    import optuna

    from nsr_sweep.sweep.search import study_storage

    spec = parse_sweep(with_(search={"num_samples": 2, "space": {"lr": {"loguniform": [1e-4, 1e-2]}}},
                             training={"solver": "adamw"}, neurons=[3, 4]))
    groups = expand(spec, {1: [3, 4]})
    log = str(tmp_path / "optuna.log")
    first = GroupedSearch(spec, groups, [], storage=study_storage(log))
    c0, c1, c2 = first.suggest("t0"), first.suggest("t1"), first.suggest("t2")  # N3 s0, N4 s0, N3 s1
    first.on_trial_complete("t0", {"val_mse": 0.3})
    second = GroupedSearch(spec, groups, [row_of(c0, status="ok", val_mse=0.3)], storage=study_storage(log))
    assert sorted((g.neuron, s) for s, g in second.queue) == [(3, 1), (4, 0), (4, 1)]  # those run again
    states = {t.user_attrs["trial_id"]: t.state.name for name in ("t/L1-N3-regression-none", "t/L1-N4-regression-none")
              for t in optuna.load_study(study_name=name, storage=study_storage(log)).trials}
    assert states == {c0["trial_id"]: "COMPLETE", c1["trial_id"]: "FAIL", c2["trial_id"]: "FAIL"}
    with pytest.raises(NsrError, match="--optuna-storage 'nosuchdb://x' cannot be opened"):
        study_storage("nosuchdb://x")


def test_a_units_size_keeps_every_worker_busy_and_its_arrays_within_a_share_of_a_workers_memory():
    spec = parse_sweep(with_(neurons=[3], heads=["regression", "classification"], controls=["shuffled", "input_only"],
                             corpus={"n_texts": 1000}, resources={"batch_neurons": 1024}))
    per_neuron = 5 * 1000 * PROBE_TEXT_BYTES  # 2 heads × (real, shuffled) + input-only, per text
    layer = {1: list(range(8192))}
    assert unit_size(spec, layer, workers=2) == 1024  # the setting's cap (8 units for 2 workers would be 1,024 too)
    assert unit_size(spec, {1: list(range(100))}, workers=2) == 13  # ≥ 4 units a worker
    assert unit_size(spec, layer, workers=2, memory=1e9) == int(1e9 * UNIT_SHARE // per_neuron) == 130
    assert unit_size(spec, layer, workers=2, memory=64e9) == 1024 and unit_size(spec, layer, 2, memory=1.0) == 1
    two = parse_sweep({**spec.model_dump(mode="json", exclude_defaults=True), "layers": [1, 2]})  # every layer's groups
    assert unit_size(two, {1: layer[1], 2: layer[1]}, workers=2, memory=1e9) == 130


def test_a_workers_memory_is_its_nodes_over_the_workers_there():
    nodes = [{"NodeID": "a", "Alive": True, "Resources": {"memory": 16e9}},
             {"NodeID": "b", "Alive": True, "Resources": {"memory": 12e9}}, {"NodeID": "c", "Alive": False}]
    assert worker_memory([{"node": "a"}, {"node": "a"}, {"node": "b"}], nodes) == 8e9  # a's two share 16 GB
    assert worker_memory([{"node": "b"}], nodes) == 12e9 and worker_memory([{"node": "c"}], nodes) is None


def test_tune_holds_a_unit_as_its_neurons_and_their_groups_and_any_other_batch_spelled_out():
    """Tune saves every trial's config in its experiment state, again and again: a unit of 1,024 neurons × 4 probes
    is a few kilobytes there (its points spelled out were 3.5 MB of the state per unit)."""
    spec = parse_sweep(with_(heads=["regression", "classification"], controls=["shuffled"]))
    grid = expand(spec, {1: list(range(1024))})
    unit = TrialBatch(unit="u", settings=TrialSettings.of(spec), points=list(grid))
    config = tune_config(unit)
    assert batch_of(config) == unit and len(config["batch"]) < 12_000 and len(unit.model_dump_json()) > 400_000
    points = list(grid)
    points[0], points[1] = points[1], points[0]  # the first neuron's groups in another order than the others'
    shuffled = TrialBatch(unit="u", settings=unit.settings, points=points)
    assert batch_of(tune_config(shuffled)) == shuffled and "points" in json.loads(tune_config(shuffled)["batch"])


def test_the_grid_places_each_group_when_read_and_counts_what_the_sweep_owes():
    spec = parse_sweep(with_(layers=[1, 2], neurons=[3, 4], freeze=["none", "all"], controls=["shuffled", "input_only"],
                             search={"num_samples": 2, "space": {"lr": {"loguniform": [1e-4, 1e-2]}}}))
    grid = expand(spec, {1: [3, 4], 2: [7]})
    points = list(grid)
    assert len(points) == len(grid) and [grid[i] for i in range(len(grid))] == points == grid[:]
    assert grid[-1] == points[-1] and [p.neuron for p in points[:: len(grid.templates)]] == [3, 4, 7]
    ids = list(expected_trials(spec, grid))
    assert ids == [p.at(s).trial_id for p in points for s in range(n_samples(spec, p))]  # spelled as GridPoint does
    assert len(ids) == len(set(ids)) == n_expected(spec, grid)


def test_exact_probe_groups_are_handed_out_as_units_of_neuron_chunks():
    """Exact frozen-base probes (nothing searched) of a chunk of one layer's neurons — every head and control —
    go out as one unit (a TrialBatch with its settings once), minus what already finished; every other group goes
    out alone, through its study."""
    spec = parse_sweep(with_(neurons=[3, 4, 5], freeze=["none", "all"], controls=["shuffled", "input_only"],
                             search={"num_samples": 2, "space": {"lr": {"loguniform": [1e-4, 1e-2]}}}))
    groups = expand(spec, {1: [3, 4, 5]})
    assert tracker_params(tune_config(TrialBatch(settings=TrialSettings.of(spec), points=[groups[0].model_copy(
        update={"layer": 0, "neuron": 0})])))["layer"] == "0"  # 0 is a layer, not a missing value
    done = [{**groups[0].model_dump(), "trial_id": "L1-N3-regression-none-s0", "status": "ok", "val_mse": 0.5}]
    s = GroupedSearch(spec, groups, done, unit_neurons=2)
    configs = []
    while (c := s.suggest(f"t{len(configs)}")) != "FINISHED":
        configs.append(c)
    batches = [c for c in configs if batch_of(c).unit is not None]
    assert sorted(sorted(m.trial_id for m in batch_of(b).specs()) for b in batches) == [
        ["L1-N3-regression-none-input_only-s0", "L1-N3-regression-none-shuffled-s0",
         "L1-N4-regression-none-input_only-s0", "L1-N4-regression-none-s0", "L1-N4-regression-none-shuffled-s0"],
        ["L1-N5-regression-none-input_only-s0", "L1-N5-regression-none-s0", "L1-N5-regression-none-shuffled-s0"]]
    ids = sorted(b["trial_id"] for b in batches)
    assert [i.rsplit("-", 1)[0] for i in ids] == ["L1-N3..4", "L1-N5..5"]
    assert all(parse_trial_id(i) is None for i in ids)
    alone = [c["trial_id"] for c in configs if batch_of(c).unit is None]
    assert len(alone) == 3 * 2 * 2 and all("-all-" in t for t in alone)  # (neuron, control) × 2 samples
    assert all(m.training == spec.training and m.seed == spec.seed for b in batches for m in batch_of(b).specs())
    held = [json.loads(b["batch"]) for b in batches]  # the settings once, the unit as its neurons × their groups
    assert all(set(h) == {"unit", "settings", "layer", "neurons", "groups", "skip"} and
               all(set(g) == set(GridPoint.model_fields) - {"layer", "neuron"} for g in h["groups"]) for h in held)
    assert sorted(h["skip"] for h in held) == [[], ["L1-N3-regression-none-s0"]]  # what finished is left out
    assert all(batch_of(tune_config(batch_of(b))) == batch_of(b) for b in configs)  # the JSON round trip
    # what MLflow logs: the place in the grid, never the batch's JSON (a unit's passes MLflow's 6,000 characters)
    first = next(b for b in batches if b["trial_id"].startswith("L1-N3..4"))
    assert tracker_params(first) == {"trial_id": first["trial_id"], "layer": "1", "neuron": "3..4 (2)",
                                     "head": "regression", "freeze": "none", "control": "input_only,real,shuffled",
                                     "n_trials": 5, "params": {}}
    one = next(c for c in configs if batch_of(c).unit is None)
    p = tracker_params(one)
    assert p["neuron"] == str(batch_of(one).points[0].neuron) and p["n_trials"] == 1 and p["freeze"] == "all"
    assert p["params"] == one["params"] and set(p["params"]) == {"lr"}


def test_cluster_yaml_passes_rays_validation():
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert any("pip install -e ~/nsr-sweep" in c for c in config["setup_commands"])
    assert any("torch.cuda.is_available()" in c for c in config["worker_setup_commands"])  # GPU nodes: CUDA torch
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["max_wrkers"] = 2
    with pytest.raises(Exception, match="max_wrkers"):
        validate_config(prepare_config(broken))


# -- whole sweeps on local Ray -----------------------------------------------------------------

SMALL = """
name: {name}
model: nsr-tiny
corpus: {{n_texts: 160, max_tokens: 24}}
layers: [1]
neurons: [{{select: top_variance, k: 2}}, 7]
heads: [regression, token]
freeze: [none, after_target]
training: {{epochs: 2, batch_size: 16}}
search: {{num_samples: 2, space: {{lr: {{loguniform: [1.0e-3, 1.0e-2]}}}}}}
resources: {{workers: 2}}
{extra}
"""


def _launch_cmd(sweep: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "nsr_sweep.cli", "launch", str(sweep), "--out", str(out), "--no-dashboard", *extra]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}


def _check_complete(sweep_dir: Path, expected: int) -> pd.DataFrame:
    df = pd.read_parquet(sweep_dir / "tables" / "trials.parquet")
    assert len(df) == expected and df["trial_id"].is_unique
    assert (df["status"] == "ok").all(), df[["trial_id", "error"]]
    for c in ("pearson_r", "mse", "offset", "skill", "drift", "val_mse"):
        assert np.isfinite(df[c].to_numpy()).all(), c
    runs = Counter(json.loads(line)["trial_id"] for line in (sweep_dir / "runs.jsonl").read_text().splitlines())
    assert sorted(runs) == sorted(df["trial_id"]) and set(runs.values()) == {1}  # every trial ran exactly once
    state = json.loads((sweep_dir / "sweep_state.json").read_text())
    assert state["status"] == "finished" and state["model_loads"] == state["workers"] == 2
    assert df.groupby(["layer", "neuron", "head", "freeze", "control"], dropna=False)["best"].sum().eq(1).all()
    from nsr_sweep.results.store import open_store

    store = open_store(sweep_dir)
    preds = store.test_predictions()
    for t, freeze in zip(df["trial_id"], df["freeze"]):
        d = sweep_dir / "trials" / t
        if freeze == "none":  # a batched probe: rows of its unit's Parquet files, no directory, no chart
            assert not d.exists() and store.record(t)["status"] == "ok"
        else:
            assert all((d / f).is_file() for f in ("metrics.json", "head.safetensors", "preds.parquet"))
            assert (d / "diagnostics.png").is_file()
        assert (preds["trial_id"] == t).any() and store.head(t) is not None
    return df


@pytest.mark.slow
def test_end_to_end_sweep_on_local_ray(tmp_path):
    sweep = tmp_path / "e2e.yaml"
    sweep.write_text(SMALL.format(name="e2e", extra="controls: [shuffled, early_features, random_model]"))
    r = subprocess.run(_launch_cmd(sweep, tmp_path / "res", "--tensorboard", "--mlflow"), env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    sweep_dir = tmp_path / "res" / "e2e"
    # 3 neurons × (3 valid combos + 3 shuffled + 1 early_features + 1 random_model) groups; 2 samples each,
    # but the 4 exact-probe groups (freeze none) are solved once
    df = _check_complete(sweep_dir, expected=3 * (4 * 2 + 4 * 1))
    assert set(df["freeze"]) == {"none", "after_target"} and "token" in set(df["head"])
    assert df["control"].value_counts().to_dict() == {"shuffled": 15, "early_features": 3, "random_model": 3}
    assert "3 invalid head+freeze trials skipped" in r.stdout
    assert (sweep_dir / "report.html").is_file() and (sweep_dir / "tables" / "best.parquet").is_file()
    assert yaml.safe_load((sweep_dir / "sweep.yaml").read_text())["name"] == "e2e"
    keys = json.loads((sweep_dir / "cache_keys.json").read_text())
    assert keys[0]["identity"][0]["pre_max_abs_err"] < 1e-4
    # what each worker ran, as its record holds it: the sweep file's own sections under their names, the searched
    # hyperparameters as sampled (and as the trial table shows them)
    from nsr_sweep import open_results
    from nsr_sweep.core.spec import TrialSettings

    swept = load_sweep(sweep_dir / "sweep.yaml")
    want = TrialSettings.of(swept).model_dump(mode="json")
    res = open_results(sweep_dir)
    for row in df.to_dict("records"):
        ran = res.trial(row["trial_id"]).spec
        assert {k: ran[k] for k in ("seed", "features", "splits", "analysis")} == \
            {k: want[k] for k in ("seed", "features", "splits", "analysis")}
        assert {k: v for k, v in ran["training"].items() if k not in swept.search.space} == \
            {k: v for k, v in want["training"].items() if k not in swept.search.space}
        assert all(ran["training"][k] == row[k] for k in swept.search.space)
    # the trackers saw every Tune trial: 24 fine-tuned ones and the probe units (every head and control of a
    # chunk of the layer's 3 neurons: 2 workers × 4 units each want chunks of 1 neuron)
    assert len(list((sweep_dir / "probes" / "records").glob("*.parquet"))) == 3
    assert len({p.parent for p in (sweep_dir / "tune").rglob("events.out.tfevents.*")}) == 27
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{sweep_dir / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["e2e"], output_format="list")
    assert len(runs) == 27 and all("val_mse" in run.data.metrics for run in runs)
    assert all("batch" not in run.data.params and run.data.params["layer"] == "1" for run in runs)
    assert sum(run.data.params["n_trials"] != "1" for run in runs) == 3  # the probe units; the rest trials alone

    st = CliRunner().invoke(main, ["status", str(sweep_dir), "--json"])
    assert st.exit_code == 0
    status = json.loads(st.output)
    assert status["counts"] == {"ok": 36} and status["expected"] == 36 and status["best"]

    again = subprocess.run(_launch_cmd(sweep, tmp_path / "res"), env=_env(), capture_output=True, text=True)
    assert again.returncode == 2 and "pass --resume" in again.stderr  # (--resume itself: the SIGKILL test)


@pytest.mark.slow
def test_sigkill_mid_sweep_then_resume_runs_every_trial_exactly_once(tmp_path):
    sweep = tmp_path / "k.yaml"
    sweep.write_text(SMALL.format(name="killed", extra=""))
    sweep_dir = tmp_path / "res" / "killed"
    driver = subprocess.Popen(_launch_cmd(sweep, tmp_path / "res"), env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        log = sweep_dir / "runs.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.3)
    assert driver.poll() is None, "the sweep ended before it could be killed"
    studies = _studies(sweep_dir)  # what `optuna-dashboard results/killed/optuna.log` shows of a running sweep
    uid = json.loads((sweep_dir / "sweep_state.json").read_text())["uid"]
    assert studies and all(n.startswith(f"killed-{uid}/L1-") and n.endswith("-after_target") for n in studies)
    busy = subprocess.run(_launch_cmd(sweep, tmp_path / "res", "--resume"), env=_env(), capture_output=True, text=True)
    assert busy.returncode == 2 and "still running" in busy.stderr  # a second launch into a running sweep
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    n_before = len((sweep_dir / "runs.jsonl").read_text().splitlines())
    assert n_before < 15
    time.sleep(2)  # the killed driver's workers go down with its raylet
    r = subprocess.run(_launch_cmd(sweep, tmp_path / "res", "--resume"), env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    df = _check_complete(sweep_dir, expected=15)
    for name, trials in _studies(sweep_dir).items():  # reloaded, not re-told: each finished trial once
        done = {t.user_attrs["trial_id"]: t.value for t in trials if t.state.name == "COMPLETE"}
        group = df[df["trial_id"].str.startswith(name.split("/")[1] + "-s")]
        assert done == dict(zip(group["trial_id"], group["val_mse"])), name
        assert all(t.state.name in ("COMPLETE", "FAIL") for t in trials)  # none left running


def _studies(sweep_dir: Path) -> dict:
    """Every study in the sweep's Optuna storage, through Optuna's own API (as optuna-dashboard reads it)."""
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep_dir / "optuna.log")))
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).trials
            for s in optuna.get_all_study_summaries(storage)}


EVERY = """
name: every
model: nsr-tiny
corpus: {n_texts: 200, max_tokens: 24}
layers: [1]
neurons: all
heads: [regression]
freeze: [none]
controls: [shuffled]
training: {epochs: 1, batch_size: 32}
analysis: {enabled: false}
search: {num_samples: 1}
resources: {workers: 2}
"""


@pytest.mark.slow
def test_neurons_all_runs_each_layers_probes_as_batches_with_a_row_per_neuron(tmp_path):
    """`neurons: all` on nsr-tiny's layer 1: 512 probes and 512 shuffled probes run as units of 64 neurons
    (2 workers × 4 units each), and every neuron still has its own row, record and artefacts, each run once."""
    sweep_dir = _launched(tmp_path, EVERY)
    df = pd.read_parquet(sweep_dir / "tables" / "trials.parquet")
    assert len(df) == 1024 and (df["status"] == "ok").all() and df["trial_id"].is_unique
    assert sorted(df.loc[df["control"].isna(), "neuron"]) == list(range(512))
    assert (df["solver"] == "ridge").all() and df["pearson_r"].notna().all()
    runs = Counter(json.loads(line)["trial_id"] for line in (sweep_dir / "runs.jsonl").read_text().splitlines())
    assert set(runs.values()) == {1} and len(runs) == 1024
    assert not (sweep_dir / "trials").exists()  # rows of Parquet datasets, one file per unit and kind
    units = sorted(p.stem for p in (sweep_dir / "probes" / "records").glob("*.parquet"))
    assert len(units) == 8 and all(len(list((sweep_dir / "probes" / k).iterdir())) == 8 for k in ("preds", "heads"))
    from nsr_sweep.core.metrics import prediction_metrics
    from nsr_sweep.results.store import open_store

    sample = df.sample(40, random_state=0)  # every number recomputable from what is stored
    preds = open_store(sweep_dir).test_predictions(sample["trial_id"])
    for row in sample.itertuples():
        p = preds[preds["trial_id"] == row.trial_id]
        m = prediction_metrics(p["pred"].to_numpy(), p["actual_orig"].to_numpy(), row.train_mean)
        assert len(p) == row.n_test
        for k in ("pearson_r", "mse", "offset", "skill"):
            assert m[k] == pytest.approx(getattr(row, k), rel=1e-9, abs=1e-12), (row.trial_id, k)
    state = json.loads((sweep_dir / "sweep_state.json").read_text())
    assert state["status"] == "finished" and state["n_expected"] == 1024


ASHA = """
name: asha
model: nsr-tiny
corpus: {n_texts: 400, max_tokens: 24}
layers: [1]
neurons: [{select: top_variance, k: 1}]
heads: [regression]
freeze: [all]
training: {epochs: 8, patience: 8, batch_size: 16}
analysis: {enabled: false}
search: {algorithm: random, num_samples: 8, scheduler: asha, grace_period: 1, reduction_factor: 2,
         metric: val_pearson_r, mode: max, space: {lr: {choice: [1.0e-7, 3.0e-3]}}}
resources: {workers: 2}
"""


def _launched(tmp_path: Path, sweep_text: str, **env) -> Path:
    """Write the sweep file, launch it to completion, return its results directory."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(sweep_text)
    r = subprocess.run(_launch_cmd(sweep, tmp_path / "res"), env={**_env(), **env}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp_path / "res" / yaml.safe_load(sweep_text)["name"]


@pytest.mark.slow
def test_asha_stops_weak_trials_and_they_are_still_recorded(tmp_path):
    sweep_dir = _launched(tmp_path, ASHA)
    df = pd.read_parquet(sweep_dir / "tables" / "trials.parquet")
    assert len(df) == 8 and (df["status"] == "ok").all()
    runs = Counter(json.loads(line)["trial_id"] for line in (sweep_dir / "runs.jsonl").read_text().splitlines())
    assert set(runs.values()) == {1} and len(runs) == 8
    stopped = df[df["scheduler_stopped"].astype(bool)]
    assert len(stopped) >= 1, df[["trial_id", "lr", "val_mse", "epochs_run"]]
    assert (stopped["epochs_run"] < 8).all()  # stopped between epochs, yet evaluated and saved
    kept = df[~df["scheduler_stopped"].astype(bool)]
    # ranked by the correlation (not val_mse under its name): the stopped trials are the worse ones
    assert kept["val_pearson_r"].max() > stopped["val_pearson_r"].max()
    assert kept["val_pearson_r"].mean() > stopped["val_pearson_r"].mean()
    assert (stopped["lr"] == 1e-7).mean() >= 0.5  # mostly the deliberately weak learning rate


RAISES = """
name: raises
model: nsr-tiny
corpus: {n_texts: 200, max_tokens: 24}
layers: [1]
neurons: [7, 9]
heads: [regression]
freeze: [none, after_target]
training: {epochs: 2}
search: {num_samples: 1}
max_failures: 1
resources: {workers: 2}
"""


@pytest.mark.slow
def test_a_trial_that_raises_is_recorded_failed_and_one_that_cannot_be_collected_fails_the_sweep(tmp_path):
    """N7's fine-tuned trial raises on every retry: it is recorded as failed, with the reason, and the sweep goes
    on. N9's record cannot be written on the driver's side (a file stands where its directory goes): the launch
    says how many are missing and why, exits non-zero, and the state, status and report say so too."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(RAISES)
    sweep_dir = tmp_path / "res" / "raises"
    blocked = sweep_dir / "trials" / "L1-N9-regression-after_target-s0"
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a directory")
    r = subprocess.run(_launch_cmd(sweep, tmp_path / "res"), env={**_env(), "NSR_SWEEP_FAIL_TRIALS":
                       "L1-N7-regression-after_target"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 of 4 trials missing" in r.stderr and "1 could not be written here" in r.stderr
    df = pd.read_parquet(sweep_dir / "tables" / "trials.parquet").set_index("trial_id")
    assert (df.loc[["L1-N7-regression-none-s0", "L1-N9-regression-none-s0"], "status"] == "ok").all()  # it went on
    failed = df.loc["L1-N7-regression-after_target-s0"]
    assert failed["status"] == "failed" and "injected failure" in failed["error"]
    saved = json.loads((sweep_dir / "trials" / "L1-N7-regression-after_target-s0" / "metrics.json").read_text())
    assert saved["status"] == "failed" and saved["reason"] == failed["error"]
    tune_errors = list((sweep_dir / "tune").rglob("error.txt"))
    assert tune_errors and "NSR_SWEEP_FAIL_TRIALS" in tune_errors[0].read_text()
    report = (sweep_dir / "report.html").read_text()
    assert "L1-N7-regression-after_target-s0" in report and "1 of 4 trials are missing" in report
    state = json.loads((sweep_dir / "sweep_state.json").read_text())
    assert state["status"] == "incomplete" and state["missing"] == ["L1-N9-regression-after_target-s0"]
    st = json.loads(CliRunner().invoke(main, ["status", str(sweep_dir), "--json"]).output)
    assert st["state"] == "incomplete" and st["missing"] == 1 and "--resume" in st["next"]


FAMILY_SWEEP = """
name: fam-{family}
model: {path}
corpus: {{n_texts: 120, max_tokens: 20}}
layers: [1, 2]
neurons: [3]
heads: [regression, classification, token]
freeze: [none, after_target, all]
training: {{epochs: 1, batch_size: 16}}
analysis: {{patch_texts: 8, n_grid: 3}}
search: {{num_samples: 1}}
resources: {{workers: 2}}
"""


def _run_here(sweep_text: str) -> pd.DataFrame:
    """A sweep's trials run in this process (no Ray): the grid, each trial's config as the search builds it,
    the exact probes of a layer together as a worker runs a unit, and each trial's row of the trial table."""
    from nsr_sweep.core.models import load_model
    from nsr_sweep.core.trial import run_trial, run_trials
    from nsr_sweep.results.schema import trial_row
    from nsr_sweep.sweep.inputs import build_cache, model_spec

    spec = parse_sweep(yaml.safe_load(sweep_text))
    model = load_model(model_spec(spec))
    cache = build_cache(spec, progress=False, model=model)
    search = GroupedSearch(spec, expand(spec, {L: [3] for L in spec.layers}), [])
    specs = []
    while (c := search.suggest(f"t{len(specs)}")) != "FINISHED":
        specs.extend(batch_of(c).specs())
    probes = [s for L in spec.layers for s in specs if s.freeze == "none" and s.layer == L]  # a unit: one layer's
    results = [r for L in spec.layers for r in run_trials(cache, model, [s for s in probes if s.layer == L])]
    unfrozen = [s for s in specs if s.freeze != "none"]
    results += [run_trial(cache, model, s) for s in unfrozen]
    return pd.DataFrame([trial_row(spec_json(s), r.status, r.metrics, r.reason) for s, r in zip(probes + unfrozen, results)])


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_every_head_and_freeze_on_every_family(tmp_path, family_dirs, family):
    """Two layers, the last included: every valid head × freeze trial is ok on each family — Llama-style through
    a launch on local Ray, GPT-2 and GPT-NeoX through the same trial code in this process (what Ray adds does
    not depend on the family; the suite's time does)."""
    text = FAMILY_SWEEP.format(family=family, path=family_dirs[family])
    if family == "llama":
        df = pd.read_parquet(_launched(tmp_path, text) / "tables" / "trials.parquet")
    else:
        df = _run_here(text)
    assert len(df) == 2 * 8 and (df["status"] == "ok").all(), df[["trial_id", "error"]]
    assert set(df["layer"]) == {1, 2} and np.isfinite(df["pearson_r"]).all()
    unfrozen = df[df["freeze"] != "none"]
    assert np.isfinite(unfrozen["proj_wout_r_ft"]).all() and np.isfinite(unfrozen["cos_wout_eff_ft"]).all()


@pytest.mark.parametrize("weights, needle", [
    ("pytorch_model.bin", "has only a pickle checkpoint (pytorch_model.bin), which nsr-sweep never loads; convert it"),
    (None, "has no weights (*.safetensors)"),
])
def test_a_model_directory_without_safetensors_is_refused_before_ray(tmp_path, tiny_dir, weights, needle):
    """Pickle checkpoints are never unpickled: such a directory is refused by the validation pass."""
    import shutil

    import ray

    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    if weights:
        (d / weights).write_bytes(b"not really a pickle")
    for key, value in (("model", str(d)), ("controls", [{"cross_model": str(d)}])):
        f = tmp_path / "s.yaml"
        f.write_text(yaml.safe_dump(with_(**{key: value})))
        r = CliRunner().invoke(main, ["launch", str(f), "--dry-run"])
        assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not ray.is_initialized()


def _claim_and_hold(sweep_dir: str, go: float, out) -> None:
    from nsr_sweep.results.layout import claim

    spec = parse_sweep(with_())
    while time.time() < go:  # both processes start claiming at the same instant
        pass
    try:
        claim(Path(sweep_dir), spec, resume=False)
        out.put("claimed")
        time.sleep(0.5)  # hold it while the other tries
    except Exception as e:  # noqa: BLE001 - reported to the parent
        out.put(str(e))


def test_two_simultaneous_launches_never_both_claim_a_directory(tmp_path):
    """20 races of two processes claiming one directory: exactly one wins each time; the other is told why."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for i in range(20):
        q = ctx.Queue()
        go = time.time() + 0.3
        procs = [ctx.Process(target=_claim_and_hold, args=(str(tmp_path / f"r{i}" / "s"), go, q)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(10)
        got = [q.get(timeout=5) for _ in range(2)]
        assert got.count("claimed") == 1 and any("is still running" in g for g in got), got


def test_a_stale_or_damaged_lock_is_not_a_running_sweep(tmp_path):
    """A launch that died (no live holder) reads `interrupted`, and the next launch takes the directory over."""
    from nsr_sweep.core.files import write_json
    from nsr_sweep.results.layout import LOCK, STATE, claim, lock_holder, release, run_state

    d = tmp_path / "s"
    d.mkdir()
    write_json(d / STATE, {"status": "running"})
    for content in ('{"pid": 999999999, "host": "elsewhere"}', "{trunc"):
        (d / LOCK).write_text(content)
        assert lock_holder(d) is None and run_state(d) == "interrupted"
    spec = parse_sweep(with_())
    claim(d, spec, resume=False)
    assert lock_holder(d)["pid"] == os.getpid() and run_state(d) == "running"
    release(d)
    assert not (d / LOCK).exists()


def test_a_resume_of_results_made_by_another_method_is_refused_in_one_line(tmp_path):
    """Trials computed by an older nsr-sweep (method 1: quantile bins) are never mixed with this one's: --resume of
    such a directory is refused, naming both versions, before anything runs; a directory of this version resumes."""
    from nsr_sweep.core.files import write_json
    from nsr_sweep.core.spec import METHOD_VERSION, dump_sweep
    from nsr_sweep.results.layout import RESOLVED, STATE, claim, release

    spec = parse_sweep(with_())
    d = tmp_path / "s"
    (d / "probes" / "records").mkdir(parents=True)
    (d / RESOLVED).write_text(dump_sweep(spec))
    (d / "probes" / "records" / "u.parquet").write_bytes(b"finished trials")
    write_json(d / STATE, {"status": "finished"})  # made before the field existed: method 1
    with pytest.raises(NsrError) as e:
        claim(d, spec, resume=True)
    msg = str(e.value)
    assert "method 1" in msg and f"this one {METHOD_VERSION}" in msg and "new name" in msg and "\n" not in msg
    write_json(d / STATE, {"status": "finished", "method_version": METHOD_VERSION})
    claim(d, spec, resume=True)
    release(d)


def test_a_launch_that_fails_after_it_started_is_recorded_failed_and_the_fixed_file_is_accepted(tmp_path, monkeypatch):
    from nsr_sweep.results.layout import read_state, run_state
    from nsr_sweep.sweep import launch as orchestrate

    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(with_()))

    def boom(self):
        raise RuntimeError("the cluster went away")

    monkeypatch.setattr(orchestrate.Launch, "start_workers", boom)
    options = LaunchOptions(str(f), out=str(tmp_path / "res"))
    with pytest.raises(RuntimeError):
        orchestrate.launch(options)
    d = tmp_path / "res" / BASE["name"]
    assert read_state(d)["status"] == "failed" and "the cluster went away" in read_state(d)["error"]
    assert run_state(d) == "failed"
    f.write_text(yaml.safe_dump(with_(layers=[2])))  # fixed: no trial ran, so a changed file is accepted
    with pytest.raises(RuntimeError):
        orchestrate.launch(options)


def _parquet_corpus(path: Path, kind: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"text number {i} with enough characters" for i in range(100)]
    pq.write_table(pa.table({"text": list(range(100)) if kind == "ints" else texts}), path)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:-20])
    return str(path)


@pytest.mark.parametrize("case, needle", [
    ("truncated", "is not a readable Parquet file"),
    ("ints", "column 'text' holds int64, not strings"),
    ("out", "--out: "),
    ("cache", "--cache-root (or $NSR_CACHE_DIR)"),
    ("cuda", "resources.device is cuda but this machine has no CUDA device"),
])
def test_inputs_only_the_machine_can_check_are_refused_before_ray(tmp_path, monkeypatch, case, needle):
    import ray
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the check, on any machine
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    data, args = with_(), ["--out", str(tmp_path / "res")]
    if case in ("truncated", "ints"):
        data = with_(corpus={"source": _parquet_corpus(tmp_path / "c.parquet", case)})
    elif case == "out":
        args = ["--out", str(blocker / "res")]
    elif case == "cache":
        args += ["--cache-root", str(blocker / "cache")]
    else:
        data = with_(resources={"device": "cuda"})
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(data))
    for extra in ([], ["--dry-run"]):
        r = CliRunner().invoke(main, ["launch", str(f), *args, *extra])
        assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not ray.is_initialized() and not (tmp_path / "res").exists()


def test_trial_ids_read_back_to_their_group():
    spec = parse_sweep(with_(heads=["regression", "token"], freeze=["none", "after_target", "all"],
                             controls=["shuffled", {"cross_model": "nsr-tiny-seed1"}, "input_only"]))
    for g in expand(spec, {1: [3, 12]}):
        got = parse_trial_id(g.at(2).trial_id)
        assert got == {"trial_id": g.at(2).trial_id, **g.model_dump(include={"layer", "neuron", "head", "freeze",
                                                                              "control"}), "sample": 2}
    assert parse_trial_id("not-a-trial") is None


FIELDS = {  # every field a trial runs with, each away from its default
    "seed": 11,
    "training": {"lr": 3e-3, "epochs": 7, "batch_size": 17, "weight_decay": 0.01, "patience": 5, "n_bins": 6,
                 "solver": "adamw", "suffix": " Q {layer}/{neuron}:", "save_weights": True, "precision": "bf16"},
    "features": {"hook": "blocks.1.mlp.hook_post"},
    "splits": {"train": 0.6, "val": 0.25, "test": 0.15},
    "analysis": {"patch_grid": "scale", "n_grid": 5, "scales": [0.0, 1.0, 3.0], "patch_texts": 20, "enabled": False,
                 "exact_patch_neurons": 3},
}
GRID = {"layers", "neurons", "heads", "freeze", "controls"}  # each trial holds one of them: its place in the grid
INPUTS = {"model", "corpus", "target", "batch_size_cache"}  # what the worker's model and cache are built from
RUNNING = {"name", "search", "resources", "max_failures"}  # how trials are scheduled, not what a trial is


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_every_sweep_file_field_reaches_the_trialspec_a_worker_runs(tmp_path):
    """A sweep file with every trial field away from its default: each TrialSpec a worker rebuilds from what Tune
    holds (the config through a JSON round trip, as Tune stores it) has every one of them under the sweep file's
    name, with its value — the searched lr as sampled, the rest as written. Every other field of a sweep file is
    accounted for: the trial's place in the grid, the inputs the worker's model and cache are built from, or how
    trials are scheduled. An unknown field is refused before Ray starts."""
    from nsr_sweep.core.spec import SweepSpec, TrialSettings
    from nsr_sweep.sweep.inputs import cache_spec, model_spec

    assert set(SweepSpec.model_fields) == set(TrialSettings.model_fields) | GRID | INPUTS | RUNNING
    spec = parse_sweep(with_(**FIELDS, layers=[1], neurons=[3, 4], heads=["regression", "token"],
                             freeze=["after_target", "all"], controls=["shuffled", {"cross_model": "nsr-tiny-seed1"}],
                             search={"num_samples": 2, "space": {"lr": {"loguniform": [1e-4, 1e-2]}}},
                             model={"name": "nsr-tiny", "init": "random", "seed": 4},
                             corpus={"n_texts": 100, "max_tokens": 24, "seed": 3}, target={"hook": "pre"}))
    search = GroupedSearch(spec, expand(spec, {1: [3, 4]}), [])
    specs = []
    while (c := search.suggest(f"t{len(specs)}")) != "FINISHED":
        c = json.loads(json.dumps(c))  # Tune keeps configs as JSON-able values
        for s in batch_of(c).specs():
            specs.append(s)
            assert s.training.lr == c["params"]["lr"] and 1e-4 <= s.training.lr <= 1e-2  # the sampled value
    want = _leaves({k: v for k, v in FIELDS.items()})
    for s in specs:
        got = _leaves(s.model_dump(include=set(FIELDS)))
        assert set(got) == set(want)  # every field by its sweep-file name, none renamed or added
        assert {k: v for k, v in got.items() if k != "training.lr"} == {k: v for k, v in want.items() if k != "training.lr"}
    places = {(s.layer, s.neuron, s.head, s.freeze, s.control, s.cross_model, s.sample) for s in specs}
    assert places == {(1, n, h, f, c, "nsr-tiny-seed1" if c == "cross_model" else None, sample) for n in (3, 4)
                      for h in ("regression", "token") for f in ("after_target", "all")
                      for c in (None, "shuffled", "cross_model") if not (c == "cross_model" and f == "after_target")
                      for sample in (0, 1)}
    cs, ms = cache_spec(spec), model_spec(spec)  # the inputs: the worker's cache and model
    assert (cs.hook, cs.position, cs.max_tokens, cs.features) == ("pre", "last", 24, "blocks.1.mlp.hook_post")
    assert (ms.name, ms.init, ms.seed) == ("nsr-tiny", "random", 4)

    import ray

    from nsr_sweep.sweep.launch import launch

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_(training={"lrr": 1e-3})))
    with pytest.raises(NsrError, match=r"training\.lrr: unknown key"):
        launch(LaunchOptions(str(bad), out=str(tmp_path / "res")))
    assert not ray.is_initialized() and not (tmp_path / "res").exists()
