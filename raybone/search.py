"""Ray Tune search: Optuna TPE proposes configs, ASHA stops weak trials, each trial is one Train run."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import ray
import ray.train
import ray.tune
import yaml
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from raybone.data import PreparedData, prepare
from raybone.errors import RayboneError, SpecError
from raybone.results import history_table, trials_table, write_json, write_parquet
from raybone.spec import Choice, Range, Spec
from raybone.train import train_loop_per_worker

TRIAL_DRIVER_MEMORY = 256 * 1024**2  # the trial function only waits on its Train run
PACKAGES = ("raybone", "ray", "torch", "torchvision", "kornia", "optuna", "pydicom", "numpy", "pandas", "pyarrow")


@dataclass
class SearchOutcome:
    path: Path
    trials: pd.DataFrame
    best: pd.Series | None


def run_search(spec: Spec, *, name: str, results_dir: Path, address: str | None = None,
               resume: bool = False, console: Console | None = None) -> SearchOutcome:
    console = console or Console()
    path = (Path(results_dir) / name).resolve()
    if resume:
        finished = _check_resumable(path, spec)
        if finished is not None:
            console.print(f"experiment {name!r} already finished ({len(finished)} trials); nothing to resume")
            return SearchOutcome(path, finished, best_row(finished, spec.metric, spec.mode))
    elif (path / "spec.yaml").exists():
        raise RayboneError(f"experiment {name!r} already exists in {path.parent}; "
                           f"continue it with --resume {name} or choose another --name")
    data = prepare(spec.data.source, format=spec.data.format, labels=spec.data.labels,
                   image_size=spec.data.image_size, num_classes=spec.data.num_classes,
                   seed=spec.seed, val_fraction=spec.data.val_fraction)
    _check_input_size(spec, data)
    _start_ray(address, console)
    max_concurrent = concurrent_trials(spec, ray.cluster_resources())
    path.mkdir(parents=True, exist_ok=True)
    _save_provenance(spec, data, path)

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(_run_trial, spec_json=spec.model_dump_json(), data_ref=[ray.put(_arrays(data))],
                                 train_storage=str(path / "train")),
        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY},
    )
    if resume:
        tuner = ray.tune.Tuner.restore(str(path), trainable, resume_errored=True)
    else:
        tuner = _new_tuner(trainable, spec, path, max_concurrent)
    console.print(f"[bold]search[/] {name}: {spec.num_samples} trials, up to {max_concurrent} at a time, "
                  f"{spec.iterations} iterations each, data {data.path}")
    grid = tuner.fit()
    trials = trials_table(grid, spec, spec.iterations)
    write_parquet(trials, path / "trials.parquet")
    write_parquet(history_table(grid), path / "history.parquet")
    return SearchOutcome(path, trials, best_row(trials, spec.metric, spec.mode))


def _check_resumable(path: Path, spec: Spec) -> pd.DataFrame | None:
    """Refuse folders raybone did not create (Tune's restore unpickles them); the trials if already done."""
    if not (path / "environment.json").exists() or not ray.tune.Tuner.can_restore(str(path)):
        raise RayboneError(f"cannot resume {path.name!r}: {path} is not a raybone experiment")
    if (path / "trials.parquet").exists():
        trials = pd.read_parquet(path / "trials.parquet")
        if len(trials) >= spec.num_samples and not (trials.status == "error").any():
            return trials
    return None


def concurrent_trials(spec: Spec, cluster: dict) -> int:
    """How many trials the cluster can train at once: more trial drivers than that would deadlock."""
    r = spec.resources
    need = {"CPU": r.num_workers * r.cpus_per_worker, "GPU": r.num_workers * r.gpus_per_worker}
    fits = [math.floor(cluster.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0]
    if min(fits) < 1:
        raise SpecError(f"one trial needs {need['CPU']:g} CPUs and {need['GPU']:g} GPUs "
                        f"but the cluster has {cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs; "
                        "lower resources.num_workers / cpus_per_worker / gpus_per_worker")
    return min(min(fits), spec.num_samples)


def trial_seed(experiment_seed: int, trial_index: int) -> int:
    """Each trial's torch/numpy seed, from the experiment seed and the trial's index."""
    return int(np.random.SeedSequence([experiment_seed, trial_index]).generate_state(1)[0])


def best_row(trials: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    scored = trials.dropna(subset=[metric])
    if scored.empty:
        return None
    return scored.loc[scored[metric].idxmin() if mode == "min" else scored[metric].idxmax()]


def _run_trial(config: dict, *, spec_json: str, data_ref: list, train_storage: str) -> None:
    """One Tune trial: a Train run named after the trial, so a resumed search finds its checkpoints."""
    spec = Spec.model_validate_json(spec_json)
    trial_id = ray.tune.get_context().get_trial_id()
    sampled = {k: v for k, v in config.items() if k != "trial_index"}
    r = spec.resources
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": spec.train_config(sampled).model_dump(), "data": data_ref,
                           "seed": trial_seed(spec.seed, config["trial_index"]),
                           "threads": max(1, int(r.cpus_per_worker))},
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.gpus_per_worker > 0,
            resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})},
        ),
        run_config=ray.train.RunConfig(
            name=f"trial-{trial_id}", storage_path=train_storage, callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    trainer.fit()


def searcher(spec: Spec, path: Path) -> OptunaSearch:
    """Seeded TPE whose study lives in the experiment folder, so optuna-dashboard can watch it."""
    return _IndexedOptunaSearch(
        sampler=optuna.samplers.TPESampler(seed=spec.seed),
        study_name=path.name,
        storage=optuna.storages.RDBStorage(f"sqlite:///{path / 'optuna.db'}"),
    )


def _new_tuner(trainable, spec: Spec, path: Path, max_concurrent: int) -> ray.tune.Tuner:
    scheduler = None
    if spec.scheduler.type == "asha":
        scheduler = ASHAScheduler(time_attr="iteration", max_t=spec.iterations,
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    return ray.tune.Tuner(
        trainable,
        param_space=_tune_space(spec),
        tune_config=ray.tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=searcher(spec, path), scheduler=scheduler,
                                        num_samples=spec.num_samples, max_concurrent_trials=max_concurrent),
        run_config=ray.tune.RunConfig(name=path.name, storage_path=str(path.parent), verbose=0,
                                      # a trial whose driver's node died is retried; its Train run resumes
                                      failure_config=ray.tune.FailureConfig(max_failures=spec.resources.max_failures),
                                      callbacks=[_TrialProgress(spec)]),
    )


class _IndexedOptunaSearch(OptunaSearch):
    """Adds the Optuna trial number as `trial_index`: sequential, and kept in the study across resumes."""

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if isinstance(config, dict):
            config = {**config, "trial_index": self._ot_trials[trial_id].number}
        return config


def _tune_space(spec: Spec) -> dict:
    space = {}
    for name, param in spec.searched().items():
        if isinstance(param, Choice):
            space[name] = ray.tune.choice(param.choices)
        else:
            space[name] = _RANGES[param.distribution](param)
    return space


_RANGES = {
    "uniform": lambda p: ray.tune.uniform(p.low, p.high),
    "loguniform": lambda p: ray.tune.loguniform(p.low, p.high),
    "int": lambda p: ray.tune.randint(int(p.low), int(p.high) + 1),
    "logint": lambda p: ray.tune.lograndint(int(p.low), int(p.high) + 1),
}


def _arrays(data: PreparedData) -> dict:
    return {"images": data.images, "labels": data.labels, "is_train": data.is_train,
            "num_classes": int(data.meta["num_classes"])}


def _check_input_size(spec: Spec, data: PreparedData) -> None:
    sizes = spec.train.get("input_size", 224)
    largest = max(sizes.choices) if isinstance(sizes, Choice) else sizes.high if isinstance(sizes, Range) else sizes
    if largest > data.images.shape[1]:
        raise SpecError(f"train.input_size {largest} is larger than the prepared images "
                        f"({data.images.shape[1]} px); raise data.image_size")


def _start_ray(address: str | None, console: Console) -> None:
    if ray.is_initialized():
        return
    context = ray.init(address=address, dashboard_host="127.0.0.1", include_dashboard=True,
                       log_to_driver=False, configure_logging=False) if address is None else ray.init(address=address)
    if context.dashboard_url:
        console.print(f"Ray dashboard: http://{context.dashboard_url}")


def _save_provenance(spec: Spec, data: PreparedData, path: Path) -> None:
    (path / "spec.yaml").write_text(yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False))
    write_json({"packages": {p: version(p) for p in PACKAGES}, "data_fingerprint": data.fingerprint,
                "data_path": str(data.path), "data_meta": data.meta, "cwd": os.getcwd()}, path / "environment.json")


