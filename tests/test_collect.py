"""Trial records on their way to the driver (collect.py), and what a model worker checks before it starts."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nsr_sweep.cache import ActivationCache, CacheSpec
from nsr_sweep.collect import Inbox, pack_trial, write_bundle
from nsr_sweep.corpus import load_corpus
from nsr_sweep.errors import NsrError
from nsr_sweep.models import load_model
from nsr_sweep.sweepdir import RECORD, save_trial
from nsr_sweep.trial import TrialSpec, run_trial
from nsr_sweep.workers import check_version, forwarded_env, gpu_budget


@pytest.fixture(scope="module")
def finetuned(family_dirs):
    m = load_model(str(family_dirs["gpt2"]))
    cache = ActivationCache.build(m, load_corpus(n_texts=160), CacheSpec(layers=(1,), max_tokens=24, store_resid=True),
                                  progress=False)
    r = run_trial(cache, m, TrialSpec(layer=1, neuron=3, freeze="after_target", epochs=1, lr=1e-2, save_weights=True,
                                      analyses=False))
    assert r.status == "ok", r.reason
    return r


def _weights(path) -> dict:
    return load_file(str(path / "model.safetensors"))


def test_a_packed_trial_written_by_the_driver_is_the_directory_save_trial_writes(finetuned, tmp_path):
    """Every file byte for byte (the record but for its timing), the record last; written once, logged once."""
    direct = save_trial(finetuned, tmp_path / "direct" / "L1-N3-regression-after_target-s0")
    bundle = pack_trial(finetuned, "L1-N3-regression-after_target-s0", 0, plot=True, storage=None, sweep="s")
    assert list(bundle["files"])[-1] == RECORD
    sweep_dir = tmp_path / "sweep"
    row = write_bundle(sweep_dir, bundle)
    got = sweep_dir / "trials" / "L1-N3-regression-after_target-s0"
    assert row["trial_id"] == "L1-N3-regression-after_target-s0" and row["status"] == "ok"
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
    assert write_bundle(sweep_dir, bundle) is None  # a retried trial's second arrival: kept once
    (got / RECORD).write_text("{truncated")  # damaged: the next arrival replaces it
    assert write_bundle(sweep_dir, bundle)["status"] == "ok" and json.loads((got / RECORD).read_text())["status"] == "ok"
    runs = [json.loads(line) for line in (sweep_dir / "runs.jsonl").read_text().splitlines()]
    assert [r["trial_id"] for r in runs] == ["L1-N3-regression-after_target-s0"] * 2 and runs[0]["pid"]


def test_saved_weights_go_to_storage_and_the_record_names_where(finetuned, tmp_path):
    store = tmp_path / "store"
    bundle = pack_trial(finetuned, "L1-N3-regression-after_target-s1", 1, plot=False, storage=str(store), sweep="s")
    uri = json.loads(bundle["files"][RECORD])["metrics"]["model_uri"]
    assert uri == f"{store}/s/trials/L1-N3-regression-after_target-s1/model"
    assert not any(f.startswith("model/") for f in bundle["files"]) and "diagnostics.png" not in bundle["files"]
    direct = save_trial(finetuned, tmp_path / "direct")
    w, want = _weights(store / "s/trials/L1-N3-regression-after_target-s1/model"), _weights(direct / "model")
    assert w.keys() == want.keys() and all(torch.equal(w[k], want[k]) for k in w)


def test_the_inbox_keeps_each_trial_once_and_hands_it_over_once():
    inbox = Inbox(finished=["a"])
    assert inbox.put([{"trial_id": "a", "row": {}}, {"trial_id": "b", "row": {"r": 1}}]) == 1  # a finished earlier
    assert inbox.put([{"trial_id": "b", "row": {"r": 2}}]) == 0  # b's retry arrives too: dropped
    assert inbox.rows(["a", "b", "c"]) == {"a": {"trial_id": "a", "status": "ok"}, "b": {"r": 1}}
    assert [b["trial_id"] for b in inbox.take()] == ["b"] and inbox.take() == []


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
