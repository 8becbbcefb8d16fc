"""Procedural "phantom" hand radiographs whose anatomy changes with bone age like real hands.

Used for the `demo` dataset and tests: a CNN must be able to learn age from these images, so the
age cues mirror the ones radiologists read (Greulich-Pyle): bones lengthen and widen, carpal bones
ossify one by one and grow, epiphyses appear as separate caps whose dark growth plate narrows and
then fuses in adolescence. Everything is drawn in "hand units" (wrist to middle fingertip ~ 1,
x towards the thumb, y towards the fingers) and mapped to pixels by one jittered similarity transform.
A left hand seen postero-anteriorly, as in the RSNA data: thumb on the image's right.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

_JOINT = 0.012  # cartilage between adult bones, hand units
_PLATE = 0.009  # growth-plate gap left just before fusion, hand units
_BONE_CORE = 0.72  # medullary brightness relative to cortex: tubular bones look brighter at the rim


@dataclass(frozen=True)
class _Ray:
    """A metacarpal and its phalanges: base point, angle from vertical (deg, + towards thumb), bones."""

    base: tuple[float, float]
    angle: float
    lengths: tuple[float, ...]  # adult, proximal to distal
    radii: tuple[float, ...]  # adult half-widths
    appear: tuple[float, ...]  # epiphysis appearance age (male years)
    fuse: tuple[float, ...]  # epiphysis fusion age (male years)
    head_epiphysis: bool  # metacarpals 2-5 ossify at the distal head; the thumb metacarpal at its base


_RAYS = (
    _Ray(
        (-0.13, 0.16),
        -14.0,
        (0.27, 0.175, 0.105, 0.085),
        (0.022, 0.021, 0.018, 0.016),
        (2.0, 1.7, 2.7, 2.4),
        (15.5, 15.5, 15.8, 14.8),
        True,
    ),  # little
    _Ray(
        (-0.062, 0.178),
        -5.0,
        (0.32, 0.22, 0.14, 0.095),
        (0.026, 0.025, 0.021, 0.018),
        (1.9, 1.6, 2.6, 2.3),
        (15.5, 15.5, 15.8, 14.8),
        True,
    ),  # ring
    _Ray(
        (0.01, 0.185),
        0.0,
        (0.35, 0.235, 0.145, 0.10),
        (0.029, 0.027, 0.023, 0.019),
        (1.8, 1.5, 2.5, 2.2),
        (15.5, 15.5, 15.8, 14.8),
        True,
    ),  # middle
    _Ray(
        (0.085, 0.178),
        7.0,
        (0.34, 0.215, 0.125, 0.095),
        (0.028, 0.026, 0.021, 0.018),
        (1.7, 1.5, 2.5, 2.2),
        (15.5, 15.5, 15.8, 14.8),
        True,
    ),  # index
    _Ray(
        (0.16, 0.125), 38.0, (0.22, 0.16, 0.12), (0.032, 0.028, 0.024), (2.8, 2.5, 2.5), (15.2, 15.3, 14.8), False
    ),  # thumb: no middle phalanx
)

# name: centre, adult semi-axes (across, along), tilt (deg), ossification age (male years). Gaps are
# kept even at maturity so every carpal stays a separate bone in the image.
_CARPALS = {
    "capitate": ((0.008, 0.118), (0.034, 0.046), 0.0, 0.15),
    "hamate": ((-0.073, 0.112), (0.035, 0.040), 10.0, 0.3),
    "triquetrum": ((-0.092, 0.035), (0.030, 0.027), 20.0, 2.5),
    "lunate": ((-0.02, 0.033), (0.032, 0.030), 0.0, 3.5),
    "trapezium": ((0.14, 0.098), (0.030, 0.032), 0.0, 5.0),
    "trapezoid": ((0.08, 0.127), (0.023, 0.029), 0.0, 5.5),
    "scaphoid": ((0.062, 0.045), (0.040, 0.025), 35.0, 5.5),
    "pisiform": ((-0.145, 0.065), (0.017, 0.017), 0.0, 11.0),
}

# Forearm bones, distal end first: joint edge, adult half-width at the wrist and mid-shaft, epiphysis timing.
_FOREARM = (
    ((0.06, -0.008), 0.052, 0.034, 1.0, 17.0),  # radius
    ((-0.085, -0.025), 0.030, 0.024, 6.5, 16.5),  # ulna
)


def render_hand(age_months: float, male: bool, rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw one left-hand radiograph of the given bone age as a uint8 [size, size] grey image."""
    # Exposure is drawn first so that, for one seed, films of different ages share their exposure.
    exposure = _Exposure.draw(rng)
    maturity = _maturity(age_months / 12.0, male, rng)
    frame = _Frame.jittered(size, maturity, male, rng)
    bone = np.zeros((size, size), dtype=np.float32)
    tissue = np.zeros((size, size), dtype=np.float32)
    _draw_soft_tissue(tissue, frame, maturity)
    for ray in _RAYS:
        _draw_ray(bone, frame, ray, maturity, rng)
    _draw_carpals(bone, frame, maturity, rng)
    _draw_forearm(bone, frame, maturity)
    return exposure.film(tissue, bone, rng)


