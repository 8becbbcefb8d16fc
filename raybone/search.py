"""Ray Tune search: Optuna TPE proposes configs, ASHA stops weak trials, each trial is one Train run."""

from __future__ import annotations

import json
import math
import os
import socket
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

from raybone import results
from raybone.data import PreparedData, prepare
from raybone.errors import RayboneError, SpecError
from raybone.results import HISTORY, STUDY, TRIALS, history_table, trials_table, write_json, write_parquet
from raybone.spec import Choice, Range, Spec
from raybone.train import train_loop_per_worker

TRIAL_DRIVER_MEMORY = 256 * 1024**2  # the trial function only waits on its Train run
DASHBOARD_PORT = 8265
NODE_START_TIMEOUT_S = 30 * 60  # how long a trial waits for the autoscaler's node (image pull, setup) per try
# Filesystems every node of a cluster can mount: a results folder on one of them is shared.
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "ceph", "glusterfs", "fuse.glusterfs",
                       "beegfs", "fuse.gcsfuse", "fuse.juicefs"}
PACKAGES = ("raybone", "ray", "torch", "torchvision", "kornia", "optuna", "pydicom", "numpy", "pandas", "pyarrow")


@dataclass
class SearchOutcome:
    path: Path | str  # the experiment: a local folder, or a URI (str) when the storage is one
    trials: pd.DataFrame
    best: pd.Series | None


def run_search(spec: Spec, *, name: str, results_dir: str | Path, address: str | None = None,
               resume: bool = False, shared_storage: bool = False, console: Console | None = None) -> SearchOutcome:
    """Search into `results_dir/name`; `results_dir` is a local folder or a URI (s3://, gs://, file://).

    `shared_storage` asserts that a local folder is shared by every node (NFS): without it, a local folder
    on a multi-node (or autoscaling) cluster is refused. The Optuna study stays local (results.study_dir).
    """
    console = console or Console()
    remote = results.is_uri(results_dir)
    root = results.location_text(results_dir) if remote else Path(results_dir).resolve()
    path = results.join(root, name)
    study = results.study_dir(root, name)
    if resume:
        finished = _check_resumable(path, spec)
        if finished is not None:
            console.print(f"experiment {name!r} already finished ({len(finished)} trials); nothing to resume")
            return SearchOutcome(path, finished, best_row(finished, spec.metric, spec.mode))
    elif results.exists(results.join(path, "spec.yaml")):
        raise RayboneError(f"experiment {name!r} already exists in {root}; "
                           f"continue it with --resume {name} or choose another --name")
    elif remote and (study / STUDY).exists():
        raise RayboneError(f"experiment {name!r} has an Optuna study at {study / STUDY} already; "
                           "choose another --name or remove that folder")
    data = prepare_data(spec)
    _check_input_size(spec, data)
    _start_ray(address, console)
    cluster = ray.cluster_resources()
    max_concurrent = concurrent_trials(spec, cluster)
    check_storage_reaches_nodes(root, shared=shared_storage, nodes=_resource_nodes(),
                                trial_fits_now=trials_that_fit(spec, cluster) >= 1)
    study.mkdir(parents=True, exist_ok=True)
    _save_provenance(spec, data, path, study)

    # The images go into the object store once per search; each node pulls them once (see the README).
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(_run_trial, spec_json=spec.model_dump_json(), data_ref=[ray.put(_arrays(data))],
                                 train_storage=str(results.join(path, "train"))),
        {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY},
    )
    if resume:
        tuner = ray.tune.Tuner.restore(str(path), trainable, resume_errored=True)
    else:
        tuner = _new_tuner(trainable, spec, str(root), name, study, max_concurrent)
    given = min(len(spec.start_from), spec.num_samples)
    starts = f" (the first {given} from start_from)" if given else ""
    console.print(f"[bold]search[/] {name}: {spec.num_samples} trials{starts}, up to {max_concurrent} at a time, "
                  f"{spec.iterations} iterations each, data {data.path}")
    grid = tuner.fit()
    trials = trials_table(grid, spec, spec.iterations, storage_location=root if remote else None)
    write_parquet(trials, results.join(path, TRIALS))
    write_parquet(history_table(grid), results.join(path, HISTORY))
    if remote and (study / STUDY).is_file():  # a copy beside the tables, so the storage holds the whole experiment
        results.copy_file(study / STUDY, results.join(path, STUDY))
    return SearchOutcome(path, trials, best_row(trials, spec.metric, spec.mode))


