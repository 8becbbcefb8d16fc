"""A finished search's Tune ResultGrid as raybone's two Parquet tables (columns: see the README's Results).

trials.parquet   one row per trial: id, status, the searched hyperparameters (named as in the YAML), the
                 final metrics, the SGD iteration reached (`iteration`), wall time, node, latest checkpoint,
                 and the best the trial ever reported: best_<metric>, best_iteration, best_checkpoint_path
history.parquet  one row per validation report of every trial: the learning curves, each report's checkpoint
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

import pandas as pd
import ray.cloudpickle
import ray.train
import ray.tune

from raybone.errors import one_line
from raybone.experiments import storage as results
from raybone.experiments.storage import HISTORY, TRIALS, as_location
from raybone.spec import METRICS, Spec

HISTORY_COLUMNS = [
    "trial_id",
    "iteration",
    "train_loss",
    "current_lr",
    "images_per_s",
    *METRICS,
    "time_total_s",
    "timestamp",
    "resumed_from",
    "restored_from",
    "exploited_from",
    "node",
    "checkpoint_path",
]
FINISHED = ("completed", "stopped_early")  # a trial's status once it ended without an error (else running, error)


def trials_table(
    result_grid,
    spec: Spec,
    history: pd.DataFrame,
    ended: set[str],
    storage_location: str | PurePath | None = None,
) -> pd.DataFrame:
    """One row per trial, its best report found in `history` (history_table's). A trial not in `ended` (the trials
    Tune said had ended: after a Ctrl-C it stops the others silently) stays `running`, so --resume continues it.
    With `storage_location` a URI, checkpoint and trial paths are URIs too (Ray reports them without their scheme)."""
    rows = []
    for result in result_grid:
        metrics, config = result.metrics or {}, result.config or {}
        trial_id = metrics.get("trial_id") or config.get("__trial_id", "")
        status = _status(result.error, metrics.get("iteration", 0), spec.iterations)
        if status == "stopped_early" and trial_id not in ended:
            status = "running"
        rows.append(
            trial_row(
                spec,
                trial_id,
                config,
                metrics,
                history[history.trial_id == trial_id],
                status,
                result.error,
                result.path,
                storage_location,
            )
        )
    return _numbered(pd.DataFrame(rows), spec)


def trial_row(
    spec: Spec,
    trial_id: str,
    config: dict,
    last: dict,
    reports: pd.DataFrame | None,
    status: str,
    error,
    path: str | None,
    storage_location: str | PurePath | None,
) -> dict:
    """A trial's row of trials.parquet from its configuration, its last report and all its reports."""

    def located(fs_path):
        return fs_path if storage_location is None or fs_path is None else as_location(fs_path, storage_location)

    best = best_report(reports, spec.metric, spec.mode)
    return {
        "trial_id": trial_id,
        "trial_index": config.get("trial_index"),
        "status": status,
        **{name: config.get(name) for name in spec.searched()},
        **{name: last.get(name) for name in METRICS},
        "iteration": last.get("iteration", 0),
        f"best_{spec.metric}": None if best is None else best[spec.metric],
        "best_iteration": None if best is None else best["iteration"],
        "best_checkpoint_path": None if best is None else located(best.get("checkpoint_path")),
        "wall_time_s": last.get("time_total_s"),
        "node": last.get("node"),
        "checkpoint_path": located(last.get("checkpoint_path")),
        "error": error_message(error) if error else None,
        "trial_path": located(path),
    }


def error_message(error) -> str:
    """A failed trial's error on one line. A Ray task error's cause is what the trial raised: its message, without
    the remote traceback before it. Train's error leads with each worker's traceback: the first worker's error is
    named instead (the tracebacks stay in Tune's error file)."""
    cause = getattr(error, "cause", None) or error
    if failures := worker_errors(cause):
        return one_line(f"{type(failures[0]).__name__} on a Train worker: {failures[0]}")
    return one_line(cause)


def worker_errors(error: BaseException) -> list[BaseException]:
    """What each Train worker raised, by rank, when `error` is Train's report of them; else none."""
    if not isinstance(error, ray.train.WorkerGroupError):
        return []
    return [error.worker_failures[rank] for rank in sorted(error.worker_failures)]


def trial_error(trial) -> str:
    """What a failed Tune trial raised, on one line, from the files Tune writes beside the trial before it calls the
    callbacks (their copies in storage come later): the pickled error (a task's or an actor's), else the last
    failure in the text file."""
    pickled, text = trial.pickled_error_file, trial.error_file
    if pickled and os.path.exists(pickled):
        with open(pickled, "rb") as file:
            return error_message(ray.cloudpickle.load(file))
    if text and os.path.exists(text):  # "Failure # 2 (occurred at ...)\n<the error>\n", one per failure
        return one_line(Path(text).read_text().rpartition("Failure # ")[2].partition("\n")[2])
    return "no error recorded"


def ended_trials(live_trials: pd.DataFrame | None) -> set[str]:
    """The trials LiveTables saw end without an error. One it saw fail and that raises nothing now was restarted
    (a resume retries failed trials), so it has not ended."""
    return set() if live_trials is None else set(live_trials.trial_id[live_trials.status.isin(FINISHED)])


