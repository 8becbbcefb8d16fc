"""What starting a trial costs: raybone's Train-in-Tune trials next to plain Ray Tune function trials, one run.

Two arms, each `--trials` trials one after another in one local Ray cluster of all the CPUs (started as
`raybone search` starts one), each through its own Tuner:
- tune:    a plain Tune function trial that reports once: what Ray Tune alone costs per trial.
- raybone: raybone's own trial (`raybone.tuning.run.trial_trainable`: a TorchTrainer with one worker running
           raybone's worker loop), as `raybone search` runs it.
Every trial gets a new driver process, as in `raybone search`.

Two ways to cut the cost were tried and dropped because they hang searches (see the README's Performance table):
Tune's `reuse_actors` (a trial that ASHA stops cannot be reset, and the search stalled), and a shorter
RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (0.5 s: fit() then returns before Tune has taken the last report from
TuneReportCallback's queue, and the trial's driver blocks for ever on its own full result queue).
The raybone trials do almost no work: one step of batch 4 at 32 px on 16 images, one six-crop evaluation of 8,
one checkpoint; the train step's time is subtracted (from the worker's `images_per_s`), the evaluation and
checkpoint of the 8 images are not (they stay in the fixed cost, which they can only overstate).

A Tune callback clocks each trial on the driver: start -> first result (start-up and the work), last result ->
end (teardown), and end -> the next trial's start (Tune starting the next driver process). The fixed cost of a
trial is its start-to-end time less the train step, plus the gap before the next one; the summary takes the
median over trials 2..N-1 (the first also starts the Tuner; the last has no next trial to measure the gap to).

    python bench/trial_start.py [--quick] [--trials N]     # JSON to bench/results/trial_start.json
"""

from __future__ import annotations

import tempfile
import time

import _common as common
import numpy as np
import ray
import ray.tune

from raybone.data import prepare
from raybone.spec import load_spec, search_space
from raybone.tuning.run import trial_trainable
from raybone.tuning.trial import trial_arrays

NAME = "trial_start"
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


def run_arm(arm: str, trainable, trials: int, storage: str, spec) -> list[dict]:
    clock = Clock()
    tuner = ray.tune.Tuner(
        trainable,
        param_space={**CONFIG, "trial_index": ray.tune.grid_search(list(range(trials)))},
        tune_config=ray.tune.TuneConfig(metric=spec.metric, mode=spec.mode, max_concurrent_trials=1),
        run_config=ray.tune.RunConfig(name=arm, storage_path=storage, verbose=0, callbacks=[clock]),
    )
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"{arm}: {grid.errors[0]}")
    return _per_trial(clock, spec.train["batch_size"])


def _per_trial(clock: Clock, batch_size: int) -> list[dict]:
    rows = sorted(clock.trials.values(), key=lambda t: t["start"])
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
        __doc__, lambda p: p.add_argument("--trials", type=int, default=None), "3 trials per arm (default: 5)"
    )
    started = time.perf_counter()
    trials = args.trials or (3 if args.quick else 5)
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
        arms = {
            arm: run_arm(arm, trainable, trials, storage, spec)
            for arm, trainable in (("tune", tune_trial), ("raybone", trial_trainable(spec, arrays, f"{storage}/train")))
        }

    # The first trial of an arm also starts the Tuner and its first driver; the last has no gap after it.
    steady = {arm: rows[1:-1] for arm, rows in arms.items()}
    fixed = {arm: common.median(r["fixed_cost_s"] for r in rows) for arm, rows in steady.items()}
    parts = {
        arm: {
            key: common.median(r[key] for r in rows)
            for key in ("start_to_first_result_s", "last_result_to_end_s", "gap_to_next_s")
        }
        for arm, rows in steady.items()
    }
    goal_met = fixed["raybone"] <= 5.0
    results = {
        "settings": {"trials_per_arm": trials, "threads": threads, "order": "tune, raybone"},
        "fixed_cost_per_trial_s": fixed,
        "median_parts_s": parts,
        "raybone_minus_tune_s": fixed["raybone"] - fixed["tune"],
        "goal": "raybone fixed cost per trial <= 5 s",
        "goal_met": goal_met,
        "trials": arms,
    }
    summary = (
        f"trial start: raybone {fixed['raybone']:.1f} s per trial, plain Tune {fixed['tune']:.1f} s;"
        f" goal <= 5 s {'met' if goal_met else 'MISSED'}"
    )
    common.finish(NAME, args, results, summary, started)


def _tiny(arrays: dict) -> dict:
    """16 training and 8 validation images: the trial's work is a rounding error next to its start."""
    train, val = np.flatnonzero(arrays["is_train"])[:16], np.flatnonzero(~arrays["is_train"])[:8]
    keep = np.concatenate([train, val])
    return {key: value[keep] if isinstance(value, np.ndarray) else value for key, value in arrays.items()}


if __name__ == "__main__":
    main()