def write_phantom_atlas(out_dir, n: int = 600, image_size: int = 256, seed: int = 0) -> Path:
    """Write `n` phantom radiographs in RSNA layout: out_dir/images/<id>.png and out_dir/boneage.csv."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ages, males = _atlas_ages(n, rng), rng.random(n) < 0.5
    ids = np.arange(1, n + 1)
    for image_id, age, male in zip(ids, ages, males):
        # One generator per id so an image does not depend on how many others are drawn.
        pixels = render_hand(float(age), bool(male), np.random.default_rng([seed, int(image_id)]), image_size)
        Image.fromarray(pixels).save(out_dir / "images" / f"{image_id}.png", compress_level=1)
    # The CSV goes last: its presence marks a complete atlas.
    pd.DataFrame({"id": ids, "boneage": ages, "male": males}).to_csv(out_dir / "boneage.csv", index=False)
    return out_dir


def _atlas_ages(n: int, rng: np.random.Generator) -> np.ndarray:
    # Cycle through the 20 whole years so every class is equally represented, then shuffle.
    years = np.arange(n) % 20
    return rng.permutation(years * 12 + rng.integers(0, 12, size=n))


def _maturity(age_years: float, male: bool, rng: np.random.Generator) -> float:
    # Girls' bones reach each milestone earlier; the timing tables are written for boys.
    tempo = 1.0 if male else 1.1
    return max(0.0, age_years * tempo + rng.normal(0.0, 0.25))


def _growth(maturity: float) -> float:
    """Fraction of adult hand size."""
    return 0.42 + 0.58 * (1.0 - np.exp(-maturity / 5.5))


def _shaft_fraction(maturity: float) -> float:
    """Fraction of a bone's segment that is ossified shaft; cartilage fills the rest in infants."""
    return 0.6 + 0.4 * min(maturity / 15.0, 1.0) ** 0.8


def _width_factor(maturity: float) -> float:
    return 0.55 + 0.45 * min(maturity / 15.0, 1.0) ** 0.8


