"""What the network sees, in NumPy: the six test-time crops and the sex feature. torch's versions (augment.py,
model.py) and the ONNX predictor (modelfolder/predict.py) share them, so both read an image the same way."""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N,S,S] re-warped to size x size as engine.resize does (antialiased bilinear, PIL's triangle filter
    on floats): equal to torch's result but for one grey level in under 0.1 % of pixels."""
    if images.shape[-1] == size:
        return images
    return np.stack(
        [
            np.clip(
                np.rint(np.asarray(Image.fromarray(i.astype(np.float32), "F").resize((size, size), Image.BILINEAR))),
                0,
                255,
            )
            for i in images
        ]
    ).astype(np.uint8)


def crop_origins(height: int, width: int, input_size: int) -> list[tuple[int, int]]:
    """(top, left) of the paper's five distinct test crops: the four corners, then the centre (the sixth crop
    is the centre flipped left-right)."""
    if input_size > min(height, width):
        raise ValueError(f"crop {input_size} is larger than the {height}x{width} images")
    bottom, right = height - input_size, width - input_size
    return [(0, 0), (0, right), (bottom, 0), (bottom, right), (bottom // 2, right // 2)]


def test_crops(images: np.ndarray, input_size: int) -> np.ndarray:
    """[6,B,1,c,c] float32 crops of uint8 images [B,S,S], each less its own mean, as augment.test_crops."""
    x = images[:, None].astype(np.float32) / 255
    crops = [
        x[..., top : top + input_size, left : left + input_size]
        for top, left in crop_origins(*x.shape[-2:], input_size)
    ]
    crops.append(crops[-1][..., ::-1])
    stacked = np.stack(crops)
    return stacked - stacked.mean(axis=(-2, -1), keepdims=True)


test_crops.__test__ = False  # not a pytest test


def sex_values(sex_code: np.ndarray) -> np.ndarray:
    """Prepared sex codes (1 male, 0 female, -1 unknown) as the model's input: +1, -1, 0 (float32)."""
    code = np.asarray(sex_code)
    return np.where(code == 1, 1.0, np.where(code == 0, -1.0, 0.0)).astype(np.float32)
