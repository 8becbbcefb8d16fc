"""One Tune trial: a Ray Train run of the worker loop (worker.py), named after the trial so that a resumed search
finds its checkpoints.

The trial relays Train's reports to Tune itself: a Train callback puts each report in a queue, and the trial's own
function reports it to Tune, returning only once every report is relayed. (Train's TuneReportCallback leaves the
reports for Tune's trainable to fetch from its own thread; when a run ends right after its last report, the
function's end reaches Tune's one-slot result queue first, and moving that last report there blocks for ever.
Ray's 2 s controller poll made the race rare; it also delayed every report and every run's end by up to 2 s, and
polling sooner is what cuts that.)

Population Based Training needs more: Tune must hold a checkpoint of each trial to hand to the trials that exploit
it. Under PBT each relayed report carries a small Tune checkpoint that points at the Train checkpoint of that
report; a trial that exploits another starts a new Train run of its own whose workers load the other's checkpoint
(the worker loop's `start_from`), at its iteration, with the perturbed configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import tempfile
import threading
import uuid
import zlib
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.tune
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue

from raybone.data import PreparedData
from raybone.errors import MismatchError, RayboneError
from raybone.experiments.storage import as_location, exists, join, read_text, write_text
from raybone.spec import Spec
from raybone.tuning.pbt import within_space
from raybone.tuning.tables import worker_errors
from raybone.tuning.worker import train_loop_per_worker

TRIAL_DRIVER_MEMORY = 256 * 1024**2  # the trial function only waits on its Train run
NODE_START_TIMEOUT_S = 30 * 60  # how long a trial waits for the autoscaler's node (image pull, setup) per try
POINTER = "train_checkpoint.json"  # a PBT trial's Tune checkpoint: where its Train checkpoint is
CONTROLLER_POLL_S = 0.25  # how often Train's controller polls its workers (Ray's default: 2 s), see above
# Train retries a worker group that cannot be placed without end: a trial whose CPUs are held by something else
# waited silently for ever (a search hung). After this many retries the trial errors with Train's message.
WORKER_START_RETRIES = 2
# A lost or preempted worker fails the Train run; Tune restarts the trial (resources.max_failures), which resumes the
# run from its checkpoint. Train's own restart could race any trial Tune stops (ASHA, PBT): Ray marks the stopped
# trial's Train controller dead and kills its workers while the controller's process still runs; that controller
# then started a new worker group after Train's placement-group cleaner had cleaned up and exited, so the new
# group's placement group held its CPUs until the search ended and later trials could not be placed. (A trial
# stopped while its workers start could still retry the start; schedulers stop trials only after a report.)
WORKER_RESTARTS = 0
# Weights or a checkpoint that do not fit (a MismatchError) fail every try alike, but Tune's FailureConfig retries
# every error, and each retry trained a whole Train run until it met the error again. The error is written beside
# the trial's Train runs (shared storage, which any node reaches), and a retry within the same search raises it at
# once; `search_run` tells the searches apart, so a resume (a new search_run) tries again: the cause may be fixed.
MISMATCH = "mismatch.json"


def trial_seed(experiment_seed: int, trial_index: int) -> int:
    """Each trial's torch/numpy seed, from the experiment seed and the trial's index."""
    return int(np.random.SeedSequence([experiment_seed, trial_index]).generate_state(1)[0])


def run_trial(config: dict, *, spec_json: str, data_ref: list, train_storage: str, search_run: str) -> None:
    """One Tune trial (see the module docstring); `search_run` names this run of the search (see MISMATCH)."""
    spec = Spec.model_validate_json(spec_json)
    trial_id = ray.tune.get_context().get_trial_id()
    mismatch = (join(train_storage, f"trial-{trial_id}", MISMATCH), search_run)
    _raise_a_mismatch_met_before(*mismatch)
    if spec.resources.max_concurrent_trials is not None:  # an autoscaling cluster: wait for a new node
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(NODE_START_TIMEOUT_S))
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(CONTROLLER_POLL_S))
    pbt = spec.scheduler.type == "pbt"
    start = _pointer(ray.tune.get_checkpoint()) if pbt else None
    if start is None or start["trial_id"] == trial_id:  # a new trial, or itself after a restart: its own run
        run, donor = (start or {}).get("run", f"trial-{trial_id}"), None
    else:  # PBT, exploiting another trial: a new run of its own, from the other's checkpoint
        run, donor = f"trial-{trial_id}-{uuid.uuid4().hex[:6]}", start
    reports = Queue(actor_options={"num_cpus": 0})
    trainer = _trainer(spec, config, data_ref, train_storage, run, [_Relay(reports)], donor)
    _relay_to_tune(trainer, reports, {"trial_id": trial_id, "run": run} if pbt else None, mismatch)


def trial_arrays(data: PreparedData) -> dict:
    """What a search puts in the object store once: every trial's workers read their images from it."""
    return {
        "images": data.images,
        "labels": data.labels,
        "is_train": data.is_train,
        "sex_code": data.sex_code,
        "num_classes": int(data.meta["num_classes"]),
    }


