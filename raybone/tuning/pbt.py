"""Population Based Training (Jaderberg et al. 2017) with Ray Tune's PopulationBasedTraining.

Trials train side by side; every perturbation interval the worst quantile copy a better trial's checkpoint and
configuration (exploit) and perturb the searched learning rate, L2 weight, weight decay and contrast (explore),
then continue from the better trial's iteration. Tune allows no searcher beside PBT: the population is drawn here,
seeded by the spec's seed and the trial's index (start_from points first), in the same ranges the searcher would
use, and handed to Tune's own trial generator as constant points.
"""

from __future__ import annotations

import functools

import numpy as np
import ray.tune
from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.search import BasicVariantGenerator

from raybone.spec import PERTURBED, Choice, Range, Spec


class _Population(PopulationBasedTraining):
    """Ray's PBT up to the last iteration. There it would pause a trial that has just finished (to restart it only
    to report again) and let a worse trial copy a finished one, leaving two of the same model in the results."""

    def __init__(self, last_iteration: int, **options):
        super().__init__(**options)
        self._last_iteration = last_iteration

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("iteration", 0) >= self._last_iteration:
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def pbt_scheduler(spec: Spec) -> PopulationBasedTraining:
    return _Population(
        spec.iterations,
        time_attr="iteration",
        perturbation_interval=spec.scheduler.perturbation_interval or spec.train_config({}).eval_every,
        burn_in_period=spec.scheduler.burn_in_period,
        hyperparam_mutations=mutations(spec),
        quantile_fraction=spec.scheduler.quantile_fraction,
        resample_probability=spec.scheduler.resample_probability,
        synch=spec.scheduler.synchronous,
        custom_explore_fn=functools.partial(within_space, spec=spec),
    )


def population_warning(spec: Spec, max_concurrent: int) -> str | None:
    """What a user must know when the population is larger than the trials that train at once: Tune creates a
    trial only when a live one ends, and a paused PBT trial is live, so the population trains in groups, one after
    another. Asynchronous PBT ranks live trials only, so each group exploits within itself. Synchronous PBT keeps
    one clock for the whole population, which the first group has moved on: a later group pauses at every validation
    (a Train restart each) and exploits nothing until it catches up (the search benchmark's second group never did)."""
    if spec.scheduler.type != "pbt" or spec.num_samples <= max_concurrent:
        return None
    groups = -(-spec.num_samples // max_concurrent)
    within = (
        "only the first exploits: the later ones pause at every validation and exploit nothing until they reach the "
        "iteration where the first stopped (synchronous PBT keeps one clock)"
        if spec.scheduler.synchronous
        else "each exploiting only within itself"
    )
    return (
        f"PBT with num_samples {spec.num_samples} but {max_concurrent} trials at a time: the population trains as "
        f"{groups} groups of up to {max_concurrent}, one after another; {within}. For one population set "
        f"num_samples to {max_concurrent}, or give the cluster room for {spec.num_samples} trials."
    )


def pbt_space(spec: Spec) -> dict:
    """Tune's param_space for a PBT search. Never sampled: the population's points fill every trial (num_samples is
    their number), but Tune needs each of their keys in the space, and checks their values against its domain."""
    return {"trial_index": ray.tune.choice(list(range(spec.num_samples)))} | {
        name: _tune_domain(param) for name, param in spec.searched().items()
    }


def pbt_population(spec: Spec, max_concurrent: int) -> BasicVariantGenerator:
    """Tune's trial generator for a PBT search: one drawn configuration per trial index, all drawn now, at most
    `max_concurrent` trials live (Tune ignores TuneConfig's limit for a generator passed in). Constants, not
    `sample_from` functions: Tune saves a function as a placeholder that a resumed search cannot resolve (its later
    trials failed), and resolving it again would undo what PBT had copied into a restored trial's config."""
    return BasicVariantGenerator(points_to_evaluate=pbt_members(spec), max_concurrent=max_concurrent)


def pbt_members(spec: Spec) -> list[dict]:
    """The population as drawn, by trial index: start_from's configurations first, then seeded draws (the seed and
    trial index pick each value, so a resumed or repeated search draws the same)."""
    return [_member(spec, index) for index in range(spec.num_samples)]


def within_space(config: dict, spec: Spec) -> dict:
    """A perturbed configuration clipped back into the searched ranges (PBT multiplies by 0.8 or 1.2). Clipped in
    Tune's own config, what trains is what the results record, and a value at a bound stays there to be perturbed
    back in, instead of drifting beyond it unseen."""
    clipped = dict(config)
    for name, param in spec.searched().items():
        if isinstance(param, Range) and name in clipped:
            value = min(max(clipped[name], param.low), param.high)
            clipped[name] = round(value) if param.distribution in ("int", "logint") else value
    return clipped


def _member(spec: Spec, index: int) -> dict:
    searched = spec.searched()
    if index < len(spec.start_from):
        return {"trial_index": index} | {name: spec.start_from[index][name] for name in searched}
    return {"trial_index": index} | {
        name: _draw(np.random.default_rng([spec.seed, index, position]), searched[name])
        for position, name in enumerate(sorted(searched))
    }


def _draw(rng: np.random.Generator, param: Range | Choice):
    if isinstance(param, Choice):
        return param.choices[rng.integers(len(param.choices))]
    log = param.distribution.startswith("log")
    low, high = (np.log(param.low), np.log(param.high)) if log else (param.low, param.high)
    value = float(rng.uniform(low, high))
    value = float(np.exp(value)) if log else value
    return round(value) if param.distribution in ("int", "logint") else value


def mutations(spec: Spec) -> dict:
    """What PBT may perturb: a range as a Tune domain (multiplied by 0.8 or 1.2, then clipped), choices as a list,
    which Ray shifts to a neighbouring choice (as a domain they too would be multiplied, off the list)."""
    searched = spec.searched()
    return {
        name: list(searched[name].choices) if isinstance(searched[name], Choice) else _tune_domain(searched[name])
        for name in PERTURBED
        if name in searched
    }


def _tune_domain(param: Range | Choice):
    if isinstance(param, Choice):
        return ray.tune.choice(list(param.choices))
    if param.distribution == "loguniform":
        return ray.tune.loguniform(param.low, param.high)
    if param.distribution == "uniform":
        return ray.tune.uniform(param.low, param.high)
    return ray.tune.randint(int(param.low), int(param.high) + 1)
