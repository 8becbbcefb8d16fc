"""A search: Optuna TPE proposes configurations, ASHA stops weak trials, each trial is one Ray Train run.

run_search writes experiment `<storage>/<name>/` (see raybone.experiments.storage for what it holds): the
resolved spec and the environment first, Ray Tune's own state while it runs, the Parquet tables at the end.
"""

from __future__ import annotations

import json
import os
import shlex
import uuid
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path, PurePath

import pandas as pd
import ray
import ray.tune
from ray.tune.schedulers import ASHAScheduler
from rich.console import Console

from raybone.data import PreparedData
from raybone.data.prepare import from_demo_atlas
from raybone.errors import DataError, RayboneError, SpecError
from raybone.experiments import storage as results
from raybone.experiments.experiment import best_row, data_changed
from raybone.experiments.storage import ENVIRONMENT, HISTORY, SPEC, STUDY, TRIALS
from raybone.spec import Choice, Range, Spec, dump_spec, load_spec, parse_spec, search_space, spec_changes
from raybone.tuning.cluster import (
    check_storage_reaches_nodes,
    concurrent_trials,
    resource_nodes,
    start_ray,
    trials_that_fit,
)
from raybone.tuning.loggers import log_best_checkpoint, loggers
from raybone.tuning.pbt import pbt_population, pbt_scheduler, pbt_space, population_warning
from raybone.tuning.progress import TrialProgress
from raybone.tuning.searcher import OptunaSearcher, warm_start_trials
from raybone.tuning.tables import FINISHED, LiveTables, ended_trials, history_table, trials_table
from raybone.tuning.trial import TRIAL_DRIVER_MEMORY, run_trial, trial_arrays

PACKAGES = ("raybone", "ray", "torch", "torchvision", "kornia", "optuna", "pydicom", "numpy", "pandas", "pyarrow")


@dataclass
class SearchOutcome:
    path: Path | str  # the experiment: a local folder, or a URI (str) when the storage is one
    trials: pd.DataFrame
    best: pd.Series | None


def search_spec(config: str | Path, overrides: list[str], storage: str | PurePath, resume: str | None = None) -> Spec:
    """The spec a search runs: the search space `config` (a file, or a packaged space's name) with `overrides`;
    for `resume`, the spec that experiment saved, from any storage."""
    if resume is None:
        return load_spec(search_space(config), overrides)
    saved = results.join(storage, resume, SPEC)
    if not results.exists(saved):
        raise RayboneError(f"cannot resume {resume!r}: no raybone experiment at {results.join(storage, resume)}")
    return parse_spec(results.read_text(saved), results.location_text(saved), overrides)


def run_search(
    spec: Spec,
    *,
    name: str,
    results_dir: str | Path,
    address: str | None = None,
    resume: bool = False,
    shared_storage: bool = False,
    warm_start: str | None = None,
    console: Console | None = None,
) -> SearchOutcome:
    """Search into `results_dir/name`; `results_dir` is a local folder or a URI (s3://, gs://, file://).

    `shared_storage` asserts that a local folder is shared by every node (NFS): without it, a local folder
    on a multi-node (or autoscaling) cluster is refused. The Optuna study stays local (storage.study_dir).
    `warm_start` names an earlier experiment in the same storage whose finished trials seed the new study.
    """
    console = console or Console()
    remote = results.is_uri(results_dir)
    root = results.location_text(results_dir) if remote else Path(results_dir).resolve()
    path, study = results.join(root, name), results.study_dir(root, name)
    finished = _check_resumable(path, spec) if resume else _check_new(path, study, remote, name, root)
    if finished is not None:
        console.print(f"experiment {name!r} already finished ({len(finished)} trials); nothing to resume")
        return SearchOutcome(path, finished, _best(finished, spec))
    if warm_start and spec.scheduler.type == "pbt":
        raise SpecError("--warm-start seeds the searcher's study, and scheduler.type pbt runs without a searcher")
    seeds = warm_start_trials(root, warm_start, spec, console) if warm_start and not resume else []
    callbacks = [TrialProgress(spec), LiveTables(spec, path, root if remote else None), *loggers(spec, name)]
    data = spec.prepare_data()
    _check_data(spec, data)
    saved = json.loads(results.read_text(results.join(path, ENVIRONMENT))) if resume else {}
    if resume:
        _check_same_data(path, saved, data)
    max_concurrent = _start_cluster(spec, root, address, shared_storage, console)
    if resume:
        max_concurrent = _kept_concurrency(saved, max_concurrent, console)
    study.mkdir(parents=True, exist_ok=True)
    _save_provenance(spec, data, path, study, max_concurrent)

    trainable = trial_trainable(spec, trial_arrays(data), str(results.join(path, "train")))
    if resume:
        tuner = ray.tune.Tuner.restore(str(path), trainable, resume_errored=True)
    else:
        searcher = None if spec.scheduler.type == "pbt" else OptunaSearcher(spec, study, seeds)
        tuner = _new_tuner(trainable, spec, str(root), name, searcher, max_concurrent, callbacks)
    given = min(len(spec.start_from), spec.num_samples)
    starts = f" (the first {given} from start_from)" if given else ""
    console.print(
        f"[bold]search[/] {name}: {spec.num_samples} trials{starts}, up to {max_concurrent} at a time, "
        f"{spec.iterations} iterations each, data {data.path}"
    )
    if warning := population_warning(spec, max_concurrent):
        console.print(f"[yellow]warning:[/] {warning}")
    grid = _fit_quietly(tuner)
    live_history, live_trials = (_read_if_there(results.join(path, table)) for table in (HISTORY, TRIALS))
    history = history_table(grid, root if remote else None, live_history)
    trials = trials_table(grid, spec, history, ended_trials(live_trials), storage_location=root if remote else None)
    results.write_parquet(trials, results.join(path, TRIALS))
    results.write_parquet(history, results.join(path, HISTORY))
    if remote and (study / STUDY).is_file():  # a copy beside the tables, so the storage holds the whole experiment
        results.copy_file(study / STUDY, results.join(path, STUDY))
    if "mlflow" in spec.loggers and not remote:
        log_best_checkpoint(spec, name, _best(trials, spec))
    return SearchOutcome(path, trials, _best(trials, spec))


