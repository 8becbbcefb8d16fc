import time

import numpy as np
import pandas as pd
import pytest

from raybone.data import phantom, render_hand, write_phantom_atlas

ndimage = pytest.importorskip("scipy.ndimage")


def _otsu(values: np.ndarray) -> int:
    """Grey level that best separates `values` into two classes."""
    p = np.bincount(values.ravel(), minlength=256) / values.size
    weight, mean = np.cumsum(p), np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean[-1] * weight - mean) ** 2 / (weight * (1 - weight))
    return int(np.nanargmax(between))


def _bone_area(image: np.ndarray) -> int:
    """Pixels of the brightest class within the hand: background < soft tissue < bone."""
    hand = image[image > _otsu(image)]
    return int((image > _otsu(hand)).sum())


def _fixed_frame(size: int = 256) -> "phantom._Frame":
    return phantom._Frame(origin=(size / 2, size * 0.85), scale=size * 0.6, cos=1.0, sin=0.0)


def test_render_is_deterministic_per_seed():
    first = render_hand(100, True, np.random.default_rng(5), 64)
    again = render_hand(100, True, np.random.default_rng(5), 64)
    other = render_hand(100, True, np.random.default_rng(6), 64)
    assert first.dtype == np.uint8 and first.shape == (64, 64)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_atlas_is_byte_identical_for_a_seed(tmp_path):
    a = write_phantom_atlas(tmp_path / "a", n=6, image_size=48, seed=3)
    b = write_phantom_atlas(tmp_path / "b", n=6, image_size=48, seed=3)
    c = write_phantom_atlas(tmp_path / "c", n=6, image_size=48, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 7
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "boneage.csv").read_bytes() != (c / "boneage.csv").read_bytes()


def test_atlas_has_rsna_layout_and_balanced_ages(tmp_path):
    out = write_phantom_atlas(tmp_path / "atlas", n=40, image_size=32, seed=0)
    labels = pd.read_csv(out / "boneage.csv")
    assert list(labels.columns) == ["id", "boneage", "male"]
    assert labels["id"].tolist() == list(range(1, 41))
    assert labels["boneage"].between(0, 239).all() and labels["boneage"].dtype.kind == "i"
    assert np.bincount(labels["boneage"] // 12, minlength=20).tolist() == [2] * 20
    assert labels["male"].dtype == bool and 0 < labels["male"].sum() < 40
    assert all((out / "images" / f"{i}.png").is_file() for i in labels["id"])


def test_bone_area_rises_with_age():
    # One seed gives the same exposure, position and rotation at every age, so areas compare directly.
    areas = np.array(
        [
            [
                _bone_area(render_hand(years * 12, seed % 2 == 0, np.random.default_rng(seed), 128))
                for years in (2, 8, 15)
            ]
            for seed in range(6)
        ]
    )
    assert np.all(np.diff(areas, axis=1) > 0)
    mean = areas.mean(axis=0)
    assert mean[1] > 1.3 * mean[0] and mean[2] > 1.2 * mean[1]


def test_carpal_bones_appear_one_by_one():
    def carpal_blobs(years: float) -> int:
        canvas = np.zeros((256, 256), dtype=np.float32)
        phantom._draw_carpals(canvas, _fixed_frame(), years, np.random.default_rng(0))
        return ndimage.label(canvas > 0.5)[1]

    counts = [carpal_blobs(years) for years in (0, 1, 3, 6, 12)]
    assert counts[0] <= 1 <= counts[1] <= 2
    assert counts == sorted(counts) and counts[-1] >= 7


def test_growth_plate_closes_in_adolescence():
    ray = phantom._RAYS[2]  # middle finger; its proximal phalanx
    start = np.add(ray.base, (0.0, ray.lengths[0]))

    def pieces(years: float) -> int:
        canvas = np.zeros((256, 256), dtype=np.float32)
        phantom._draw_long_bone(
            canvas,
            _fixed_frame(),
            start,
            start + (0.0, ray.lengths[1]),
            ray.radii[1],
            years,
            ray.appear[1],
            ray.fuse[1],
            False,
            False,
        )
        return ndimage.label(canvas > 0.5)[1]

    assert pieces(0.5) == 1  # shaft only: the epiphysis has not ossified yet
    assert pieces(6) == 2 and pieces(12) == 2  # separate cap behind a dark growth plate
    assert pieces(17) == 1  # fused


def test_rendering_is_fast():
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for age in range(0, 240, 12):
        render_hand(age, age % 24 == 0, rng, 256)
    assert time.perf_counter() - started < 5.0  # 20 films (~0.2 s idle); 600 must take well under a minute
