"""Search efficiency on real radiographs: ASHA + TPE (raybone's default) versus random search without early
stopping, the same number of trials, the same space, the same trial seeds.

Both searches run `raybone.tuning.run.run_search` on ../shared/data/rsna-100 (skipped with a message where absent)
at a small size: 40 px images, 32 px crops, GoogLeNet from scratch, batch 32, the space of
search_spaces/quick.yaml (lr, decay_steps, l2_weight, weight_decay), validation every 20 iterations on 5 % of
the images (six crops each, so a report stays cheap). Random search is spec override `scheduler.type=none`
plus Optuna's RandomSampler: raybone has no searcher option yet, so this script swaps the sampler of
`raybone.tuning.searcher.searcher`'s result (seeded as TPE is, so both draw the same configs until TPE's start-up
trials are used up).

Compute is counted in trial-iterations. "To within 5 %": ASHA+TPE's reports in time order (Tune's per-trial
result.json), cumulative iterations reported by all its trials, until its running best val_rmse <= 1.05 x
random search's best. Goal: at most a third of random search's iterations.

    python bench/search.py [--quick]      # JSON to bench/results/search.json; ~15 min (quick ~4) on 2 cores
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import _common as common
import optuna
import pandas as pd
from rich.console import Console

import raybone.tuning.run
import raybone.tuning.searcher
from raybone.spec import TrainConfig, load_spec

NAME = "search"
SOURCE = "rsna-100"
QUICK_YAML = common.REPO / "search_spaces" / "quick.yaml"
TOLERANCE = 1.05


def spec_for(source: Path, scheduler: str, trials: int, iterations: int) -> object:
    overrides = [
        f"data.source={source}",
        "data.format=rsna",
        "data.image_size=40",
        "data.val_fraction=0.05",
        "model=googlenet",
        "weights=none",
        "input_size=32",
        "batch_size=32",
        f"iterations={iterations}",
        "eval_every=20",
        f"num_samples={trials}",
        f"scheduler.type={scheduler}",
        "scheduler.grace_period=20",
        "scheduler.reduction_factor=2",
        "resources.num_workers=1",
        "resources.cpus_per_worker=1",
        "seed=0",
    ]
    if "crop_fraction" in TrainConfig.model_fields:
        overrides.append("crop_fraction=0.8")  # 32 of 40 px: the workers crop the prepared images as they are
    return load_spec(QUICK_YAML, overrides)


@contextmanager
def random_sampler():
    """raybone's searcher, with Optuna's RandomSampler in place of TPE (same seed, same study)."""
    tpe_searcher = raybone.tuning.run.searcher

    def searcher(spec, path):
        search = tpe_searcher(spec, path)
        if not isinstance(getattr(search, "_sampler", None), optuna.samplers.TPESampler):
            raise RuntimeError(
                "raybone.tuning.searcher.searcher no longer returns an OptunaSearch with a TPE sampler; "
                "update bench/search.py"
            )
        search._sampler = optuna.samplers.RandomSampler(seed=spec.seed)
        return search

    raybone.tuning.run.searcher = searcher
    try:
        yield
    finally:
        raybone.tuning.run.searcher = tpe_searcher


def search(spec, name: str, results_dir: Path) -> dict:
    with common.stopwatch() as elapsed:
        outcome = raybone.tuning.run.run_search(spec, name=name, results_dir=results_dir, console=Console(quiet=True))
    trials = outcome.trials
    reports = _reports(trials)
    return {
        "trials": trials,
        "reports": reports,
        "wall_s": elapsed(),
        "trial_iterations": int(trials.iteration.sum()),
        "best_val_rmse": float(trials.val_rmse.min()),
        "statuses": trials.status.value_counts().to_dict(),
    }


def _reports(trials: pd.DataFrame) -> pd.DataFrame:
    """Every validation report of every trial with its wall-clock time, from Tune's result.json files."""
    rows = []
    for trial in trials.itertuples():
        result_json = Path(trial.trial_path) / "result.json"
        lines = (
            [json.loads(line) for line in result_json.read_text().splitlines() if line.strip()]
            if result_json.is_file()
            else []
        )
        if not lines:  # a trial that failed before its first report
            continue
        start = min(r["timestamp"] - r["time_total_s"] for r in lines)
        rows += [
            {
                "trial_id": trial.trial_id,
                "iteration": r["iteration"],
                "val_rmse": r["val_rmse"],
                "time": start + r["time_total_s"],
            }
            for r in lines
        ]
    return pd.DataFrame(rows, columns=["trial_id", "iteration", "val_rmse", "time"]).sort_values(
        ["time", "iteration"], ignore_index=True
    )


