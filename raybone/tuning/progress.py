"""What `raybone search` shows while it runs: a progress bar over the search's iterations and a line per trial."""

from __future__ import annotations

import math

import ray.tune
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from raybone.errors import printable
from raybone.spec import Spec
from raybone.tuning.tables import trial_error


class TrialProgress(ray.tune.Callback):
    """A progress bar over the search's total iterations, plus a line per finished trial.

    Tune pickles its callbacks into the experiment (for --resume), so the bar is built in setup().
    """

    def __init__(self, spec: Spec):
        self._spec = spec
        self._progress = None

    def __getstate__(self):
        return {"_spec": self._spec, "_progress": None}

    def setup(self, **info):
        self._console = Console()
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self._console,
        )
        self._task = self._progress.add_task("starting", total=self._spec.num_samples * self._spec.iterations)
        self._seen: dict[str, int] = {}
        self._best = None
        self._trial_best: dict[str, tuple[float, int]] = {}  # trial id -> (best value, its iteration)
        self._unended: set[str] = set()  # trials started in this run that Tune has not said ended
        self._progress.start()

    def on_experiment_end(self, trials, **info):
        # Tune calls this on Ctrl-C and on errors too, with trials still unfinished; after a Ctrl-C it has marked
        # the running ones TERMINATED without telling the callbacks they ended.
        done = not self._unended and all(t.status in ("TERMINATED", "ERROR") for t in trials)
        self._describe(trials, state="finished" if done else "stopped")
        self._progress.stop()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._unended.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._advance(trial.trial_id, result.get("iteration", 0))
        value = result.get(self._spec.metric)
        if value is not None and not math.isnan(value):  # a diverged run scored nothing, as in trials.parquet
            self._score(trial.trial_id, value, result.get("iteration", 0))
        self._describe(trials)

    def _score(self, trial_id: str, value: float, iteration: int) -> None:
        if self._better(value, self._best):
            self._best = value
        held = self._trial_best.get(trial_id, (None,))[0]
        # The latest of equal scores: Train keeps the latest of equal checkpoints, and trials.parquet names it.
        if self._better(value, held) or value == held:
            self._trial_best[trial_id] = (value, iteration)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._unended.discard(trial.trial_id)
        last = trial.last_result or {}
        # An early-stopped trial never reaches the last iteration: its unused budget counts as done.
        self._advance(trial.trial_id, self._spec.iterations)
        self._describe(trials, ending=trial)
        best, at = self._trial_best.get(trial.trial_id, (float("nan"), 0))
        ended = "finished" if last.get("iteration", 0) >= self._spec.iterations else "stopped early"
        self._console.print(
            f"trial {trial.trial_id} {ended} at iteration {last.get('iteration', 0)}: "
            f"{self._spec.metric} {last.get(self._spec.metric, float('nan')):.3f} (its best {best:.3f} at "
            f"iteration {at}, kept)"
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self._unended.discard(trial.trial_id)
        self._describe(trials, ending=trial)
        self._print_failure(trial, "")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._print_failure(trial, " (Tune tries it again)")

    def _print_failure(self, trial, then: str) -> None:
        last = self._seen.get(trial.trial_id)  # reported in this run: Tune's last_result may predate a resume
        at = f" at iteration {last}" if last else ""
        error = printable(trial_error(trial))
        self._console.print(
            Text.assemble((f"trial {trial.trial_id} failed", "red"), f"{at}: {error}{then}"), highlight=False
        )

    def _describe(self, trials, ending=None, state: str | None = None) -> None:
        """'2 running, best val_rmse 3.120'. Tune calls on_trial_complete while the trial is still RUNNING, so the
        ending trial is not counted."""
        running = sum(t.status == "RUNNING" and t is not ending for t in trials)
        best = f", best {self._spec.metric} {self._best:.3f}" if self._best is not None else ""
        self._progress.update(self._task, description=f"{state or f'{running} running'}{best}")

    def _better(self, value: float, than: float | None) -> bool:
        return than is None or (value < than if self._spec.mode == "min" else value > than)

    def _advance(self, trial_id: str, done: int) -> None:
        self._progress.advance(self._task, done - self._seen.get(trial_id, 0))
        self._seen[trial_id] = done
