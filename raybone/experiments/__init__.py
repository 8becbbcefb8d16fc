"""Experiments a search wrote, read through one storage layer (a folder, s3://, gs://, file://); no Ray here.

storage      locations, pyarrow.fs reads and atomic writes, local mirrors of remote files
experiment   Experiment (spec, environment, trials, history, best trial), listing, summaries
importances  Optuna's hyperparameter importances (Optuna imported only when asked)
"""

from raybone.experiments.experiment import (
    BestTrial,
    Experiment,
    compare,
    list_experiments,
    load_trained_model,
    summaries,
)
from raybone.experiments.importances import Importances, importances

__all__ = [
    "BestTrial",
    "Experiment",
    "Importances",
    "compare",
    "importances",
    "list_experiments",
    "load_trained_model",
    "summaries",
]
