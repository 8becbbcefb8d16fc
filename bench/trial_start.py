"""What starting a trial costs: raybone's Train-in-Tune trials next to plain Ray Tune function trials, one run.

Three arms in one local Ray cluster of all the CPUs (started as `raybone search` starts one). Each arm runs
twice, in the order tune, raybone, raybone_2s_poll, raybone_2s_poll, raybone, tune, so that drifting machine load
hits every arm alike; each run is `--trials` trials one after another through a Tuner of its own:
- tune:          a plain Tune function trial that reports once: what Ray Tune alone costs per trial.
- raybone:       raybone's own trial (`raybone.tuning.run.trial_trainable`: a TorchTrainer with one worker running
                 raybone's worker loop), as `raybone search` runs it.
- raybone_2s_poll: the same trial with Ray's default controller poll (2 s): what raybone's 0.25 s poll saves.
Every trial gets a new driver process, as in `raybone search`.

Tune's `reuse_actors` was tried and dropped: a trial that ASHA stops cannot be reset, and the search stalled.
The trial's Train controller polls its workers every 0.25 s (`raybone.tuning.trial.CONTROLLER_POLL_S`); with
Train's TuneReportCallback so short a poll hung searches, so raybone's trials relay their reports themselves (see
raybone/tuning/trial.py).
The raybone trials do almost no work: one step of batch 4 at 32 px on 16 images, one six-crop evaluation of 8,
one checkpoint; the train step's time is subtracted (from the worker's `images_per_s`), the evaluation and
checkpoint of the 8 images are not (they stay in the fixed cost, which they can only overstate).

While each run lasts, every process on the machine is sampled from /proc every 0.1 s, and after it Ray's state API
says which actor each process hosted: the CPU seconds per trial of the trial's driver, its Train controller and
worker and each helper actor, and how busy the CPUs were. On a machine of few cores the start-up is CPU work, not
waiting, so two runs side by side (parallel test processes) cannot hide it.

A Tune callback clocks each trial on the driver: start -> first result (start-up and the work), last result ->
end (teardown), and end -> the next trial's start (Tune starting the next driver process). The fixed cost of a
trial is its start-to-end time less the train step, plus the gap before the next one; the summary takes the
median over trials 2..N-1 of both runs (the first also starts the Tuner; the last has no next trial to measure the
gap to).

    python bench/trial_start.py [--quick] [--trials N]     # JSON to bench/results/trial_start.json
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import _common as common
import numpy as np
import ray
import ray.tune

from raybone.data import prepare
from raybone.spec import load_spec, search_space
from raybone.tuning.run import trial_trainable
from raybone.tuning.trial import run_trial, trial_arrays

NAME = "trial_start"
ORDER = ("tune", "raybone", "raybone_2s_poll", "raybone_2s_poll", "raybone", "tune")
CONFIG = {"lr": 1e-3, "decay_steps": 50, "l2_weight": 0.1, "weight_decay": 1e-3}  # inside quick.yaml's space


class Clock(ray.tune.Callback):
    """Driver-side wall clock of every trial's start, results and end."""

    def __init__(self):
        self.trials: dict[str, dict] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.trials[trial.trial_id] = {"start": time.time(), "results": []}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.trials[trial.trial_id]["results"].append((time.time(), result))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.trials[trial.trial_id]["end"] = time.time()


def tune_trial(config: dict) -> None:
    ray.tune.report({"val_rmse": 0.0, "iteration": 1})


def ray_poll_trial(config: dict, **kwargs) -> None:
    """raybone's trial with Ray's default controller poll. Each trial has a new driver process, so this setting
    stays in this arm."""
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "2.0"
    run_trial(config, **kwargs)


class ProcessCpu:
    """CPU seconds each process on this machine spent while the block ran, from /proc (Linux), sampled every 0.1 s:
    a process that ends loses at most its last 0.1 s. `busy` is the share of all CPUs' time not idle."""

    def __init__(self):
        self.cpu_s: dict[int, float] = {}
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._before, self._machine = _cpu_by_pid(), _machine_cpu()
        self._sampler.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._sampler.join()
        self._take()
        (total, idle), (total_0, idle_0) = _machine_cpu(), self._machine
        self.busy = 1 - (idle - idle_0) / (total - total_0)

    def _sample(self) -> None:
        while not self._done.wait(0.1):
            self._take()

    def _take(self) -> None:
        for pid, cpu in _cpu_by_pid().items():
            self.cpu_s[pid] = cpu - self._before.get(pid, 0.0)


