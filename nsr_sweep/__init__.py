"""nsr-sweep: neuron self-report sweeps over layers, neurons, heads and freeze modes.

The Python API (docs/python.md): `load_sweep`, `build_cache`, `TrialSpec`, `run_trial`, `launch`,
`open_results` — the CLI's behaviour, returning DataFrames and tensors. Names load on first use, so
`import nsr_sweep` (and the CLI) stay light.
"""

__version__ = "0.2.0"

_EXPORTS = {"load_sweep": "api", "build_cache": "api", "run_trial": "api", "launch": "api", "open_results": "api",
            "Results": "api", "TrialRecord": "api", "TrialSpec": "core.spec", "SweepSpec": "core.spec",
            "TrialResult": "core.trial"}
__all__ = ["load_sweep", "build_cache", "TrialSpec", "run_trial", "launch", "open_results", "Results", "TrialRecord",
           "TrialResult", "SweepSpec", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'nsr_sweep' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
