"""Batched train/test augmentation (Chen, §4.1), run with Kornia on the batch's own device.

Inputs are uint8 batches of warped square radiographs ([B,S,S] or [B,1,S,S]); outputs are
float [.., 1, input_size, input_size] with each image's mean subtracted.
"""

from functools import cache

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from raybone.core.inputs import crop_origins

MAX_ROTATION_DEG = 20.0


def to_float(images_uint8: Tensor) -> Tensor:
    """[B,S,S] or [B,1,S,S] uint8 -> [B,1,S,S] float in [0, 1]."""
    x = images_uint8.unsqueeze(1) if images_uint8.ndim == 3 else images_uint8
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(
            f"expected a uint8 batch [B,S,S] or [B,1,S,S], got {images_uint8.dtype} {list(images_uint8.shape)}"
        )
    return x.float() / 255


def subtract_mean(x: Tensor) -> Tensor:
    """Subtract each image's own mean (over its last two axes)."""
    return x - x.mean(dim=(-2, -1), keepdim=True)


def train_augment(images: Tensor, input_size: int, contrast: float = 0.0) -> Tensor:
    """Random rotation in ±20°, random crop, random horizontal flip, optionally random brightness,
    contrast and gamma within ±`contrast`, then mean subtraction."""
    return subtract_mean(_train_pipeline(input_size, contrast)(to_float(images)))


def test_crops(images: Tensor, input_size: int) -> Tensor:
    """[6,B,1,c,c]: top-left, top-right, bottom-left, bottom-right, centre, flipped centre."""
    x = to_float(images)
    origins = crop_origins(*x.shape[-2:], input_size)
    crops = [x[..., top : top + input_size, left : left + input_size] for top, left in origins]
    crops.append(crops[-1].flip(-1))
    return subtract_mean(torch.stack(crops))


# Test modules that import this function by name would otherwise have pytest collect it as a test.
test_crops.__test__ = False


@cache
def _train_pipeline(input_size: int, contrast: float) -> nn.Sequential:
    # Rotating the whole warped image before cropping keeps most of the black corners that the
    # rotation brings in outside the crop.
    geometry = [
        K.RandomRotation(degrees=MAX_ROTATION_DEG, p=1.0),
        K.RandomCrop((input_size, input_size)),
        K.RandomHorizontalFlip(p=0.5),
    ]
    # The paper's worst errors were low-contrast films: exposure jitter teaches contrast invariance.
    span = (1 - contrast, 1 + contrast)
    exposure = [K.RandomBrightness(span, p=1.0), K.RandomContrast(span, p=1.0), K.RandomGamma(span, p=1.0)]
    return nn.Sequential(*geometry, *(exposure if contrast > 0 else []))