def _cpu_by_pid() -> dict[int, float]:
    ticks, found = os.sysconf("SC_CLK_TCK"), {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:  # fields 14 and 15 of /proc/PID/stat (utime, stime), counted after the command's closing bracket
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended meanwhile
                continue
            found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return found


def _machine_cpu() -> tuple[int, int]:
    """(all, idle) CPU time since boot, in ticks: the first line of /proc/stat, idle counting I/O wait."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(values), values[3] + values[4]


def cpu_per_trial(sampled: ProcessCpu, trials: int) -> dict[str, float]:
    """CPU seconds per trial by the actor class each process hosted (Ray runs each actor in a process of its own);
    processes that hosted none are the cluster's own (raylet, GCS, dashboard), idle workers and anything else on the
    machine, and `this process` is Tune's loop and the sampler. Every trial of the run counts, the first (which also
    starts the Tuner) too."""
    from ray.util.state import list_actors

    hosted = {a.pid: a.class_name.rsplit(".", 1)[-1] for a in list_actors(detail=True, limit=10_000) if a.pid}
    by_kind = Counter()
    for pid, cpu in sampled.cpu_s.items():
        by_kind["this process" if pid == os.getpid() else hosted.get(pid, "cluster and idle workers")] += cpu
    return {kind: round(cpu / trials, 2) for kind, cpu in by_kind.most_common() if cpu > 0}


def run_arm(arm: str, trainable, trials: int, storage: str, spec) -> tuple[list[dict], list[dict], dict]:
    """Per-trial costs, the trials' own clock readings in start order, and CPU seconds per trial by process."""
    clock = Clock()
    tuner = ray.tune.Tuner(
        trainable,
        param_space={**CONFIG, "trial_index": ray.tune.grid_search(list(range(trials)))},
        tune_config=ray.tune.TuneConfig(metric=spec.metric, mode=spec.mode, max_concurrent_trials=1),
        run_config=ray.tune.RunConfig(name=arm, storage_path=storage, verbose=0, callbacks=[clock]),
    )
    with ProcessCpu() as sampled:
        grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"{arm}: {grid.errors[0]}")
    clocked = sorted(clock.trials.values(), key=lambda t: t["start"])
    cpu = {"busy": round(sampled.busy, 3), "cpu_s_per_trial": cpu_per_trial(sampled, trials)}
    return _per_trial(clocked, spec.train["batch_size"]), clocked, cpu


def _per_trial(rows: list[dict], batch_size: int) -> list[dict]:
    out = []
    for this, following in zip(rows, rows[1:] + [None]):
        first, last = this["results"][0], this["results"][-1]
        work = batch_size / first[1]["images_per_s"] if "images_per_s" in first[1] else 0.0
        wall = this["end"] - this["start"]
        gap = following["start"] - this["end"] if following else None
        out.append(
            {
                "start_to_first_result_s": first[0] - this["start"],
                "last_result_to_end_s": this["end"] - last[0],
                "wall_s": wall,
                "train_step_s": work,
                "gap_to_next_s": gap,
                "fixed_cost_s": None if gap is None else wall - work + gap,
            }
        )
    return out


def main() -> None:
    args = common.parse_args(
        __doc__, lambda p: p.add_argument("--trials", type=int, default=None), "3 trials per run (default: 4)"
    )
    started = time.perf_counter()
    trials = args.trials or (3 if args.quick else 4)
    if trials < 3:
        raise SystemExit("--trials: at least 3 (the first and the last trial are not steady)")
    threads = common.cpu_count()
    spec = load_spec(
        search_space("quick"),
        [
            "data.image_size=36",
            "train.input_size=32",
            "train.batch_size=4",
            "train.iterations=1",
            "train.eval_every=1",
            f"resources.cpus_per_worker={threads}",  # one trial at a time, as one trial of all the CPUs runs
            "scheduler.type=none",
        ],
    )
    arrays = _tiny(trial_arrays(prepare("demo", image_size=36, progress=False)))
    with common.local_ray(threads), tempfile.TemporaryDirectory(prefix="raybone-trial-start-") as storage:
        trainables = {
            "tune": tune_trial,
            "raybone": trial_trainable(spec, arrays, f"{storage}/train"),
            "raybone_2s_poll": trial_trainable(spec, arrays, f"{storage}/train", trial=ray_poll_trial),
        }
        runs = [(arm, run_arm(f"{arm}-{i}", trainables[arm], trials, storage, spec)) for i, arm in enumerate(ORDER)]
        arms, steady, paths, cpu = {}, {}, {}, {}
        for arm, (rows, clocked, used) in runs:
            arms.setdefault(arm, []).append(rows)
            cpu.setdefault(arm, []).append(used)
            # The first trial of a run also starts the Tuner and its first driver; the last has no gap after it.
            steady.setdefault(arm, []).extend(rows[1:-1])
            if arm != "tune":
                paths.setdefault(arm, []).extend(_critical_path(clocked))

    fixed = {arm: common.median(r["fixed_cost_s"] for r in rows) for arm, rows in steady.items()}
    parts = {
        arm: {
            key: common.median(r[key] for r in rows)
            for key in ("start_to_first_result_s", "last_result_to_end_s", "gap_to_next_s")
        }
        for arm, rows in steady.items()
    }
    goal_met = fixed["raybone"] <= 5.0
    cpu_s = {arm: common.median(sum(run["cpu_s_per_trial"].values()) for run in runs) for arm, runs in cpu.items()}
    results = {
        "settings": {"trials_per_run": trials, "threads": threads, "order": ", ".join(ORDER)},
        "fixed_cost_per_trial_s": fixed,
        "median_parts_s": parts,
        "raybone_minus_tune_s": fixed["raybone"] - fixed["tune"],
        "critical_path_median_s": {
            arm: {key: common.median(row[key] for row in path) for key in path[0]} for arm, path in paths.items()
        },
        "critical_path_s": paths,
        "cpu_per_run": cpu,  # per run of each arm: how busy the CPUs were, and CPU seconds per trial by process
        "cpu_s_per_trial_median": cpu_s,
        "goal": "raybone fixed cost per trial <= 5 s",
        "goal_met": goal_met,
        "trials": arms,
    }
    summary = (
        f"trial start: raybone {fixed['raybone']:.1f} s per trial ({fixed['raybone_2s_poll']:.1f} s with Ray's 2 s"
        f" poll), plain Tune {fixed['tune']:.1f} s; goal <= 5 s {'met' if goal_met else 'MISSED'}; CPU per trial:"
        f" raybone {cpu_s['raybone']:.1f} s, plain Tune {cpu_s['tune']:.1f} s"
    )
    common.finish(NAME, args, results, summary, started)


