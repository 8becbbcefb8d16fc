"""The trackers a search also logs to (spec `loggers`, `raybone search --logger`): Ray Tune's own MLflow and W&B
callbacks. Steps are SGD iterations (each report carries `timesteps_total`, which Tune's loggers, TensorBoard's
included, take as the step); experiment (MLflow) and group (W&B) are the raybone experiment's name, each run is a
Tune trial named `run_trial_<trial_id>` as in trials.parquet, with the trial's configuration as its parameters.
"""

from __future__ import annotations

import os

from raybone.errors import SpecError
from raybone.spec import Spec

PACKAGES = {"mlflow": "mlflow-skinny", "wandb": "wandb"}


def loggers(spec: Spec, name: str) -> list:
    """Tune callbacks for the spec's loggers; a one-line error, before Ray starts, when a package is missing."""
    callbacks = []
    for logger in spec.loggers:
        try:
            if logger == "mlflow":
                from ray.air.integrations.mlflow import MLflowLoggerCallback

                callbacks.append(MLflowLoggerCallback(experiment_name=name, tags={"raybone_experiment": name}))
            else:
                from ray.air.integrations.wandb import WandbLoggerCallback

                # The logging actors see no driver environment: pass W&B's mode and folder on explicitly.
                settings = {
                    key: os.environ[f"WANDB_{key.upper()}"]
                    for key in ("mode", "dir")
                    if os.environ.get(f"WANDB_{key.upper()}")
                }
                callbacks.append(
                    WandbLoggerCallback(group=name, project=_wandb_project(), upload_checkpoints=False, **settings)
                )
        except ImportError:
            raise SpecError(
                f"loggers: {logger} needs the {PACKAGES[logger]} package: python -m pip install 'raybone[{logger}]'"
            ) from None
    return callbacks


def log_best_checkpoint(spec: Spec, name: str, best) -> None:
    """The best checkpoint of the search, as an artifact of its trial's MLflow run."""
    import mlflow

    if best is None or not best.get("best_checkpoint_path"):
        return
    runs = mlflow.search_runs(
        experiment_names=[name], filter_string=f"tags.trial_name = 'run_trial_{best.trial_id}'", output_format="list"
    )
    for run in runs:
        mlflow.MlflowClient().log_artifacts(run.info.run_id, best.best_checkpoint_path, "best_checkpoint")


def _wandb_project() -> str:
    return os.environ.get("WANDB_PROJECT", "raybone")
