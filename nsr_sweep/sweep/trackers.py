"""Optional experiment trackers (--tensorboard, --mlflow), fed every result Tune receives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import NsrError, redacted


@dataclass(frozen=True)
class Trackers:
    """Optional experiment trackers, fed every result Tune receives (a batch reports its summary)."""
    tensorboard: bool = False
    """Tune's TBX logger: event files under results/<name>/tune/ (`tensorboard --logdir results/<name>/tune`)."""
    mlflow: str | None = None
    """An MLflow tracking URI, or "" for results/<name>/mlruns/mlflow.db (SQLite: MLflow 3 refuses a plain
    mlruns/ file store by default); one MLflow experiment named after the sweep."""

    def check(self) -> None:
        """The packages they need, before anything starts."""
        import importlib.util

        for on, module, package in ((self.tensorboard, "tensorboardX", "tensorboardX"),
                                    (self.mlflow is not None, "mlflow", "mlflow-skinny")):
            if on and importlib.util.find_spec(module) is None:
                raise NsrError(f"--{'tensorboard' if module == 'tensorboardX' else 'mlflow'} needs {package}: "
                               f"pip install {package}")

    def mlflow_uri(self, sweep_dir: Path) -> str | None:
        if self.mlflow is None:
            return None
        if self.mlflow:
            return self.mlflow
        (sweep_dir / "mlruns").mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{sweep_dir / 'mlruns' / 'mlflow.db'}"

    def callbacks(self, sweep_dir: Path, name: str) -> list:
        """Tune callbacks; an MLflow store that cannot be opened fails here, before Ray starts."""
        out: list = []
        if self.tensorboard:
            from ray.tune.logger import TBXLoggerCallback

            out.append(TBXLoggerCallback())
        if (uri := self.mlflow_uri(sweep_dir)) is not None:
            import mlflow
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            try:
                mlflow.MlflowClient(uri).search_experiments(max_results=1)
            except Exception as e:
                raise NsrError(redacted(f"--mlflow {uri}: cannot be opened ({type(e).__name__}: {str(e)[:300]})")) from None
            out.append(_mlflow_callback(MLflowLoggerCallback)(tracking_uri=uri, experiment_name=name,
                                                               save_artifact=False))
        return out


def _mlflow_callback(base):
    """Ray's MLflow callback, logging `tracker_params` of a trial's config instead of the whole config."""
    from .grid import tracker_params

    class MLflowCallback(base):
        def log_trial_start(self, trial):
            if trial not in self._trial_runs:
                run = self.mlflow_util.start_run(tags={**self.tags, "trial_name": str(trial)}, run_name=str(trial))
                self._trial_runs[trial] = run.info.run_id
                self.mlflow_util.log_params(run_id=run.info.run_id, params_to_log=tracker_params(trial.config))
    return MLflowCallback
