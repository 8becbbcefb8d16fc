"""Resume after a real interruption: SIGKILL (or Ctrl-C) the driver of a running search, then --resume it.

The interrupted search is a process of its own, with its own Ray cluster, killed for real. The resume runs the
same `raybone search --resume` in this process, on the module's cluster: a process of its own would only add the
start of another cluster (about 10 s a resume), and the resume reads nothing but what the killed run saved.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from raybone.cli import app
from raybone.spec import load_spec
from raybone.tuning.pbt import pbt_members

pytestmark = pytest.mark.slow

ARGS = [
    "--set",
    "data.image_size=40",
    "--set",
    "input_size=32",
    "--set",
    "batch_size=8",
    "--set",
    "iterations=6",
    "--set",
    "eval_every=2",
    "--set",
    "num_samples=2",
    "--set",
    "resources.cpus_per_worker=2",
]  # one trial at a time on 2 cores: the kill lands between trials, before Tune creates the second


def _resume(name: str, results: Path, *more: str) -> str:
    """`raybone search --resume NAME`, in this process; its output, and its exit status checked."""
    args = ["search", "--resume", name, "--results-dir", str(results), *more]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "1000"})  # a line per trial, unwrapped
    assert result.exit_code == 0, result.output
    return result.stdout


def _raybone(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "raybone", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )


# Searcher-driven trials, and PBT's population, which Tune generates itself: its second trial is created only after
# the resume, from what the first run saved. Synchronous PBT pauses a trial at each interval until the others reach
# it, so a second trial started beside the first would show in the timestamps; one interval, to save time.
@pytest.mark.parametrize(
    "scheduler",
    [
        ["scheduler.type=none"],
        ["scheduler.type=pbt", "scheduler.synchronous=true", "scheduler.perturbation_interval=4"],
    ],
    ids=["searcher", "pbt"],
)
def test_search_resumes_after_sigkill(local_ray, tmp_path, scheduler, monkeypatch):
    monkeypatch.setenv("RAYBONE_CACHE", str(tmp_path / "cache"))  # the killed run's prepared data, found again
    env = dict(os.environ)
    args = [*ARGS, *(arg for setting in scheduler for arg in ("--set", setting))]
    driver = _raybone("search", "--name", "killed", "--results-dir", str(tmp_path), *args, env=env)
    experiment = tmp_path / "killed"
    deadline = time.time() + 300
    while not _completed_checkpoints(experiment):
        assert driver.poll() is None, driver.stdout.read()
        assert time.time() < deadline, "first trial never finished"
        time.sleep(0.5)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    os.killpg(driver.pid, signal.SIGKILL)  # the in-process Ray cluster dies with its driver, as on a laptop
    for table in ("trials.parquet", "history.parquet"):  # the live tables: whole even after a SIGKILL
        if (experiment / table).exists():
            assert len(pd.read_parquet(experiment / table)) >= 1
    done_before = _completed_checkpoints(experiment)

    # resources may change on resume, but Tune keeps the concurrency limit the search started with: raybone says so
    output = _resume("killed", tmp_path, "--set", "resources.max_concurrent_trials=2")
    assert "up to 1 at a time" in output and "would give 2" in output, output
    trials = pd.read_parquet(experiment / "trials.parquet")
    assert len(trials) == 2 and trials.trial_id.is_unique
    if scheduler[0] == "scheduler.type=pbt":  # the population drawn at the start, each member once, none redrawn
        spec = load_spec(experiment / "spec.yaml")
        names = sorted(spec.searched())
        drawn = sorted(tuple(member[name] for name in names) for member in pbt_members(spec))
        assert sorted(trials[names].itertuples(index=False, name=None)) == drawn
    assert (trials.status == "completed").all() and (trials.iteration == 6).all()
    history = pd.read_parquet(experiment / "history.parquet")
    for trial_id, rows in history.groupby("trial_id"):
        assert rows.iteration.is_unique, f"trial {trial_id} trained an iteration twice"
    first, second = sorted(history.groupby("trial_id").timestamp, key=lambda group: group[1].min())
    assert first[1].max() <= second[1].min(), "two trials trained at once, and only one fits"
    for path, mtime in done_before.items():
        assert path.stat().st_mtime == mtime, f"finished trial {path} was trained again"

    assert "already finished (2 trials); nothing to resume" in _resume("killed", tmp_path)


def test_a_search_interrupted_during_its_last_trial_continues_it_and_names_a_checkpoint_it_cannot(
    local_ray, tmp_path, monkeypatch
):
    """Ctrl-C during the search's last trial: the trials table lists every trial, the interrupted one `running`, and
    the resume continues it (Tune stops it without telling raybone, which once wrote it `stopped_early`, and the
    resume answered 'already finished'). A checkpoint whose optimizer state no longer fits the model (a VGG16 search
    started before weight decay moved to the class layer) fails the trial with one line naming the checkpoint; once
    the checkpoint fits again, the trial resumes."""
    import torch

    monkeypatch.setenv("RAYBONE_CACHE", str(tmp_path / "cache"))
    env = {**os.environ, "COLUMNS": "1000"}
    settings = ["data.image_size=40", "input_size=32", "batch_size=8", "iterations=120", "eval_every=10"]
    settings += ["num_samples=1", "scheduler.type=none", "resources.max_failures=0"]
    args = [arg for setting in settings for arg in ("--set", setting)]
    driver = _raybone("search", "--name", "killed", "--results-dir", str(tmp_path), *args, env=env)
    experiment = tmp_path / "killed"
    deadline = time.time() + 300
    while not ((experiment / "trials.parquet").exists() and _checkpoints(experiment)):  # the trial has reported
        assert driver.poll() is None, driver.stdout.read()
        assert time.time() < deadline, "no report before the deadline"
        time.sleep(0.5)
    driver.send_signal(signal.SIGINT)
    output, _ = driver.communicate(timeout=120)
    saved = _settled_checkpoints(experiment)  # the one Train registered last is among them
    assert max(saved.values()) < 120, "the trial finished before the interrupt"
    assert (pd.read_parquet(experiment / "trials.parquet").status == "running").all(), output

    originals = {path: path.read_bytes() for path in saved}
    for path in saved:  # the optimizer's two parameter groups (decayed, not) as one
        state = torch.load(path, weights_only=True)
        groups = state["optimizer"]["param_groups"]
        state["optimizer"]["param_groups"] = [{**groups[0], "params": groups[0]["params"] + groups[1]["params"]}]
        torch.save(state, path)
    failed = _resume("killed", tmp_path)
    assert "already finished" not in failed, failed
    (row,) = pd.read_parquet(experiment / "trials.parquet").itertuples()
    assert row.status == "error" and row.error.startswith("cannot continue from a checkpoint whose optimizer state")
    assert any(row.error.endswith(str(path.parent)) for path in saved), row.error
    assert f"trial {row.trial_id} failed: {row.error}" in " ".join(failed.split()), failed

    for path, data in originals.items():
        path.write_bytes(data)
    _resume("killed", tmp_path)
    (row,) = pd.read_parquet(experiment / "trials.parquet").itertuples()
    assert row.status == "completed" and row.iteration == 120, row
    history = pd.read_parquet(experiment / "history.parquet")
    after = history[history.resumed_from > 0]
    (start,) = after.resumed_from.unique()  # continued from a checkpoint, not from the start
    assert start in saved.values() and list(after.iteration) == list(range(start + 10, 121, 10)), history


def _checkpoints(experiment: Path) -> dict[Path, int]:
    """Every checkpoint file written so far, with its iteration."""
    import torch

    found = {}
    for path in experiment.glob("train/trial-*/checkpoint_*/checkpoint.pt"):
        try:
            found[path] = torch.load(path, weights_only=True)["iteration"]
        except Exception:  # being written right now
            continue
    return found


def _settled_checkpoints(experiment: Path) -> dict[Path, int]:
    """The checkpoints once no more are written: a worker outlives its driver for a moment."""
    deadline = time.time() + 60
    while time.time() < deadline:
        before = _checkpoints(experiment)
        time.sleep(2)
        if _checkpoints(experiment) == before:
            return before
    raise AssertionError("checkpoints were still being written a minute after the driver ended")


def _completed_checkpoints(experiment: Path) -> dict[Path, float]:
    """Checkpoint files of Train runs that reached the final iteration, with their modification times."""
    return {path: path.stat().st_mtime for path, iteration in _checkpoints(experiment).items() if iteration == 6}


def test_resume_refuses_a_folder_raybone_did_not_create(tmp_path):
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "spec.yaml").write_text("seed: 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "raybone", "search", "--resume", "stranger", "--results-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "is not a raybone experiment" in result.stderr


def test_the_best_report_is_one_with_a_checkpoint_when_a_resumed_run_reports_its_last_metrics_again():
    from raybone.tuning.tables import best_report

    # iteration 4 was the best and finished the run; after a driver crash its workers reported it again, uncheckpointed
    reports = pd.DataFrame(
        {
            "iteration": [2, 4, 4],
            "val_rmse": [3.0, 2.0, 2.0],
            "checkpoint_path": ["/ckpt/2", "/ckpt/4", None],
        }
    )
    best = best_report(reports, "val_rmse", "min")
    assert best.iteration == 4 and best.checkpoint_path == "/ckpt/4"
    # equal values otherwise keep the latest, as Train keeps the latest of equal checkpoints
    later = pd.DataFrame({"iteration": [2, 4], "val_rmse": [2.0, 2.0], "checkpoint_path": ["/ckpt/2", "/ckpt/4"]})
    assert best_report(later, "val_rmse", "min").checkpoint_path == "/ckpt/4"
    assert best_report(later.drop(columns="checkpoint_path"), "val_rmse", "min").iteration == 4
