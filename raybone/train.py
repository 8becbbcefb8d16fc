"""The Ray Train worker loop: fine-tune one CNN with L2CE, evaluate with six crops, report.

Each Train worker receives `{"train": TrainConfig fields, "seed": int, "data": [ObjectRef]}`.
The prepared arrays come from the object store (put there once per search), so no worker
decodes an image.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from torch import nn

from raybone.checkpoint import CHECKPOINT_FILE, read_checkpoint
from raybone.engine import predict_probs, train_step
from raybone.loss import create_loss
from raybone.metrics import classification_metrics
from raybone.model import create_model, parameter_groups
from raybone.spec import TrainConfig


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = TrainConfig(**loop_config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(loop_config["seed"] + rank)
    device = _device(loop_config["threads"])
    arrays = ray.get(loop_config["data"][0])
    # The uint8 images live on the training device: batches are indexed there, never copied per step.
    train_x, train_y, val_x, val_y = (t.to(device) for t in _split_tensors(arrays))
    num_classes = arrays["num_classes"]

    model = _prepare_model(create_model(cfg.model, num_classes, cfg.weights, cfg.finetune), cfg, device)
    optimizer = torch.optim.Adam(parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.decay_steps, gamma=0.5)
    iteration, last_metrics = _restore(model, optimizer, schedule)
    if iteration >= cfg.iterations and last_metrics:
        ray.train.report(last_metrics)  # the run finished before a driver crash: tell Tune its result again
    # Where the run started and trains: visible in history.parquet after a restart or a lost node.
    placement = {"resumed_from": iteration, "node": ray.get_runtime_context().get_node_id()}
    loss_fn = create_loss(cfg.loss, cfg.l2_weight)
    batches = torch.Generator(device).manual_seed(loop_config["seed"] * 1000 + rank * 100003 + iteration)
    per_worker_batch = max(1, cfg.batch_size // world)

    losses, started = [], time.perf_counter()
    while iteration < cfg.iterations:
        index = torch.randint(len(train_y), (per_worker_batch,), generator=batches, device=device)
        losses.append(train_step(model, optimizer, loss_fn, train_x[index], train_y[index], cfg))
        schedule.step()
        iteration += 1
        if iteration % cfg.eval_every == 0 or iteration == cfg.iterations:
            metrics = {"iteration": iteration, "train_loss": torch.stack(losses).mean().item(),
                       "lr": schedule.get_last_lr()[0], **placement}
            metrics["images_per_s"] = len(losses) * cfg.batch_size / (time.perf_counter() - started)
            if rank == 0:
                probs = predict_probs(_unwrap(model), val_x, cfg.input_size, cfg.eval_batch_size, device,
                                      amp=cfg.amp, channels_last=cfg.channels_last)
                metrics |= {f"val_{k}": v for k, v in classification_metrics(probs, val_y.cpu().numpy()).items()}
            _report(metrics, model, optimizer, schedule, cfg, num_classes, rank)
            losses, started = [], time.perf_counter()


def _device(threads: int) -> torch.device:
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(threads)  # one thread per reserved CPU, not one per machine core
    return device


def _prepare_model(model: nn.Module, cfg: TrainConfig, device) -> nn.Module:
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # moves to the device; DDP when there are several workers
    return torch.compile(model) if cfg.compile else model


def _split_tensors(arrays: dict) -> tuple[torch.Tensor, ...]:
    images, labels = torch.from_numpy(arrays["images"]), torch.from_numpy(arrays["labels"])
    is_train = torch.from_numpy(arrays["is_train"])
    return images[is_train], labels[is_train], images[~is_train], labels[~is_train]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _restore(model: nn.Module, optimizer, schedule) -> tuple[int, dict]:
    """Continue from the run's latest checkpoint (worker restart or resumed search); else start at 0."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, {}
    with checkpoint.as_directory() as folder:
        state = read_checkpoint(folder)
    _unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return state["iteration"], state["metrics"]


def _report(metrics: dict, model: nn.Module, optimizer, schedule, cfg: TrainConfig, num_classes: int,
            rank: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:  # one copy of the weights is enough; DDP keeps replicas identical
            state = {
                "model": _unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "iteration": metrics["iteration"],
                "config": cfg.model_dump(),
                "num_classes": num_classes,
                "metrics": metrics,
            }
            torch.save(state, Path(folder) / CHECKPOINT_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)
