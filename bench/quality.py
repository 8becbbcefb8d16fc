"""Quality on held-out radiographs: does a raybone search beat the paper's recipe? (issue 16, item 3)

On ../shared/data/rsna-100 (11,310 RSNA hands at 100 px) a stratified 20 % test set is held out first; no arm
ever trains or selects on it. In the regime where the recipe learns on a CPU (bench/regime.py: GoogLeNet from
scratch, 88 px crops of the 100 px images, batch 32, B = 1500 iterations, where it first reached 2.0 y, in 9 minutes
on 2 cores with bf16 training steps) four models are built:
  (a) recipe: the paper's recipe (lr 1e-4 halved every 500 iterations, L2CE weight 1) as one trial of B iterations;
  (b) search: a raybone search (TPE + ASHA, 5 trials, one rung at 3B/4, judged at the first validation past it;
      with --no-early-stopping TPE alone, 4 trials, each to B) of about 4B trial-iterations, no trial longer than
      B, started from the recipe (start_from), over lr, decay step, L2 weight, weight decay and sex input; its best
      checkpoint by validation RMSE (the best any trial kept, not its last);
  (c) top-3: the ensemble of the search's three best trials, as `raybone best --export --top 3` builds it;
  (d) recipe-ema: the recipe with weight averaging (ema 0.99), one trial of B: the same budget as (a);
and the recipe twice more at other seeds, two trials at once: with (a), the seed-to-seed spread of its test RMSE.
The search trains with the same weight averaging and judges trials only at 3B/4. Without averaging, and with
8 trials and a first rung at B/4 (bench/results/quality-no-averaging.json), single validations swung by up to
2.9 y between evaluations (2.85 -> 5.36 -> 2.43 y) and 5 of 8 trials were stopped at B/4 before any had
learned, so ASHA and the best-checkpoint rule selected on noise and the search lost to the recipe by 0.17 y.
With averaging the validation curve falls steadily, but only from about 0.6B: before that the averaged model
scores as the median predictor, so an earlier rung would compare nothing.
Each is exported as a model folder and scored once on the test set with six-crop averaging, beside the median
predictor (always the training split's median class). Goals: (b) beats (a) by >= 0.10 y test RMSE, (c) by
>= 0.20 y. `--no-early-stopping` trains every trial of (b) to B (4 trials, 4B; quality-no-early-stopping.json):
ASHA stops the trials that would be (c)'s other members at 3B/4, and an ensemble of unfinished models is held
back by them. `--device cuda` runs the same arms with B = 2000 (an estimated 10-15 minutes of an H100/H200 for all
the arms). Until 2026-12-06 the CPU regime was 64 of 73 px with B = 1000 in fp32 (bench/results/quality.json of
2026-12-02): at 88 px the recipe needed 30 minutes per 2,000 iterations then.

`--paper-scale` (issue 16, item 4; for a lent GPU: `--paper-scale --device cuda`) instead trains the recipe at the
paper's scale, VGG16 and GoogLeNet at 224 of 256 px for 5000 x 32, the two sharing the device, and scores each
on the same held-out hands (on the device) beside the paper's published figures (quality-paper-scale.json).
Two differences remain: no ImageNet weights (a lent device reaches no network), and the data: RSNA hands, whose
100 px images the 256 px warp enlarges, scored on a held-out split. Alone on an H100 such trials took 94 s (VGG16)
and 231 s (GoogLeNet, kernel-launch bound) in bench/gpu.py: about 4-5 minutes of training, under 10 in all. A lent
machine has no Ray, Optuna, Kornia or pydantic, and no ../shared/data: bench/device_stage.py carries them there
in three calls, the last of which runs this (README).

    python bench/quality.py [--recipe-iterations B] [--trials N] [--no-early-stopping] [--seed S] [--work DIR]
        [--quick] [--device cpu|cuda] [--paper-scale]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import yaml
from _common import finish, parse_args, shared_folder

from raybone.api import export, load_experiment
from raybone.core.engine import cpu_has_bf16
from raybone.core.metrics import classification_metrics
from raybone.data import prepare
from raybone.data.prepare import PreparedData, stratified_split
from raybone.modelfolder.format import MODEL_JSON
from raybone.modelfolder.predict import Predictor
from raybone.spec import load_spec
from raybone.tuning.cluster import start_local_ray
from raybone.tuning.run import run_search

PAPER = {
    "model": "googlenet",
    "weights": "none",
    "finetune": "full",
    "batch_size": 32,
    "loss": "l2ce",
    "lr": 1e-4,
    "decay_steps": 500,
    "l2_weight": 1.0,
    "weight_decay": 0.1,
    "readout": "argmax",
}
# Where the recipe learns (bench/regime.py): on 2 cores 88 of 100 px, val RMSE 1.99 y at 1,500 iterations in 9 min.
SOURCE_SIZE = 100  # rsna-100's image size, at which the CPU regimes prepare it
REGIMES = {
    "cpu": {"input_size": 88, "resize_to": 100, "iterations": 1500, "eval_every": 250},
    "cuda": {"input_size": 88, "resize_to": 100, "iterations": 2000, "eval_every": 250},
}
# The recipe sits inside every range, not on an edge, so the search can move either way from it.
SEARCHED = {
    "lr": {"distribution": "loguniform", "low": 3e-5, "high": 1e-3},
    "decay_steps": {"distribution": "int", "low": 200, "high": 1500},
    "l2_weight": {"distribution": "loguniform", "low": 0.1, "high": 3.0},
    "weight_decay": {"distribution": "loguniform", "low": 0.01, "high": 0.3},
    "sex_input": {"choices": [True, False]},
}
RECIPE_POINT = {**{name: PAPER[name] for name in SEARCHED if name in PAPER}, "sex_input": False}
# Weight averaging over about 1 / (1 - 0.99) = 100 steps, less than the 250 between validations: each validated
# model averages that stretch of training rather than one step's weights.
AVERAGING = {"ema": 0.99}
# ASHA judges trials once, at 3/4 of the budget (the first validation past it): at 64 of 73 px the averaged curves
# said nothing before ~0.6 of it.
RUNG = 0.75
ENSEMBLE = 3
# Two more runs of the recipe (experiment seed S + 1 for --seed S: other initial weights and batches): with (a),
# the seed-to-seed spread of its test RMSE, which a gain must exceed to mean anything. Seed S + 1's own (a) is the
# first of these (trial 0 at S + 1) again, alone on twice the threads: pooled, consecutive seeds' files share a run.
REPEATS = 2
# The paper's scale (--paper-scale): its recipe per network, validated ten times as in bench/gpu.py's paper trial.
PAPER_SCALE = {"input_size": 224, "resize_to": 256, "iterations": 5000, "eval_every": 500}
# --quick runs the same code on a CPU in minutes: VGG16's smallest input (five poolings), one six-crop validation,
# which on a CPU costs more than the training.
PAPER_SCALE_QUICK = {"input_size": 32, "resize_to": 36, "iterations": 20, "eval_every": 20}
PUBLISHED = {  # the paper's validation figures, with ImageNet weights
    "vgg16": {"top1": 0.46, "top2": 0.70, "rmse": 1.11},
    "googlenet": {"top1": 0.36, "top2": 0.65, "rmse": 1.25},
}
GOALS = {"search": 0.10, f"top{ENSEMBLE}": 0.20}  # test RMSE (y) each must gain on the recipe, same readout
LEARNED = 2.5  # a model above this test RMSE (y) has not learned (median predictor: 3.60 y)


def _options(parser) -> None:
    parser.add_argument("--recipe-iterations", type=int, help="B: the recipe's iterations and any trial's most")
    parser.add_argument("--trials", type=int, help="trials in the search (default 5, 4 with --no-early-stopping)")
    parser.add_argument(
        "--no-early-stopping",
        action="store_true",
        help="the search trains every trial to B, so that (c)'s members all finish (quality-no-early-stopping.json)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="experiment seed of (a), (b) and (d), S + 1 for the recipe's other runs; S > 0 names its JSON -seedS",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--work", help="working folder of an earlier run: its prepared data and finished arms are kept")
    parser.add_argument(
        "--paper-scale", action="store_true", help="the recipe per network at 224 of 256 px, 5000 x 32 (for a GPU)"
    )


def held_out_data(work: Path, image_size: int = SOURCE_SIZE) -> tuple[PreparedData, PreparedData]:
    """rsna-100 prepared in `work` as (searched, test), warped to `image_size`: the test set a stratified (by year,
    seeded) 20 % held out before anything trains; the rest with a small validation split, which keeps six-crop
    validation cheap."""
    source = shared_folder("rsna-100")
    labels = pd.read_csv(source / "boneage.csv")
    is_test = stratified_split((labels.boneage // 12).to_numpy(), 0.2, seed=123)
    searched_csv, test_csv = work / "searched.csv", work / "test.csv"
    labels[~is_test].to_csv(searched_csv, index=False)
    labels[is_test].to_csv(test_csv, index=False)
    prepared, test = (prepared_folder(work, split, image_size) for split in ("prepared", "test"))
    searched = prepare(
        source, labels=searched_csv, out=prepared, image_size=image_size, val_fraction=0.1, progress=False
    )
    return searched, prepare(source, labels=test_csv, out=test, image_size=image_size, progress=False)


def prepared_folder(work: Path, split: str, image_size: int) -> Path:
    """Where a split is prepared: at rsna-100's own size under its plain name, which earlier working folders use."""
    return work / (split if image_size == SOURCE_SIZE else f"{split}-{image_size}")