def _fit_quietly(tuner: ray.tune.Tuner) -> ray.tune.ResultGrid:
    """Tune logs each failed try of a trial with Ray's whole traceback (about 45 lines of its own frames);
    TrialProgress prints one line per try instead, and the traceback stays in the trial's error file. A user's
    setting wins, and the process's other Tune runs keep theirs."""
    quiet = "TUNE_PRINT_ALL_TRIAL_ERRORS" not in os.environ
    if quiet:
        os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] = "0"
    try:
        return tuner.fit()
    finally:
        if quiet:
            del os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"]


def _read_if_there(table) -> pd.DataFrame | None:
    return results.read_parquet(table) if results.exists(table) else None


def trial_trainable(spec: Spec, arrays: dict, train_storage: str, trial=run_trial):
    """What Tune runs per trial: `trial` (benchmarks wrap `run_trial`) with the spec, the images and where Train
    keeps the checkpoints."""
    # The images go into the object store once per search; each node pulls them once (see the README).
    return ray.tune.with_resources(
        ray.tune.with_parameters(
            trial,
            spec_json=spec.model_dump_json(),
            data_ref=[ray.put(arrays)],
            train_storage=train_storage,
            search_run=uuid.uuid4().hex,  # this run of the search, apart from a later resume of it
        ),
        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY},
    )


def _best(trials: pd.DataFrame, spec: Spec) -> pd.Series | None:
    """The trial with the best value any trial ever reported (its best checkpoint is kept)."""
    column = f"best_{spec.metric}"
    return best_row(trials, column if column in trials else spec.metric, spec.mode)


def _check_new(path: Path | str, study: Path, remote: bool, name: str, root) -> None:
    if results.exists(results.join(path, SPEC)):
        raise RayboneError(
            f"experiment {name!r} already exists in {root}; continue it with --resume {name} or choose another --name"
        )
    if remote and (study / STUDY).exists():
        raise RayboneError(
            f"experiment {name!r} has an Optuna study at {study / STUDY} already; "
            "choose another --name or remove that folder"
        )


def _check_resumable(path: Path | str, spec: Spec) -> pd.DataFrame | None:
    """Refuse folders raybone did not create (Tune's restore unpickles them) and a spec that would train the
    trials differently from how they started; the trials if already done."""
    name = _name(path)
    if not results.exists(results.join(path, ENVIRONMENT)) or not ray.tune.Tuner.can_restore(str(path)):
        raise RayboneError(f"cannot resume {name!r}: {path} is not a raybone experiment")
    saved = results.join(path, SPEC)
    changed = spec_changes(parse_spec(results.read_text(saved), results.location_text(saved)), spec)
    if changed:
        raise SpecError(
            f"cannot resume {name!r}: its trials started with another spec ({'; '.join(changed)}); only "
            "resources and loggers may change on resume: drop the other --set options, or search under a new --name"
        )
    trials = _read_if_there(results.join(path, TRIALS))
    # The live table lists each trial from its first report, so a search killed during its last trials holds them
    # all, still running.
    if trials is not None and len(trials) >= spec.num_samples and trials.status.isin(FINISHED).all():
        return trials
    return None


