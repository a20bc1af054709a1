"""The launch as one object, without Ray: `LaunchOptions` built once and carried whole, the phases that need no
cluster (validation, the disk's room, the count, the timings, a failure's record, stopping once), and what a
full disk leaves behind (the state rewritten in place, logs cut back to whole lines)."""

import errno
import json
import os
from dataclasses import fields
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from nsr_sweep.cli import main
from nsr_sweep.core.errors import NsrError
from nsr_sweep.core.spec import parse_sweep
from nsr_sweep.results.layout import STATE, read_state, update_state
from nsr_sweep.sweep import disk
from nsr_sweep.sweep.launch import Launch, missing_trials, work_seconds
from nsr_sweep.sweep.options import LaunchOptions

BASE = {"name": "t", "model": "nsr-tiny", "layers": [1], "neurons": [3, 5], "heads": ["regression"],
        "freeze": ["none", "after_target"], "corpus": {"n_texts": 160, "max_tokens": 24},
        "search": {"num_samples": 2}}


def _sweep(tmp_path: Path, **kw) -> str:
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({**BASE, **kw}))
    return str(f)


def test_the_cli_flags_are_the_options_fields_and_its_arguments_parse_back_to_the_same_options():
    launch = main.commands["launch"]
    flags = {p.name for p in launch.params} - {"dry_run"}
    assert flags == {f.name for f in fields(LaunchOptions)}  # each field is the flag of its name, nothing else
    opts = LaunchOptions("s.yaml", out="/r", address="auto", resume=True, dashboard=False, dashboard_host="::1",
                         cache_root="/c", ray_network="host", storage="s3://b/p", optuna_storage="sqlite:///x.db",
                         tensorboard=True, mlflow="")
    ctx = launch.make_context("launch", opts.cli_args())
    assert LaunchOptions(**{k: v for k, v in ctx.params.items() if k != "dry_run"}) == opts
    assert LaunchOptions.from_json(opts.to_json()) == opts  # the isolated child's copy: the same options
    assert LaunchOptions("s.yaml").cli_args() == ["s.yaml"]  # defaults are left out
    assert LaunchOptions("my sweep.yaml", out="r").resume_command() == "nsr-sweep launch 'my sweep.yaml' --out r --resume"
    with pytest.raises(NsrError, match="unknown option 'worker'; allowed: out, address"):
        LaunchOptions.of(sweep_file="s.yaml", worker=2)
    with pytest.raises(AttributeError):
        opts.resume = False  # type: ignore[misc]  # frozen: carried unchanged


def test_validation_refuses_a_results_root_without_room_in_one_line_before_anything_is_written(tmp_path, monkeypatch):
    f = _sweep(tmp_path)
    spec = parse_sweep({**BASE})
    need = disk.estimate_bytes(spec)
    # 2 neurons: 2 exact probes (one unit each, at most) and 2 × 2 fine-tuned trials, the sweep's own files
    assert need == (disk.SWEEP_BYTES + 2 * (disk.PROBE_BYTES + disk.PROBE_TEST_TEXT_BYTES * 24) + 2 * disk.UNIT_BYTES
                    + 4 * (disk.TRIAL_BYTES + disk.TRIAL_TEXT_BYTES * 160))
    usage = type("Usage", (), {"free": need - 1, "total": 10**9})
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: usage)
    launch = Launch(LaunchOptions(f, out=str(tmp_path / "res")))
    with pytest.raises(NsrError) as e:
        launch.validate()
    assert str(e.value) == (f"--out: {tmp_path} has {disk.human(need - 1)} free (of 1.0 GB), and sweep 't' will write "
                            f"about {disk.human(need)}: free space there or choose another --out")
    r = CliRunner().invoke(main, ["launch", f, "--out", str(tmp_path / "res"), "--dry-run"])  # the same pass
    assert r.exit_code == 2 and r.output.strip() == f"error: {e.value}"
    assert not (tmp_path / "res").exists()
    usage.free = need
    r = CliRunner().invoke(main, ["launch", f, "--out", str(tmp_path / "res"), "--dry-run"])
    assert r.exit_code == 0 and r.output.splitlines()[-1] == \
        f"  results: about {disk.human(need)} to write into {tmp_path / 'res' / 't'} ({disk.human(need)} free there)"
    launch.validate()
    assert launch.sweep_dir == tmp_path / "res" / "t" and launch.network == "auto"


def test_a_resumed_sweep_needs_room_only_for_what_it_has_not_written(tmp_path, monkeypatch):
    spec = parse_sweep({**BASE})
    need = disk.estimate_bytes(spec)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "written").write_bytes(b"x" * 100_000)
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: type("U", (), {"free": need - 100_000, "total": 1}))
    disk.check_room(spec, tmp_path / "t")
    with pytest.raises(NsrError, match="will write about"):
        disk.check_room(spec, tmp_path / "u")