@dataclass(frozen=True)
class _Frame:
    """Similarity transform from hand units (y up) to pixel coordinates (row down)."""

    origin: tuple[float, float]
    scale: float
    cos: float
    sin: float

    @classmethod
    def jittered(cls, size: int, maturity: float, male: bool, rng: np.random.Generator) -> _Frame:
        adolescent_boy = 0.07 * min(max((maturity - 9.0) / 6.0, 0.0), 1.0) if male else 0.0
        scale = size * 0.6 * (0.7 + 0.3 * _growth(maturity)) * (1.0 + adolescent_boy) * rng.uniform(0.93, 1.07)
        angle = np.deg2rad(rng.uniform(-10.0, 10.0))
        origin = (size * (0.5 + rng.uniform(-0.04, 0.04)), size * (0.78 + rng.uniform(-0.04, 0.04)))
        return cls(origin, scale, float(np.cos(angle)), float(np.sin(angle)))

    def point(self, x: float, y: float) -> np.ndarray:
        rotated_x = self.cos * x - self.sin * y
        rotated_y = self.sin * x + self.cos * y
        return np.array([self.origin[0] + self.scale * rotated_x, self.origin[1] - self.scale * rotated_y])

    def direction(self, degrees_from_vertical: float) -> np.ndarray:
        """Unit pixel-space vector (x, row) of a hand-unit direction given as an angle from vertical."""
        x, y = _unit(degrees_from_vertical)
        return np.array([self.cos * x - self.sin * y, -(self.sin * x + self.cos * y)])


# ---------------------------------------------------------------- anatomy


def _draw_soft_tissue(tissue: np.ndarray, frame: _Frame, maturity: float) -> None:
    plump = 1.0 + 0.25 * (1.0 - _growth(maturity))  # infant hands are relatively chubby
    for ray in _RAYS:
        direction = _unit(ray.angle)
        tip = np.add(ray.base, direction * (sum(ray.lengths) + 0.02))
        _capsule(tissue, frame, ray.base, tip, 1.75 * ray.radii[1] * plump, 1.5 * ray.radii[1] * plump, 0.0, soft=2.0)
        knuckle = np.add(ray.base, direction * ray.lengths[0])
        _capsule(tissue, frame, ray.base, knuckle, 0.06, 0.05, 0.0, soft=2.0)
    _ellipse(tissue, frame, (0.0, 0.09), (0.17 * plump, 0.12), 0.0, 0.0, soft=2.0)
    _capsule(tissue, frame, (0.0, -1.2), (0.0, 0.02), 0.16 * plump, 0.16 * plump, 0.0, soft=2.0)


def _draw_ray(bone: np.ndarray, frame: _Frame, ray: _Ray, maturity: float, rng: np.random.Generator) -> None:
    direction = _unit(ray.angle + rng.uniform(-3.0, 3.0))  # finger spread varies between films
    start = np.asarray(ray.base, dtype=float)
    for index, (length, radius) in enumerate(zip(ray.lengths, ray.radii)):
        length *= rng.uniform(0.96, 1.04)
        end = start + direction * length
        epiphysis_at_head = ray.head_epiphysis and index == 0
        is_tuft = index == len(ray.lengths) - 1
        _draw_long_bone(
            bone, frame, start, end, radius, maturity, ray.appear[index], ray.fuse[index], epiphysis_at_head, is_tuft
        )
        start = end + direction * _JOINT


def _draw_long_bone(bone, frame, start, end, radius, maturity, appear, fuse, epiphysis_at_head, is_tuft) -> None:
    """One tubular bone inside the segment start..end (adult extent) with its epiphysis at one end."""
    if epiphysis_at_head:
        start, end = end, start  # draw from the epiphyseal end so one code path serves both
    length = float(np.linalg.norm(end - start))
    axis = (end - start) / length
    width = radius * _width_factor(maturity)
    cartilage = (1.0 - _shaft_fraction(maturity)) * length * 0.5
    cap_max = 1.1 * radius * (0.7 if epiphysis_at_head else 0.45)  # heads are rounder than base caps
    shaft_end = _draw_epiphysis(bone, frame, start, axis, cartilage, width, cap_max, maturity, appear, fuse)
    far_radius = width * (0.55 if is_tuft and not epiphysis_at_head else 0.9)
    _shaft(bone, frame, shaft_end, end - axis * cartilage, width, far_radius, waist=0.2)


