import math

import pytest
import torch

from raybone.core import augment

SIZE, CROP = 72, 64


def random_batch(batch=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, SIZE, SIZE), dtype=torch.uint8, generator=generator)


def seeded_augment(images, seed):
    torch.manual_seed(seed)
    return augment.train_augment(images, CROP)


def test_to_float_adds_channel_and_scales():
    images = random_batch()
    x = augment.to_float(images)
    assert x.dtype == torch.float32 and x.shape == (4, 1, SIZE, SIZE)
    torch.testing.assert_close(x[:, 0] * 255, images.float())
    assert torch.equal(augment.to_float(images.unsqueeze(1)), x)
    with pytest.raises(ValueError, match="uint8"):
        augment.to_float(images.float())


def test_train_augment_shape_device_and_zero_means():
    images = random_batch()
    out = augment.train_augment(images, CROP)
    assert out.shape == (4, 1, CROP, CROP) and out.dtype == torch.float32
    assert out.device == images.device
    torch.testing.assert_close(out.mean(dim=(-2, -1)), torch.zeros(4, 1), atol=1e-5, rtol=0)


def test_train_augment_is_seeded():
    images = random_batch()
    assert torch.equal(seeded_augment(images, 1), seeded_augment(images, 1))
    assert not torch.equal(seeded_augment(images, 1), seeded_augment(images, 2))


def test_train_augment_flips_about_half():
    # Bright left half: after a flip the right half of the output is the brighter one.
    images = torch.zeros(200, SIZE, SIZE, dtype=torch.uint8)
    images[:, :, : SIZE // 2] = 255
    out = seeded_augment(images, 0)[:, 0]
    flipped = out[:, :, CROP // 2 :].mean(dim=(1, 2)) > out[:, :, : CROP // 2].mean(dim=(1, 2))
    assert 0.35 < flipped.float().mean().item() < 0.65


def line_angles_deg(images):
    """Angle from vertical of the bright line in each [H,W] image, from second moments."""
    weights = images - images.amin(dim=(1, 2), keepdim=True)
    rows, cols = torch.meshgrid(
        torch.arange(images.shape[1], dtype=images.dtype),
        torch.arange(images.shape[2], dtype=images.dtype),
        indexing="ij",
    )
    total = weights.sum(dim=(1, 2))

    def moment(a, b):
        return (weights * a * b).sum(dim=(1, 2)) / total

    mean_r, mean_c = moment(rows, 1), moment(cols, 1)
    var_r = moment(rows, rows) - mean_r**2
    var_c = moment(cols, cols) - mean_c**2
    cov = moment(rows, cols) - mean_r * mean_c
    return torch.rad2deg(0.5 * torch.atan2(2 * cov, var_r - var_c))


def test_train_augment_rotates_within_20_degrees():
    images = torch.zeros(64, SIZE, SIZE, dtype=torch.uint8)
    images[:, :, SIZE // 2 - 1 : SIZE // 2 + 1] = 255  # thin vertical line through the centre
    angles = line_angles_deg(seeded_augment(images, 0)[:, 0]).abs()
    assert angles.max() <= augment.MAX_ROTATION_DEG + 1
    assert angles.max() > 10  # it does rotate, across the range


def test_line_angle_helper_measures_a_known_tilt():
    # A line drawn at 15 degrees from vertical must read as 15, or the test above proves nothing.
    image = torch.zeros(1, SIZE, SIZE)
    for row in range(SIZE):
        image[0, row, round(SIZE / 2 + (row - SIZE / 2) * math.tan(math.radians(15)))] = 1
    assert line_angles_deg(image).abs().item() == pytest.approx(15, abs=1)


def test_test_crops_are_exact_corners_centre_and_flip():
    images = random_batch()
    crops = augment.test_crops(images, CROP)
    assert crops.shape == (6, 4, 1, CROP, CROP)
    x = augment.to_float(images)
    far, mid = SIZE - CROP, (SIZE - CROP) // 2
    expected = [
        x[..., :CROP, :CROP],
        x[..., :CROP, far:],
        x[..., far:, :CROP],
        x[..., far:, far:],
        x[..., mid : mid + CROP, mid : mid + CROP],
    ]
    for crop, slice_ in zip(crops, expected):
        torch.testing.assert_close(crop, augment.subtract_mean(slice_))
    torch.testing.assert_close(crops[5], crops[4].flip(-1))  # means summed in another order
    torch.testing.assert_close(crops.mean(dim=(-2, -1)), torch.zeros(6, 4, 1), atol=1e-5, rtol=0)


def test_test_crops_reject_crop_larger_than_image():
    with pytest.raises(ValueError, match="larger"):
        augment.test_crops(random_batch(), SIZE + 1)
