"""A finished search's Tune ResultGrid as raybone's two Parquet tables (columns: see the README's Results).

trials.parquet   one row per trial: id, status, the searched hyperparameters (named as in the YAML), the
                 final metrics, the SGD iteration reached (`iteration`), wall time, node, latest checkpoint,
                 and the best the trial ever reported: best_<metric>, best_iteration, best_checkpoint_path
history.parquet  one row per validation report of every trial: the learning curves, each report's checkpoint
"""

from __future__ import annotations

from pathlib import PurePath

import pandas as pd

from raybone.errors import one_line
from raybone.experiments.storage import as_location
from raybone.spec import METRICS, Spec

HISTORY_COLUMNS = [
    "trial_id",
    "iteration",
    "train_loss",
    "current_lr",
    "images_per_s",
    *METRICS,
    "time_total_s",
    "resumed_from",
    "restored_from",
    "exploited_from",
    "node",
    "checkpoint_path",
]


def trials_table(result_grid, spec: Spec, storage_location: str | PurePath | None = None) -> pd.DataFrame:
    """One row per trial. With `storage_location` a URI, checkpoint and trial paths are URIs too (Ray reports
    them without their scheme)."""

    def located(fs_path):
        return fs_path if storage_location is None or fs_path is None else as_location(fs_path, storage_location)

    rows = []
    for result in result_grid:
        metrics = result.metrics or {}
        config = result.config or {}
        iteration = metrics.get("iteration", 0)
        best = best_report(result.metrics_dataframe, spec.metric, spec.mode)
        rows.append(
            {
                "trial_id": metrics.get("trial_id") or config.get("__trial_id", ""),
                "trial_index": config.get("trial_index"),
                "status": _status(result, iteration, spec.iterations),
                **{name: config.get(name) for name in spec.searched()},
                **{name: metrics.get(name) for name in METRICS},
                "iteration": iteration,
                f"best_{spec.metric}": None if best is None else best[spec.metric],
                "best_iteration": None if best is None else best["iteration"],
                "best_checkpoint_path": None if best is None else located(best.get("checkpoint_path")),
                "wall_time_s": metrics.get("time_total_s"),
                "node": metrics.get("node"),
                "checkpoint_path": located(metrics.get("checkpoint_path")),
                "error": one_line(result.error) if result.error else None,
                "trial_path": located(result.path),
            }
        )
    table = pd.DataFrame(rows).sort_values("trial_id", ignore_index=True)
    if spec.scheduler.type == "pbt":  # an exploiting trial copies its donor's config, trial_index included
        table["trial_index"] = range(len(table))  # Tune numbers the population in the order it was drawn
    return table


def best_report(reports: pd.DataFrame | None, metric: str, mode: str) -> pd.Series | None:
    """The report with the best `metric`, the latest of equals (as Train keeps the latest of equal checkpoints);
    None if no report has it."""
    if reports is None or metric not in reports or reports[metric].isna().all():
        return None
    best = reports[metric].min() if mode == "min" else reports[metric].max()
    return reports.loc[reports.index[reports[metric] == best][-1]]


def history_table(result_grid, storage_location: str | PurePath | None = None) -> pd.DataFrame:
    frames = []
    for result in result_grid:
        df = result.metrics_dataframe
        if df is not None and len(df):
            frame = df[[c for c in HISTORY_COLUMNS if c in df.columns]].copy()
            if storage_location is not None and "checkpoint_path" in frame:
                frame["checkpoint_path"] = [
                    as_location(p, storage_location) if isinstance(p, str) else None for p in frame["checkpoint_path"]
                ]
            frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=HISTORY_COLUMNS)
    # A function trial's last report comes back once more as its final result.
    history = pd.concat(frames, ignore_index=True)
    keys = [c for c in ("trial_id", "iteration", "checkpoint_path") if c in history.columns]
    return history.drop_duplicates(subset=keys, keep="first", ignore_index=True)


def _status(result, iteration: int, total_iterations: int) -> str:
    if result.error:
        return "error"
    return "completed" if iteration >= total_iterations else "stopped_early"
