"""The Ray Train worker loop: fine-tune one CNN with L2CE, evaluate with six crops, report.

Each Train worker receives `{"train": TrainConfig fields, "seed": int, "data": [ObjectRef]}`.
The prepared arrays come from the object store (put there once per search), so no worker
decodes an image.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from raybone.core.checkpoint import read_checkpoint, write_checkpoint
from raybone.core.engine import predict_probs, resize, to_layout, train_step
from raybone.core.loss import balanced_class_weights, create_loss
from raybone.core.metrics import readout_metrics
from raybone.core.model import create_model, parameter_groups, sex_feature
from raybone.errors import MismatchError
from raybone.spec import TrainConfig


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = TrainConfig(**loop_config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(loop_config["seed"] + rank)
    device = _device(loop_config["threads"])
    arrays = ray.get(loop_config["data"][0])
    train, val = (_Split.of(arrays, part, cfg, device) for part in (arrays["is_train"], ~arrays["is_train"]))
    num_classes = arrays["num_classes"]

    model = _prepare_model(create_model(cfg.model, num_classes, cfg.weights, cfg.finetune, cfg.sex_input), cfg)
    optimizer = torch.optim.Adam(parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.decay_steps, gamma=0.5)
    average = _average(model, cfg)
    start_from = loop_config.get("start_from") or {}  # PBT: the checkpoint of the trial this one exploits
    iteration, last_metrics, restored = _restore(model, average, optimizer, schedule, cfg, start_from.get("path"))
    # Where the run started and trains: visible in history.parquet after a restart or a lost node.
    placement = {
        "resumed_from": iteration,
        "node": ray.get_runtime_context().get_node_id(),
        "restored_from": restored,
        "exploited_from": start_from.get("trial_id"),  # PBT's lineage
    }
    if iteration >= cfg.iterations and last_metrics:
        # The run had finished before a driver crash: Tune hears its result again, placed where this run started
        # (resumed_from == iteration), so history.parquet knows it for a repeat and leaves it out.
        ray.train.report(last_metrics | placement)
    weights = balanced_class_weights(train.labels, num_classes)
    loss_fn = create_loss(cfg.loss, cfg.l2_weight, weights if cfg.class_balance == "loss" else None)
    draw = _sampler(
        train.labels,
        weights if cfg.class_balance == "sampling" else None,
        max(1, cfg.batch_size // world),
        loop_config["seed"] * 1000 + rank * 100003 + iteration,
    )

    losses, started = [], time.perf_counter()
    while iteration < cfg.iterations:
        images, labels, sex = train.batch(draw())
        losses.append(train_step(model, optimizer, loss_fn, images, labels, cfg, sex))
        schedule.step()
        if average is not None:
            average.update_parameters(_unwrap(model))
        iteration += 1
        if iteration % cfg.eval_every == 0 or iteration == cfg.iterations:
            metrics = {
                "iteration": iteration,
                "timesteps_total": iteration,  # the step Tune's loggers (TensorBoard, MLflow) plot against
                "train_loss": torch.stack(losses).mean().item(),
                "current_lr": schedule.get_last_lr()[0],
                **placement,
            }
            metrics["images_per_s"] = len(losses) * cfg.batch_size / (time.perf_counter() - started)
            if rank == 0:
                metrics |= validate(_evaluated(model, average), val, cfg, device)
            _report(metrics, model, average, optimizer, schedule, cfg, num_classes, rank)
            losses, started = [], time.perf_counter()


def validate(model: nn.Module, val: _Split, cfg: TrainConfig, device) -> dict[str, float]:
    """Six-crop validation metrics; val_rmse / val_mae score the readout the spec names."""
    probs = predict_probs(
        model,
        val.images,
        cfg.input_size,
        cfg.eval_batch_size,
        device,
        sex=val.sex,
        amp=cfg.amp,
    )
    return {f"val_{k}": v for k, v in readout_metrics(probs, val.labels.cpu().numpy(), cfg.readout).items()}


@dataclass
class _Split:
    """One split on the training device: uint8 images at the trial's size, labels, sex input (or None)."""

    images: torch.Tensor
    labels: torch.Tensor
    sex: torch.Tensor | None

    @classmethod
    def of(cls, arrays: dict, part: np.ndarray, cfg: TrainConfig, device) -> _Split:
        # The images live on the training device: batches are indexed there, never copied per step.
        images = resize(torch.from_numpy(arrays["images"][part]).to(device), cfg.resize_to)
        sex = sex_feature(arrays["sex_code"][part]).to(device) if cfg.sex_input else None
        return cls(images, torch.from_numpy(arrays["labels"][part]).to(device), sex)

    def batch(self, index: torch.Tensor) -> tuple:
        """(images, labels, sex) for train_step; sex is None for models without sex input."""
        return self.images[index], self.labels[index], None if self.sex is None else self.sex[index]


