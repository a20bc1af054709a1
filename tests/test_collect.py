"""Trial records on their way to the driver (sweep/transport.py), the worker pool's outcomes, and what a model worker checks before it starts."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nsr_sweep.core.cache import ActivationCache, CacheSpec
from nsr_sweep.core.corpus import load_corpus
from nsr_sweep.core.errors import NsrError
from nsr_sweep.core.models import load_model
from nsr_sweep.core.trial import TrialSpec, run_trial
from nsr_sweep.report.plots import trial_chart
from nsr_sweep.results.layout import RECORD
from nsr_sweep.results.records import save_trial
from nsr_sweep.sweep.transport import Inbox, pack_trial, write_bundle
from nsr_sweep.sweep.workers import check_version, forwarded_env, gpu_budget


@pytest.fixture(scope="module")
def finetuned(family_dirs):
    m = load_model(str(family_dirs["gpt2"]))
    cache = ActivationCache.build(m, load_corpus(n_texts=160), CacheSpec(layers=(1,), max_tokens=24, store_resid=True),
                                  progress=False)
    r = run_trial(cache, m, TrialSpec(layer=1, neuron=3, freeze="after_target", training={"epochs": 1, "lr": 1e-2, "save_weights": True}, analysis={"enabled": False}))
    assert r.status == "ok", r.reason
    return r


def _weights(path) -> dict:
    return load_file(str(path / "model.safetensors"))


def test_a_packed_trial_written_by_the_driver_is_the_directory_save_trial_writes(finetuned, tmp_path):
    """Every file byte for byte (the record but for its timing), the record last; written once, logged once."""
    tid = "L1-N3-regression-after_target-s0"
    direct = save_trial(finetuned, tmp_path / "direct" / tid, chart=trial_chart)  # the worker draws it
    bundle = pack_trial(finetuned, tid, 0, plot=True, storage=None, sweep="s")
    assert list(bundle["files"])[-1] == f"trials/{tid}/{RECORD}" and bundle["trial_ids"] == [tid]
    sweep_dir = tmp_path / "sweep"
    rows = write_bundle(sweep_dir, bundle)
    got = sweep_dir / "trials" / tid
    assert [r["trial_id"] for r in rows] == [tid] and rows[0]["status"] == "ok"
    files = sorted(p.relative_to(direct).as_posix() for p in direct.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file())
    assert "model/model.safetensors" in files and "diagnostics.png" in files
    for f in files:
        if f != RECORD:
            assert (direct / f).read_bytes() == (got / f).read_bytes(), f
    a, b = (json.loads((d / RECORD).read_text()) for d in (direct, got))
    for rec in (a, b):
        rec["metrics"].pop("artefact_seconds")
    assert a == b
    assert write_bundle(sweep_dir, bundle) == []  # a retried trial's second arrival: kept once
    (got / RECORD).write_text("{truncated")  # damaged: the next arrival replaces it
    assert write_bundle(sweep_dir, bundle)[0]["status"] == "ok" and json.loads((got / RECORD).read_text())["status"] == "ok"
    runs = [json.loads(line) for line in (sweep_dir / "runs.jsonl").read_text().splitlines()]
    assert [r["trial_id"] for r in runs] == [tid] * 2 and runs[0]["pid"]


def test_a_unit_is_rows_of_parquet_datasets_that_read_back_as_each_probe(tmp_path):
    """A unit of batched probes travels as four files; written by the driver, each probe reads back — its record,
    test predictions, patching points and head — equal to what run_trials produced."""
    import numpy as np

    from nsr_sweep.core.trial import run_trials
    from nsr_sweep.results.store import open_store
    from nsr_sweep.sweep.transport import pack_unit

    m = load_model("nsr-tiny")
    cache = ActivationCache.build(m, load_corpus(n_texts=160), CacheSpec(layers=(1,), max_tokens=24), progress=False)
    specs = [TrialSpec(layer=1, neuron=n, head=h, control=c, analysis={"patch_texts": 8, "n_grid": 3})
             for n in (4, 9) for h in ("regression", "classification") for c in (None, "shuffled")]
    specs.append(TrialSpec(layer=1, neuron=4, control="input_only", analysis={"patch_texts": 8, "n_grid": 3}))
    results = run_trials(cache, m, specs)
    ids = [f"t{i}" for i in range(len(specs))]
    bundle = pack_unit([(r, t, 0) for r, t in zip(results, ids)], "L1-N4..9-abcdef12")
    assert list(bundle["files"])[-1] == "probes/records/L1-N4..9-abcdef12.parquet"
    sweep_dir = tmp_path / "sweep"
    rows = write_bundle(sweep_dir, bundle)
    assert sorted(r["trial_id"] for r in rows) == sorted(ids) and write_bundle(sweep_dir, bundle) == []
    store = open_store(sweep_dir)
    assert sorted(r["trial_id"] for r in store.finished_rows()) == sorted(ids)
    preds = store.test_predictions()
    for t, r in zip(ids, results):
        test = r.preds[r.preds["split"] == "test"]
        got = preds[preds["trial_id"] == t].sort_values("text_id")
        np.testing.assert_array_equal(got["pred"].to_numpy(), test["pred"].to_numpy())
        np.testing.assert_array_equal(got["actual_orig"].to_numpy(), test["actual_orig"].to_numpy())
        rec = store.record(t)
        assert rec["spec"] == r.spec.model_dump(mode="json") and rec["metrics"]["pearson_r"] == r.metrics["pearson_r"]
        pts = store.patch_points(t)
        if r.spec.control == "input_only":
            assert pts is None and store.head(t) is None  # token-count heads are not kept
            continue
        np.testing.assert_array_equal(pts["delta_pred"].to_numpy(), r.patch["delta_pred"].to_numpy())
        head = store.head(t)
        assert set(head) == set(r.head) and all(torch.equal(head[k], r.head[k]) for k in head)


def test_saved_weights_go_to_storage_and_the_record_names_where(finetuned, tmp_path):
    store = tmp_path / "store"
    tid = "L1-N3-regression-after_target-s1"
    bundle = pack_trial(finetuned, tid, 1, plot=False, storage=str(store), sweep="s")
    uri = json.loads(bundle["files"][f"trials/{tid}/{RECORD}"])["metrics"]["model_uri"]
    assert uri == f"{store}/s/trials/{tid}/model"
    assert not any(f.startswith(f"trials/{tid}/model/") for f in bundle["files"])
    assert f"trials/{tid}/diagnostics.png" not in bundle["files"]
    direct = save_trial(finetuned, tmp_path / "direct")
    w, want = _weights(store / f"s/trials/{tid}/model"), _weights(direct / "model")
    assert w.keys() == want.keys() and all(torch.equal(w[k], want[k]) for k in w)


def test_the_inbox_keeps_each_trial_once_and_hands_it_over_once():
    inbox = Inbox(finished=["a"])
    one = lambda t, r: {"unit": None, "trial_ids": [t], "rows": [{"trial_id": t, **r}]}  # noqa: E731
    assert inbox.put([one("a", {}), one("b", {"r": 1})]) == 1  # a finished earlier
    assert inbox.put([one("b", {"r": 2})]) == 0  # b's retry arrives too: dropped
    unit = {"unit": "u", "trial_ids": ["c", "d"], "rows": [{"trial_id": "c"}, {"trial_id": "d"}]}
    assert inbox.put([unit]) == 1 and inbox.put([unit]) == 0
    assert inbox.rows(["a", "b", "c", "x"]) == {"a": {"trial_id": "a", "status": "ok"}, "b": {"trial_id": "b", "r": 1}}
    assert inbox.has_unit("u") and not inbox.has_unit("c")  # a unit is known by its id, not its probes one by one
    assert [b["trial_ids"] for b in inbox.take()] == [["b"], ["c", "d"]] and inbox.take() == []


def test_a_worker_with_another_version_refuses_to_start_and_names_both():
    from nsr_sweep import __version__

    check_version(__version__)
    with pytest.raises(NsrError, match=rf"has nsr-sweep {__version__}, the driver 0\.0\.0-other: install the same"):
        check_version("0.0.0-other")


def test_workers_get_the_drivers_hub_cache_and_nsr_settings(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "HF_HOME", "NSR_CACHE_DIR", "PATH_LIKE"):
        monkeypatch.setenv(k, f"v-{k}")
    env = forwarded_env()
    assert {k: env[k] for k in ("HF_HUB_OFFLINE", "HF_HOME", "NSR_CACHE_DIR")} == {
        "HF_HUB_OFFLINE": "v-HF_HUB_OFFLINE", "HF_HOME": "v-HF_HOME", "NSR_CACHE_DIR": "v-NSR_CACHE_DIR"}
    assert "PATH_LIKE" not in env


def test_a_gpu_share_too_small_for_the_model_is_refused_with_the_least_share_that_fits():
    gib = 2**30
    gpu_budget(int(0.5 * gib), 80 * gib, 0.25, trainable=True)  # GPT-2 small, fine-tuned, a quarter of 80 GB
    with pytest.raises(NsrError, match=r"gpus_per_worker 0\.25: .* ≈40\.0 GiB \(fine-tuning\).* 20\.0 GiB; allowed ≥ 0\.50"):
        gpu_budget(8 * gib, 80 * gib, 0.25, trainable=True)
    gpu_budget(8 * gib, 80 * gib, 0.25, trainable=False)  # weights alone fit: 10 GiB of 20
    gpu_budget(8 * gib, 80 * gib, 2.0, trainable=False)  # a worker reserving two GPUs still uses one
    with pytest.raises(NsrError, match="more than a whole 80 GiB GPU"):
        gpu_budget(30 * gib, 80 * gib, 2.0, trainable=True)


def test_the_pool_tells_a_failed_trial_from_a_lost_one_by_the_exceptions_type():
    """The trial's own code raising (a RayTaskError) is a failure, recorded as such with the cause; a dead actor,
    node or object (also wrapped in a RayTaskError), or every worker gone, is lost — by type, not by text (the
    messages here say nothing of either)."""
    import asyncio

    import ray.exceptions as E

    from nsr_sweep.sweep.workers import RERUNS_ON_DEAD_WORKER, WorkerPool

    class Worker:
        def __init__(self, raises):
            self.raises, self.calls = raises, 0
            self.run = self  # `worker.run.remote(config)`, as on an actor handle

        async def remote(self, config):
            self.calls += 1
            if self.raises is not None:
                raise self.raises
            return {"trial_id": config["trial_id"], "status": "ok"}

    def outcome(workers, tid="t"):
        pool = WorkerPool(workers)

        async def go():
            try:
                await pool.run({"trial_id": tid})
            except Exception as e:  # noqa: BLE001 - the pool re-raises what it classified
                return type(e)
        raised = asyncio.run(go())
        return pool.outcome(tid), raised, pool.alive

    cause = ValueError("no words about workers here")
    (how, why), raised, alive = outcome([Worker(E.RayTaskError("run", "tb", cause))])
    assert how == "failed" and why == "ValueError: no words about workers here" and alive == {0}
    (how, why), raised, alive = outcome([Worker(E.RayTaskError("run", "tb", E.ActorDiedError()))])
    assert how == "lost" and why.startswith("ActorDiedError")
    dying = [Worker(E.ActorDiedError()) for _ in range(RERUNS_ON_DEAD_WORKER + 2)]
    (how, why), raised, alive = outcome(dying)
    assert how == "lost" and why.startswith("ActorDiedError") and [w.calls for w in dying] == [1, 1, 1, 0]
    assert alive == {3}  # the dead were dropped; the last one never ran it
    (how, why), raised, alive = outcome([Worker(E.ActorDiedError())])  # the only worker died: none left to rerun on
    assert how == "lost" and "every model worker is gone" in why and alive == set()
    (how, why), raised, alive = outcome([Worker(E.ActorDiedError()), Worker(None)])
    assert how == "ok" and raised is None and alive == {1}  # rerun on the live worker
    for unreachable in (E.ActorUnavailableError("blip", None), E.NodeDiedError("n")):  # it may still be running
        (how, why), raised, alive = outcome([Worker(unreachable), Worker(None)])
        assert how == "lost" and why.startswith(type(unreachable).__name__) and alive == {0, 1}  # kept, not rerun
    assert outcome([Worker(None)], "other")[0] == ("ok", "") and WorkerPool([]).outcome("never") == ("unseen", "")


def test_the_collector_counts_what_finished_keeps_no_row_once_shown_and_snapshots_only_a_small_table(tmp_path,
                                                                                                    monkeypatch):
    """The driver's memory is flat in the number of trials: rows are counted (Tally), held only until a progress line
    shows them, and the table's snapshot — which holds the whole table — stops past SNAPSHOT_ROWS, and is removed
    then (a stale one would be read as the table)."""
    from types import SimpleNamespace

    import nsr_sweep.results.tables as tables
    import nsr_sweep.sweep.transport as transport

    written = []
    monkeypatch.setattr(tables, "write_trials_table", lambda d, *a: written.append(len(written)) or
                        (d / "tables").mkdir(exist_ok=True) or (d / "tables" / "trials.parquet").write_text("x"))
    monkeypatch.setattr(transport, "SNAPSHOT_ROWS", 3)
    monkeypatch.setattr(transport, "TABLE_EVERY_S", 0.0)
    spec = SimpleNamespace(search=SimpleNamespace(metric="val_mse", mode="min"))
    c = transport.Collector(tmp_path, spec, [{"trial_id": "old", "status": "ok", "pearson_r": 0.9}], None, None)
    row = lambda t, s="ok", r=0.5: {"trial_id": t, "status": s, "pearson_r": r}  # noqa: E731
    c._keep([row("a"), row("b", "failed", float("nan"))])
    assert written == [0] and c.tally.counts == {"ok": 2, "failed": 1} and c.tally.best == (0.9, "old")
    assert c.shown(["a", "x"]) == [row("a")] and c.shown(["a"]) == [] and list(c.unshown) == ["b"]
    c._keep([row("c", r=0.95)])
    assert len(written) == 1 and c.tally.best == (0.95, "c") and c.tally.total == 4  # past 3: no snapshot …
    assert not (tmp_path / "tables" / "trials.parquet").exists()  # … and none left stale
