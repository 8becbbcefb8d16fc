"""What Ray Train costs raybone: its worker loop in a real TorchTrainer versus a plain PyTorch loop.

Both sides train GoogLeNet from scratch on the phantom demo atlas (72 px images, 64 px crops), batch 32, the
same number of iterations, with raybone's own step (`raybone.core.engine.train_step`: Kornia augmentation, L2CE,
Adam), the same seeds and the same torch thread count. The Ray side is `raybone.tuning.worker.train_loop_per_worker`
itself, unchanged, in a `TorchTrainer` with one worker of all the CPUs; a thin wrapper only clocks its
evaluations and reports. Training is split into windows of `eval_every` iterations: raybone reports
`images_per_s` per window (its evaluation and checkpoint excluded), and windows 2.. give the steady rate, as
the plain loop's windows do. Runs alternate plain, Ray, Ray, plain, so drifting machine load hits both.
The headline ratio compares each side's fastest steady window (other work on the machine only slows windows
down); the ratio of the median steady rates is reported beside it.

Fixed cost per trial = wall time of the Ray run - its iterations at the steady rate - its evaluations and
checkpoint reports: worker-group start + data fetch + model build + the first step's extra time + teardown.

    python bench/overhead.py [--quick]          # JSON to bench/results/overhead.json
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import _common as common
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from raybone.core.engine import to_layout, train_step
from raybone.core.loss import create_loss
from raybone.core.model import create_model, parameter_groups
from raybone.data import prepare
from raybone.spec import TrainConfig
from raybone.tuning.trial import trial_arrays  # the exact dict a search puts in the object store

NAME = "overhead"
SEED = 0


def instrumented_loop(loop_config: dict) -> None:
    """raybone's worker loop, unchanged, with wall clocks around its evaluations and reports.

    Runs in the Ray worker (pickled by value from this script), so it imports what it needs itself.
    """
    import json
    import time
    from pathlib import Path

    import ray.train

    import raybone.tuning.worker as worker

    events: dict = {"worker_start": time.time(), "reports": []}
    real_report, real_predict = ray.train.report, worker.predict_probs
    pending: dict = {}

    def predict(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real_predict(*args, **kwargs)
        finally:
            pending["eval_s"] = time.perf_counter() - start

    def report(metrics, checkpoint=None, **kwargs):
        enter = time.time()
        real_report(metrics, checkpoint=checkpoint, **kwargs)
        events["reports"].append(
            {
                "iteration": metrics["iteration"],
                "images_per_s": metrics["images_per_s"],
                "eval_s": pending.pop("eval_s", 0.0),
                "enter": enter,
                "exit": time.time(),
            }
        )

    ray.train.report, worker.predict_probs = report, predict
    try:
        worker.train_loop_per_worker(loop_config)
    finally:
        ray.train.report, worker.predict_probs = real_report, real_predict
        events["worker_end"] = time.time()
        Path(loop_config["bench_events"]).write_text(json.dumps(events))


def ray_run(cfg: TrainConfig, data_ref, threads: int, storage: Path, index: int) -> dict:
    events_path = storage / f"events-{index}.json"
    trainer = TorchTrainer(
        instrumented_loop,
        train_loop_config={
            "train": cfg.model_dump(),
            "data": [data_ref],
            "seed": SEED,
            "threads": threads,
            "bench_events": str(events_path),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": threads}),
        run_config=ray.train.RunConfig(
            name=f"overhead-{index}",
            storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    fit_start = time.time()
    trainer.fit()
    fit_end = time.time()
    return _decompose(json.loads(events_path.read_text()), fit_start, fit_end, cfg)


def ray_run_retried(
    cfg: TrainConfig, data_ref, threads: int, storage: Path, index: int, failures: list, attempts: int = 3
) -> dict:
    """A run that fails is run again from scratch (and the failure recorded), never resumed: a resumed run
    would mix two worker starts into one measurement."""
    for attempt in range(attempts):
        try:
            return ray_run(cfg, data_ref, threads, storage, index * 10 + attempt)
        except ray.train.TrainingFailedError as err:
            failures.append({"run": index, "attempt": attempt, "error": " ".join(str(err).split())[:300]})
    raise RuntimeError(f"the Ray run failed {attempts} times; see failures in the log")


def _decompose(events: dict, fit_start: float, fit_end: float, cfg: TrainConfig) -> dict:
    reports = events["reports"]
    windows = [r["iteration"] - p for r, p in zip(reports, [0] + [r["iteration"] for r in reports[:-1]])]
    window_s = [n * cfg.batch_size / r["images_per_s"] for n, r in zip(windows, reports)]
    steady_ips = sum(windows[1:]) * cfg.batch_size / sum(window_s[1:])
    step_s = cfg.batch_size / steady_ips
    loop_start = reports[0]["enter"] - reports[0]["eval_s"] - window_s[0]
    wall = fit_end - fit_start
    evals = sum(r["eval_s"] for r in reports)
    checkpoints = sum(r["exit"] - r["enter"] for r in reports)
    parts = {
        "worker_group_start_s": events["worker_start"] - fit_start,
        "data_and_model_setup_s": loop_start - events["worker_start"],
        "first_step_extra_s": window_s[0] - windows[0] * step_s,
        "teardown_s": fit_end - events["worker_end"],
    }
    return {
        "steady_images_per_s": steady_ips,
        "best_window_images_per_s": max(r["images_per_s"] for r in reports[1:]),
        "window_images_per_s": [r["images_per_s"] for r in reports],
        "wall_s": wall,
        "steady_training_s": cfg.iterations * step_s,
        "wall_minus_steady_s": wall - cfg.iterations * step_s,
        "evaluations_s": evals,
        "checkpoint_reports_s": checkpoints,
        "fixed_cost_s": wall - cfg.iterations * step_s - evals - checkpoints,
        **parts,
    }


def plain_run(cfg: TrainConfig, arrays: dict, threads: int) -> dict:
    """The same steps without Ray: raybone's train_step in a bare loop, timed in the same windows."""
    common.set_threads(threads)
    with common.stopwatch() as setup:
        torch.manual_seed(SEED)
        images, labels = torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"])
        is_train = torch.from_numpy(arrays["is_train"])
        train_x, train_y = images[is_train], labels[is_train]
        model = to_layout(create_model(cfg.model, arrays["num_classes"], cfg.weights, cfg.finetune), cfg.channels_last)
        optimizer = torch.optim.Adam(parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.decay_steps, gamma=0.5)
        loss_fn = create_loss(cfg.loss, cfg.l2_weight)
        batches = torch.Generator("cpu").manual_seed(SEED * 1000)
    window_s, losses, iteration, started = [], [], 0, time.perf_counter()
    while iteration < cfg.iterations:
        index = torch.randint(len(train_y), (cfg.batch_size,), generator=batches)
        losses.append(train_step(model, optimizer, loss_fn, train_x[index], train_y[index], cfg))
        schedule.step()
        iteration += 1
        if iteration % cfg.eval_every == 0 or iteration == cfg.iterations:
            torch.stack(losses).mean().item()  # as the worker computes train_loss before timing the window
            window_s.append(time.perf_counter() - started)
            losses, started = [], time.perf_counter()
    steady_images = (cfg.iterations - cfg.eval_every) * cfg.batch_size
    rates = [cfg.eval_every * cfg.batch_size / s for s in window_s]
    return {
        "steady_images_per_s": steady_images / sum(window_s[1:]),
        "best_window_images_per_s": max(rates[1:]),
        "window_images_per_s": rates,
        "setup_s": setup(),
        "training_s": sum(window_s),
    }