def _numbered(table: pd.DataFrame, spec: Spec) -> pd.DataFrame:
    table = table.sort_values("trial_id", ignore_index=True)
    if spec.scheduler.type == "pbt":  # an exploiting trial copies its donor's config, trial_index included
        table["trial_index"] = range(len(table))  # Tune numbers the population in the order it was drawn
    return table


class LiveTables(ray.tune.Callback):
    """trials.parquet and history.parquet while the search runs: a history row per validation report, and the
    trials with their status so far (`running` until they end). Each write is atomic, so `raybone results` and
    `raybone report` read a consistent table at any moment; the search replaces both with Tune's final record.

    Tune pickles its callbacks into the experiment (for --resume): the rows are read back from the tables."""

    def __init__(self, spec: Spec, experiment: str | PurePath, storage_location: str | PurePath | None):
        self._spec, self._experiment, self._storage = spec, experiment, storage_location
        self._reports: list[dict] = []
        self._rows: dict[str, dict] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reports": [], "_rows": {}}

    def setup(self, **info) -> None:
        for name, kept in ((HISTORY, "_reports"), (TRIALS, "_rows")):
            location = results.join(self._experiment, name)
            if results.exists(location):
                records = results.read_parquet(location).to_dict("records")
                setattr(self, kept, records if kept == "_reports" else {r["trial_id"]: r for r in records})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._reports.append({**{c: result.get(c) for c in HISTORY_COLUMNS}, "trial_id": trial.trial_id})
        self._update(trial, "running", None)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        self._update(trial, _status(None, last.get("iteration", 0), self._spec.iterations), None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._update(trial, "error", trial_error(trial))

    def _update(self, trial, status: str, error) -> None:
        reports = pd.DataFrame(self._reports)
        own = reports[reports.trial_id == trial.trial_id] if len(reports) else None
        self._rows[trial.trial_id] = trial_row(
            self._spec,
            trial.trial_id,
            trial.config,
            trial.last_result or {},
            own,
            status,
            error,
            trial.path,
            self._storage,
        )
        history = _located_checkpoints(reports.reindex(columns=HISTORY_COLUMNS), self._storage)
        results.write_parquet(history, results.join(self._experiment, HISTORY))
        results.write_parquet(
            _numbered(pd.DataFrame(list(self._rows.values())), self._spec), results.join(self._experiment, TRIALS)
        )


def best_report(reports: pd.DataFrame | None, metric: str, mode: str) -> pd.Series | None:
    """The report with the best `metric`, the latest of equals (as Train keeps the latest of equal checkpoints)
    that has a checkpoint if any has; None if no report has the metric. (A run that had finished before a driver
    crash reports its last metrics again on resume, without a checkpoint.)"""
    if reports is None or metric not in reports or reports[metric].isna().all():
        return None
    best = reports[metric].min() if mode == "min" else reports[metric].max()
    equals = reports[reports[metric] == best]
    if "checkpoint_path" in equals and equals.checkpoint_path.notna().any():
        equals = equals[equals.checkpoint_path.notna()]
    return equals.iloc[-1]


def history_table(
    result_grid, storage_location: str | PurePath | None = None, live: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Every validation report: Tune's record, with those that only the `live` table (LiveTables') kept. A trial
    that restarts (paused by PBT or a scheduler, or resumed) gets its result.json copied back from storage, where
    it may not yet hold the trial's last reports, and they are gone from Tune's record. A finished run that tells
    Tune its result again (at its resumed_from iteration: it trained nothing) validated nothing new."""
    frames = []
    for result in result_grid:
        df = result.metrics_dataframe
        if df is not None and len(df):
            frames.append(
                _located_checkpoints(df[[c for c in HISTORY_COLUMNS if c in df.columns]].copy(), storage_location)
            )
    if live is not None and len(live):
        frames.append(live[[c for c in HISTORY_COLUMNS if c in live.columns]])
    if not frames:
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    # A function trial's last report comes back once more as its final result; the live table holds Tune's too.
    history = pd.concat(frames, ignore_index=True)
    keys = [c for c in ("trial_id", "iteration", "checkpoint_path") if c in history.columns]
    history = history.drop_duplicates(subset=keys, keep="first", ignore_index=True)
    if "resumed_from" in history:
        history = history[history.iteration != history.resumed_from]
    return history.sort_values(["trial_id", "timestamp", "iteration"], kind="stable", ignore_index=True)


def _located_checkpoints(history: pd.DataFrame, storage_location: str | PurePath | None) -> pd.DataFrame:
    """History rows with their checkpoint paths, and those their runs restored from, as URIs on a URI storage (Ray
    reports them without the scheme; a restored_from that was not located would match no checkpoint_path)."""
    for column in ("checkpoint_path", "restored_from"):
        if storage_location is not None and column in history:
            history[column] = [
                as_location(p, storage_location) if isinstance(p, str) else None for p in history[column]
            ]
    return history


def _status(error, iteration: int, total_iterations: int) -> str:
    if error:
        return "error"
    return "completed" if iteration >= total_iterations else "stopped_early"
