"""The local Ray cluster's footprint and a launch's lifecycle under SIGKILL, measured from outside:
listeners (`ss -ltnp`), processes (/proc), the token file, what a killed launch leaves on disk."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from nsr_sweep.results.layout import claim, lock_holder, release, remove_partial_writes
from nsr_sweep.sweep import localray

SWEEP = """
name: {name}
model: nsr-tiny
corpus: {{n_texts: 160, max_tokens: 24}}
layers: [1]
neurons: [7, 40]
heads: [regression]
freeze: [none, all]
training: {{epochs: 1, batch_size: 16}}
search: {{num_samples: 2, space: {{lr: {{loguniform: [1.0e-3, 1.0e-2]}}}}}}
resources: {{workers: 2}}
"""
N_TRIALS = 2 * (1 + 2)  # per neuron: the exact probe once, two sampled unfrozen trials


def _env(**kw) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **kw}


def _launch(sweep: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "nsr_sweep.cli", "launch", str(sweep), "--out", str(out), *extra]


def _descendants(root: int) -> dict[int, str]:
    """pid → command name of every process below `root` now."""
    kids: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(p))
    out, todo = {}, [root]
    while todo:
        for k in kids.get(todo.pop(), []):
            try:
                out[k] = Path(f"/proc/{k}/comm").read_text().strip()
            except OSError:
                continue
            todo.append(k)
    return out


def _alive(pids) -> list[int]:
    """Those still running (a zombie waiting for its reaper is not running)."""
    out = []
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            out.append(p)
    return out


def _listeners() -> list[tuple[str, int]]:
    """(local address, pid) of every TCP listener this network namespace shows (`ss -ltnp`)."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        local = line.split()[3]
        rows += [(local.rsplit(":", 1)[0], int(pid)) for pid in re.findall(r"pid=(\d+)", line)]
    return rows


def _loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr in ("[::1]", "[::ffff:127.0.0.1]") or addr.startswith("[::ffff:127.")


def _until(pred, timeout: float) -> None:
    """Poll `pred` for up to `timeout` s (the assertions that follow say what was still wrong)."""
    deadline = time.time() + timeout
    while not pred() and time.time() < deadline:
        time.sleep(0.2)