def _draw_epiphysis(bone, frame, joint, axis, cartilage, width, cap_max, maturity, appear, fuse) -> np.ndarray:
    """Draw the epiphysis at `joint` (if ossified) and return where the shaft's metaphysis ends."""
    metaphysis = cartilage + 2 * cap_max + _PLATE  # the epiphysis grows into this room
    if maturity < appear:
        return joint + axis * metaphysis
    grown = 0.35 + 0.65 * min((maturity - appear) / 8.0, 1.0)
    cap_height = cap_max * grown
    centre = 0.6 * cartilage + cap_height  # infant epiphyses sit inside the cartilaginous end
    # Over the last year before fusion the shaft reaches across the plate until it meets the cap's centre.
    closing = min(max(fuse - maturity, 0.0), 1.0)
    metaphysis = centre + (metaphysis - centre) * closing
    _ellipse(bone, frame, joint + axis * centre, (1.1 * width * grown, cap_height), _degrees(axis), 0.35)
    return joint + axis * metaphysis


def _draw_carpals(bone: np.ndarray, frame: _Frame, maturity: float, rng: np.random.Generator) -> None:
    for centre, axes, angle, appear in _CARPALS.values():
        if maturity < appear:
            continue
        grown = 0.25 + 0.75 * min((maturity - appear) / 7.0, 1.0) ** 0.8
        jitter = rng.uniform(0.92, 1.05)
        _ellipse(bone, frame, centre, (axes[0] * grown * jitter, axes[1] * grown * jitter), angle, 0.3)


def _draw_forearm(bone: np.ndarray, frame: _Frame, maturity: float) -> None:
    width = _width_factor(maturity)
    axis = np.array([0.0, -1.0])  # from the wrist towards the elbow
    cartilage = (1.0 - _shaft_fraction(maturity)) * 0.05
    for joint, distal_radius, shaft_radius, appear, fuse in _FOREARM:
        joint = np.asarray(joint)
        cap_max = 0.4 * distal_radius
        metaphysis = _draw_epiphysis(
            bone, frame, joint, axis, cartilage, distal_radius * width, cap_max, maturity, appear, fuse
        )
        _shaft(bone, frame, metaphysis, joint + axis * 1.3, distal_radius * width, shaft_radius * width)


def _shaft(bone, frame, a, b, radius_a, radius_b, waist=0.0) -> None:
    """A diaphysis whose rounded ends stop at a and b rather than a capsule radius beyond them."""
    axis = (b - a) / np.linalg.norm(b - a)
    inner_a, inner_b = a + axis * radius_a, b - axis * radius_b
    if (inner_b - inner_a) @ axis <= 0:  # too short for its width: a rounded nub
        inner_a = inner_b = (a + b) / 2
    _capsule(bone, frame, inner_a, inner_b, radius_a, radius_b, 0.35, waist=waist)


def _unit(degrees_from_vertical: float) -> np.ndarray:
    theta = np.deg2rad(degrees_from_vertical)
    return np.array([np.sin(theta), np.cos(theta)])


def _degrees(axis: np.ndarray) -> float:
    """Angle from vertical (deg, + towards thumb) of a hand-unit direction."""
    return float(np.rad2deg(np.arctan2(axis[0], axis[1])))


# ---------------------------------------------------------------- rasterising


def _capsule(canvas, frame, a, b, radius_a, radius_b, rim, waist=0.0, soft=0.5) -> None:
    """Paint a tapered capsule a-b (hand units) whose half-width runs radius_a -> radius_b."""
    pa, pb = frame.point(*a), frame.point(*b)
    ra, rb = radius_a * frame.scale, radius_b * frame.scale
    rows, cols = _window(canvas, np.minimum(pa, pb) - max(ra, rb) - 2, np.maximum(pa, pb) + max(ra, rb) + 2)
    if rows is None:
        return
    y, x = np.ogrid[rows, cols]
    segment = pb - pa
    t = np.clip(((x - pa[0]) * segment[0] + (y - pa[1]) * segment[1]) / max(segment @ segment, 1e-9), 0.0, 1.0)
    distance = np.hypot(x - (pa[0] + t * segment[0]), y - (pa[1] + t * segment[1]))
    half_width = (ra + (rb - ra) * t) * (1.0 - waist * np.sin(np.pi * t))
    _paint(canvas, rows, cols, distance - half_width, half_width, rim, soft)