def recipe_train(input_size: int, resize_to: int, iterations: int, eval_every: int) -> dict:
    """The recipe's train section at `input_size` crops of the images re-warped to `resize_to`."""
    crop = {"input_size": input_size, "crop_fraction": input_size / resize_to}
    return {**PAPER, **crop, "iterations": iterations, "eval_every": eval_every}


def regime_tag(regime: dict) -> str:
    """A regime's part of its runs' names (88of100px-1500): a run or record of other settings is never reused."""
    return f"{regime['input_size']}of{regime['resize_to']}px-{regime['iterations']}"


def median_rmse(train_labels: np.ndarray, labels: np.ndarray) -> float:
    """RMSE (years) of always predicting the training split's median class."""
    return float(np.sqrt(np.mean((labels - np.median(train_labels)) ** 2)))


def median_reference(data: PreparedData, test: PreparedData) -> dict[str, float]:
    """The median predictor's RMSE on the validation split and the held-out hands: the floor any figure must beat."""
    train = data.labels[data.is_train]
    return {
        "median_predictor_val_rmse": median_rmse(train, data.labels[~data.is_train]),
        "median_predictor_test_rmse": median_rmse(train, test.labels),
    }


def spec_file(
    work: Path,
    name: str,
    train: dict,
    device: str,
    samples: int = 1,
    start_from=(),
    seed: int = 0,
    scheduler: dict | None = None,
    searcher: str = "tpe",
    image_size: int = SOURCE_SIZE,
) -> Path:
    """A search-space file: a search's trials share the machine under ASHA (one rung, at RUNG of the
    iterations, unless `scheduler` says otherwise), a single run takes all of it, and repeats of one
    configuration (seeds) run to the end."""
    gpu, single = device == "cuda", samples == 1
    searched = any(isinstance(value, dict) for value in train.values())
    if scheduler is None:
        scheduler = (
            {"type": "none"}
            if single or not searched
            else {"type": "asha", "grace_period": int(RUNG * train["iterations"]), "reduction_factor": 3}
        )
    spec = {
        "seed": seed,
        "metric": "val_rmse",
        "mode": "min",
        "num_samples": samples,
        "data": {"source": str(prepared_folder(work, "prepared", image_size)), "image_size": image_size},
        "train": train,
        "start_from": list(start_from),
        "scheduler": scheduler,
        "searcher": {"type": searcher},
        "resources": {  # a search runs two trials at once: 1-CPU workers on 2 cores, or half-GPU workers
            "cpus_per_worker": (8 if gpu else 2) if single else (4 if gpu else 1),
            "gpus_per_worker": (1 if single else 0.5) if gpu else 0,
        },
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_arm(work: Path, name: str, train: dict, device: str, samples: int = 1, start_from=(), seed: int = 0, **space):
    """run_search of spec_file's space (`space`: its scheduler, searcher, image size) into work/name; with --work an arm
    that finished earlier is resumed (nothing reruns)."""
    spec = load_spec(spec_file(work, name, train, device, samples, start_from, seed, **space))
    return run_search(spec, name=name, results_dir=work, resume=(work / name / "trials.parquet").is_file())


def test_metrics(best, folder: Path, test: PreparedData, device: str = "cpu") -> dict[str, float]:
    """Export `best` (one trial or a list: an ensemble) as a user would, and score the model folder once on the
    held-out images on `device`."""
    predictor = Predictor(export(best, folder, force=True), device=device)
    m = classification_metrics(predictor.predict_arrays(test.images, test.sex_code), test.labels)
    return {
        "top1": m["top1"],
        "top2": m["top2"],
        "rmse_argmax": m["rmse"],
        "rmse_expected": m["rmse_expected"],
        "mae_months_argmax": 12 * m["mae"],
        "mae_months_expected": 12 * m["mae_expected"],
    }


def curves(path) -> dict[str, list]:
    """Each trial's validation RMSE by iteration: the curves that explain a goal met or missed."""
    history = pd.read_parquet(Path(path) / "history.parquet").dropna(subset=["val_rmse"])
    return {
        str(trial): [[int(r.iteration), round(float(r.val_rmse), 3)] for r in rows.itertuples()]
        for trial, rows in history.groupby("trial_id")
    }


def main() -> None:
    args = parse_args(__doc__, _options)
    if args.paper_scale and (args.no_early_stopping or args.trials):
        raise SystemExit(
            "--paper-scale trains the recipe per network, no search: drop --no-early-stopping and --trials"
        )
    if args.seed < 0:
        raise SystemExit(f"--seed must be 0 or more, not {args.seed}")
    started = time.perf_counter()
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="raybone-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    regime = _regime(args)
    data, test = held_out_data(work, regime["resize_to"])
    start_local_ray(num_cpus=None if args.device == "cuda" else 2)
    reference = median_reference(data, test)
    if args.paper_scale:
        results = {"reference": reference, **_paper_scale(work, test, args.device, regime, args.seed)}
        finish(_seeded("quality-paper-scale", args.seed), args, results, _paper_summary(results), started)
    else:
        stopping = not args.no_early_stopping
        trials = 3 if args.quick else args.trials or (5 if stopping else 4)  # about 4B trial-iterations either way
        results = {"reference": reference, **_arms(work, test, args.device, regime, trials, stopping, args.seed)}
        name = _seeded("quality" if stopping else "quality-no-early-stopping", args.seed)
        finish(name, args, results, _summary(results), started)
    ray.shutdown()


def _regime(args) -> dict:
    """Crop, warp, iterations and validation cadence: the paper's scale, or where the recipe learns on the device."""
    regime = dict(PAPER_SCALE if args.paper_scale else REGIMES[args.device])
    regime["iterations"] = args.recipe_iterations or regime["iterations"]
    if args.quick:
        regime.update(PAPER_SCALE_QUICK if args.paper_scale else {"iterations": 100, "eval_every": 50})
    return regime


def _arms(
    work: Path, test: PreparedData, device: str, regime: dict, trials: int, early_stopping: bool, seed: int
) -> dict:
    """Arms (a) to (d) at experiment seed `seed` and the recipe's other seeds, each scored on the held-out hands;
    without `early_stopping` the search trains every trial to B."""
    train = recipe_train(**regime)
    tag = _seeded(regime_tag(regime), seed)
    models = work / _seeded("models", seed)  # one --work folder may hold several seeds' runs
    recipe = run_arm(work, f"quality-recipe-{tag}", train, device, seed=seed)
    averaged = run_arm(work, f"quality-recipe-ema-{tag}", {**train, **AVERAGING}, device, seed=seed)
    search_train = {**train, **AVERAGING, **SEARCHED, "readout": "expected"}
    name, scheduler = ("search-ema", None) if early_stopping else ("search-ema-full", {"type": "none"})
    search = run_arm(
        work, f"quality-{name}-{tag}", search_train, device, trials, [RECIPE_POINT], seed=seed, scheduler=scheduler
    )
    experiment = load_experiment(search.path)
    arms = {
        "recipe": (load_experiment(recipe.path).best(), recipe),
        "search": (experiment.best(), search),
        f"top{ENSEMBLE}": (experiment.top(ENSEMBLE), search),
        "recipe-ema": (load_experiment(averaged.path).best(), averaged),
    }
    results = {
        "settings": {
            "regime": regime,
            "recipe": train,
            "searched": SEARCHED,
            "averaging": AVERAGING,
            "seed": seed,
            "early_stopping": early_stopping,
            "rung": RUNG if early_stopping else None,
            "trials": trials,
            "cpu_has_bf16": cpu_has_bf16(),  # with amp (the default), CPU training steps ran in bf16
        },
        "test_images": len(test.labels),
        "arms": {},
    }
    for arm, (chosen, outcome) in arms.items():
        members = chosen if isinstance(chosen, list) else [chosen]
        results["arms"][arm] = {
            "trial_iterations": int(outcome.trials.iteration.sum()),
            "members": [
                {
                    "trial_id": m.trial_id,
                    "iteration": m.iteration,
                    "val_rmse": m.metrics()["val_rmse"],
                    **m.train_config().model_dump(include=set(SEARCHED) | {"readout", "ema"}, mode="json"),
                }
                for m in members
            ],
            **_scored(chosen, models / arm, test),
            "curves": curves(outcome.path),
        }
    scored_recipe = results["arms"]["recipe"]
    results["recipe_seeds"] = _recipe_seeds(work, models, tag, train, device, test, scored_recipe, seed + 1)
    return results


def _scored(chosen, folder: Path, test: PreparedData, device: str = "cpu") -> dict:
    """A trial (or ensemble) exported to `folder`: its held-out scores and the validation figures it carries."""
    return {
        "test": test_metrics(chosen, folder, test, device),
        "validation": json.loads((folder / MODEL_JSON).read_text())["metrics"],
    }


def _paper_scale(work: Path, test: PreparedData, device: str, regime: dict, seed: int) -> dict:
    """The recipe per network at the paper's scale, the networks trained side by side as one search whose start
    points are the networks, each scored on the held-out hands on the device it trained on."""
    train = {**recipe_train(**regime), "model": {"choices": list(PUBLISHED)}}
    tag = _seeded(regime_tag(regime), seed)
    points = [{"model": network} for network in PUBLISHED]
    # Both run to the end: spec_file's default for a search, ASHA at 3B/4, would stop the worse network there.
    outcome = run_arm(
        work,
        f"quality-paper-scale-{tag}",
        train,
        device,
        len(points),
        points,
        seed=seed,
        scheduler={"type": "none"},
        image_size=regime["resize_to"],
    )
    networks = {}
    for trial in load_experiment(outcome.path).top(len(points)):
        network = trial.train_config().model
        networks[network] = {
            "trial_id": trial.trial_id,
            "iteration": trial.iteration,
            **_scored(trial, work / _seeded("models", seed) / f"paper-{network}", test, device),
            "published_validation": PUBLISHED[network],
        }
    settings = {"regime": regime, "recipe": train, "seed": seed}
    return {"settings": settings, "test_images": len(test.labels), "networks": networks, "curves": curves(outcome.path)}


def _recipe_seeds(
    work: Path, models: Path, tag: str, train: dict, device: str, test: PreparedData, recipe: dict, seed: int
) -> dict:
    """The recipe at REPEATS more seeds (the trials of experiment seed `seed`), scored as (a) is: test RMSE per seed,
    (a)'s first, with mean and SD."""
    outcome = run_arm(work, f"quality-recipe-seeds-{tag}", train, device, samples=REPEATS, seed=seed)
    runs = [{"trial_id": recipe["members"][0]["trial_id"], "test": recipe["test"]}]
    for i, trial in enumerate(load_experiment(outcome.path).top(REPEATS), start=1):
        runs.append({"trial_id": trial.trial_id, "test": test_metrics(trial, models / f"recipe-{i}", test)})
    spread = {}
    for key in ("rmse_argmax", "rmse_expected"):
        values = [run["test"][key] for run in runs]
        spread[key] = {"values": values, "mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1))}
    return {"runs": runs, "spread": spread, "curves": curves(outcome.path)}


def _summary(results: dict) -> str:
    arms, median = results["arms"], results["reference"]["median_predictor_test_rmse"]
    recipe = arms["recipe"]["test"]

    def line(arm: str) -> str:
        t, spent = arms[arm]["test"], arms[arm]["trial_iterations"]
        learned = "" if min(t["rmse_argmax"], t["rmse_expected"]) <= LEARNED else " NOT LEARNED"
        gain = (
            f"; gain on the recipe {_gain(recipe, t)} (goal {GOALS[arm]:.2f}: {_verdict(recipe, t, GOALS[arm])}), "
            f"on recipe-ema {_gain(arms['recipe-ema']['test'], t)}"
            if arm in GOALS
            else ""
        )
        return (
            f"{arm} ({spent} trial-it) top-1 {t['top1']:.3f} top-2 {t['top2']:.3f} RMSE {t['rmse_argmax']:.2f}/"
            f"{t['rmse_expected']:.2f} y MAE {t['mae_months_expected']:.1f} mo{learned}{gain}"
        )

    spread = results["recipe_seeds"]["spread"]
    seeds = "/".join(f"{spread[k]['mean']:.2f} ± {spread[k]['sd']:.2f}" for k in ("rmse_argmax", "rmse_expected"))
    return (
        f"held-out test ({results['test_images']} RSNA hands; RMSE arg-max/expected; median predictor "
        f"{median:.2f} y): "
        + " | ".join(line(arm) for arm in arms)
        + f" | recipe over {len(spread['rmse_argmax']['values'])} seeds: RMSE {seeds} y (mean ± SD)"
    )


def _paper_summary(results: dict) -> str:
    def line(network: str, r: dict) -> str:
        t, p = r["test"], r["published_validation"]
        learned = "" if min(t["rmse_argmax"], t["rmse_expected"]) <= LEARNED else " NOT LEARNED"
        return (
            f"{network} top-1 {t['top1']:.3f} top-2 {t['top2']:.3f} "
            f"RMSE {t['rmse_argmax']:.2f}/{t['rmse_expected']:.2f} y{learned}"
            f" (paper, validation: {p['top1']:.2f} / {p['top2']:.2f} / {p['rmse']:.2f} y)"
        )

    median = results["reference"]["median_predictor_test_rmse"]
    return (
        f"paper-scale recipe, held-out test ({results['test_images']} RSNA hands; RMSE arg-max/expected; median "
        f"predictor {median:.2f} y): " + " | ".join(line(n, r) for n, r in results["networks"].items())
    )


def _seeded(name: str, seed: int) -> str:
    """A name for experiment seed `seed`: seed 0's is the name itself, so earlier runs and their JSON keep theirs."""
    return name if seed == 0 else f"{name}-seed{seed}"


def _gains(reference: dict, test: dict) -> list[float]:
    """How much lower `test`'s RMSE is than `reference`'s, arg-max and expected (years)."""
    return [reference[key] - test[key] for key in ("rmse_argmax", "rmse_expected")]


def _verdict(reference: dict, test: dict, goal: float) -> str:
    """Whether `test` gains `goal` on `reference` on each readout, unrounded: 0.1996 y misses a goal of 0.20."""
    return "/".join("met" if gain >= goal else "MISSED" for gain in _gains(reference, test))


def _gain(reference: dict, test: dict) -> str:
    return "/".join(f"{gain:+.4f}" for gain in _gains(reference, test)) + " y"


if __name__ == "__main__":
    main()
