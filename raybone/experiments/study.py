"""An experiment's trials as Optuna sees them: the spec's distributions, finished trials as Optuna trials.

Optuna is imported inside the functions, so that importing raybone.experiments does not load it.
"""

from __future__ import annotations

import math

import pandas as pd

from raybone.spec import Choice, Range, Spec

RAY_TRIAL_ID = "ray_trial_id"  # the user attribute naming a study trial's Ray trial, as trials.parquet does


def distributions(spec: Spec) -> dict:
    """Optuna's distribution of each searched hyperparameter, named as in the YAML."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    def one(param: Range | Choice):
        if isinstance(param, Choice):
            return CategoricalDistribution(param.choices)
        log = param.distribution.startswith("log")
        if param.distribution in ("int", "logint"):
            return IntDistribution(int(param.low), int(param.high), log=log)
        return FloatDistribution(param.low, param.high, log=log)

    return {name: one(param) for name, param in spec.searched().items()}


def finished_trials(trials: pd.DataFrame, spec: Spec, with_pruned: bool = False) -> tuple[list, list[str]]:
    """trials.parquet's completed trials (and with `with_pruned` those stopped early, as PRUNED at the iteration
    they reached) as Optuna trials over `spec`'s space: (trials, one reason per trial left out).

    A completed trial's value is the best it reported (best_<metric>; the final value in tables from before).
    """
    import optuna
    from optuna.trial import TrialState

    space = distributions(spec)
    value_of = f"best_{spec.metric}" if f"best_{spec.metric}" in trials else spec.metric
    if value_of not in trials or any(name not in trials for name in space):
        return [], [f"the trials do not record {value_of} and every searched hyperparameter"]
    states = {"completed": TrialState.COMPLETE, **({"stopped_early": TrialState.PRUNED} if with_pruned else {})}
    frozen, skipped = [], []
    for _, row in trials[trials.status.isin(states)].iterrows():
        value = row[value_of] if row.status == "completed" else row.get(spec.metric)
        if value is None or not math.isfinite(value) or any(pd.isna(row[name]) for name in space):
            skipped.append(f"trial {row.trial_id}: no {value_of} or a hyperparameter missing")
            continue
        params = {name: _native(row[name], distribution) for name, distribution in space.items()}
        pruned = states[row.status] == TrialState.PRUNED
        try:
            frozen.append(
                optuna.trial.create_trial(
                    params=params,
                    distributions=space,
                    state=states[row.status],
                    value=None if pruned else float(value),
                    intermediate_values={int(row.get("iteration") or 0): float(value)} if pruned else None,
                    user_attrs={RAY_TRIAL_ID: str(row.trial_id)},
                )
            )
        except ValueError:  # a value outside this spec's space
            outside = [f"{n} {params[n]!r}" for n, d in space.items() if not _within(spec.searched()[n], params[n])]
            skipped.append(f"trial {row.trial_id}: {', '.join(outside) or 'a value'} outside this space")
    return frozen, skipped


def _within(param: Range | Choice, value) -> bool:
    return value in param.choices if isinstance(param, Choice) else param.low <= value <= param.high


def _native(value, distribution):
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, IntDistribution):
        return int(value)
    if isinstance(distribution, CategoricalDistribution):
        value = value.item() if hasattr(value, "item") else value
        return next((c for c in distribution.choices if c == value), value)
    return float(value)
