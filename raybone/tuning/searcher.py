"""The searcher: Optuna's TPE, seeded, its study in a local SQLite file that optuna-dashboard can watch."""

from __future__ import annotations

from pathlib import Path

import optuna
import ray.tune
from ray.tune.search.optuna import OptunaSearch

from raybone.experiments.storage import STUDY
from raybone.spec import Choice, Spec


def searcher(spec: Spec, path: Path) -> OptunaSearch:
    """Seeded TPE whose study (named after the folder) lives in the local folder `path`, so optuna-dashboard
    can watch it: the experiment folder, or results/<name>/ when the storage is a URI."""
    return _IndexedOptunaSearch(
        sampler=optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup_trials(spec.num_samples)),
        objective=(spec.metric, spec.mode),
        points_to_evaluate=spec.start_from,
        study_name=path.name,
        storage=optuna.storages.RDBStorage(f"sqlite:///{path / STUDY}"),
    )


def startup_trials(num_samples: int) -> int:
    """Random trials before TPE models the results: Optuna's 10, but a third of a smaller search, so that a
    search of 10 trials or fewer is not random search under another name."""
    return min(10, max(2, num_samples // 3))


class _IndexedOptunaSearch(OptunaSearch):
    """Adds the Optuna trial number as `trial_index`: sequential, and kept in the study across resumes."""

    def __init__(self, *, objective: tuple[str, str], **kwargs):
        super().__init__(**kwargs)
        self._objective = objective  # (metric, mode): Tune does not tell them when nothing is searched

    def _setup_study(self, mode):
        # Enqueue the start points into a new study only: a resumed one has run (or queued) them already.
        points, self._points_to_evaluate = self._points_to_evaluate, []
        super()._setup_study(mode)
        if not self._ot_study.trials:
            for point in points:
                self._ot_study.enqueue_trial(point)

    def suggest(self, trial_id: str):
        if not self._space:  # nothing searched: every trial trains the spec's fixed configuration
            if self._ot_study is None:
                self._metric, self._mode = self._metric or self._objective[0], self._mode or self._objective[1]
                self._setup_study(self._mode)
            self._ot_trials.setdefault(trial_id, self._ot_study.ask())
            config = {}
        else:
            config = super().suggest(trial_id)
        if isinstance(config, dict):
            config = {**config, "trial_index": self._ot_trials[trial_id].number}
        return config


def tune_space(spec: Spec) -> dict:
    space = {}
    for name, param in spec.searched().items():
        if isinstance(param, Choice):
            space[name] = ray.tune.choice(param.choices)
        else:
            space[name] = _RANGES[param.distribution](param)
    return space


_RANGES = {
    "uniform": lambda p: ray.tune.uniform(p.low, p.high),
    "loguniform": lambda p: ray.tune.loguniform(p.low, p.high),
    "int": lambda p: ray.tune.randint(int(p.low), int(p.high) + 1),
    "logint": lambda p: ray.tune.lograndint(int(p.low), int(p.high) + 1),
}