class _TrialProgress(ray.tune.Callback):
    """A progress bar over the search's total iterations, plus a line per finished trial.

    Tune pickles its callbacks into the experiment (for --resume), so the bar is built in setup().
    """

    def __init__(self, spec: Spec):
        self._spec = spec
        self._progress = None

    def __getstate__(self):
        return {"_spec": self._spec, "_progress": None}

    def setup(self, **info):
        self._console = Console()
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=self._console)
        self._task = self._progress.add_task("starting", total=self._spec.num_samples * self._spec.iterations)
        self._seen: dict[str, int] = {}
        self._best = None
        self._progress.start()

    def on_experiment_end(self, trials, **info):
        self._progress.stop()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._advance(trial.trial_id, result.get("iteration", 0))
        value = result.get(self._spec.metric)
        if value is not None and (self._best is None or (value < self._best) == (self._spec.mode == "min")):
            self._best = value
        running = sum(t.status == "RUNNING" for t in trials)
        best = f", best {self._spec.metric} {self._best:.3f}" if self._best is not None else ""
        self._progress.update(self._task, description=f"{running} running{best}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        # An early-stopped trial never reaches the last iteration: its unused budget counts as done.
        self._advance(trial.trial_id, self._spec.iterations)
        self._console.print(f"trial {trial.trial_id} finished at iteration {last.get('iteration', 0)}: "
                            f"{self._spec.metric} {last.get(self._spec.metric, float('nan')):.3f}")

    def _advance(self, trial_id: str, done: int) -> None:
        self._progress.advance(self._task, done - self._seen.get(trial_id, 0))
        self._seen[trial_id] = done
