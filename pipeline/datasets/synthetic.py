"""The embedded dataset: small square RGB images drawn deterministically from a seed, no network needed.

The class is a (shape, texture) pair: shapes {disk, square, triangle, cross, ring} x textures
{solid, stripes, checks, dots}, classes 0-4 solid, 5-9 striped, and so on. Everything else is a
nuisance drawn per image: position, size, rotation, texture period and phase, foreground and
background colours, a background gradient and pixel noise. Colour carries no class information, so
a representation must see shape and texture — which random crops and colour jitter preserve.
"""

from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_dir
from pipeline.datasets.splits import ArraySplit, Labeled
from pipeline.params import Params

SHAPES = ("disk", "square", "triangle", "cross", "ring")
TEXTURES = ("solid", "stripes", "checks", "dots")
CLASSES = "classes.txt"  # the raw folder: this, and images/labels .npy files per split (no pickle)


def class_names(num_classes: int) -> list[str]:
    return [f"{TEXTURES[c // len(SHAPES)]}-{SHAPES[c % len(SHAPES)]}" for c in range(num_classes)]


def generate(
    rng: np.random.Generator, num_classes: int, per_class: int, size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, 3) uint8 images and (n,) int64 labels, classes interleaved in random order. Lengths
    are given for 32 px and scale with `size`."""
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    n = len(labels)

    def draw(low: float, high: float) -> np.ndarray:  # one value per image, broadcastable over pixels
        return rng.uniform(low, high, (n, 1, 1)).astype(np.float32)

    scale = size / 32
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    radius, angle = draw(6 * scale, 11 * scale), draw(0, 2 * np.pi)
    dx, dy = (xx - draw(10 * scale, 22 * scale)) / radius, (yy - draw(10 * scale, 22 * scale)) / radius
    u = dx * np.cos(angle) + dy * np.sin(angle)  # shape coordinates: unit radius, rotated
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    inside = _shape_masks(u, v)[labels % len(SHAPES), np.arange(n)]  # (n, 32, 32)
    period = draw(3 * scale, 5.5 * scale)
    tone = _texture_masks(u * radius, v * radius, period, draw(0, 2 * np.pi))[labels // len(SHAPES), np.arange(n)]

    foreground = rng.uniform(0.35, 1.0, (n, 1, 1, 3)).astype(np.float32)
    background = (1 - foreground) * draw(0.2, 0.7)[..., None]
    background = background * (1 + draw(-0.5, 0.5)[..., None] * (xx[..., None] - size / 2) / size)
    shaded = np.where(tone[..., None], foreground, foreground * 0.4)
    image = np.where(inside[..., None], shaded, background)
    image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8), labels.astype(np.int64)


def _shape_masks(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(len(SHAPES), n, size, size) booleans, in the order of SHAPES."""
    r = np.hypot(u, v)
    au, av = np.abs(u), np.abs(v)
    return np.stack(
        [
            r <= 1,
            np.maximum(au, av) <= 0.8,
            (v <= 0.5) & (v >= np.sqrt(3) * au - 1),
            ((au <= 0.3) & (av <= 1)) | ((av <= 0.3) & (au <= 1)),
            (r >= 0.55) & (r <= 1),
        ]
    )


def _texture_masks(u: np.ndarray, v: np.ndarray, period: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """(len(TEXTURES), n, size, size) booleans: which pixels of a shape get the bright tone."""
    wave_u = np.sin(2 * np.pi * u / period + phase)
    wave_v = np.sin(2 * np.pi * v / period + phase)
    return np.stack(
        [
            np.ones_like(u, dtype=bool),
            wave_u > 0,
            (wave_u > 0) ^ (wave_v > 0),
            (wave_u > 0.5) & (wave_v > 0.5),
        ]
    )


def prepare_synthetic(params: Params, out: Path) -> None:
    """Write train and test splits (independent draws from one seed) as .npy arrays, and the class names."""
    p = params.datasets.synthetic
    rng = np.random.default_rng(p.seed)
    with atomic_dir(out) as staging:
        for split, per_class in (("train", p.train_per_class), ("test", p.test_per_class)):
            images, labels = generate(rng, p.num_classes, per_class, p.image_size)
            np.save(staging / f"{split}_images.npy", images)
            np.save(staging / f"{split}_labels.npy", labels)
        (staging / CLASSES).write_text("\n".join(class_names(p.num_classes)) + "\n")


def load_synthetic(raw: Path) -> Labeled:
    def split(name: str) -> ArraySplit:
        return ArraySplit(
            np.load(raw / f"{name}_images.npy", allow_pickle=False),
            np.load(raw / f"{name}_labels.npy", allow_pickle=False),
        )

    return Labeled((raw / CLASSES).read_text().split(), split("train"), split("test"))