def test_saved_weights_count_unless_they_go_to_storage(tmp_path):
    spec = parse_sweep({**BASE, "training": {"save_weights": True}})
    plain = disk.estimate_bytes(parse_sweep({**BASE}))
    weights = disk.estimate_bytes(spec) - plain
    # nsr-tiny: 4 blocks, d_model 128, 256 positions, its vocabulary; float32; 4 fine-tuned trials
    from nsr_sweep.core.models import model_shape

    s = model_shape("nsr-tiny")
    assert weights == 4 * 4 * (s["d_vocab"] * 128 + s["n_ctx"] * 128 + 12 * 4 * 128 * 128)


def test_a_model_whose_weights_are_not_here_is_refused_by_dry_run_and_launch_before_ray(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import ray

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model in ("openai-community/gpt2", {"name": "nsr-tiny"}):
        controls = [{"cross_model": "openai-community/gpt2"}] if isinstance(model, dict) else []
        f = _sweep(tmp_path, model=model, controls=controls, layers=[1])
        for extra in (["--dry-run"], []):
            r = CliRunner().invoke(main, ["launch", f, "--out", str(tmp_path / "res"), "--ray-network", "host", *extra])
            assert r.exit_code == 2 and "model 'openai-community/gpt2' was not found locally" in r.output, r.output
            assert len(r.output.strip().splitlines()) == 1 and not ray.is_initialized()
        if controls:
            assert r.output.startswith(f"error: {f}: controls: cross_model: ")
    assert not (tmp_path / "res").exists()


def test_the_count_and_the_timings_come_from_the_rows_and_the_phases_clocks():
    rows = [{"trial_id": "a", "status": "ok"}, {"trial_id": "b", "status": "failed"},
            {"trial_id": "c", "status": "damaged"}]
    assert missing_trials({"a", "b", "c", "d"}, pd.DataFrame(rows)) == ["c", "d"]
    assert missing_trials({"a"}, pd.DataFrame()) == ["a"]
    work = pd.DataFrame([{"seconds": 2.0, "artefact_seconds": 1.0}, {"seconds": float("nan")},
                         {"seconds": float("inf"), "artefact_seconds": 0.5}])
    assert work_seconds(work) == 3.5 and work_seconds(pd.DataFrame()) == 0.0
    launch = Launch(LaunchOptions("s.yaml"))
    launch.times = {"start": 100.0, "ray": 104.0, "cache": 110.0, "trials": 130.0}
    launch.n_workers, launch.state = 2, {"started": 100.0}
    t = launch.timings(30.0)
    assert {k: t[k] for k in ("ray_init_s", "cache_s", "trials_wall_s", "trial_work_s", "scheduling_overhead_s")} == \
        {"ray_init_s": 4.0, "cache_s": 6.0, "trials_wall_s": 20.0, "trial_work_s": 30.0, "scheduling_overhead_s": 5.0}


def test_ray_is_stopped_once_however_the_launch_ends():
    class Local:
        stops = 0

        def stop(self):
            Local.stops += 1

    launch = Launch(LaunchOptions("s.yaml"))
    launch.local, launch.ray_started = Local(), True
    launch.stop()
    launch.stop()  # `run`'s finally, after the stop before the report
    assert Local.stops == 1 and launch.local is None and not launch.ray_started


def _full(path: Path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_full_disk_is_recorded_failed_in_one_line_with_the_resume_command(tmp_path, monkeypatch):
    sweep_dir = tmp_path / "res" / "t"
    (sweep_dir / "probes" / "records").mkdir(parents=True)
    update_state(sweep_dir, status="running", name="t")
    launch = Launch(LaunchOptions("s.yaml", out=str(tmp_path / "res"), dashboard=False))
    launch.sweep_dir = sweep_dir
    usage = type("Usage", (), {"free": 4096, "total": 10**6})
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: usage)
    wrapped = RuntimeError("Tune gave up")  # however deep Tune or Ray wrapped it
    wrapped.__cause__ = _full(sweep_dir / "probes" / "records" / ".u.parquet.abcd1234")
    full = launch.record_failure(wrapped)
    want = (f"no space left on device: {sweep_dir / 'probes' / 'records'} has 4.1 kB free (of 1.0 MB); the records written so "
            f"far are kept: free space there, then `nsr-sweep launch s.yaml --out {tmp_path / 'res'} --no-dashboard "
            "--resume`")
    assert str(full) == want and "\n" not in want
    state = read_state(sweep_dir)
    assert state["status"] == "failed" and state["error"] == want
    assert launch.record_failure(RuntimeError("not a disk")) is None  # failed already: the first reason stays
    assert read_state(sweep_dir)["error"] == want


def test_on_a_full_disk_the_state_is_rewritten_in_place_within_its_spare_room(tmp_path, monkeypatch):
    from nsr_sweep.results import layout

    update_state(tmp_path, status="running", workers=2)
    size = (tmp_path / STATE).stat().st_size
    assert size >= layout.STATE_ROOM and json.loads((tmp_path / STATE).read_text())["workers"] == 2

    def no_room(path, write):
        raise _full(path)

    monkeypatch.setattr(layout, "atomic_write", no_room)
    update_state(tmp_path, status="failed", error="x" * 2000)
    assert read_state(tmp_path) == {"status": "failed", "workers": 2, "error": "x" * 2000}
    assert (tmp_path / STATE).stat().st_size == size  # not a byte more
    with pytest.raises(OSError):
        update_state(tmp_path, error="x" * (size + 1))  # what does not fit is not written half


def test_logs_a_full_disk_cut_short_lose_only_their_unfinished_line(tmp_path):
    from nsr_sweep.results.layout import RUNS, STUDIES, remove_partial_writes

    (tmp_path / RUNS).write_text('{"trial_id": "a"}\n{"trial_id": "b"}\n{"trial_')
    (tmp_path / STUDIES).write_text('{"op_code": 0}\n')
    assert remove_partial_writes(tmp_path) == [tmp_path / RUNS]
    assert (tmp_path / RUNS).read_text() == '{"trial_id": "a"}\n{"trial_id": "b"}\n'
    assert (tmp_path / STUDIES).read_text() == '{"op_code": 0}\n'


def test_tunes_own_log_of_a_full_disk_is_not_printed_but_stops_the_launch(tmp_path):
    import io
    import logging

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    ray_logger = logging.getLogger("ray")
    ray_logger.addHandler(handler)
    noted: list[OSError] = []
    try:
        with disk.full_disk_logs_noted(noted.append):
            log = logging.getLogger("ray.tune.execution.experiment_state")
            try:
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "tune"))
            except OSError:
                log.error("Saving experiment state to storage failed with exception: ", exc_info=True)
            log.error("something else went wrong")
        log.error("after: printed again")
    finally:
        ray_logger.removeHandler(handler)
    assert noted and {(e.errno, e.filename) for e in noted} == {(errno.ENOSPC, str(tmp_path / "tune"))}  # (per handler)
    assert out.getvalue() == "something else went wrong\nafter: printed again\n"


