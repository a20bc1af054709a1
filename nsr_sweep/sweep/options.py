"""What a launch was asked to do: `LaunchOptions`, built once — by `nsr-sweep launch` from its flags or by
`nsr_sweep.launch` from its keyword arguments — and carried unchanged to the process that runs the launch
(as JSON, on the isolated child's command line). Each field is the CLI flag of the same name.

Nothing here imports more than the standard library: the isolated child reads its options before it enters
its network namespace, while it must still run a single thread.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..core.errors import NsrError


@dataclass(frozen=True)
class LaunchOptions:
    """A launch's options (the sweep file's contents are the sweep's; these say where and how it runs)."""

    sweep_file: str
    """The sweep file (YAML) to run."""
    out: str = "results"
    """The results root: the launch writes OUT/<name>/."""
    address: str | None = None
    """A running Ray cluster to join (e.g. auto); None: $RAY_ADDRESS, or a local cluster started for the launch."""
    resume: bool = False
    """Finish an interrupted or failed sweep in OUT/<name>/; finished trials are never rerun."""
    dashboard: bool = True
    """Start the Ray dashboard (a local cluster only)."""
    dashboard_host: str = "127.0.0.1"
    """Where the local dashboard listens (on the host's network, forwarded into the launch's namespace)."""
    cache_root: str | None = None
    """The activation cache root; None: $NSR_CACHE_DIR or ~/.cache/nsr-sweep/activations."""
    ray_network: str = "auto"
    """A local cluster in the launch's own network namespace: isolated requires it, auto falls back to the host's
    network with a warning, host never isolates."""
    storage: str | None = None
    """Where saved weights go (training.save_weights): a path shared by the nodes or a pyarrow.fs URI; None: they
    travel to OUT via Ray."""
    optuna_storage: str | None = None
    """The studies' database URL (sqlite:///…, postgresql://…); None: OUT/<name>/optuna.log."""
    tensorboard: bool = False
    """Tune's TensorBoard logger into OUT/<name>/tune/."""
    mlflow: str | None = None
    """An MLflow tracking URI, or "" for OUT/<name>/mlruns; None: no MLflow."""

    @classmethod
    def of(cls, **options) -> LaunchOptions:
        """From keyword arguments (the Python API's), an unknown one refused by name."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise NsrError(f"launch: unknown option {unknown[0]!r}; allowed: {', '.join(allowed[1:])}")
        return cls(**options)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LaunchOptions:
        return cls(**json.loads(text))

    def with_(self, **changes) -> LaunchOptions:
        return replace(self, **changes)

    def cli_args(self) -> list[str]:
        """The same options as `nsr-sweep launch` arguments (each field is the flag of its name; a default is
        left out)."""
        args = [self.sweep_file]
        for f in fields(self)[1:]:
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if value == f.default:
                continue
            if f.name == "dashboard":
                args.append("--dashboard" if value else "--no-dashboard")
            elif value is True or (f.name == "mlflow" and value == ""):
                args.append(flag)
            elif value is not None and value is not False:
                args += [flag, str(value)]
        return args

    def resume_command(self) -> str:
        """The command that finishes this launch's sweep."""
        import shlex

        return " ".join(["nsr-sweep", "launch", *map(shlex.quote, self.with_(resume=False).cli_args()), "--resume"])


@dataclass
class Isolation:
    """Where a local launch's process stands (`localray.enter_child` made it): in its own network namespace, or
    why not; and the dashboard listener its parent bound on the host's network (a `localray.DashboardForward`)."""
    isolated: bool = False
    why: str | None = "the launch was not started in a process of its own"
    forward: Any = None