def _critical_path(trials: list[dict]) -> list[dict]:
    """Where each raybone trial's time goes, from the previous trial's end to its own, in the order it is spent.

    Ray's own records: the state API says when each process was launched and when it was up (registered with
    Ray), and the timeline when each actor's setup ran. A trial's processes are those launched after the
    previous trial's last result (Tune may launch the next driver before it calls the previous trial complete);
    the first trial has no previous one and is left out, as is a trial whose processes Ray's records miss. With one
    report per trial (as here) the parts add up to the span between the two ends.
    """
    from ray.util.state import list_actors, list_workers

    # The last part of the class name: a wrapped trainable's driver is `wrap_function.<locals>.ImplicitFunc`.
    kinds = {actor.pid: actor.class_name.rsplit(".", 1)[-1] for actor in list_actors(detail=True, limit=10_000)}
    processes: dict[str, list[dict]] = {}
    for w in list_workers(detail=True, limit=10_000):
        if w.pid in kinds and w.worker_launch_time_ms and w.worker_launched_time_ms:
            processes.setdefault(kinds[w.pid], []).append(
                {"launch": w.worker_launch_time_ms / 1e3, "up": w.worker_launched_time_ms / 1e3, "id": w.worker_id}
            )
    tasks = {
        (event["tid"].removeprefix("worker:"), event["name"]): (event["ts"] / 1e6, (event["ts"] + event["dur"]) / 1e6)
        for event in ray.timeline()
        if event.get("ph") == "X" and str(event.get("tid", "")).startswith("worker:")
    }
    rows = []
    for before, trial in itertools.pairwise(trials):
        own = {  # the trial driver, Train controller and Train worker this trial started: the first launched
            kind: min(
                (p for p in processes.get(kind, []) if before["results"][-1][0] <= p["launch"] <= trial["end"]),
                key=lambda p: p["launch"],
                default=None,
            )
            for kind in ("ImplicitFunc", "TrainController", "RayTrainWorker")
        }
        if None in own.values():
            continue
        driver, controller, worker = own["ImplicitFunc"], own["TrainController"], own["RayTrainWorker"]
        controller_ready = tasks[(controller["id"], "__init__")][1]
        context_start, context_end = tasks[(worker["id"], "init_train_context")]
        rows.append(
            {
                "tune_launches_the_trial_driver_s": driver["launch"] - before["end"],
                "driver_process_start_s": driver["up"] - driver["launch"],
                "driver_loads_the_trial_s": trial["start"] - driver["up"],  # imports Ray Train and torch
                "driver_builds_the_run_s": controller["launch"] - trial["start"],  # spec, queue, TorchTrainer
                "controller_process_start_s": controller["up"] - controller["launch"],
                "controller_setup_s": controller_ready - controller["up"],  # imports, storage, callbacks
                "worker_group_start_s": context_start - controller_ready,  # placement group, 3 processes
                "worker_train_context_s": context_end - context_start,  # imports the loop, process group
                # model, data, step, evaluation, checkpoint, and the report's way to Tune (poll and relay)
                "worker_loop_to_first_result_s": trial["results"][0][0] - context_end,
                "last_result_to_end_s": trial["end"] - trial["results"][-1][0],
            }
        )
    return rows


def _tiny(arrays: dict) -> dict:
    """16 training and 8 validation images: the trial's work is a rounding error next to its start."""
    train, val = np.flatnonzero(arrays["is_train"])[:16], np.flatnonzero(~arrays["is_train"])[:8]
    keep = np.concatenate([train, val])
    return {key: value[keep] if isinstance(value, np.ndarray) else value for key, value in arrays.items()}


if __name__ == "__main__":
    main()
