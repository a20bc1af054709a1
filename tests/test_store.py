"""The store (results/store.py): one interface over both layouts, a trial → unit index read once, damage named."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nsr_sweep.core.cache import ActivationCache, CacheSpec
from nsr_sweep.core.corpus import load_corpus
from nsr_sweep.core.models import load_model
from nsr_sweep.core.trial import TrialSpec, run_trials
from nsr_sweep.results.records import save_trial, save_unit
from nsr_sweep.results.schema import HP_COLUMNS, PATCH_COLUMNS
from nsr_sweep.results.store import ProbeUnits, SweepStore, TrialDirs, open_store

ANALYSIS = {"patch_texts": 8, "n_grid": 3}


@pytest.fixture(scope="module")
def probes():
    """Eight probes of two neurons (regression and classification heads, real and shuffled) and an input-only one,
    each with its trial id."""
    m = load_model("nsr-tiny")
    cache = ActivationCache.build(m, load_corpus(n_texts=160), CacheSpec(layers=(1,), max_tokens=24), progress=False)
    specs = [TrialSpec(layer=1, neuron=n, head=h, control=c, analysis=ANALYSIS)
             for n in (4, 9) for h in ("regression", "classification") for c in (None, "shuffled")]
    specs.append(TrialSpec(layer=1, neuron=4, control="input_only", analysis=ANALYSIS))
    results = run_trials(cache, m, specs)
    assert all(r.status == "ok" for r in results)
    return [(r, s.trial_id, 0) for r, s in zip(results, specs)]


def _as_dirs(done, root: Path) -> Path:
    for r, tid, sample in done:
        save_trial(r, root / "trials" / tid, tid, sample)
    return root


def _as_units(done, root: Path, size: int = 3) -> Path:
    """The probes as units of `size` (in order), named u0, u1, …"""
    for i in range(0, len(done), size):
        save_unit(done[i: i + size], root, f"u{i // size}")
    return root


TIMING = ["artefact_seconds", "unit"]  # when each writer ran, and the unit a batched probe was in: the only differences


def _table(store) -> pd.DataFrame:
    df = pd.DataFrame(store.finished_rows()).drop(columns=TIMING, errors="ignore")
    return df.sort_values("trial_id").reset_index(drop=True)[sorted(df.columns)]


def test_both_layouts_read_back_the_same_trials(probes, tmp_path):
    dirs, units = open_store(_as_dirs(probes, tmp_path / "a")), open_store(_as_units(probes, tmp_path / "b"))
    assert isinstance(dirs, TrialDirs) and isinstance(units, ProbeUnits)
    ids = [tid for _, tid, _ in probes]
    a, b = _table(dirs), _table(units)
    assert a["trial_id"].tolist() == sorted(ids)
    pd.testing.assert_frame_equal(a, b, check_dtype=False)
    key = ["trial_id", "text_id"]
    pa, pb = (s.test_predictions(ids).sort_values(key).reset_index(drop=True) for s in (dirs, units))
    pd.testing.assert_frame_equal(pa, pb, check_dtype=False)
    for r, tid, _ in probes:
        test = r.preds[r.preds["split"] == "test"]
        assert len(pa[pa["trial_id"] == tid]) == len(test) == r.metrics["n_test"]
        want = test.sort_values("text_id")["pred"].to_numpy()
        np.testing.assert_array_equal(units.predictions(tid)["pred"].to_numpy(), want)
        np.testing.assert_array_equal(dirs.predictions(tid).query("split == 'test'").sort_values("text_id")["pred"], want)
        ra, rb = dirs.record(tid), units.record(tid)
        assert ra["spec"] == rb["spec"] == r.spec.model_dump(mode="json") and ra["status"] == rb["status"] == "ok"
        ma, mb = ({k: v for k, v in rec["metrics"].items() if k not in TIMING} for rec in (ra, rb))
        assert all(ma[k] == pytest.approx(mb[k], nan_ok=True) for k in ma.keys() & mb.keys())
        # as before the store: a unit's row holds its hyperparameters as columns, and NaN for what other probes have
        assert set(ma) - set(mb) <= set(HP_COLUMNS) and all(np.isnan(mb[k]) for k in set(mb) - set(ma))
        if r.spec.control == "input_only":  # a token-count head is kept in a directory only; it is not patched
            assert units.head(tid) is None and units.patch_points(tid) is None and dirs.head(tid) is not None
            continue
        ha, hb = dirs.head(tid), units.head(tid)
        assert ha.keys() == hb.keys() == r.head.keys() and all(torch.equal(ha[k], hb[k]) for k in ha)
        cols = [*PATCH_COLUMNS, "delta_act", "delta_pred"]
        pd.testing.assert_frame_equal(dirs.patch_points(tid)[cols], units.patch_points(tid)[cols], check_dtype=False)
        np.testing.assert_array_equal(units.patch_points(tid)["delta_pred"], r.patch["delta_pred"])


def test_a_directory_holding_both_layouts_answers_each_trial_from_the_one_that_holds_it(probes, tmp_path):
    root = _as_units(probes[:4], tmp_path / "both")
    _as_dirs(probes[4:], root)
    store = open_store(root)
    assert isinstance(store, SweepStore)
    whole = open_store(_as_dirs(probes, tmp_path / "dirs"))
    pd.testing.assert_frame_equal(_table(store), _table(whole), check_dtype=False)
    key = ["trial_id", "text_id"]
    for ids in (None, [tid for _, tid, _ in probes[2:6]]):
        got, want = (s.test_predictions(ids).sort_values(key).reset_index(drop=True) for s in (store, whole))
        pd.testing.assert_frame_equal(got, want, check_dtype=False)
    for _, tid, _ in probes:
        assert store.holds(tid) and store.record(tid)["spec"] == whole.record(tid)["spec"]
    assert store.record("L1-N99-regression-none-s0") is None and not store.holds("nope")
    assert open_store(tmp_path / "empty").finished_rows() == []


def test_the_trial_to_unit_index_is_read_once_per_store(probes, tmp_path, monkeypatch):
    """Every probe's patching points, head and predictions looked up one by one: each unit's records read once for
    the index; a unit that lands later is read when a trial it holds is asked for, and only it."""
    root = _as_units(probes[:6], tmp_path / "u")  # units u0, u1
    reads = Counter()
    real = pd.read_parquet

    def counting(path, *a, **kw):
        if "/records/" in str(path):
            reads[(Path(path).stem, tuple(kw.get("columns") or ()))] += 1
        return real(path, *a, **kw)

    monkeypatch.setattr(pd, "read_parquet", counting)
    store = open_store(root)
    for _, tid, _ in probes[:6]:
        assert store.patch_points(tid) is not None and store.head(tid) is not None
        assert len(store.predictions(tid)) and len(store.test_predictions([tid]))
    index = ("trial_id", "unit")
    assert reads == {("u0", index): 1, ("u1", index): 1}
    save_unit(probes[6:], root, "u2")  # a unit that finished after the store was opened
    assert store.patch_points(probes[6][1]) is not None and store.head("not-a-trial") is None
    assert reads == {("u0", index): 1, ("u1", index): 1, ("u2", index): 1}
    known = open_store(root, trials=pd.DataFrame({"trial_id": [probes[0][1]], "unit": ["u0"]}))
    assert known.patch_points(probes[0][1]) is not None and reads[("u0", index)] == 1  # the table said where
    assert len(store.finished_rows()) == len(probes) and all(v == 1 for k, v in reads.items() if k[1] == index)


def test_damaged_files_are_named_with_what_resume_does(probes, tmp_path):
    root = _as_units(probes, tmp_path / "d")  # u0 (3 probes), u1 (3), u2 (3, one input-only)
    _as_dirs(probes[:2], root)
    assert open_store(root).damage() == []
    rec = root / "probes" / "records" / "u0.parquet"
    rec.write_bytes(rec.read_bytes()[:200])  # a truncated records file
    (root / "probes" / "preds" / "u1.parquet").write_bytes(b"")
    heads = root / "probes" / "heads" / "u2.safetensors"
    heads.write_bytes(heads.read_bytes()[:-4])
    t0, t1 = probes[0][1], probes[1][1]
    (root / "trials" / t0 / "metrics.json").write_text("{trunc")
    (root / "trials" / t1 / "head.safetensors").unlink()
    got = {d.path: d for d in open_store(root).damage()}
    assert set(got) == {"probes/records/u0.parquet", "probes/preds/u1.parquet", "probes/heads/u2.safetensors",
                        f"trials/{t0}/metrics.json", f"trials/{t1}/head.safetensors"}
    u0 = got["probes/records/u0.parquet"]
    assert u0.rerun and set(u0.trial_ids) == {t for _, t, _ in probes[:3]}  # read from its other files
    assert u0.line().startswith("damaged: probes/records/u0.parquet: ArrowInvalid: ") and \
        u0.line().endswith("--resume reruns its 3 trials")
    u1 = got["probes/preds/u1.parquet"]
    assert not u1.rerun and u1.record == "probes/records/u1.parquet" and len(u1.trial_ids) == 3
    assert "delete probes/records/u1.parquet and --resume reruns them" in u1.line()
    assert not got["probes/heads/u2.safetensors"].rerun
    assert got[f"trials/{t0}/metrics.json"].rerun and got[f"trials/{t1}/head.safetensors"].why == "ValueError: missing"
    rows = {r["trial_id"]: r["status"] for r in open_store(root).finished_rows()}
    assert probes[2][1] not in rows and rows[t0] == "damaged" and rows[t1] == "ok"  # u0's third probe is missing


def test_rows_that_do_not_match_their_record_are_damage(probes, tmp_path):
    """A predictions file that reads but lacks a probe's rows (a file of another unit copied over it)."""
    root = _as_units(probes, tmp_path / "r")
    shutil.copy(root / "probes" / "preds" / "u1.parquet", root / "probes" / "preds" / "u0.parquet")
    (d,) = open_store(root).damage()
    assert d.path == "probes/preds/u0.parquet" and "without the test rows their record counts" in d.why