def compute_to_reach(reports: pd.DataFrame, target: float) -> dict | None:
    """Trial-iterations (and seconds) spent until the running best val_rmse first gets to `target`."""
    latest: dict[str, int] = {}
    best, start = float("inf"), reports.time.min()
    for row in reports.itertuples():
        latest[row.trial_id] = max(latest.get(row.trial_id, 0), row.iteration)
        best = min(best, row.val_rmse)
        if best <= target:
            return {
                "trial_iterations": sum(latest.values()),
                "seconds": row.time - start,
                "val_rmse": best,
                "trials_started": len(latest),
            }
    return None


def main() -> None:
    args = common.parse_args(__doc__, quick_help="6 trials of 60 iterations per search (default: 16 of 120)")
    started = time.perf_counter()
    source = common.shared_folder(SOURCE)
    trials, iterations = (6, 60) if args.quick else (16, 120)
    threads = common.cpu_count()

    with tempfile.TemporaryDirectory(prefix="raybone-bench-search-") as tmp:
        os.environ["RAYBONE_CACHE"] = str(Path(tmp) / "cache")  # the prepared data: never beside the source
        with common.local_ray(threads):  # run_search uses the running cluster
            asha = search(spec_for(source, "asha", trials, iterations), "asha-tpe", Path(tmp) / "results")
            with random_sampler():
                rand = search(spec_for(source, "none", trials, iterations), "random", Path(tmp) / "results")

    target = TOLERANCE * rand["best_val_rmse"]
    reached = compute_to_reach(asha["reports"], target)
    fraction = common.ratio(reached["trial_iterations"], rand["trial_iterations"]) if reached else None
    startup = raybone.tuning.searcher.startup_trials(trials)
    results = {
        "settings": {
            "source": str(source),
            "trials": trials,
            "iterations": iterations,
            "eval_every": 20,
            "image_size": 40,
            "input_size": 32,
            "model": "googlenet",
            "batch_size": 32,
            "val_fraction": 0.05,
            "asha": {"grace_period": 20, "reduction_factor": 2},
            "concurrent_trials": threads,
            "tpe_startup_trials": startup,
        },
        "asha_tpe": {k: v for k, v in asha.items() if k not in ("trials", "reports")},
        "random": {k: v for k, v in rand.items() if k not in ("trials", "reports")},
        "target_val_rmse": target,
        "asha_tpe_to_target": reached,
        "asha_tpe_to_target_over_random_iterations": fraction,
        "iterations_asha_tpe_over_random": common.ratio(asha["trial_iterations"], rand["trial_iterations"]),
        "goal": "asha_tpe_to_target_over_random_iterations <= 1/3",
        "goal_met": fraction is not None and fraction <= 1 / 3,
        "trials": {
            label: run["trials"]
            .drop(columns=["trial_path", "checkpoint_path"], errors="ignore")
            .to_dict(orient="records")
            for label, run in (("asha_tpe", asha), ("random", rand))
        },
    }
    reach = (
        f"within 5 % of random's best after {reached['trial_iterations']} trial-iterations ="
        f" {common.fmt_ratio(fraction)} of random's"
        if reached
        else "never within 5 % of random's best"
    )
    summary = (
        f"search ({trials} trials x {iterations} it): ASHA+TPE {asha['trial_iterations']} trial-iterations,"
        f" best val_rmse {asha['best_val_rmse']:.3f}, {asha['wall_s']:.0f} s vs random"
        f" {rand['trial_iterations']}, best {rand['best_val_rmse']:.3f}, {rand['wall_s']:.0f} s; ASHA+TPE {reach}"
        f" (goal <= 0.33x {'met' if results['goal_met'] else 'MISSED'})"
    )
    common.finish(NAME, args, results, summary, started)


if __name__ == "__main__":
    main()
