"""Search efficiency where models learn (issue 16, item 2): which search finds a good model with the least compute?

On ../shared/data/rsna-100, with bench/quality.py's held-out 20 % test split (no arm trains or selects on it) and
its learned CPU regime (GoogLeNet from scratch, 88 of 100 px, batch 32, weight averaging 0.99, expected-age
readout, no trial longer than B = 1500 iterations, validation every 250), six searches of quality.py's space
(lr, decay steps, L2 weight, weight decay, sex input) run at `--seeds` experiment seeds each:
  asha-tpe  TPE + ASHA, one rung at 3B/4 (reduction factor 3; judged at the first validation past it: 1250 of
            1500), 6 trials: raybone's default in this regime (quality.py: at 64 of 73 px the averaged curves
            said nothing before about 0.6B);
  random    random search, every trial to B, 6 trials;
  top-k     Egele et al. (2023)'s one-epoch rule: 8 random configurations trained one epoch (250 iterations),
            the best continued to B; as ASHA with a single rung at one epoch, whose reduction factor puts its next
            rung past B: 6.01 at B = 1500 and 8.01 at B = 2000 (--device cuda), so about the best sixth or eighth
            continues; 4 at the earlier B = 1000, the best 2 of 8 (ASHA is asynchronous: the first trials to reach
            the rung are judged against fewer than all 8);
  pbt       Population Based Training of 4 trials to B (raybone draws the population; no searcher), the worst
            quarter copying a better trial's weights and perturbing lr, L2 weight and weight decay every two
            validations (500 iterations; 250 in the earlier regime), synchronous (every trial waits for the rest at
            each interval). With two trials at a time Tune runs these 4 as two populations of 2, one after the other
            (it creates a trial only when a live one ends, and a paused one is live; found here, `raybone search`
            now warns). Only the first group exploits: Ray's synchronous PBT keeps one clock, which the first group
            moves to B, so the second pauses at every validation and never exploits (found after all 3 seeds had
            run).
  pbt-pair  the same PBT with a population of the 2 trials that train at once: one group, which exploits
            (added after the defect above, to measure a PBT that works as meant);
  pbt-burn-in  pbt-pair with a burn-in of three validations (750 iterations): its first exploit comes once the
            curves separate, not at 500, where both trials still score as the median predictor and pbt-pair's
            copy was a coin toss (added after pbt-pair's three seeds in this regime).
Two trials train at once (1-CPU workers). Compute is counted in trial-iterations, from each trial's reports
(history.parquet) in time order (Tune's timestamps, to the second): a report counts the iterations its trial
trained since its previous report in the same run, or since the checkpoint the run started from (a resume, a
PBT exploit), so a finished trial's result repeated on resume counts nothing.
Each arm-seed's best checkpoint is exported and scored once on the test set, beside the median predictor; a
search whose best scores above 2.5 y test RMSE has NOT LEARNED and counts for nothing: the target is within 5 %
of the best validation RMSE any learned search found, and per arm the median (and range over seeds) of the
trial-iterations its running best needed to reach it ("never" counts as all it spent). Goal: the recommended
arm (asha-tpe) needs <= 1/3 of random search's trial-iterations, both learned.

In this regime seeds 0, 1 and 2 of asha-tpe, random and top-k took 43, 44 and 43; 48, 47 and 48; 43, 24 and 24
minutes (2026-12-06; 8,250, 8,500 and 8,000; 9,000 each; 7,000, 4,500 and 4,500 trial-iterations; 0.31-0.37 s of
wall time per trial-iteration with two trials at once); pbt-pair 16, 16 and 16 and pbt-burn-in 18, 18 and 16 minutes
(3,000 trial-iterations each), PBT 35, 34 and 34 (6,000). The earlier records ran
in the earlier CPU regime (64 of 73 px, fp32, B = 1000, validation every 125; search-64of73px.json): there,
about 19,000 trial-iterations per seed for the first four arms, 2 hours on 2 cores (seed 0: asha-tpe 23,
random 30, top-k 23 and PBT 50 minutes, about 0.29 s of wall time per trial-iteration with two trials at once;
PBT also pays a Train restart at each pause), so 6 hours for 3 seeds, more than a session; on an Intel Xeon VM,
seeds 1 and 2 took about twice as long (asha-tpe 45 and 45, random 60 and 52, top-k 60 and 61 minutes), except
PBT (40 and 41 minutes); pbt-pair's 2,000 trial-iterations per seed took 21, 20 and 24 minutes there.
Each arm-seed, once finished and scored, is recorded in <--out>/search-runs/ (bench/results/search-runs/,
committed), and a seed recorded there is not run again: `--arms` / `--seeds` run a part, a later session (a fresh
machine) the rest, and the figures cover every recorded arm-seed of these settings. `--work DIR` keeps the
prepared data and resumes an arm-seed interrupted on this machine.

    python bench/search.py --work DIR [--arms asha-tpe,random,top-k,pbt,pbt-pair,pbt-burn-in] [--seeds 3] [--quick]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
from _common import finish, parse_args, write_result
from quality import (
    AVERAGING,
    LEARNED,
    REGIMES,
    RUNG,
    SEARCHED,
    held_out_data,
    median_reference,
    recipe_train,
    regime_tag,
    run_arm,
    test_metrics,
)

from raybone.api import load_experiment
from raybone.tuning.cluster import start_local_ray

TOLERANCE = 1.05
GOAL = 1 / 3  # the recommended arm's trial-iterations to the target over random search's
EPOCH = 250  # iterations: 8,142 training images at batch 32 are 254 steps, rounded to the validation cadence
PAIR = 2  # the trials that train at once (quality.spec_file's resources): one PBT population, no later groups


def arms(iterations: int, eval_every: int, trials: int = 8) -> dict[str, dict]:
    """Each arm's trials, sampler and scheduler (the top-k rung and PBT's interval on the validation cadence):
    `trials` for top-k, which keeps a quarter of them, 3/4 of that for asha-tpe and random, half for PBT, and a
    PBT population of the trials that train at once (pbt-pair), also with a burn-in of three validations."""
    epoch = min(max(eval_every, round(EPOCH / eval_every) * eval_every), iterations - eval_every)
    population = trials // 2
    return {
        "asha-tpe": {  # quality.py's search: one rung at 3B/4
            "samples": 3 * trials // 4,
            "searcher": "tpe",
            "scheduler": {"type": "asha", "grace_period": int(RUNG * iterations), "reduction_factor": 3},
        },
        "random": {"samples": 3 * trials // 4, "searcher": "random", "scheduler": {"type": "none"}},
        "top-k": {
            "samples": trials,
            "searcher": "random",
            # One rung: the next one (epoch x reduction factor) would lie beyond the last iteration.
            "scheduler": {
                "type": "asha",
                "grace_period": epoch,
                "reduction_factor": max(4, math.ceil(iterations / epoch) + 0.01),
            },
        },
        "pbt": _pbt(population, eval_every),
        "pbt-pair": _pbt(PAIR, eval_every),
        "pbt-burn-in": _pbt(PAIR, eval_every, burn_in=3 * eval_every),
    }


def _pbt(population: int, eval_every: int, burn_in: int = 0) -> dict:
    """Synchronous PBT with one trial in the bottom quantile, exploiting every two validations (after `burn_in`
    iterations). A plan without a burn-in leaves it out, as the earlier records do."""
    scheduler = {
        "type": "pbt",
        "perturbation_interval": 2 * eval_every,
        "quantile_fraction": 1 / population,
        "synchronous": True,  # asynchronous, the worst trial may never copy the best (see the README)
    }
    return {"samples": population, "scheduler": scheduler | ({"burn_in_period": burn_in} if burn_in else {})}


def _options(parser) -> None:
    parser.add_argument("--work", required=True, help="working folder: its prepared data and finished arms are kept")
    parser.add_argument(
        "--arms", default="asha-tpe,random,top-k,pbt,pbt-pair,pbt-burn-in", help="comma-separated arms to run"
    )
    parser.add_argument("--seeds", type=int, default=3, help="experiment seeds per arm (0, 1, ...)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def compute_curve(history: pd.DataFrame) -> pd.DataFrame:
    """The running best val_rmse against trial-iterations spent, one row per report in time order."""
    reports = history.dropna(subset=["val_rmse"]).sort_values(["timestamp", "iteration"], ignore_index=True)
    started = reports["resumed_from"].fillna(0)
    previous = reports.groupby(["trial_id", started]).iteration.shift()
    trained = (reports.iteration - previous.fillna(started)).clip(lower=0)
    return pd.DataFrame(
        {
            "trial_iterations": trained.cumsum().astype(int),
            "best_val_rmse": reports["val_rmse"].cummin(),
            "trial_id": reports["trial_id"],
            "iteration": reports["iteration"],
        }
    )


def to_target(curve: pd.DataFrame, target: float) -> int | None:
    """Trial-iterations until the running best first reaches `target` (None: never)."""
    reached = curve.index[curve.best_val_rmse <= target]
    return int(curve.trial_iterations[reached[0]]) if len(reached) else None


def main() -> None:
    args = parse_args(__doc__, _options, quick_help="iterations 100, validation every 25, half the trials, one seed")
    regime = dict(REGIMES[args.device])
    if args.quick:
        regime.update(iterations=100, eval_every=25)
        args.seeds = 1
    started = time.perf_counter()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, test = held_out_data(work)
    start_local_ray(num_cpus=None if args.device == "cuda" else 2)

    train = {**recipe_train(**regime), **AVERAGING, **SEARCHED, "readout": "expected"}
    tag = regime_tag(regime)
    plans = arms(regime["iterations"], regime["eval_every"], trials=4 if args.quick else 8)
    data_hash = {"searched": data.meta["content_sha256"], "test": test.meta["content_sha256"]}
    settings = {"regime": regime, "train": train, "plans": plans, "data_content_sha256": data_hash}
    records = _Records(args, settings)
    for arm in filter(None, args.arms.split(",")):
        for seed in range(args.seeds):
            name = _name(arm, tag, seed)
            if records.read(name):
                print(f"{name}: kept from {records.path(name)}", flush=True)
                continue
            arm_started = time.perf_counter()
            outcome = run_arm(work, name, train, args.device, seed=seed, **plans[arm])
            run = _scored_run(outcome.path, work / "models", test)
            records.write(name, {"arm": arm, "seed": seed, **run}, arm_started)
    ray.shutdown()
    results = _results(records.every(_name("*", tag, "*")), settings, data, test)
    finish("search", args, results, _summary(results), started)


def _name(arm: str, tag: str, seed: int) -> str:
    return f"search-{arm}-{tag}-seed{seed}"


class _Records:
    """One JSON per finished arm-seed under <--out>/search-runs (the machine, date and command with it): a later
    session adds seeds and arms to them, where a working folder does not outlive its machine. A record of other
    settings (regime, space, data, or its own arm's plan) is not used; another arm added or changed keeps it."""

    def __init__(self, args, settings: dict):
        self._args = argparse.Namespace(**{**vars(args), "out": args.out / "search-runs"})
        self._settings = json.loads(json.dumps(settings))

    def path(self, name: str) -> Path:
        return self._args.out / f"{name}.json"

    def read(self, name: str) -> dict | None:
        path = self.path(name)
        record = json.loads(path.read_text()) if path.is_file() else None
        return record if record and self._same_settings(record) else None

    def _same_settings(self, record: dict) -> bool:
        theirs, mine = (
            {**settings, "plans": settings["plans"].get(record["arm"])}
            for settings in (record["settings"], self._settings)
        )
        return theirs == mine

    def every(self, pattern: str) -> dict[tuple[str, int], dict]:
        """(arm, seed) -> record, for every record of these settings matching the glob `pattern`."""
        found = {}
        for path in sorted(self._args.out.glob(f"{pattern}.json")):
            record = self.read(path.stem)
            if record:
                found[record["arm"], record["seed"]] = record
        return found

    def write(self, name: str, run: dict, started: float) -> None:
        write_result(name, self._args, {"settings": self._settings, **run}, name, started)


def _scored_run(folder: Path, models: Path, test) -> dict:
    """A finished arm-seed: its compute curve (from history.parquet) and its best trial, scored once on the
    held-out hands."""
    curve, best = compute_curve(pd.read_parquet(folder / "history.parquet")), load_experiment(folder).best()
    scored = test_metrics(best, models / folder.name, test)
    return {
        "best": {"trial_id": best.trial_id, "iteration": best.iteration, **best.hyperparameters()},
        "test": scored,
        "learned": min(scored["rmse_argmax"], scored["rmse_expected"]) <= LEARNED,
        "trial_iterations": int(curve.trial_iterations.iloc[-1]),
        "curve": curve[["trial_iterations", "best_val_rmse"]].values.round(3).tolist(),
    }


def _results(runs: dict[tuple[str, int], dict], settings: dict, data, test) -> dict:
    learned = [min(v for _, v in run["curve"]) for run in runs.values() if run["learned"]]
    target = TOLERANCE * float(min(learned)) if learned else None
    per_run = {}
    for (arm, seed), record in runs.items():
        run = {key: record[key] for key in ("best", "test", "learned", "trial_iterations", "wall_s", "date")}
        curve = pd.DataFrame(record["curve"], columns=["trial_iterations", "best_val_rmse"])
        per_run.setdefault(arm, {})[seed] = {**run, "to_target": to_target(curve, target) if target else None}
    summary = {arm: _arm_summary(seeds) for arm, seeds in per_run.items()}
    both = {"asha-tpe", "random"} <= summary.keys() and all(summary[a]["learned"] for a in ("asha-tpe", "random"))
    ratio = summary["asha-tpe"]["to_target_median"] / summary["random"]["to_target_median"] if both else None
    return {
        "settings": settings,
        "reference": median_reference(data, test),
        "target_val_rmse": target,
        "arms": summary,
        "runs": {arm: {str(seed): run for seed, run in seeds.items()} for arm, seeds in per_run.items()},
        "asha_tpe_over_random": ratio,
        "goal": f"asha-tpe's median trial-iterations to the target <= {GOAL:.2f} x random's, both learned",
        "goal_met": ratio is not None and ratio <= GOAL,
    }


def _arm_summary(seeds: dict) -> dict:
    """Median and range over seeds of the trial-iterations to the target (all it spent where never reached);
    the arm has learned when most of its seeds did."""
    spent = [run["to_target"] if run["to_target"] is not None else run["trial_iterations"] for run in seeds.values()]
    return {
        "to_target_median": float(np.median(spent)),
        "to_target_range": [min(spent), max(spent)],
        "reached": sum(run["to_target"] is not None for run in seeds.values()),
        "seeds": len(seeds),
        "test_rmse_expected_median": float(np.median([run["test"]["rmse_expected"] for run in seeds.values()])),
        "wall_min_median": float(np.median([run["wall_s"] for run in seeds.values()])) / 60,
        "learned": 2 * sum(run["learned"] for run in seeds.values()) > len(seeds),
    }


def _summary(results: dict) -> str:
    median = results["reference"]["median_predictor_test_rmse"]
    lines = []
    for arm, s in results["arms"].items():
        learned = "" if s["learned"] else " NOT LEARNED"
        lines.append(
            f"{arm} {s['to_target_median']:.0f} trial-it to target (range {s['to_target_range'][0]}-"
            f"{s['to_target_range'][1]}; reached at {s['reached']} of {s['seeds']} seeds; "
            f"{s['wall_min_median']:.0f} min), test RMSE "
            f"{s['test_rmse_expected_median']:.2f} y{learned}"
        )
    target = results["target_val_rmse"]
    best = "none learned" if target is None else f"{target / TOLERANCE:.2f} y"
    ratio = results["asha_tpe_over_random"]
    verdict = "" if ratio is None else f"; asha-tpe / random {ratio:.2f}x (goal <= {GOAL:.2f}x: "
    verdict += "" if ratio is None else ("met)" if results["goal_met"] else "MISSED)")
    return (
        f"search to within 5 % of the best val RMSE any learned search found ({best}), "
        f"medians over seeds; test RMSE (expected age) on held-out hands, median predictor {median:.2f} y: "
        + " | ".join(lines)
        + verdict
    )


if __name__ == "__main__":
    main()