# -- status and --resume on a launched sweep ------------------------------------------------------------

PROBES_ONLY = """
name: probes
model: nsr-tiny
corpus: {n_texts: 160, max_tokens: 24}
layers: [1]
neurons: [3, 7]
heads: [regression, classification]
freeze: [none]
controls: [shuffled]
training: {epochs: 2, batch_size: 16}
analysis: {patch_texts: 8}
resources: {workers: 2}
"""


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "nsr_sweep.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_status_names_a_truncated_unit_file_and_resume_reruns_its_trials_once(tmp_path):
    sweep = tmp_path / "probes.yaml"
    sweep.write_text(PROBES_ONLY)
    launch = ("launch", str(sweep), "--out", str(tmp_path / "res"), "--no-dashboard")
    r = _cli(*launch)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = tmp_path / "res" / "probes"
    units = sorted((d / "probes" / "records").glob("*.parquet"))
    assert len(units) == 2  # a unit per neuron: its 4 probes (2 heads, real and shuffled)
    lost = pd.read_parquet(units[0])["trial_id"].tolist()
    ok = _cli("status", str(d))
    assert ok.returncode == 0 and "damaged" not in ok.stdout and "(finished): 8/8" in ok.stdout
    units[0].write_bytes(units[0].read_bytes()[:1000])  # truncated, as a full disk or a killed copy leaves it
    st = _cli("status", str(d))
    assert st.returncode == 2, st.stdout + st.stderr
    rel = units[0].relative_to(d).as_posix()
    damaged = [line.strip() for line in st.stdout.splitlines() if line.strip().startswith("damaged:")]
    assert damaged == [f"damaged: {rel}: ArrowInvalid: Parquet magic bytes not found in footer; "
                       f"--resume reruns its {len(lost)} trials"], st.stdout
    assert "(incomplete): 4/8 trials finished" in st.stdout and f"reruns the {len(lost)} trial(s)" in st.stdout
    js = json.loads(_cli("status", str(d), "--json").stdout)
    assert [(x["path"], x["trials"], x["rerun"]) for x in js["damaged"]] == [(rel, len(lost), True)]

    again = _cli(*launch, "--resume")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    runs = Counter(json.loads(line)["trial_id"] for line in (d / "runs.jsonl").read_text().splitlines())
    assert {t for t, n in runs.items() if n == 2} == set(lost) and set(runs.values()) == {1, 2}  # those, once more
    assert sorted((d / "probes" / "records").glob("*.parquet")) == units  # the unit rewritten in place
    df = pd.read_parquet(d / "tables" / "trials.parquet")
    assert len(df) == 8 and df["trial_id"].is_unique and (df["status"] == "ok").all()
    preds = open_store(d).test_predictions()
    assert preds.groupby("trial_id").size().to_dict() == dict(zip(df["trial_id"], df["n_test"]))  # no duplicate row
    assert _cli("status", str(d)).returncode == 0
