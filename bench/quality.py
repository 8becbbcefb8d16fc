"""Quality at a fixed budget on real radiographs: the paper's recipe versus a raybone search.

On ../shared/data/rsna-100 (11,310 RSNA hands at 100 px) a stratified 20 % test set is held out first;
neither arm ever trains or selects on it. Then
  (b) a raybone search (TPE + ASHA) over the paper's four hyperparameters and the quality levers
      (sex input, exposure jitter, class balance, expected-age readout) runs on the remaining images, and
  (a) the paper's recipe as a single configuration (lr 1e-4 halved every 500 iterations, L2CE, batch 32)
      trains for exactly the trial-iterations the search spent.
Both winners are scored once, on the test set, with six-crop averaging: top-1, top-2, RMSE (arg-max and
expected age) and MAE in months. GoogLeNet from scratch at 88 px crops of 100 px, as the baseline script.

    python bench/quality.py [--budget 3000] [--trials 10] [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd
import ray
import yaml
from _common import finish, parse_args, shared_folder

from raybone.core.engine import predict_trained
from raybone.core.metrics import classification_metrics
from raybone.data import prepare
from raybone.data.prepare import PreparedData, stratified_split
from raybone.experiments.experiment import best_row, load_trained_model
from raybone.spec import load_spec
from raybone.tuning.cluster import start_local_ray
from raybone.tuning.run import run_search

COMMON = {
    "model": "googlenet",
    "weights": "none",
    "finetune": "full",
    "input_size": 88,
    "crop_fraction": 0.88,
    "batch_size": 32,
    "loss": "l2ce",
}
PAPER = {**COMMON, "lr": 1e-4, "decay_steps": 500, "l2_weight": 1.0, "weight_decay": 0.1, "readout": "argmax"}
CONCURRENT = 2  # trials at once: two 1-CPU workers on 2 cores, or two half-GPU workers
SEARCHED = {
    "lr": {"distribution": "loguniform", "low": 1e-4, "high": 3e-3},
    "decay_steps": {"distribution": "int", "low": 200, "high": 1500},
    "l2_weight": {"distribution": "loguniform", "low": 1e-3, "high": 1.0},
    "weight_decay": {"distribution": "loguniform", "low": 1e-4, "high": 0.3},
    "sex_input": {"choices": [True, False]},
    "contrast": {"distribution": "uniform", "low": 0.0, "high": 0.4},
    "class_balance": {"choices": ["none", "sampling", "loss"]},
}


def _options(parser) -> None:
    parser.add_argument("--budget", type=int, default=3000, help="trial-iterations the search aims to spend")
    parser.add_argument("--trials", type=int, default=10, help="trials in the search")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--work", help="working folder of an earlier run: its finished search is reused")


def held_out_data(work: Path) -> tuple[PreparedData, PreparedData]:
    """rsna-100 prepared in `work` as (searched, test): the test set a stratified (by year, seeded) 20 % held out
    before anything trains; the rest with a small validation split, which keeps six-crop validation cheap."""
    source = shared_folder("rsna-100")
    labels = pd.read_csv(source / "boneage.csv")
    is_test = stratified_split((labels.boneage // 12).to_numpy(), 0.2, seed=123)
    searched_csv, test_csv = work / "searched.csv", work / "test.csv"
    labels[~is_test].to_csv(searched_csv, index=False)
    labels[is_test].to_csv(test_csv, index=False)
    searched = prepare(
        source, labels=searched_csv, out=work / "prepared", image_size=100, val_fraction=0.1, progress=False
    )
    return searched, prepare(source, labels=test_csv, out=work / "test", image_size=100, progress=False)


def spec_file(work: Path, name: str, train: dict, args, iterations: int, samples: int, rung: int) -> Path:
    """A search-space file: several trials share the machine under ASHA (first rung `rung`), a single run
    takes all of it."""
    gpu, single = args.device == "cuda", samples == 1
    spec = {
        "seed": 0,
        "metric": "val_rmse",
        "mode": "min",
        "num_samples": samples,
        "data": {"source": str(work / "prepared"), "image_size": 100},
        "train": {**train, "iterations": iterations, "eval_every": rung},
        "scheduler": {"type": "none"} if single else {"type": "asha", "grace_period": rung, "reduction_factor": 3},
        "resources": {
            "cpus_per_worker": (8 if gpu else 2) if single else (4 if gpu else 1),
            "gpus_per_worker": (1 if single else 0.5) if gpu else 0,
        },
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def score(checkpoint: str, test, device: str) -> tuple[dict, dict[str, float]]:
    """The checkpoint's values of the searched hyperparameters, and its six-crop metrics on images no arm has seen."""
    model, cfg, _ = load_trained_model(checkpoint)
    m = classification_metrics(predict_trained(model, cfg, test.images, test.sex_code, device), test.labels)
    metrics = {
        "top1": m["top1"],
        "top2": m["top2"],
        "rmse_argmax": m["rmse"],
        "rmse_expected": m["rmse_expected"],
        "mae_months_argmax": 12 * m["mae"],
        "mae_months_expected": 12 * m["mae_expected"],
    }
    return cfg.model_dump(include=set(SEARCHED), mode="json"), metrics


def main() -> None:
    args = parse_args(__doc__, _options)
    if args.quick:
        args.budget, args.trials = 600, 4
    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="raybone-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    _, test = held_out_data(work)
    start_local_ray(num_cpus=None if args.device == "cuda" else 2)

    # Asynchronous ASHA cannot stop the first trials that run at once (nothing to compare them with yet): they
    # run to max_t. So max_t is a quarter of the budget with two at once; the others mostly stop at the first
    # or second rung (rungs max_t/9, max_t/3), which lands the spend near the budget for about 10 trials.
    max_t = max(90, args.budget // (CONCURRENT + 2))
    rung = max_t // 9
    search = run_search(
        load_spec(
            spec_file(work, "search", {**COMMON, **SEARCHED, "readout": "expected"}, args, rung * 9, args.trials, rung)
        ),
        name="search",
        results_dir=work,
        resume=(work / "search" / "trials.parquet").is_file(),
    )  # --work: a finished search is kept
    spent = int(search.trials.iteration.sum())
    paper = run_search(
        load_spec(spec_file(work, "paper", PAPER, args, spent, 1, max(50, spent // 6))), name="paper", results_dir=work
    )
    arms = {"paper_recipe": paper, "raybone_search": search}
    results = {"test_images": len(test.labels), "budget_trial_iterations": spent, "arms": {}}
    for arm, outcome in arms.items():
        config, metrics = score(best_row(outcome.trials, "val_rmse", "min").checkpoint_path, test, args.device)
        results["arms"][arm] = {
            "trial_iterations": int(outcome.trials.iteration.sum()),
            "config": config,
            "test": metrics,
        }
    a, b = (results["arms"][k]["test"] for k in arms)
    summary = (
        f"quality on {len(test.labels)} held-out RSNA hands, {spent} trial-iterations each: paper recipe "
        f"top-1 {a['top1']:.3f} top-2 {a['top2']:.3f} RMSE {a['rmse_argmax']:.2f}/{a['rmse_expected']:.2f} y "
        f"MAE {a['mae_months_expected']:.1f} mo | raybone search top-1 {b['top1']:.3f} top-2 {b['top2']:.3f} "
        f"RMSE {b['rmse_argmax']:.2f}/{b['rmse_expected']:.2f} y MAE {b['mae_months_expected']:.1f} mo "
        f"(RMSE arg-max/expected)"
    )
    ray.shutdown()
    finish("quality", args, results, summary, started)


if __name__ == "__main__":
    main()
