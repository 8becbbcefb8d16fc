"""One training step and six-crop prediction: plain PyTorch, no Ray, shared by training, export and benches."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from raybone.core.augment import test_crops, train_augment
from raybone.core.model import sex_feature, train_mode

if TYPE_CHECKING:
    from raybone.spec import TrainConfig


def train_step(
    model: nn.Module,
    optimizer,
    loss_fn,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    sex: torch.Tensor | None = None,
) -> torch.Tensor:
    """One optimizer step; returns the loss as a device tensor so the GPU never waits for the host."""
    train_mode(model)
    x = train_augment(images, cfg.input_size, cfg.contrast)
    with _autocast(cfg.amp, images.device, training=True):
        loss = loss_fn(_forward(model, x, sex).float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: torch.Tensor,
    input_size: int,
    batch_size: int,
    device,
    *,
    sex: torch.Tensor | None = None,
    amp: bool = False,
) -> np.ndarray:
    """Class probabilities averaged over the six test-time crops (paper section 4.2)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        crops = test_crops(images[start : start + batch_size].to(device), input_size)
        crop_sex = None if sex is None else sex[start : start + batch_size].to(device).repeat(6)
        with _autocast(amp, crops.device):
            logits = _forward(model, crops.flatten(0, 1), crop_sex).float()
        out.append(logits.softmax(-1).view(6, crops.shape[1], -1).mean(0).cpu())
    return torch.cat(out).numpy()


def predict_images(
    model: nn.Module,
    images: np.ndarray,
    size: int,
    input_size: int,
    device,
    *,
    sex_code: np.ndarray | None = None,
    batch_size: int = 64,
    amp: bool = False,
) -> np.ndarray:
    """Six-crop class probabilities [N, C] for uint8 images [N, S, S] as prepare() stores them, re-warped to
    `size` as the trial was: what the trial's validation computed. sex_code (1 male, 0 female, -1 unknown) is
    given only for a model with sex input.
    """
    out = []
    for start in range(0, len(images), 16 * batch_size):  # resize a chunk at a time: floats are 4x the bytes
        chunk = torch.from_numpy(np.array(images[start : start + 16 * batch_size], dtype=np.uint8))
        sex = None if sex_code is None else sex_feature(sex_code[start : start + len(chunk)])
        out.append(
            predict_probs(
                model,
                resize(chunk.to(device), size),
                input_size,
                batch_size,
                device,
                sex=sex,
                amp=amp,
            )
        )
    return np.concatenate(out)


def predict_trained(
    model: nn.Module, cfg: TrainConfig, images: np.ndarray, sex_code: np.ndarray, device: str
) -> np.ndarray:
    """predict_images for a trial's checkpoint (model and config from checkpoint.load_trained_model)."""
    return predict_images(
        to_layout(model.to(device), cfg.channels_last),
        images,
        cfg.resize_to,
        cfg.input_size,
        torch.device(device),
        sex_code=sex_code if cfg.sex_input else None,
        batch_size=cfg.eval_batch_size,
        amp=cfg.amp,
    )


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Re-warp a uint8 batch [N,S,S] to size x size (once per trial, when input_size is searched)."""
    if images.shape[-1] == size:
        return images
    x = torch.nn.functional.interpolate(images.unsqueeze(1).float(), size=(size, size), mode="bilinear", antialias=True)
    return x.squeeze(1).round().clamp(0, 255).to(torch.uint8)


def _forward(model: nn.Module, x: torch.Tensor, sex: torch.Tensor | None) -> torch.Tensor:
    return model(x) if sex is None else model(x, sex)


def to_layout(model: nn.Module, channels_last: bool) -> nn.Module:
    """The model's weights in NHWC where `channels_last`: tensor cores and oneDNN convolve that layout faster (on 2
    CPU cores 1.3x the fp32 training rate, bench/cpu.py). Only the weights move: a grey batch [N,1,H,W] is already
    laid out both ways."""
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _autocast(amp: bool, device: torch.device, *, training: bool = False):
    """bf16 autocast on a GPU that supports it, and for training steps on a CPU with bf16 instructions (there 1.5x
    the channels-last fp32 rate, 2.0x plain fp32's, on 2 AVX-512 cores: bench/cpu.py). CPU inference stays fp32: a
    model validated on a CPU scores what its export, and its fp32 ONNX copy, predict there, up to float rounding."""
    if device.type == "cuda":
        bf16 = amp and torch.cuda.is_bf16_supported()
    else:
        bf16 = amp and training and device.type == "cpu" and cpu_has_bf16()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


@functools.cache  # asked at every training step; the CPU does not change
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware, as x86 reports it (AVX-512 BF16 or AMX): without those bf16 is
    emulated and slower. Other architectures (ARM's BF16) are not measured and train in fp32, as does a torch
    without `torch.cpu.get_capabilities` (older releases)."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
