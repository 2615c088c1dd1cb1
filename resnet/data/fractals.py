"""A formula-driven pretraining set in the spirit of FractalDB (Kataoka et al., ACCV 2020). numpy only.

Each class is an iterated function system (IFS): 2 to 4 contractive affine maps drawn once from the seed. An
image of the class is the attractor rendered by the chaos game, with per-image jitter of the maps' parameters,
its own colour, scale and placement, so that a network must learn the shape, not one fixed picture. Everything
is a function of (seed, class, image index): the same parameters give the same bytes on every machine, with no
download — the offline stand-in for ImageNet pretraining.
"""

from __future__ import annotations

import numpy as np

from resnet.data.sources import RawDataset


def sample_ifs(rng: np.random.Generator, max_singular: float = 0.85) -> tuple[np.ndarray, np.ndarray]:
    """2-4 affine maps x → A x + b with every singular value of A below `max_singular` (so the chaos game
    converges to an attractor). Returns (A: (k, 2, 2), b: (k, 2))."""
    k = int(rng.integers(2, 5))
    matrices = np.empty((k, 2, 2))
    for i in range(k):
        while True:
            candidate = rng.uniform(-1, 1, (2, 2))
            if np.linalg.svd(candidate, compute_uv=False)[0] < max_singular:
                matrices[i] = candidate
                break
    return matrices, rng.uniform(-1, 1, (k, 2))


def render_class(
    matrices: np.ndarray,
    offsets: np.ndarray,
    count: int,
    image_size: int,
    rng: np.random.Generator,
    *,
    points: int,
    jitter: float,
) -> np.ndarray:
    """`count` uint8 RGB images (count, size, size, 3) of one IFS; the chaos game runs for all images at once."""
    k = len(matrices)
    # Per-image jitter of every map parameter, as FractalDB perturbs its IFS codes to make intra-class variety.
    a = matrices[None] * (1 + jitter * rng.uniform(-1, 1, (count, k, 2, 2)))
    b = offsets[None] + jitter * rng.uniform(-1, 1, (count, k, 2))
    # Maps are picked with probability proportional to |det A|: each covers that share of the attractor.
    weights = np.abs(np.linalg.det(matrices)) + 1e-3
    choice = rng.choice(k, size=(points, count), p=weights / weights.sum())
    xy = np.zeros((count, 2))
    trail = np.empty((points, count, 2))
    rows = np.arange(count)
    for step in range(points):
        pick = choice[step]
        xy = np.einsum("nij,nj->ni", a[rows, pick], xy) + b[rows, pick]
        trail[step] = xy
    trail = trail[20:]  # the first points have not reached the attractor yet

    # Fit each image's attractor into a random fraction of the canvas at a random place.
    low, high = trail.min(axis=0), trail.max(axis=0)
    extent = np.maximum(high - low, 1e-6).max(axis=1, keepdims=True)
    scale = rng.uniform(0.6, 0.95, (count, 1)) * (image_size - 1) / extent
    span = (high - low) * scale
    origin = rng.uniform(0, 1, (count, 2)) * np.maximum(image_size - 1 - span, 0)
    pixels = np.rint((trail - low) * scale + origin).astype(np.int64).clip(0, image_size - 1)

    images = np.zeros((count, image_size, image_size, 3), dtype=np.uint8)
    colours = rng.integers(96, 256, (count, 3), dtype=np.int64).astype(np.uint8)
    image_index = np.broadcast_to(rows, pixels.shape[:2])
    images[image_index, pixels[..., 1], pixels[..., 0]] = colours[image_index]
    return images


def load_fractals(
    image_size: int,
    *,
    num_classes: int = 10,
    per_class: int = 100,
    seed: int = 0,
    points: int = 1500,
    jitter: float = 0.1,
) -> RawDataset:
    """`num_classes` IFS classes × `per_class` images, fully determined by `seed`."""
    images, labels = [], []
    for cls in range(num_classes):
        class_rng = np.random.default_rng([seed, cls])
        matrices, offsets = sample_ifs(class_rng)
        images.append(
            render_class(matrices, offsets, per_class, image_size, class_rng, points=points, jitter=jitter)
        )
        labels.append(np.full(per_class, cls, dtype=np.int64))
    classes = tuple(f"ifs{cls:03d}" for cls in range(num_classes))
    return RawDataset(np.concatenate(images), np.concatenate(labels), classes)