def _check_same_data(path: Path | str, environment: dict, data: PreparedData) -> None:
    """Refuse to resume trials on other data than they started on: the experiment would mix two datasets, and
    environment.json, rewritten on resume, would record only the second."""
    if data_changed(environment, data):
        raise RayboneError(
            f"cannot resume {_name(path)!r}: its trials started on other data ({data.path}: the images, readings or "
            "split changed since); restore that data, or search under a new --name"
        )


def _kept_concurrency(environment: dict, fits: int, console: Console) -> int:
    """How many trials a resumed search trains at once: Tune restores the limit the search started with (its
    tune_config is saved with the experiment), whatever the cluster or `resources` are now."""
    kept = environment.get("max_concurrent_trials", fits)
    if kept != fits:
        console.print(
            f"[yellow]note:[/] the resumed search trains up to {kept} at a time, as it started (Ray Tune restores "
            f"that limit); the cluster and resources now would give {fits}"
        )
    return kept


def _name(path: Path | str) -> str:
    return Path(results.location_text(path).partition("?")[0]).name


def _start_cluster(spec: Spec, root, address: str | None, shared_storage: bool, console: Console) -> int:
    """Start (or join) Ray; how many trials train at once. Refuses storage that the nodes cannot reach."""
    start_ray(address, console)
    cluster = ray.cluster_resources()
    max_concurrent = concurrent_trials(spec, cluster)
    check_storage_reaches_nodes(
        root, shared=shared_storage, nodes=resource_nodes(), trial_fits_now=trials_that_fit(spec, cluster) >= 1
    )
    return max_concurrent


def _new_tuner(
    trainable, spec: Spec, storage: str, name: str, searcher, max_concurrent: int, callbacks: list
) -> ray.tune.Tuner:
    if spec.scheduler.type == "pbt":  # Tune runs PBT without a searcher: the population is drawn up front
        return ray.tune.Tuner(
            trainable,
            param_space=pbt_space(spec),
            tune_config=ray.tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                search_alg=pbt_population(spec, max_concurrent),
                scheduler=pbt_scheduler(spec),
                num_samples=spec.num_samples,
            ),
            run_config=_run_config(spec, storage, name, callbacks),
        )
    scheduler = None
    if spec.scheduler.type == "asha":
        scheduler = ASHAScheduler(
            time_attr="iteration",
            max_t=spec.iterations,
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=spec.num_samples,
            max_concurrent_trials=max_concurrent,
        ),
        run_config=_run_config(spec, storage, name, callbacks),
    )


def _run_config(spec: Spec, storage: str, name: str, callbacks: list) -> ray.tune.RunConfig:
    return ray.tune.RunConfig(
        name=name,
        storage_path=storage,
        verbose=0,
        # a failed trial is retried (its driver's node died, or a Train worker was lost: Train does not restart
        # workers itself, see WORKER_RESTARTS); its Train run resumes from its checkpoint
        failure_config=ray.tune.FailureConfig(max_failures=spec.resources.max_failures),
        callbacks=callbacks,
    )


def _check_data(spec: Spec, data: PreparedData) -> None:
    if note := data.missing_validation():
        raise DataError(note)
    _check_input_size(spec, data)


def _check_input_size(spec: Spec, data: PreparedData) -> None:
    sizes = spec.train.get("input_size", 224)
    largest = max(sizes.choices) if isinstance(sizes, Choice) else sizes.high if isinstance(sizes, Range) else sizes
    if largest <= data.images.shape[1]:
        return
    if Path(str(spec.data.source)).resolve() == data.path.resolve():  # a prepared folder: data.image_size is its own
        source = "demo" if from_demo_atlas(data.meta) else shlex.quote(str(data.meta.get("source", "SOURCE")))
        fix = (
            f"a prepared folder keeps its size: raybone data prepare {source} --image-size {largest} --out NEW "
            "(or larger), then search --data NEW"
        )
    else:
        fix = f"raise data.image_size to {largest} or more"
    raise SpecError(
        f"train.input_size {largest} is larger than the prepared images in {data.path} ({data.images.shape[1]} px); "
        f"{fix}, or lower train.input_size"
    )


def _save_provenance(spec: Spec, data: PreparedData, path: Path | str, study: Path, max_concurrent: int) -> None:
    results.write_text(dump_spec(spec), results.join(path, SPEC))
    results.write_json(
        {
            "packages": {p: version(p) for p in PACKAGES},
            "data_fingerprint": data.fingerprint,
            "data_path": str(data.path.absolute()),  # the report and export read it from any folder
            "data_meta": data.meta,
            "cwd": os.getcwd(),
            "experiment": str(path),
            "optuna_db": str(study / STUDY),
            "max_concurrent_trials": max_concurrent,
        },
        results.join(path, ENVIRONMENT),
    )
