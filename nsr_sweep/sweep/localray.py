"""The local Ray cluster a launch starts: closed to the network, a private token, nothing left behind.

Ray 2.60's gRPC servers (GCS, raylet, every worker) and its agents bind all interfaces whatever
`--node-ip-address` says. So on Linux a local launch runs in a child process (`spawn_isolated`) that
enters a network namespace of its own, with only loopback up, before it imports anything that starts
threads — root or not (a user namespace maps a non-root user's own uid; the kernel grants it only to a
single-threaded process). Every Ray port, the agents' `/metrics` included, lives there and nothing
outside the launch can connect; the calling process keeps its network. Ray sees loopback as the node's address and binds
127.0.0.1. The dashboard is reached through one listener on the host's loopback that forwards to
it (and the dashboard asks for Ray's token). Models and `hf:` corpora are fetched before the move.

A reaper process watches the driver through a pipe. When the driver is gone (or closed the pipe
after `ray.shutdown`) it kills every process of the cluster: the driver's descendants as last seen,
everything in the launch's namespace, every Ray binary or Python process of this interpreter holding a
file in its Ray temp dir (never another program reading a Ray log); then it deletes the temp dir. A launch also reaps what an earlier launch whose reaper died left behind.

    python -m nsr_sweep.sweep.localray reap TEMP_DIR DRIVER_PID   (started by `start_reaper`, not by hand)
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..core.errors import NsrError
from .options import Isolation, LaunchOptions

NETWORK_MODES = ("auto", "isolated", "host")
OWNER = "nsr-owner.json"  # in each launch's Ray temp dir: the driver's pid and start time, its namespace
CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def ray_temp_root() -> Path:
    """Short (Ray's socket paths must stay under 108 bytes) and per user."""
    return Path(tempfile.gettempdir()) / f"nsr-ray-{os.getuid()}"


# -- the network namespace -------------------------------------------------------------------


def isolate_network() -> None:
    """Move this process (the calling thread, and whatever it starts from now on) into a new network
    namespace with loopback up. Root needs nothing more; others get a user namespace mapping their own
    uid and gid, which the kernel allows only to a single-threaded process. Raises OSError saying why not."""
    if sys.platform != "linux":
        raise OSError("network namespaces are Linux-only")
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    uid, gid = os.getuid(), os.getgid()
    _unshare(libc, CLONE_NEWNET if root else CLONE_NEWUSER | CLONE_NEWNET)
    try:  # moved: from here on a failure cannot be undone, so it is not a fallback but an error
        if not root:
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
            Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # `ip link set lo up`, without iproute2
            flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sh", b"lo", 0)))[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))
    except OSError as e:
        raise NsrError(f"--ray-network: entered a new network namespace but could not set it up ({e}); "
                       "use --ray-network host") from None


def _unshare(libc, flags: int) -> None:
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        hint = " (the process already runs threads)" if err == 22 else ""
        raise OSError(err, f"unshare: {os.strerror(err)}{hint}")


def net_namespace(pid: int | str = "self") -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


class DashboardForward:
    """A listener on the host side that forwards each connection to the dashboard inside the namespace.

    Bound before the move (so it belongs to the host's network); its accepting thread starts after the
    move, so the connections it opens reach the namespace's loopback."""

    def __init__(self, host: str, port: int = 8265, sock: socket.socket | None = None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if sock is None:
            try:
                sock = socket.create_server((host, port), family=family)
            except OSError:  # taken (another sweep's dashboard): any free port
                sock = socket.create_server((host, 0), family=family)
        self.sock, self.host = sock, host
        self.port = self.sock.getsockname()[1]

    @classmethod
    def adopt(cls, fd: int, host: str) -> "DashboardForward":
        """The listener a parent process bound on the host's network, passed down as a file descriptor."""
        return cls(host, sock=socket.socket(fileno=fd))

    @property
    def url(self) -> str:
        return f"{f'[{self.host}]' if ':' in self.host else self.host}:{self.port}"

    def start(self, target_port: int) -> None:
        threading.Thread(target=self._serve, args=(target_port,), daemon=True, name="dashboard-forward").start()

    def _serve(self, target_port: int) -> None:
        while self.sock.fileno() != -1:
            try:
                client, _ = self.sock.accept()
            except OSError:
                time.sleep(0.2)  # closed (the launch ended), or out of descriptors: never spin
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", target_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            done = threading.Semaphore(0)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b, done), daemon=True).start()
            threading.Thread(target=_close_after, args=(done, client, upstream), daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def _pump(src: socket.socket, dst: socket.socket, done: threading.Semaphore) -> None:
    """One direction of a forwarded connection, until its end of stream."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        done.release()


def _close_after(done: threading.Semaphore, *socks: socket.socket) -> None:
    for _ in range(2):  # both directions finished
        done.acquire()
    for s in socks:
        s.close()


# -- the token ---------------------------------------------------------------------------------


def ensure_private_token() -> Path | None:
    """Ray's token file, readable by its owner alone: created 0600 before Ray would create it
    world-readable, or an existing one tightened. None when token authentication is off or the
    token comes from the environment."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
    return path


# -- the reaper ----------------------------------------------------------------------------------


def start_reaper(temp_dir: Path) -> subprocess.Popen:
    """The watcher of this driver; close its stdin (or die) and it reaps the cluster."""
    return subprocess.Popen([sys.executable, "-m", "nsr_sweep.sweep.localray", "reap", str(temp_dir), str(os.getpid())],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # a Ctrl-C to the launch does not reach it


def write_owner(temp_dir: Path, isolated: bool = False) -> None:
    """Who owns the temp dir: the driver (pid and start time), and its namespace once it has its own."""
    from ..core.files import write_json

    temp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_json(temp_dir / OWNER, {"pid": os.getpid(), "start": _start_time(os.getpid()),
                                  "netns": net_namespace() if isolated else None})


def reap_stale(root: Path | None = None) -> int:
    """Kill what launches whose driver and reaper both died left behind; returns how many processes."""
    root = root or ray_temp_root()
    killed = 0
    for d in sorted(root.glob("*")) if root.is_dir() else []:
        try:
            owner = json.loads((d / OWNER).read_text())
        except (OSError, ValueError):
            if _age(d) < 60:
                continue  # a launch creating it right now
            owner = {}
        if owner.get("start") is not None and _start_time(owner.get("pid", 0)) == owner["start"]:
            continue  # its driver is alive
        killed += _kill_cluster({}, _still_its(owner.get("netns"), d), d)
        shutil.rmtree(d, ignore_errors=True)
    return killed


def _still_its(netns: str | None, temp_dir: Path) -> str | None:
    """A dead launch's namespace, if it is still that launch's: never ours (the host's, for a launch that
    was not isolated), and one of its processes still holds a file in the temp dir (an emptied namespace's
    number can be reused by a live launch)."""
    if not netns or netns == net_namespace():
        return None
    prefix = str(temp_dir.resolve())
    tree = _children_map()
    return netns if any(net_namespace(p) == netns and _holds_file_under(p, prefix) for p in tree["all"]) else None


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _reap(temp_dir: Path, driver: int) -> None:
    """Watch `driver` until stdin closes, then kill its cluster and delete its temp dir."""
    known: dict[int, int | None] = {}
    own_ns, netns = net_namespace(), None
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 0.5)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
        known.update({p: _start_time(p) for p in _descendants(driver)})
        ns = net_namespace(driver)
        if ns and ns != own_ns:
            netns = ns
        if _start_time(driver) is None:
            break
    _kill_cluster(known, netns, temp_dir, spare=driver)
    shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_cluster(known: dict[int, int | None], netns: str | None, temp_dir: Path, spare: int | None = None) -> int:
    """SIGKILL, until none is left (8 s at most), every process that was a known descendant, is one of
    theirs now, lives in `netns`, or holds a file under `temp_dir`."""
    me, killed, deadline = os.getpid(), 0, time.time() + 8
    while time.time() < deadline:
        victims = _cluster(known, netns, temp_dir) - {me, spare}
        if not victims:
            break
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
        time.sleep(0.1)
    return killed


def _cluster(known: dict[int, int | None], netns: str | None, temp_dir: Path) -> set[int]:
    tree = _children_map()
    out = {p for p, t in known.items() if t is not None and _start_time(p) == t}
    todo = list(out)
    while todo:
        kids = tree.get(todo.pop(), [])
        todo += [k for k in kids if k not in out]
        out.update(kids)
    prefix = str(temp_dir.resolve())
    for pid in tree.get("all", []):
        if (netns and net_namespace(pid) == netns) or (_is_ray_process(pid) and _holds_file_under(pid, prefix)):
            out.add(pid)
    return {p for p in out if _state(p) not in (None, "Z")}


RAY_BINARIES = ("raylet", "gcs_server")


def _is_ray_process(pid: int) -> bool:
    """One of the launch's own kinds of process — Ray's binaries or this Python — never a user's `tail -f` of a
    Ray log (which holds a file in the temp dir too)."""
    try:
        exe = os.path.realpath(f"/proc/{pid}/exe")
    except OSError:
        return False
    return os.path.basename(exe) in RAY_BINARIES or exe == os.path.realpath(sys.executable)


def _children_map() -> dict:
    tree: dict = {"all": []}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _stat(int(name))
            if stat:
                tree["all"].append(int(name))
                tree.setdefault(int(stat[1]), []).append(int(name))
    return tree


def _descendants(root: int) -> list[int]:
    tree, out, todo = _children_map(), [], [root]
    while todo:
        kids = tree.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: state, ppid, …"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> int | None:
    s = _stat(pid)
    return int(s[19]) if s and s[0] != "Z" else None


def _state(pid: int) -> str | None:
    s = _stat(pid)
    return s[0] if s else None


def _holds_file_under(pid: int, prefix: str) -> bool:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            continue
    return False


# -- the launch's own process ------------------------------------------------------------------

PR_SET_PDEATHSIG = 1
NOT_ISOLATED = ("warning: Ray's ports are not isolated: this machine refuses the launch a network namespace of its "
                "own ({why}); Ray's gRPC servers listen on all interfaces. Keep it behind a firewall, or ask its "
                "administrator to allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
                "user.max_user_namespaces > 0); --ray-network host silences this")


def spawn_isolated(options: LaunchOptions, forward: DashboardForward | None) -> int:
    """Run the launch in a child process that enters its own network namespace before it imports anything
    that starts threads (the kernel grants a user namespace only to a single-threaded process). The child
    dies with this process (PR_SET_PDEATHSIG); the dashboard listener, bound here on the host's network, is
    passed to it. Returns the child's exit code."""
    fds = (forward.sock.fileno(),) if forward is not None else ()
    args = {"options": options.to_json(), "parent": os.getpid(), "forward_fd": fds[0] if fds else None,
            "forward_host": forward.host if forward is not None else None}
    child = subprocess.Popen([sys.executable, "-m", "nsr_sweep.sweep.child", json.dumps(args)], pass_fds=fds)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:  # the child got the same Ctrl-C: let it record the interruption
            continue


def enter_child(args: dict) -> Isolation | None:
    """In the launch's own process (`sweep/child.py`), first thing: die with the parent, isolate the network
    (or say why not), adopt the dashboard's listener. None when the parent is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != args["parent"]:  # the parent died before the line above
        return None
    isolated, why = False, None
    if sys.platform == "linux":
        try:
            isolate_network()
            isolated = True
        except OSError as e:
            why = e
    else:
        why = "network namespaces are Linux-only"
    forward = DashboardForward.adopt(args["forward_fd"], args["forward_host"]) if args["forward_fd"] is not None \
        else None
    return Isolation(isolated, None if isolated else str(why), forward)


# -- starting the cluster ----------------------------------------------------------------------


def prefetch(spec) -> None:
    """What the launch inside the namespace would download, fetched before it starts: hub models (into the
    local Hugging Face cache, where the namespace finds them; nothing when offline) and an `hf:` corpus
    (into the datasets cache)."""
    from ..core.models import bundled_models, resolve_model_dir

    for name in (spec.model.name, spec.cross_model):
        if name and name not in bundled_models() and not Path(name).expanduser().is_dir():
            resolve_model_dir(name, need_weights=False)  # downloads when the hub is reachable and allowed
    if spec.corpus.source.startswith("hf:"):
        from ..core.corpus import _read_hf

        _read_hf(spec.corpus.source[3:])


class LocalCluster:
    """What a launch started locally: Ray's context and dashboard URL, the reaper, the dashboard forward."""

    def __init__(self, reaper: subprocess.Popen, forward: DashboardForward | None):
        self.reaper, self.forward = reaper, forward
        self.ctx: Any = None  # Ray's context
        self.url: str | None = None  # the dashboard as the user reaches it

    def stop(self, wait: float = 10.0) -> None:
        """Ray shut down, the forward closed, then the reaper kills any leftover and deletes the temp dir."""
        import ray

        ray.shutdown()
        if self.forward is not None:
            self.forward.close()
        try:
            if self.reaper.stdin:
                self.reaper.stdin.close()
            self.reaper.wait(wait)
        except (OSError, subprocess.TimeoutExpired):
            pass


def start_local_ray(cpus: int, *, dashboard: bool, dashboard_host: str, network: str, isolated: bool = False,
                    not_isolated: str | None = None, forward: DashboardForward | None = None,
                    echo=print) -> LocalCluster:
    """`ray.init` of a new local cluster in this launch's own temp dir — in this process's own network
    namespace when `isolated` (`spawn_isolated` made it; `not_isolated` says why it could not). On any
    failure what was started is stopped before the error goes on."""
    if network not in NETWORK_MODES:
        raise NsrError(f"--ray-network {network!r}: allowed {', '.join(NETWORK_MODES)}")
    if network != "host" and not isolated:
        if network == "isolated":
            raise NsrError(f"--ray-network isolated: cannot make a network namespace ({not_isolated}); "
                           "use --ray-network host behind a firewall")
        echo(NOT_ISOLATED.format(why=not_isolated))
        if forward is not None:  # Ray's own dashboard takes the host's port instead
            forward.close()
            forward = None
    reap_stale()
    temp_dir = ray_temp_root() / secrets.token_hex(4)
    write_owner(temp_dir)
    local = LocalCluster(start_reaper(temp_dir), forward if dashboard else None)
    try:
        _start(local, temp_dir, cpus, dashboard, dashboard_host, isolated, echo)
    except BaseException:
        local.stop()
        raise
    return local


def _start(local: LocalCluster, temp_dir: Path, cpus: int, dashboard: bool, dashboard_host: str, isolated: bool,
           echo) -> None:
    import ray

    if isolated:
        write_owner(temp_dir, isolated=True)  # now with the namespace: a later launch can reap it
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # fetched already; no network here
        echo("Ray's ports: in this launch's own network namespace (loopback only)")
    ensure_private_token()
    local.ctx = ray.init(num_cpus=cpus, include_dashboard=dashboard, _temp_dir=str(temp_dir),
                         dashboard_host="127.0.0.1" if isolated else dashboard_host,
                         log_to_driver=False, configure_logging=True, logging_level=logging.ERROR)
    url = getattr(local.ctx, "dashboard_url", None) or None
    if url and local.forward is not None:
        local.forward.start(int(url.rsplit(":", 1)[1]))
        url = local.forward.url
    local.url = url


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "reap":
        _reap(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit("usage: python -m nsr_sweep.sweep.localray reap TEMP_DIR DRIVER_PID  (started by start_reaper)")