def _ellipse(canvas, frame, centre, semi_axes, degrees_from_vertical, rim, soft=0.5) -> None:
    """Paint an ellipse; semi_axes are (across, along) the given direction, in hand units."""
    c = frame.point(*centre)
    across, along = semi_axes[0] * frame.scale, semi_axes[1] * frame.scale
    reach = max(across, along) + 2
    rows, cols = _window(canvas, c - reach, c + reach)
    if rows is None:
        return
    y, x = np.ogrid[rows, cols]
    along_x, along_y = frame.direction(degrees_from_vertical)
    u = (x - c[0]) * along_x + (y - c[1]) * along_y
    v = (y - c[1]) * along_x - (x - c[0]) * along_y
    q = np.sqrt((u / along) ** 2 + (v / across) ** 2)
    gradient = np.sqrt((u / along**2) ** 2 + (v / across**2) ** 2) / np.maximum(q, 1e-6)
    distance = (q - 1.0) / np.maximum(gradient, 1e-6)  # first-order distance to the outline, px
    _paint(canvas, rows, cols, distance, np.full_like(distance, min(across, along)), rim, soft)


def _window(canvas: np.ndarray, low: np.ndarray, high: np.ndarray):
    """Row/column slices of the canvas covering a pixel bounding box, or (None, None) if off-canvas."""
    height, width = canvas.shape
    x0, y0 = max(int(low[0]), 0), max(int(low[1]), 0)
    x1, y1 = min(int(high[0]) + 2, width), min(int(high[1]) + 2, height)
    if x0 >= x1 or y0 >= y1:
        return None, None
    return slice(y0, y1), slice(x0, x1)


def _paint(canvas, rows, cols, distance, half_width, rim, soft) -> None:
    # Antialiased coverage from the signed distance; bones brighten towards their cortex.
    coverage = np.clip(0.5 - distance / soft, 0.0, 1.0)
    if rim:
        cortex = np.clip(1.0 + distance / np.maximum(rim * half_width, 0.75), 0.0, 1.0)
        coverage = coverage * (_BONE_CORE + (1.0 - _BONE_CORE) * cortex)
    np.maximum(canvas[rows, cols], coverage, out=canvas[rows, cols])


@dataclass(frozen=True)
class _Exposure:
    """Per-film variation of the X-ray exposure, development and scanner noise."""

    fog: float
    tissue: float
    bone: float
    contrast: float
    brightness: float
    gamma: float
    noise: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Exposure:
        return cls(
            fog=rng.uniform(0.0, 0.05),
            tissue=rng.uniform(0.2, 0.3),
            bone=rng.uniform(0.48, 0.6),
            contrast=rng.uniform(0.85, 1.15),
            brightness=rng.uniform(-0.05, 0.05),
            gamma=rng.uniform(0.8, 1.25),
            noise=rng.uniform(2.5, 8.0),
        )

    def film(self, tissue: np.ndarray, bone: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Turn tissue/bone density maps into a uint8 film image."""
        size = tissue.shape[0]
        background = 0.05 + self.fog * np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
        signal = background + self.tissue * tissue + self.bone * bone
        signal = np.clip(signal * self.contrast + self.brightness, 0.0, 1.0) ** self.gamma
        film = Image.fromarray((signal * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.5 * size / 256))
        noise = rng.normal(0.0, self.noise, size=(size, size))
        return np.clip(np.asarray(film, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
