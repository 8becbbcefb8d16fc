"""Which searched hyperparameters mattered: Optuna's importance evaluators over an experiment's completed trials.

Only trials that trained for the whole budget count: a trial the scheduler stopped early was measured after fewer
iterations (it is a PRUNED trial in the study), and mixing the two would credit a hyperparameter with the budget's
effect. The trials come from the experiment's Optuna study (`optuna.db`, study name = experiment name, the one
optuna-dashboard shows: COMPLETE trials, each valued at the best its run reported); where the study is missing or
holds fewer of them than `trials.parquet` (an older experiment, a study written elsewhere), from `trials.parquet`,
in an in-memory study with the distributions of the saved `spec.yaml`. Optuna is imported only when asked for.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from raybone.errors import RayboneError, one_line
from raybone.experiments.experiment import Experiment
from raybone.experiments.storage import STUDY, TRIALS
from raybone.experiments.study import RAY_TRIAL_ID, finished_trials

EVALUATORS = ("fanova", "mdi", "ped")


@dataclass
class Importances:
    """Normalised importances (summing to 1, most important first), or a note saying why there are none."""

    evaluator: str
    source: str  # "optuna.db" or "trials.parquet"
    trials: int  # completed trials (the whole budget) with a metric value that the evaluator saw
    values: dict[str, float] = field(default_factory=dict)
    constant: list[str] = field(default_factory=list)  # searched parameters that never varied
    note: str | None = None


def importances(experiment: Experiment, evaluator: str = "fanova") -> Importances:
    """Hyperparameter importances of `experiment` by Optuna's `evaluator` (fanova | mdi | ped)."""
    import optuna

    if evaluator not in EVALUATORS:
        raise RayboneError(f"unknown importance evaluator {evaluator!r}; choose one of {', '.join(EVALUATORS)}")
    spec = experiment.spec
    names = list(spec.searched())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from_study, study_note = _study_trials(experiment, names)
    from_table, _ = finished_trials(experiment.trials(), spec)
    source, frozen = (STUDY, from_study) if len(from_study) >= len(from_table) else (TRIALS, from_table)
    result = Importances(evaluator, source, len(frozen))
    if source == TRIALS and study_note:
        result.source = f"{TRIALS} ({study_note})"
    if not names:
        result.note = "the search space has no searched hyperparameters"
        return result
    if len(frozen) < 2:
        result.note = (
            f"importances need at least 2 completed trials with {spec.metric} (trials stopped early are left "
            f"out: they trained for fewer iterations); this experiment has {len(frozen)}"
        )
        return result
    varied = [n for n in names if len({_key(t.params[n]) for t in frozen}) > 1]
    result.constant = [n for n in names if n not in varied]
    if not varied:
        result.note = f"the searched hyperparameters never varied across the {len(frozen)} completed trials"
        return result
    if len({t.value for t in frozen}) < 2:
        result.note = f"every completed trial has the same {spec.metric}; nothing to attribute"
        return result
    study = optuna.create_study(direction="minimize" if spec.mode == "min" else "maximize")
    study.add_trials(frozen)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            values = optuna.importance.get_param_importances(study, evaluator=_evaluator(evaluator), params=varied)
    except ImportError:  # fANOVA and MDI fit scikit-learn random forests; the ranked trials still stand
        result.note = (
            f"the {evaluator} evaluator needs scikit-learn: python -m pip install scikit-learn, "
            "or use --importance-evaluator ped"
        )
        return result
    except RuntimeError as err:  # e.g. fANOVA: "Encountered zero total variance in all trees."
        result.note = f"{evaluator} could not attribute the variance of {spec.metric}: {err}"
        return result
    result.values = {k: float(v) for k, v in values.items()}
    return result


def _evaluator(name: str):
    from optuna.importance import (
        FanovaImportanceEvaluator,
        MeanDecreaseImpurityImportanceEvaluator,
        PedAnovaImportanceEvaluator,
    )

    if name == "fanova":
        return FanovaImportanceEvaluator(seed=0)
    if name == "mdi":
        return MeanDecreaseImpurityImportanceEvaluator(seed=0)
    return PedAnovaImportanceEvaluator()


def _study_trials(experiment: Experiment, names: list[str]) -> tuple[list, str | None]:
    """The study's COMPLETE trials of this experiment that carry a finite value and every searched parameter."""
    import optuna

    path = experiment.study()
    if path is None:
        return [], f"no {STUDY}"
    try:
        study = optuna.load_study(study_name=experiment.name, storage=f"sqlite:///{path}")
        trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    except Exception as err:  # a study of another name, a corrupt or foreign database
        return [], f"{STUDY} unreadable: {one_line(err)}"
    ours = set(experiment.trials().trial_id)  # not a warm start's trials: the study holds them too
    usable = [
        t
        for t in trials
        if t.user_attrs.get(RAY_TRIAL_ID) in ours
        and t.value is not None
        and math.isfinite(t.value)
        and all(n in t.params for n in names)
    ]
    return usable, None if usable else f"{STUDY} has no completed trials with values"


def _key(value):
    return repr(value)
