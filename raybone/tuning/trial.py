"""One Tune trial: a Ray Train run of the worker loop (worker.py), named after the trial so a resumed search finds
its checkpoints; Train's TuneReportCallback relays each validation report to Tune."""

from __future__ import annotations

import os

import numpy as np
import ray
import ray.train
import ray.tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from raybone.data import PreparedData
from raybone.spec import Spec
from raybone.tuning.worker import train_loop_per_worker

TRIAL_DRIVER_MEMORY = 256 * 1024**2  # the trial function only waits on its Train run
NODE_START_TIMEOUT_S = 30 * 60  # how long a trial waits for the autoscaler's node (image pull, setup) per try


def trial_seed(experiment_seed: int, trial_index: int) -> int:
    """Each trial's torch/numpy seed, from the experiment seed and the trial's index."""
    return int(np.random.SeedSequence([experiment_seed, trial_index]).generate_state(1)[0])


def run_trial(config: dict, *, spec_json: str, data_ref: list, train_storage: str) -> None:
    """One Tune trial: a Train run named after the trial, so a resumed search finds its checkpoints."""
    spec = Spec.model_validate_json(spec_json)
    trial_id = ray.tune.get_context().get_trial_id()
    sampled = {k: v for k, v in config.items() if k != "trial_index"}
    r = spec.resources
    if r.max_concurrent_trials is not None:  # an autoscaling cluster: wait for a new node, not Train's 60 s
        os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(NODE_START_TIMEOUT_S))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": spec.train_config(sampled).model_dump(),
            "data": data_ref,
            "seed": trial_seed(spec.seed, config["trial_index"]),
            "threads": max(1, int(r.cpus_per_worker)),
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
            name=f"trial-{trial_id}",
            storage_path=train_storage,
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=r.max_failures),
            # The best checkpoints by the search's metric survive the trial's later iterations; Train also keeps
            # the latest, which a restarted worker group resumes from.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=spec.keep_checkpoints,
                checkpoint_score_attribute=spec.metric,
                checkpoint_score_order=spec.mode,
            ),
        ),
    )
    trainer.fit()


def trial_arrays(data: PreparedData) -> dict:
    """What a search puts in the object store once: every trial's workers read their images from it."""
    return {
        "images": data.images,
        "labels": data.labels,
        "is_train": data.is_train,
        "sex_code": data.sex_code,
        "num_classes": int(data.meta["num_classes"]),
    }