def main() -> None:
    args = common.parse_args(__doc__, quick_help="40 iterations per run, one run per side (default: 120, two each)")
    started = time.perf_counter()
    threads = common.cpu_count()
    iterations, eval_every, order = (40, 10, "PR") if args.quick else (120, 10, "PRRP")
    image_size, input_size = 72, 64
    cfg = TrainConfig(
        model="googlenet",
        weights="none",
        loss="l2ce",
        lr=1e-3,
        batch_size=32,
        iterations=iterations,
        eval_every=eval_every,
        input_size=input_size,
        crop_fraction=input_size / image_size,
    )  # the worker then crops the 72 px images as they are
    assert getattr(cfg, "image_size", image_size) == image_size
    data = prepare("demo", image_size=image_size, progress=False)
    arrays = trial_arrays(data)

    plain, raybone_runs, failures = [], [], []
    with common.local_ray(threads), tempfile.TemporaryDirectory(prefix="raybone-overhead-") as storage:
        data_ref = ray.put(arrays)
        for index, side in enumerate(order):
            if side == "P":
                plain.append(plain_run(cfg, arrays, threads))
            else:
                raybone_runs.append(ray_run_retried(cfg, data_ref, threads, Path(storage), index, failures))

    plain_ips = common.median(r["steady_images_per_s"] for r in plain)
    ray_ips = common.median(r["steady_images_per_s"] for r in raybone_runs)
    median_ratio = common.ratio(ray_ips, plain_ips)
    # Other work on the machine only ever slows a window down: the fastest steady window of each side is the
    # best estimate of its own speed, and their ratio of the overhead. The medians show how noisy it was.
    plain_best = max(r["best_window_images_per_s"] for r in plain)
    ray_best = max(r["best_window_images_per_s"] for r in raybone_runs)
    speed = common.ratio(ray_best, plain_best)
    fixed = common.median(r["fixed_cost_s"] for r in raybone_runs)
    wall_minus = common.median(r["wall_minus_steady_s"] for r in raybone_runs)
    results = {
        "settings": {
            "model": cfg.model,
            "image_size": image_size,
            "input_size": cfg.input_size,
            "batch_size": cfg.batch_size,
            "iterations": iterations,
            "eval_every": eval_every,
            "threads": threads,
            "order": order,
            "train_images": int(arrays["is_train"].sum()),
            "val_images": int((~arrays["is_train"]).sum()),
        },
        "plain_images_per_s": plain_best,
        "raybone_images_per_s": ray_best,
        "raybone_over_plain": speed,
        "plain_median_steady_images_per_s": plain_ips,
        "raybone_median_steady_images_per_s": ray_ips,
        "raybone_over_plain_median": median_ratio,
        "goal": "raybone_over_plain >= 0.95",
        "goal_met": speed is not None and speed >= 0.95,
        "fixed_cost_per_trial_s": fixed,
        "wall_minus_steady_training_s": wall_minus,
        "plain_runs": plain,
        "raybone_runs": raybone_runs,
        "failed_ray_runs": failures,
    }
    summary = (
        f"overhead: raybone {ray_best:.1f} img/s vs plain {plain_best:.1f} img/s (best windows) ="
        f" {common.fmt_ratio(speed, 3)} (goal >= 0.95x {'met' if results['goal_met'] else 'MISSED'}; medians"
        f" {ray_ips:.1f} vs {plain_ips:.1f} = {common.fmt_ratio(median_ratio, 2)}); fixed cost per trial {fixed:.1f} s"
        f" (wall - steady training = {wall_minus:.1f} s incl. {len(raybone_runs[0]['window_images_per_s'])}"
        f" evals+checkpoints)" + (f"; {len(failures)} failed Ray run(s) rerun" if failures else "")
    )
    common.finish(NAME, args, results, summary, started)


if __name__ == "__main__":
    main()