def prepare_data(spec: Spec) -> PreparedData:
    """The search's data, prepared once (and cached) with the spec's settings and seed."""
    return prepare(spec.data.source, format=spec.data.format, labels=spec.data.labels,
                   image_size=spec.data.image_size, num_classes=spec.data.num_classes,
                   seed=spec.seed, val_fraction=spec.data.val_fraction)


def _check_resumable(path: Path | str, spec: Spec) -> pd.DataFrame | None:
    """Refuse folders raybone did not create (Tune's restore unpickles them); the trials if already done."""
    if not results.exists(results.join(path, "environment.json")) or not ray.tune.Tuner.can_restore(str(path)):
        name = Path(results.location_text(path).partition("?")[0]).name
        raise RayboneError(f"cannot resume {name!r}: {path} is not a raybone experiment")
    if results.exists(results.join(path, TRIALS)):
        trials = results.read_parquet(results.join(path, TRIALS))
        if len(trials) >= spec.num_samples and not (trials.status == "error").any():
            return trials
    return None


def trials_that_fit(spec: Spec, cluster: dict) -> int:
    """How many trials the cluster's present CPUs and GPUs can train at once."""
    r = spec.resources
    need = {"CPU": r.num_workers * r.cpus_per_worker, "GPU": r.num_workers * r.gpus_per_worker}
    return min(math.floor(cluster.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0)


def concurrent_trials(spec: Spec, cluster: dict) -> int:
    """How many trials train at once: resources.max_concurrent_trials where set (an autoscaling cluster: trials
    wait for the nodes it adds), else as many as the present cluster fits (more drivers would only wait)."""
    r = spec.resources
    if r.max_concurrent_trials is not None:
        return min(r.max_concurrent_trials, spec.num_samples)
    fits = trials_that_fit(spec, cluster)
    if fits < 1:
        raise SpecError(f"one trial needs {r.num_workers * r.cpus_per_worker:g} CPUs and "
                        f"{r.num_workers * r.gpus_per_worker:g} GPUs but the cluster has {cluster.get('CPU', 0):g} CPUs "
                        f"and {cluster.get('GPU', 0):g} GPUs; lower resources.num_workers / cpus_per_worker / "
                        "gpus_per_worker, or on an autoscaling cluster set resources.max_concurrent_trials "
                        "so that trials wait for the nodes it adds")
    return min(fits, spec.num_samples)


def check_storage_reaches_nodes(location: str | Path, *, shared: bool, nodes: int, trial_fits_now: bool) -> None:
    """Refuse a results folder on this machine's disk when Train workers on other nodes would write to it.

    A URI other than file:// (s3://, gs://) is reachable from every node; a local folder is when the caller
    says so (--shared-storage) or when it lies on a network filesystem (NFS, Lustre, ...).
    """
    if shared or not results.is_local(location):
        return
    folder = results.storage(location)[1]
    if _filesystem_type(folder) in NETWORK_FILESYSTEMS:
        return
    hint = "pass --storage s3://... or an NFS path with --shared-storage"
    if nodes > 1:
        raise RayboneError(f"this cluster has {nodes} nodes but results go to the local folder {folder}, "
                           f"which the other nodes cannot reach; {hint}")
    if not trial_fits_now:
        raise RayboneError(f"trials will train on nodes the autoscaler adds (no node has room for one now) but "
                           f"results go to the local folder {folder}, which those nodes cannot reach; {hint}")


def _resource_nodes() -> int:
    """Alive nodes that offer resources (a dead or draining node's entry stays in ray.nodes())."""
    return sum(1 for node in ray.nodes() if node.get("Alive") and any(v > 0 for v in node.get("Resources", {}).values()))


def _filesystem_type(folder: str) -> str | None:
    """The type of the filesystem (from /proc/self/mountinfo) that holds `folder`, if known."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    real, best, kind = os.path.realpath(folder), "", None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        point = fields[4].encode().decode("unicode_escape")  # spaces come as \040
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, right.split()[0]
    return kind


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
    if r.max_concurrent_trials is not None:  # an autoscaling cluster: wait for a new node, not Train's 60 s
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(NODE_START_TIMEOUT_S))
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
    """Seeded TPE whose study (named after the folder) lives in the local folder `path`, so optuna-dashboard
    can watch it: the experiment folder, or results/<name>/ when the storage is a URI."""
    return _IndexedOptunaSearch(
        sampler=optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup_trials(spec.num_samples)),
        objective=(spec.metric, spec.mode),
        points_to_evaluate=spec.start_from,
        study_name=path.name,
        storage=optuna.storages.RDBStorage(f"sqlite:///{path / 'optuna.db'}"),
    )


def startup_trials(num_samples: int) -> int:
    """Random trials before TPE models the results: Optuna's 10, but a third of a smaller search, so that a
    search of 10 trials or fewer is not random search under another name."""
    return min(10, max(2, num_samples // 3))


def _new_tuner(trainable, spec: Spec, storage: str, name: str, study: Path, max_concurrent: int) -> ray.tune.Tuner:
    scheduler = None
    if spec.scheduler.type == "asha":
        scheduler = ASHAScheduler(time_attr="iteration", max_t=spec.iterations,
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor)
    return ray.tune.Tuner(
        trainable,
        param_space=_tune_space(spec),
        tune_config=ray.tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=searcher(spec, study), scheduler=scheduler,
                                        num_samples=spec.num_samples, max_concurrent_trials=max_concurrent),
        run_config=ray.tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                      # a trial whose driver's node died is retried; its Train run resumes
                                      failure_config=ray.tune.FailureConfig(max_failures=spec.resources.max_failures),
                                      callbacks=[_TrialProgress(spec)]),
    )


class _IndexedOptunaSearch(OptunaSearch):
    """Adds the Optuna trial number as `trial_index`: sequential, and kept in the study across resumes."""

    def __init__(self, *, objective: tuple[str, str], **kwargs):
        super().__init__(**kwargs)
        self._objective = objective  # (metric, mode): Tune does not tell them when nothing is searched

    def _setup_study(self, mode):
        # Enqueue the start points into a new study only: a resumed one has run (or queued) them already.
        points, self._points_to_evaluate = self._points_to_evaluate, []
        super()._setup_study(mode)
        if not self._ot_study.trials:
            for point in points:
                self._ot_study.enqueue_trial(point)

    def suggest(self, trial_id: str):
        if not self._space:  # nothing searched: every trial trains the spec's fixed configuration
            if self._ot_study is None:
                self._metric, self._mode = self._metric or self._objective[0], self._mode or self._objective[1]
                self._setup_study(self._mode)
            self._ot_trials.setdefault(trial_id, self._ot_study.ask())
            config = {}
        else:
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
    return {"images": data.images, "labels": data.labels, "is_train": data.is_train, "sex_code": data.sex_code,
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
    context = start_local_ray() if address is None else ray.init(address=address)
    if context.dashboard_url:
        console.print(f"Ray dashboard: http://{context.dashboard_url}")


def start_local_ray(num_cpus: int | None = None):
    """A fresh in-process cluster ("local"), even if `ray start` left one running on this machine.

    Its workers are told their dashboard: with two Ray instances on one machine, Train's placement-group
    cleaner cannot tell which is theirs, and finished trials would keep their CPUs (later trials hang).
    """
    port = _free_port(DASHBOARD_PORT)
    return ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", dashboard_port=port,
                    include_dashboard=True, log_to_driver=False, configure_logging=False,
                    runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})


def _free_port(preferred: int) -> int:
    """`preferred` if nothing listens on it, else a free port."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise RayboneError("no free port for the Ray dashboard")


def _save_provenance(spec: Spec, data: PreparedData, path: Path | str, study: Path) -> None:
    results.write_text(yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False), results.join(path, "spec.yaml"))
    write_json({"packages": {p: version(p) for p in PACKAGES}, "data_fingerprint": data.fingerprint,
                "data_path": str(data.path), "data_meta": data.meta, "cwd": os.getcwd(),
                "experiment": str(path), "optuna_db": str(study / STUDY)}, results.join(path, "environment.json"))


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
