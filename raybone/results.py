"""The experiment folder `results/<name>/` and its Parquet tables.

    spec.yaml          the resolved spec the search ran with
    environment.json   package versions, data fingerprint, command
    trials.parquet     one row per trial (final metrics, hyperparameters, checkpoint)
    history.parquet    one row per report of every trial (learning curves)
    train/             the Ray Train runs, one per trial, with their checkpoints
    ...                Ray Tune's own experiment state (used by --resume)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd

from raybone.errors import RayboneError

TRIALS = "trials.parquet"
HISTORY = "history.parquet"
METRIC_COLUMNS = ["val_top1", "val_top2", "val_rmse", "val_mae", "val_rmse_expected", "val_mae_expected"]


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """Write atomically: a crash mid-write leaves the previous table, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def trials_table(result_grid, spec, total_iterations: int) -> pd.DataFrame:
    """One row per trial from a Tune ResultGrid, columns named as in the search-space YAML."""
    rows = []
    for result in result_grid:
        metrics = result.metrics or {}
        config = result.config or {}
        iteration = metrics.get("iteration", 0)
        row = {
            "trial_id": metrics.get("trial_id") or config.get("__trial_id", ""),
            "trial_index": config.get("trial_index"),
            "status": _status(result, iteration, total_iterations),
            **{name: config.get(name) for name in spec.searched()},
            **{name: metrics.get(name) for name in METRIC_COLUMNS},
            "training_iteration": iteration,
            "wall_time_s": metrics.get("time_total_s"),
            "node": metrics.get("node"),
            "checkpoint_path": metrics.get("checkpoint_path"),
            "error": _one_line(result.error) if result.error else None,
            "trial_path": result.path,
        }
        rows.append(row)
    return pd.DataFrame(rows).sort_values("trial_id", ignore_index=True)


def history_table(result_grid) -> pd.DataFrame:
    frames = []
    for result in result_grid:
        df = result.metrics_dataframe
        if df is not None and len(df):
            frames.append(df[[c for c in _HISTORY_COLUMNS if c in df.columns]])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=_HISTORY_COLUMNS)


_HISTORY_COLUMNS = ["trial_id", "iteration", "train_loss", "lr", "images_per_s", *METRIC_COLUMNS, "time_total_s",
                    "resumed_from", "node"]


def _status(result, iteration: int, total_iterations: int) -> str:
    if result.error:
        return "error"
    return "completed" if iteration >= total_iterations else "stopped_early"


def _one_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def experiment_dir(results_dir: Path, name: str, must_exist: bool = True) -> Path:
    path = Path(results_dir) / name
    if must_exist and not (path / TRIALS).exists():
        known = ", ".join(list_experiments(results_dir)) or "none yet"
        raise RayboneError(f"no experiment named {name!r} in {results_dir} (known: {known})")
    return path


def list_experiments(results_dir: Path) -> list[str]:
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    found = [p for p in results_dir.iterdir() if (p / TRIALS).exists()]
    return [p.name for p in sorted(found, key=lambda p: (p / TRIALS).stat().st_mtime)]


def load_trials(results_dir: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(experiment_dir(results_dir, name) / TRIALS)
