"""Training losses: plain cross entropy and Chen's L2CE, which also penalises probability mass
placed far (in years) from the true class."""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]


def l2ce(logits: Tensor, target: Tensor, l2_weight: float) -> Tensor:
    """Batch mean of CE_i + l2_weight * sum_j softmax(logits)_ij * (j - y_i)^2."""
    classes = torch.arange(logits.shape[1], device=logits.device, dtype=logits.dtype)
    squared_years = (classes - target.unsqueeze(1).to(logits.dtype)) ** 2
    expected_squared_error = (logits.softmax(dim=1) * squared_years).sum(dim=1)
    ce = F.cross_entropy(logits, target, reduction="none")
    return (ce + l2_weight * expected_squared_error).mean()


_BUILDERS: dict[str, Callable[[float], LossFn]] = {
    "ce": lambda l2_weight: F.cross_entropy,
    "l2ce": lambda l2_weight: partial(l2ce, l2_weight=l2_weight),
}
LOSSES = tuple(_BUILDERS)


def create_loss(name: str, l2_weight: float = 0.0) -> LossFn:
    """Loss function (logits [B,C], integer targets [B]) -> scalar; "ce" ignores l2_weight."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    return _BUILDERS[name](l2_weight)