def _wait_for(pred, timeout: float, what: str, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        assert proc is None or proc.poll() is None, f"the launch ended before {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _runs(sweep_dir: Path) -> Counter:
    log = sweep_dir / "runs.jsonl"
    return Counter(json.loads(x)["trial_id"] for x in log.read_text().splitlines()) if log.is_file() else Counter()


def _status(sweep_dir: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "nsr_sweep.cli", "status", str(sweep_dir), "--json"],
                       capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# -- the mechanism, fast ---------------------------------------------------------------------


def test_the_token_file_is_created_private_and_an_open_one_is_tightened(tmp_path, monkeypatch):
    path = tmp_path / "ray" / "auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert localray.ensure_private_token() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and re.fullmatch(r"[0-9a-f]{64}", path.read_text())
    token = path.read_text()
    path.chmod(0o644)
    localray.ensure_private_token()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text() == token  # kept, only tightened
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert localray.ensure_private_token() is None


def test_a_launch_whose_driver_and_reaper_died_is_reaped_by_the_next(tmp_path):
    """A launch's process (this Python, or a Ray binary) holding a file in a dead launch's Ray temp dir is
    killed and the dir deleted; a live launch's dir is left alone, and so is a user's `tail -f` of a Ray log."""
    dead, live = tmp_path / "dead0001", tmp_path / "live0001"
    for d, pid in ((dead, 999_999_999), (live, os.getpid())):
        d.mkdir()
        # a dead launch that recorded the host's namespace (never isolated) must not take the host down with it
        (d / localray.OWNER).write_text(json.dumps({"pid": pid, "start": localray._start_time(pid),
                                                    "netns": localray.net_namespace()}))
        (d / "log").write_text("")
    holders = [subprocess.Popen([sys.executable, "-c", f"import time; f = open({str(d / 'log')!r}); time.sleep(60)"])
               for d in (dead, live)]
    reader = subprocess.Popen(["tail", "-f", str(dead / "log")], stdout=subprocess.DEVNULL)  # a user reading a log
    bystander = subprocess.Popen(["sleep", "60"])  # same namespace, no file of the launch
    time.sleep(1.0)
    assert localray.reap_stale(tmp_path) == 1
    holders[0].wait(5)
    assert holders[0].returncode == -signal.SIGKILL and not dead.exists()
    assert holders[1].poll() is None and live.is_dir() and bystander.poll() is None and reader.poll() is None
    for p in (holders[1], bystander, reader):
        p.kill()


def test_a_killed_launchs_partial_writes_are_removed_by_the_next_claim(tmp_path):
    from nsr_sweep.core.spec import parse_sweep

    d = tmp_path / "t"
    (d / "tables").mkdir(parents=True)
    (d / "trials" / "L1-N3-regression-none-s0").mkdir(parents=True)
    partial = [d / "tables" / ".trials.parquet.k2j_x9q1.parquet", d / ".sweep_state.json.abcd1234.json",
               d / "trials" / ".L1-N3-regression-none-s1.zz99yy88", d / "trials" / "L1-N3-regression-none-s0" / ".metrics.json.q1w2e3r4.json"]
    for p in partial:
        p.mkdir() if p.suffix == "" or p.name.startswith(".L1") else p.write_text("")
    kept = [d / "tables" / "trials.parquet", d / "trials" / "L1-N3-regression-none-s0" / "metrics.json"]
    for p in kept:
        p.write_text("x")
    claim(d, parse_sweep({"name": "t", "model": "nsr-tiny", "layers": [1], "neurons": [3], "heads": ["regression"],
                   "freeze": ["none"]}), resume=True)
    release(d)
    assert not any(p.exists() for p in partial) and all(p.read_text() == "x" for p in kept)
    assert remove_partial_writes(d) == []


# -- the footprint of a real launch ----------------------------------------------------------------


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only_and_nothing_outlives_a_sigkilled_driver(tmp_path):
    """During a run no listener of the launch's processes is outside 127.0.0.0/8, the dashboard answers
    through it only with the token; 10 s after SIGKILL of the driver none of its processes is alive and
    its Ray temp dir is gone. The same measurement on `--ray-network host` does see Ray's open ports."""
    sweep = tmp_path / "s.yaml"
    sweep.write_text(SWEEP.format(name="fp").replace("num_samples: 2", "num_samples: 40"))
    token = tmp_path / "token"
    env = _env(RAY_AUTH_TOKEN_PATH=str(token))
    env.pop("RAY_AUTH_MODE", None)
    seen = {}
    for network in ("auto", "host"):
        out = tmp_path / network
        log = tmp_path / f"{network}.log"
        driver = subprocess.Popen(_launch(sweep, out, "--ray-network", network), env=env,
                                  stdout=log.open("w"), stderr=subprocess.STDOUT)
        _wait_for(lambda: "building or loading the cache" in log.read_text(), 300, "the model workers", driver)
        cluster = _descendants(driver.pid)
        assert sum(c == "raylet" for c in cluster.values()) == 1 and len(cluster) > 5, cluster
        ours = {driver.pid, *cluster}
        seen[network] = [(a, p) for a, p in _listeners() if p in ours]
        if network == "auto":
            assert "own network namespace" in log.read_text()
            assert stat.S_IMODE(token.stat().st_mode) == 0o600
            url = re.search(r"Ray dashboard: (http://\S+)", log.read_text()).group(1)
            assert _http_status(url + "/api/version") == 401
            assert _http_status(url + "/api/version", token.read_text()) == 200
        temp_dirs = list(localray.ray_temp_root().glob("*"))
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        _until(lambda: not _alive(cluster) and not any(d.exists() for d in temp_dirs if _owned_by(d, driver.pid)), 10)
        assert _alive(cluster) == [], {p: cluster[p] for p in _alive(cluster)}
        assert not any(d.exists() for d in temp_dirs if _owned_by(d, driver.pid))
        assert _status(out / "fp")["state"] == "interrupted"
    outside = [(a, p) for a, p in seen["auto"] if not _loopback(a)]
    assert seen["auto"] and outside == [], seen["auto"]  # the dashboard's forwarder, on loopback
    assert [a for a, _ in seen["host"] if not _loopback(a)], seen["host"]  # the measurement can see an open port


def _owned_by(d: Path, pid: int) -> bool:
    try:
        return json.loads((d / localray.OWNER).read_text())["pid"] == pid
    except (OSError, ValueError):
        return True  # unreadable: count it


def _http_status(url: str, token: str | None = None) -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ten_simultaneous_launch_pairs_each_run_exactly_one_and_any_kill_resumes(tmp_path):
    """10 times (20 until the suite outgrew its time; the kill points stay random over claim, Ray start, cache and
    trials), two launches of one sweep into one directory start together: exactly one is refused, with
    the reason, and the other runs until it is SIGKILLed at a random point (claim, Ray start, cache,
    trials). Every time `status` reads `interrupted` and nothing of the killed cluster survives; at the
    end a `--resume` finishes the sweep with every trial run exactly once."""
    import random

    from nsr_sweep.results.status import sweep_status

    rng = random.Random(0)
    sweep = tmp_path / "s.yaml"
    sweep.write_text(SWEEP.format(name="race"))
    out, sweep_dir = tmp_path / "res", tmp_path / "res" / "race"
    env = _env(RAY_AUTH_MODE="disabled")
    survivors: dict[int, str] = {}
    for i in range(10):
        pair = [subprocess.Popen(_launch(sweep, out, "--resume", "--no-dashboard"), env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
        _wait_for(lambda: any(p.poll() is not None for p in pair), 120, "one of the pair to exit")
        loser = next(p for p in pair if p.poll() is not None)
        winner = next(p for p in pair if p is not loser)
        err = loser.stderr.read()
        assert loser.returncode == 2 and "is still running" in err and len(err.strip().splitlines()) == 1, (i, err)
        time.sleep(rng.uniform(0, 3))  # claim, Ray start, workers, cache
        assert winner.poll() is None, (i, winner.stderr.read())
        cluster = _descendants(winner.pid)
        winner.kill()
        winner.wait()
        survivors.update(cluster)
        _until(lambda: lock_holder(sweep_dir) is None, 5)  # its child, the driver, dies with it (and the lock)
        assert (_status(sweep_dir) if i == 0 else sweep_status(sweep_dir))["state"] == "interrupted", i  # CLI once
    _until(lambda: not _alive(survivors), 10)
    assert _alive(survivors) == [], {p: survivors[p] for p in _alive(survivors)}
    assert max(_runs(sweep_dir).values(), default=1) == 1
    r = subprocess.run(_launch(sweep, out, "--resume", "--no-dashboard"), env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    df = pd.read_parquet(sweep_dir / "tables" / "trials.parquet")
    assert len(df) == N_TRIALS and (df["status"] == "ok").all()
    runs = _runs(sweep_dir)
    assert sorted(runs) == sorted(df["trial_id"]) and set(runs.values()) == {1}
    assert _status(sweep_dir)["state"] == "finished"
    from nsr_sweep.results.layout import PARTIAL

    ours = [sweep_dir, sweep_dir / "tables", sweep_dir / "trials", *sweep_dir.glob("trials/*/")]
    assert not [p for d in ours for p in d.iterdir() if PARTIAL.match(p.name)]  # no partial write left behind


def test_where_namespaces_are_refused_the_warning_says_so_in_one_line(monkeypatch):
    """The fallback of --ray-network auto (the kernel refused the launch's child a namespace): one line that says
    why and what the user can do — never "run as root"; --ray-network isolated refuses to run instead."""
    lines = []
    monkeypatch.setattr(localray, "_start", lambda *a, **k: None)  # no Ray: only what is said before it starts
    local = localray.start_local_ray(1, dashboard=False, dashboard_host="127.0.0.1", network="auto", isolated=False,
                                     not_isolated="[Errno 1] unshare: Operation not permitted", echo=lines.append)
    local.stop()
    assert len(lines) == 1 and "\n" not in lines[0] and "Operation not permitted" in lines[0]
    assert "firewall" in lines[0] and "unprivileged user namespaces" in lines[0] and "root to" not in lines[0]
    from nsr_sweep.core.errors import NsrError

    with pytest.raises(NsrError, match="--ray-network isolated: cannot make a network namespace"):
        localray.start_local_ray(1, dashboard=False, dashboard_host="127.0.0.1", network="isolated", isolated=False,
                                 not_isolated="refused", echo=lines.append)