def test_a_resume_into_a_disk_that_is_still_full_says_so_in_one_line(tmp_path, monkeypatch):
    from nsr_sweep.results import layout

    f = _sweep(tmp_path)

    def no_room(path, write):
        raise _full(path)

    monkeypatch.setattr(layout, "atomic_write", no_room)  # sweep.yaml cannot be written
    monkeypatch.setattr(disk, "check_room", lambda *a: None)  # (what the sweep dir already holds passed it)
    r = CliRunner().invoke(main, ["launch", f, "--out", str(tmp_path / "res"), "--resume", "--ray-network", "host"])
    assert r.exit_code == 2 and r.output.startswith(f"error: no space left on device: {tmp_path / 'res' / 't'} has ")
    assert r.output.strip().endswith(f"`nsr-sweep launch {f} --out {tmp_path / 'res'} --ray-network host --resume`")
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "res" / "t" / "sweep.lock").exists()


def test_the_full_disk_behind_a_workers_error_names_the_workers_file(tmp_path):
    import ray.exceptions

    cache = tmp_path / "cache" / "ab12" / "acts.safetensors"
    try:
        raise _full(cache)
    except OSError as e:
        wrapped = ray.exceptions.RayTaskError("build_cache", "Traceback …", e).as_instanceof_cause()
    assert disk.disk_full_error(wrapped).filename == str(cache)
    assert disk.disk_full_error(RuntimeError("no")) is None


def test_tunes_saved_stopper_holds_no_rows():
    """Tune pickles its stopper into tune/experiment_state-*.json at every checkpoint: the full-disk stopper reads the
    live collector but saves nothing of it (it held every row, 40 MB of every-neuron's tune/, before)."""
    import pickle
    from types import SimpleNamespace

    import cloudpickle  # what Tune saves its state with

    from nsr_sweep.sweep.launch import _stop_on_full_disk

    collector = SimpleNamespace(disk_full=None, rows=[{"x": float(i)} for i in range(100_000)])
    stopper = _stop_on_full_disk(collector)
    saved = cloudpickle.dumps(stopper)
    assert len(saved) < 10_000 and not pickle.loads(saved).stop_all()
    assert not stopper.stop_all()
    collector.disk_full = "results: no space left"
    assert stopper.stop_all() and stopper("t", {}) is False


def test_the_launchs_own_process_never_imports_torch(tmp_path):
    """The driver holds nothing of the model: its modules, the validation of a sweep without a cross-model and the
    report import no torch (190 MB of a process whose memory must stay flat at a layer's scale)."""
    import subprocess
    import sys

    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({**BASE, "name": "no-torch"}))
    code = (f"import sys\nfrom nsr_sweep.sweep.launch import Launch\nfrom nsr_sweep.sweep.options import LaunchOptions\n"
            "from nsr_sweep.sweep import grid, inputs, progress, search, trainable, transport, workers\n"
            "from nsr_sweep.report import build\nfrom nsr_sweep.core import cache\n"
            f"Launch(LaunchOptions({str(sweep)!r}, out={str(tmp_path / 'out')!r})).validate()\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                                                                                            "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
