"""Training losses: plain cross entropy and Chen's L2CE, which also penalises probability mass
placed far (in years) from the true class."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from raybone.core.catalog import LOSSES

LossFn = Callable[[Tensor, Tensor], Tensor]


def l2ce(logits: Tensor, target: Tensor, l2_weight: float, class_weights: Tensor | None = None) -> Tensor:
    """Batch mean of CE_i + l2_weight * sum_j softmax(logits)_ij * (j - y_i)^2."""
    classes = torch.arange(logits.shape[1], device=logits.device, dtype=logits.dtype)
    squared_years = (classes - target.unsqueeze(1).to(logits.dtype)) ** 2
    expected_squared_error = (logits.softmax(dim=1) * squared_years).sum(dim=1)
    ce = F.cross_entropy(logits, target, reduction="none")
    return _weighted_mean(ce + l2_weight * expected_squared_error, target, class_weights)


def _weighted_mean(per_image: Tensor, target: Tensor, class_weights: Tensor | None) -> Tensor:
    """Plain mean, or weighted by each image's class weight (rare years count more)."""
    if class_weights is None:
        return per_image.mean()
    weights = class_weights[target]
    return (per_image * weights).sum() / weights.sum()


def create_loss(name: str, l2_weight: float = 0.0, class_weights: Tensor | None = None) -> LossFn:
    """Loss function (logits [B,C], integer targets [B]) -> scalar; "ce" is L2CE with l2_weight 0."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    return partial(l2ce, l2_weight=l2_weight if name == "l2ce" else 0.0, class_weights=class_weights)


def balanced_class_weights(labels: Tensor, num_classes: int) -> Tensor:
    """Inverse class frequency, normalised to mean 1 over the classes present; absent classes get 0."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    weights = torch.where(counts > 0, 1 / counts.clamp(min=1), torch.zeros_like(counts))
    return weights * (counts > 0).sum() / weights.sum()
