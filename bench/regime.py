"""A learning regime for the CPU: does the paper's recipe learn within about 20 CPU-minutes on rsna-100?

Every search figure is only worth something if the models it compares have learned. This trains the recipe
(GoogLeNet from scratch, lr 1e-4 halved every 500 iterations, L2CE with weight 1, weight decay 0.1, batch 32)
as one raybone trial on rsna-100 (the same stratified 20 % test split as bench/quality.py held out first; a 10 %
validation split of the rest), for `--iterations` at `--input-size` crops of the 100 px images re-warped to
`--resize-to` (100: the images as they are; 73 with 64 px crops is the demo's 0.875 ratio), validating every
`--eval-every`, and records its learning curve (validation RMSE against iterations and wall time) next to the
median predictor (always the median class of the training split), and its test figures at the end.
Goal (issue 16): validation RMSE <= 2.0 years within about 20 minutes on 2 cores. `--lr` trains the recipe at
another initial learning rate (still halved every 500 iterations): does the search space hold a point that learns
faster? Judge that by the validation curve; the test figures are printed, never chosen on. `--model vgg16` trains
the same recipe with VGG16: does the paper's other network fit the CPU budget? The trial runs with the
spec's defaults, channels-last and bf16 training steps where the CPU has bf16 instructions (bench/cpu.py); `--fp32`
trains it as every CPU trial ran before those (amp and channels_last off).

    python bench/regime.py [--iterations 2000] [--input-size 88] [--resize-to 100] [--eval-every 250] [--lr 1e-4]
                           [--model googlenet|vgg16] [--fp32] [--work DIR]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd
import ray
from _common import finish, parse_args
from quality import PAPER, held_out_data, median_rmse, recipe_train, spec_file, test_metrics

from raybone.api import load_experiment
from raybone.core.catalog import MODELS
from raybone.core.engine import cpu_has_bf16
from raybone.spec import load_spec
from raybone.tuning.cluster import start_local_ray
from raybone.tuning.run import run_search

GOAL_RMSE, GOAL_MINUTES = 2.0, 20


def _options(parser) -> None:
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--input-size", type=int, default=88, help="crop side")
    parser.add_argument("--resize-to", type=int, default=100, help="re-warp the 100 px images to this side first")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=PAPER["lr"], help="initial learning rate (the recipe's: 1e-4)")
    parser.add_argument("--model", choices=MODELS, default=PAPER["model"])
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast, no channels-last")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--work", help="working folder (its prepared data is reused)")


def main() -> None:
    args = parse_args(__doc__, _options)
    if args.quick:
        args.iterations, args.eval_every = 100, 50
    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="raybone-regime-"))
    work.mkdir(parents=True, exist_ok=True)
    data, test = held_out_data(work)
    start_local_ray(num_cpus=None if args.device == "cuda" else 2)
    recipe = {
        **recipe_train(args.input_size, args.resize_to, args.iterations, args.eval_every),
        "lr": args.lr,
        "model": args.model,
    }
    if args.fp32:
        recipe |= {"amp": False, "channels_last": False}
    size = f"{args.input_size}of{args.resize_to}"
    # The recipe's own lr and the defaults keep the old names.
    tag = (
        ("" if args.model == PAPER["model"] else f"-{args.model}")
        + ("" if args.lr == PAPER["lr"] else f"-lr{args.lr:g}")
        + ("-fp32" if args.fp32 else "")
    )
    name = f"recipe-{size}px-{args.iterations}{tag}"
    spec = load_spec(spec_file(work, name, recipe, args.device))
    outcome = run_search(spec, name=name, results_dir=work)
    history = pd.read_parquet(outcome.path / "history.parquet")
    curve = [
        {
            "iteration": int(r.iteration),
            "minutes": round(r.time_total_s / 60, 2),
            "val_rmse": r.val_rmse,
            "val_rmse_expected": r.val_rmse_expected,
            "val_top1": r.val_top1,
        }
        for r in history.itertuples()
    ]
    best = load_experiment(outcome.path).best()
    scored = test_metrics(best, work / "models" / name, test)
    val_labels = data.labels[~data.is_train]
    reference = {
        "median_predictor_val_rmse": median_rmse(data.labels[data.is_train], val_labels),
        "median_predictor_test_rmse": median_rmse(data.labels[data.is_train], test.labels),
    }
    reached = next((p for p in curve if p["val_rmse"] <= GOAL_RMSE), None)
    results = {
        "settings": {
            "input_size": args.input_size,
            "image_size": 100,
            "resize_to": args.resize_to,
            "iterations": args.iterations,
            "eval_every": args.eval_every,
            "batch_size": PAPER["batch_size"],
            "recipe": recipe,
            "cpu_has_bf16": cpu_has_bf16(),  # with amp (the default), CPU training steps ran in bf16
        },
        "curve": curve,
        "reference": reference,
        "best_iteration": best.iteration,
        "test_at_best_checkpoint": scored,
        "val_images": len(val_labels),
        "test_images": len(test.labels),
    }
    met = reached is not None and reached["minutes"] <= GOAL_MINUTES
    summary = (
        f"recipe ({args.model}, lr {args.lr:g}{', fp32' if args.fp32 else ''}) at {args.input_size} of "
        f"{args.resize_to} px: val RMSE "
        f"{curve[-1]['val_rmse']:.2f} y after {curve[-1]['iteration']} iterations in {curve[-1]['minutes']:.1f} min; "
        + (
            f"<= {GOAL_RMSE} y first at {reached['iteration']} it, {reached['minutes']:.1f} min"
            if reached
            else f"never <= {GOAL_RMSE} y"
        )
        + f" (goal: within {GOAL_MINUTES} min: {'met' if met else 'missed'}); median predictor "
        f"{reference['median_predictor_val_rmse']:.2f} y; test RMSE {scored['rmse_argmax']:.2f} / "
        f"{scored['rmse_expected']:.2f} y (arg-max / expected; median predictor "
        f"{reference['median_predictor_test_rmse']:.2f} y) on {len(test.labels)} held-out hands"
    )
    ray.shutdown()
    finish(f"regime-{size}{tag}", args, results, summary, started)


if __name__ == "__main__":
    main()
