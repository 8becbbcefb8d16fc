"""The searcher: Optuna over its public ask-and-tell API, as a Ray Tune Searcher.

Each Tune trial is one Optuna trial (`study.ask`), whose number is the trial's `trial_index` and which records the
Ray trial id as the user attribute `ray_trial_id`, so optuna-dashboard and trials.parquet name the same trial.
Every validation report becomes an intermediate value at its SGD iteration. A trial that trained for the whole
budget is told COMPLETE with the best value it reported (the checkpoint raybone keeps and exports); a trial the
scheduler stopped early is told PRUNED, so TPE and the importances never compare it with full-budget trials as
if it were one of them; a failed trial FAIL. The study lives in a local SQLite file (optuna-dashboard can watch
it) and so outlives the driver: a resumed search reopens it, and Tune restores the Ray-to-Optuna trial map
through save/restore.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher
from rich.console import Console
from rich.text import Text

from raybone.errors import SpecError
from raybone.experiments import Experiment
from raybone.experiments.storage import STUDY
from raybone.experiments.study import RAY_TRIAL_ID, distributions, finished_trials
from raybone.spec import Spec, spec_changes


def startup_trials(num_samples: int) -> int:
    """Random trials before TPE (or GP, CMA-ES) models the results: Optuna's 10, but a third of a smaller search,
    so that a search of 10 trials or fewer is not random search under another name."""
    return min(10, max(2, num_samples // 3))


def sampler(spec: Spec) -> optuna.samplers.BaseSampler:
    """The spec's Optuna sampler, seeded by the spec's seed."""
    kind, seed, startup = spec.searcher.type, spec.seed, startup_trials(spec.num_samples)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)
    if kind == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
    if kind == "qmc":
        with warnings.catch_warnings():  # "experimental" since Optuna 3.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.RandomSampler(seed=seed)


def warm_start_trials(storage, name: str, spec: Spec, console: Console | None = None) -> list:
    """Experiment `name`'s completed and early-stopped trials as Optuna trials of `spec`'s space; trials outside it
    are reported and left out. Refused in one line if the experiment searched other hyperparameters."""
    earlier = Experiment.open(storage, name)
    if set(earlier.spec.searched()) != set(spec.searched()):
        raise SpecError(
            f"--warm-start {name}: it searched {', '.join(earlier.spec.searched()) or 'nothing'}, this "
            f"search {', '.join(spec.searched()) or 'nothing'}; warm starts need the same hyperparameters"
        )
    if earlier.spec.metric != spec.metric:
        raise SpecError(f"--warm-start {name}: it optimised {earlier.spec.metric}, this search {spec.metric}")
    trials, skipped = finished_trials(earlier.trials(), spec, with_pruned=True)
    if console is not None:
        console.print(
            f"warm start from {name}: {len(trials)} trials"
            + (f"; left out {len(skipped)}: {'; '.join(skipped[:3])}" if skipped else ""),
            highlight=False,
        )
        if changed := spec_changes(earlier.spec, spec, training_only=True):
            said = f" {name} trained its trials otherwise ({'; '.join(changed)}); the sampler takes their scores as if "
            console.print(Text.assemble(("note:", "yellow"), said + "this search had made them"), highlight=False)
    return trials


class OptunaSearcher(Searcher):
    """Optuna's ask-and-tell behind Ray Tune's Searcher interface (see the module docstring)."""

    def __init__(self, spec: Spec, study_folder: Path, warm_start: list = ()):
        super().__init__(metric=spec.metric, mode=spec.mode)
        self._spec = spec
        self._path = Path(study_folder) / STUDY
        self._name = Path(study_folder).name
        self._warm_start = list(warm_start)
        self._numbers: dict[str, int] = {}  # Ray trial id -> Optuna trial number
        self._study = self._storage = None

    def __getstate__(self) -> dict:
        # Tune pickles the searcher; the study is reopened from its SQLite file.
        return {**self.__dict__, "_study": None, "_storage": None}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the space comes from the spec, not from Tune's param_space

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self._storage = optuna.storages.RDBStorage(f"sqlite:///{self._path}")
            self._study = optuna.create_study(
                study_name=self._name,
                storage=self._storage,
                sampler=sampler(self._spec),
                direction="minimize" if self._spec.mode == "min" else "maximize",
                load_if_exists=True,
            )
            if not self._study.trials:  # a new study: a resumed one has these already
                self._study.add_trials(self._warm_start)
                for point in self._spec.start_from:
                    self._study.enqueue_trial(point)
        return self._study

    def suggest(self, trial_id: str) -> dict:
        trial = self.study.ask(distributions(self._spec))
        trial.set_user_attr(RAY_TRIAL_ID, trial_id)
        self._numbers[trial_id] = trial.number
        return {**trial.params, "trial_index": trial.number}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        value, step = result.get(self.metric), result.get("iteration")
        if trial_id in self._numbers and _finite(value) and step is not None:
            self._report(self._numbers[trial_id], float(value), int(step))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self._numbers.get(trial_id)
        # A trial the study already knows as finished ended before its driver died, after Tune last saved its own
        # state: on resume Tune runs it again, it reports its result again and ends again (told once is enough).
        if number is None or self._trial(number).state.is_finished():
            return
        if result and not error:  # a result the scheduler stopped the trial on reaches no on_trial_result
            self.on_trial_result(trial_id, result)
        if error or not result:
            self.study.tell(number, state=TrialState.FAIL)
        elif result.get("iteration", 0) >= self._spec.iterations:
            best = self._best_reported(number)
            self.study.tell(number, best if best is not None else result.get(self.metric))
        else:
            self.study.tell(number, state=TrialState.PRUNED)

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({"numbers": self._numbers}))

    def restore(self, checkpoint_path: str) -> None:
        self._numbers = json.loads(Path(checkpoint_path).read_text())["numbers"]

    def _trial(self, number: int) -> optuna.trial.FrozenTrial:
        """One trial, where `study.trials` would read every trial of the study from SQLite."""
        trial = self._trial_id(number)  # first: it opens the study (and its storage) on a resumed searcher
        return self._storage.get_trial(trial)

    def _trial_id(self, number: int) -> int:
        """The storage's id of trial `number`, through Optuna's public storage interface."""
        storage = self.study and self._storage
        return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(self._name), number)

    def _report(self, number: int, value: float, step: int) -> None:
        """The trial's intermediate value at an SGD iteration."""
        trial = self._trial_id(number)
        if self._storage.get_trial(trial).state == TrialState.RUNNING:
            self._storage.set_trial_intermediate_value(trial, step, value)

    def _best_reported(self, number: int) -> float | None:
        values = [v for v in self._trial(number).intermediate_values.values() if _finite(v)]
        if not values:
            return None
        return min(values) if self._spec.mode == "min" else max(values)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
