"""Faults injected for real: a Train worker process is killed mid-trial and the trial still finishes."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
from conftest import TINY, free_port
from ray.util.placement_group import placement_group
from ray.util.state import list_actors

from raybone.spec import load_spec
from raybone.tuning.run import run_search

pytestmark = pytest.mark.slow

QUICK = Path(__file__).resolve().parents[1] / "search_spaces" / "quick.yaml"
# Long enough that the worker killed after its checkpoint at 40 still has about 15 s of training left on 2 cores.
ITERATIONS = 200
LONG_TRIAL = [
    "data.image_size=40",
    "input_size=32",
    "batch_size=8",
    f"iterations={ITERATIONS}",
    "eval_every=20",
    "scheduler.type=none",
    "num_samples=1",
    "resources.max_failures=2",
]


def _checkpointed_iteration(experiment: Path) -> int:
    best = 0
    for path in experiment.glob("train/trial-*/checkpoint_*/checkpoint.pt"):
        try:
            best = max(best, torch.load(path, weights_only=True)["iteration"])
        except Exception:  # being written right now
            continue
    return best


def _train_worker_pids(dashboard_url: str) -> list[int]:
    # Ask this test's own cluster: another Ray instance on the machine must not make the query ambiguous.
    actors = list_actors(
        address=f"http://{dashboard_url}", filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    )
    return [actor.pid for actor in actors]


def test_a_trial_whose_workers_cannot_be_placed_errors_instead_of_waiting_for_ever(tmp_path, monkeypatch):
    """Every CPU held (as a placement group leaked by an ended trial would hold it): Train's default is to retry
    the worker group without end, and the search waits in silence."""
    from raybone.tuning.cluster import start_local_ray

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "2")  # the cluster's processes inherit it
    start_local_ray(num_cpus=2)
    try:
        ray.get(placement_group([{"CPU": 2}]).ready())
        spec = load_spec(QUICK, TINY + ["num_samples=1", "scheduler.type=none", "resources.max_failures=0"])
        outcome = run_search(spec, name="stuck", results_dir=tmp_path)  # before, it never returned
    finally:
        ray.shutdown()
    (row,) = outcome.trials.itertuples()
    assert row.status == "error" and "worker group startup timed out" in row.error, row.error
    assert row.error.startswith("Training failed")  # the trial's own message, not the traceback Ray puts first
    assert outcome.best is None


def test_killed_train_worker_resumes_from_its_checkpoint(local_ray, tmp_path):
    spec = load_spec(QUICK, LONG_TRIAL)
    outcome = {}
    search = threading.Thread(target=lambda: outcome.update(run=run_search(spec, name="kill", results_dir=tmp_path)))
    search.start()
    deadline = time.time() + 240
    while _checkpointed_iteration(tmp_path / "kill") < 40:  # well past the first reported checkpoint
        assert search.is_alive() and time.time() < deadline, "no checkpoint before the deadline"
        time.sleep(0.2)
    (pid,) = _train_worker_pids(local_ray.dashboard_url)
    os.kill(pid, signal.SIGKILL)
    search.join(timeout=600)

    (row,) = outcome["run"].trials.itertuples()
    assert row.status == "completed" and row.iteration == ITERATIONS and row.val_rmse > 0
    history = pd.read_parquet(outcome["run"].path / "history.parquet")
    assert history.iteration.is_unique and history.iteration.is_monotonic_increasing
    first_run, restarted = history[history.resumed_from == 0], history[history.resumed_from > 0]
    assert len(restarted), "the trial was never restarted"
    # Tune restarted the trial (Train restarts no workers itself: see WORKER_RESTARTS in raybone/tuning/trial.py).
    assert "Failure # 1" in (Path(row.trial_path) / "error.txt").read_text()
    # The restarted run continued from the last checkpoint the first one reported, not from zero.
    assert restarted.resumed_from.iloc[0] == first_run.iteration.max() >= 20
    assert history.iteration.max() == ITERATIONS


def _train_runs_started(dashboard_url: str) -> int:
    return len(
        list_actors(address=f"http://{dashboard_url}", filters=[("class_name", "=", "TrainController")], limit=10_000)
    )


def test_weights_that_do_not_fit_are_not_trained_again_when_tune_retries_the_trial(
    local_ray, tmp_path, capfd, monkeypatch
):
    """They fail every try alike, and each of Tune's retries trained a whole Train run; a resume tries again. Each
    try prints one line, not Ray's traceback (about 45 lines a try)."""
    weights = tmp_path / "other.pt"
    torch.save({"stem.weight": torch.zeros(1)}, weights)
    spec = load_spec(
        QUICK, TINY + ["num_samples=1", "scheduler.type=none", "resources.max_failures=2", f"weights={weights}"]
    )
    before = _train_runs_started(local_ray.dashboard_url)
    monkeypatch.setenv("COLUMNS", "1000")  # a line per try, unwrapped
    outcome = run_search(spec, name="weights", results_dir=tmp_path)

    (row,) = outcome.trials.itertuples()
    assert row.status == "error" and row.error.startswith(f"weights from {weights} do not fit googlenet"), row.error
    tries = (Path(row.trial_path) / "error.txt").read_text()
    assert "Failure # 3" in tries and tries.count(f"weights from {weights} do not fit googlenet") >= 3, tries
    assert _train_runs_started(local_ray.dashboard_url) - before == 1, "a retry trained again"
    shown = capfd.readouterr()
    tries = [line for line in shown.out.splitlines() if f"failed: weights from {weights} do not fit" in line]
    assert [line.endswith("(Tune tries it again)") for line in tries] == [True, True, False], shown.out[-3000:]
    assert "Traceback" not in shown.out + shown.err
    run_search(spec, name="weights", results_dir=tmp_path, resume=True)  # the user may have fixed the cause
    assert _train_runs_started(local_ray.dashboard_url) - before == 2, "the resume did not try again"


_START_AT_ONCE = """
import sys, time
from pathlib import Path
import ray
from raybone.tuning import cluster
cluster.DASHBOARD_PORT = int(sys.argv[3])
Path(sys.argv[1] + ".ready").touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.01)
print(cluster.start_local_ray(num_cpus=1).dashboard_url)
ray.shutdown()
"""


def test_two_searches_started_at_the_same_moment_both_get_a_cluster(tmp_path):
    """Both saw the dashboard's port free, and the second's Ray failed to start with a traceback."""
    # A preferred port free now: were it busy, both would skip it for random free ports, with or without the fix.
    preferred = free_port()
    go = tmp_path / "go"
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", _START_AT_ONCE, str(tmp_path / str(i)), str(go), str(preferred)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        deadline = time.time() + 120
        while not all((tmp_path / f"{i}.ready").exists() for i in range(2)):
            assert time.time() < deadline, "the two processes never got ready"
            time.sleep(0.05)
        go.touch()
        outputs = [start.communicate(timeout=120)[0] for start in starts]
    finally:
        for start in starts:  # a failed wait leaves no cluster behind
            start.kill()
    assert [start.returncode for start in starts] == [0, 0], outputs
    urls = sorted(output.strip().splitlines()[-1] for output in outputs)
    assert f"127.0.0.1:{preferred}" in urls and len(set(urls)) == 2, outputs
