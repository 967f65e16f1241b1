"""Train-time augmentation, and the views a cache stores per image (extract --views)."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .decode import load_rgb
from .splits import name_bytes
from .transform import RESAMPLE, EvalTransform, preprocess

_CROP_SCALE = {"light": (0.25, 1.0), "strong": (0.08, 1.0)}


def augment(
    item: tuple[str | Path, int | tuple[int, ...]], t: EvalTransform, kind: str
) -> np.ndarray:
    """Train-time view of an image, reproducible from its seed.

    ``item`` is ``(path, seed)``. ``light``: random resized crop (scale 0.25-1,
    aspect 3/4-4/3) and horizontal flip; ``strong``: crop scale 0.08-1, flip
    and colour jitter (brightness, contrast, saturation +-40%). ``none``: the
    eval transform.

    Returns
    -------
    ndarray of shape (crop, crop, 3), uint8.
    """
    path, seed = item
    if kind == "none":
        return preprocess(path, t)
    return augmented_views(path, t, kind, [seed])[0]


def augmented_views(path: str | Path, t: EvalTransform, kind: str, seeds: list) -> list[np.ndarray]:
    """One :func:`augment` view per seed, the file decoded once."""
    img = load_rgb(path, short_side=t.crop if t.jpeg_draft else None)
    return [_augmented(img, np.random.default_rng(seed), t, kind) for seed in seeds]


def _augmented(
    img: Image.Image, rng: np.random.Generator, t: EvalTransform, kind: str
) -> np.ndarray:
    w, h = img.size
    lo, hi = _CROP_SCALE[kind]
    box = None
    for _ in range(10):  # torchvision's RandomResizedCrop sampling
        area = w * h * rng.uniform(lo, hi)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (x0, y0, x0 + cw, y0 + ch)
            break
    if box is None:  # fall back to the central square
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    img = img.resize((t.crop, t.crop), RESAMPLE[t.interpolation], box=box)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if kind == "strong":
        from PIL import ImageEnhance

        for i in rng.permutation(3):
            enhancer = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[i]
            img = enhancer(img).enhance(float(rng.uniform(0.6, 1.4)))
    return np.array(img, dtype=np.uint8)


# ---------------------------------------------------------------------------
# Views stored in a cache (extract --views)

VIEW_POLICY = "flip, then light random resized crops"


def views_for(split: str, views: int) -> int:
    """Views a cache stores per image of ``split``: all ``views`` for train, the flip alone
    for val, test and unlabelled images (what test-time averaging uses), none without --views."""
    if views <= 0:
        return 0
    return views if split == "train" else 1


def view_policy(views: int, seed: int) -> str:
    """How ``extract --views`` draws its views: part of the cache identity ("" without views)."""
    return f"{VIEW_POLICY} (scale {_CROP_SCALE['light'][0]}-1), seed {seed}" if views else ""


def view_key(seed: int, path: str) -> tuple[int, int]:
    """The seed of one image's views: from the path relative to the data root, so the same
    image gets the same views in a resumed, incremental or moved extraction."""
    return seed, zlib.crc32(name_bytes(path))


def with_views(item: tuple[str | Path, int, tuple[int, int]], t: EvalTransform) -> np.ndarray:
    """An image's eval crop followed by its ``n`` stored views: (1 + n, crop, crop, 3) uint8.

    ``item`` is ``(path, n, key)``. View 1 is the eval crop mirrored left-right; views
    2..n are :func:`augment`'s ``light`` views seeded by ``(*key, v)``.
    """
    path, n, key = item
    plain = preprocess(path, t)
    out = [plain, np.ascontiguousarray(plain[:, ::-1])][: 1 + n]
    if n > 1:
        out += augmented_views(path, t, "light", [(*key, v) for v in range(1, n)])
    return np.stack(out)