def _sampler(labels: torch.Tensor, class_weights: torch.Tensor | None, batch: int, seed: int):
    """Batches of indices: uniform, or with rare years drawn as often as common ones."""
    generator = torch.Generator(labels.device).manual_seed(seed)
    if class_weights is None:
        return lambda: torch.randint(len(labels), (batch,), generator=generator, device=labels.device)
    per_image = class_weights[labels]
    return lambda: torch.multinomial(per_image, batch, replacement=True, generator=generator)


def _device(threads: int) -> torch.device:
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(threads)  # one thread per reserved CPU, not one per machine core
    return device


def _prepare_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    # prepare_model moves the model to the device, and wraps it in DDP when there are several workers.
    model = ray.train.torch.prepare_model(to_layout(model, cfg.channels_last))
    return torch.compile(model) if cfg.compile else model


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _average(model: nn.Module, cfg: TrainConfig) -> AveragedModel | None:
    """The exponential moving average of the weights (batch-norm statistics included), or None with ema 0."""
    if not cfg.ema:
        return None
    return AveragedModel(_unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)


def _evaluated(model: nn.Module, average: AveragedModel | None) -> nn.Module:
    """The weights that are validated, checkpointed as the model and exported: the average where there is one."""
    return _unwrap(model) if average is None else average.module


def _restore(
    model: nn.Module, average: AveragedModel | None, optimizer, schedule, cfg: TrainConfig, start: str | None
) -> tuple[int, dict, str | None]:
    """Continue from the run's latest checkpoint (a restarted trial, a resumed search), else from `start` (a PBT trial
    exploiting another), else at 0. Returns the iteration, its metrics and the checkpoint's path."""
    checkpoint = ray.train.get_checkpoint() or (ray.train.Checkpoint(start) if start else None)
    if checkpoint is None:
        return 0, {}, None
    with checkpoint.as_directory() as folder:
        state = read_checkpoint(folder)
    _unwrap(model).load_state_dict(state.get("training_model", state["model"]))
    if average is not None and "average" in state:
        average.load_state_dict(state["average"])
    _load_optimizer(optimizer, state["optimizer"], checkpoint.path)
    schedule.load_state_dict(state["schedule"])
    _adopt(cfg, optimizer, schedule, state["iteration"])
    return state["iteration"], state["metrics"], checkpoint.path


def _load_optimizer(optimizer, state: dict, path: str) -> None:
    try:
        optimizer.load_state_dict(state)
    except ValueError as err:  # PyTorch: the saved parameter groups differ from the model's, in number or size
        raise MismatchError(
            "cannot continue from a checkpoint whose optimizer state does not fit the model (a VGG16 search from "
            f"before 2026-12-06, when weight decay moved to the class layer alone): rerun it under a new --name; {path}"
        ) from err


def _adopt(cfg: TrainConfig, optimizer, schedule, iteration: int) -> None:
    """This run's learning rate and weight decay over the checkpoint's: the same after a restart, PBT's
    perturbed values after an exploit (the schedule keeps halving from where the checkpoint was)."""
    schedule.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * 0.5 ** (iteration // cfg.decay_steps)
    optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay  # parameter_groups: decayed group first


def _report(
    metrics: dict,
    model: nn.Module,
    average: AveragedModel | None,
    optimizer,
    schedule,
    cfg: TrainConfig,
    num_classes: int,
    rank: int,
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:  # one copy of the weights is enough; DDP keeps replicas identical
            # "model" holds the weights that were validated (the average, with ema); training resumes from
            # "training_model" and "average" where there is an average.
            averaged = (
                {}
                if average is None
                else {"training_model": _unwrap(model).state_dict(), "average": average.state_dict()}
            )
            state = {
                "model": _evaluated(model, average).state_dict(),
                **averaged,
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "iteration": metrics["iteration"],
                "config": cfg.model_dump(),
                "num_classes": num_classes,
                "metrics": metrics,
            }
            write_checkpoint(state, folder)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)
