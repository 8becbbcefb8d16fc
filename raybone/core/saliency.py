"""Grad-CAM (Selvaraju et al., 2017): which regions of a radiograph drive the predicted bone age.

The class score's gradient, averaged over a convolutional layer's map, weighs that layer's channels; the
weighted sum, rectified and upsampled, is the saliency map. The deepest layer is the most class-specific but
also the coarsest (7x7 for a 224 px crop); on small crops a map of one or two cells cannot localise, so the
deepest candidate whose map is at least MIN_CELLS wide is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raybone.core.model import saliency_layers

MIN_CELLS = 7  # the paper's 224 px crops give GoogLeNet and VGG16 maps of 7 x 7 at their deepest layers


def grad_cam(
    model: nn.Module,
    arch: str,
    crops: torch.Tensor,
    target: torch.Tensor | None = None,
    sex: torch.Tensor | None = None,
) -> tuple[torch.Tensor, str, int]:
    """Maps [N, H, W] in [0, 1] for preprocessed crops [N, 1, H, W] (default target: the predicted class).

    Returns the maps, the name of the layer they come from and the cells on a side of its map (below MIN_CELLS
    only when no candidate layer reaches it at this input size).
    """
    layers = saliency_layers(model, arch)
    names = {module: name for name, module in model.named_modules()}
    maps: dict[nn.Module, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, _, out: maps.__setitem__(m, out)) for layer in layers]
    model.eval()
    try:
        with torch.enable_grad():
            # Frozen (finetune="head") layers build no graph unless the input asks for one.
            x = crops.float().detach().requires_grad_(True)
            logits = model(x) if sex is None else model(x, sex)
            target = logits.argmax(1) if target is None else target
            layer = next((m for m in layers if min(maps[m].shape[-2:]) >= MIN_CELLS), layers[-1])
            activation = maps[layer]
            (grads,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), activation)
    finally:
        for hook in hooks:
            hook.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=crops.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cells = min(activation.shape[-2:])
    return cam / torch.where(peak > 0, peak, 1.0), names[layer], cells  # an all-zero map stays zero