def _trainer(
    spec: Spec,
    config: dict,
    data_ref: list,
    storage: str,
    run: str,
    callbacks: list,
    donor: dict | None = None,
) -> TorchTrainer:
    r = spec.resources
    # PBT clips in Tune's config; this clip is for an experiment started before that, resumed with its old scheduler.
    sampled = within_space({k: v for k, v in config.items() if k != "trial_index"}, spec)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": spec.train_config(sampled).model_dump(),
            "data": data_ref,
            # A PBT run that exploits another draws its own batches: its seed follows the run, not the donor.
            "seed": trial_seed(spec.seed, config["trial_index"] if donor is None else zlib.crc32(run.encode())),
            "threads": max(1, int(r.cpus_per_worker)),
            # PBT: where this run starts when its own run has no checkpoint yet, and whose that checkpoint is
            "start_from": None if donor is None else donor_start(donor, storage),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=r.num_workers,
            use_gpu=r.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": r.cpus_per_worker,
                **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=run,
            storage_path=storage,
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(
                max_failures=WORKER_RESTARTS,
                max_preemption_failures=WORKER_RESTARTS,
                controller_failure_limit=WORKER_START_RETRIES,
            ),
            # The best checkpoints by the search's metric survive the trial's later iterations; Train also keeps
            # the latest, which a restarted trial resumes from. Under PBT every one stays: a trial may
            # exploit another at any report.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=None if spec.scheduler.type == "pbt" else spec.keep_checkpoints,
                checkpoint_score_attribute=spec.metric,
                checkpoint_score_order=spec.mode,
            ),
        ),
    )


class _Relay(ray.train.UserCallback):
    """On the Train controller: each report, with its checkpoint's path, to the trial."""

    def __init__(self, reports: Queue):
        self._reports = reports

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self._reports.put({**metrics[0], **({"checkpoint_path": checkpoint.path} if checkpoint else {})})


def _relay_to_tune(
    trainer: TorchTrainer, reports: Queue, pointer: dict | None, mismatch: tuple[str, str] | None = None
) -> None:
    """Train in a thread; report each of its results to Tune, under PBT with a `pointer` to its checkpoint. A
    MismatchError the run ends with is recorded at `mismatch` (where, and for which search run: see MISMATCH)."""
    failure = []
    thread = threading.Thread(target=lambda: _fit(trainer, failure), daemon=True)
    thread.start()
    while thread.is_alive() or not reports.empty():
        try:
            metrics = reports.get(timeout=CONTROLLER_POLL_S)  # no report can come sooner than the next poll
        except queue.Empty:
            continue
        if pointer is None:
            ray.tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / POINTER).write_text(json.dumps({**pointer, "path": metrics.get("checkpoint_path")}))
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(folder))
    if failure:
        error = _own_error(failure[0])
        if mismatch is not None and isinstance(error, MismatchError):
            where, search_run = mismatch
            with contextlib.suppress(OSError):  # the record only saves retries; the user must see the trial's error
                write_text(json.dumps({"search_run": search_run, "message": str(error)}), where)
        raise error


def _raise_a_mismatch_met_before(where: str, search_run: str) -> None:
    if exists(where):
        met = json.loads(read_text(where))
        if met["search_run"] == search_run:
            raise MismatchError(met["message"])


def _own_error(err: BaseException) -> BaseException:
    """The message raybone raised on a worker (a checkpoint it cannot continue) over Train's wrapper, which leads
    with the worker's traceback; any other failure as it is."""
    return next((failure for failure in worker_errors(err) if isinstance(failure, RayboneError)), err)


def _fit(trainer: TorchTrainer, failure: list) -> None:
    try:
        trainer.fit()
    except BaseException as err:  # raised again in the trial's own thread
        failure.append(err)


def donor_start(donor: dict, storage: str) -> dict:
    """Where a PBT run that exploits `donor` starts: the donor's checkpoint as a location its workers open without
    being told the filesystem. Ray reports the path without its scheme, which on a bucket is no local path: every
    exploit on s3:// or gs:// storage failed ("URI has empty scheme")."""
    return {"path": as_location(donor["path"], storage), "trial_id": donor["trial_id"]}


def _pointer(checkpoint: ray.tune.Checkpoint | None) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / POINTER).read_text())
