"""The eval transform: its recipe (the identity stored in caches) and the CPU path that runs it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import EmbedcacheError
from .decode import load_rgb, thumbnail_of

RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
}


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalTransform:
    """Deterministic preprocessing: resize the short side, centre-crop, normalise.

    ``jpeg_draft`` lets the JPEG decoder downscale by 2/4/8 while decoding when
    the image is at least that much larger than needed (much faster on big
    photos; the result differs from a full decode by resampling noise only).
    """

    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    jpeg_draft: bool = True

    def __post_init__(self):
        if not 0 < self.crop <= self.resize:
            raise EmbedcacheError(
                "image size must satisfy 0 < crop <= resize, "
                f"got crop={self.crop}, resize={self.resize}"
            )

    def to_json(self) -> str:
        """Return a canonical JSON string (the identity stored in caches)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EvalTransform:
        """Rebuild the transform recorded by :meth:`to_json`."""
        d = json.loads(text)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    def with_crop(self, crop: int) -> EvalTransform:
        """Return the same recipe at another crop size (resize scales with it)."""
        resize = int(round(crop * self.resize / self.crop))
        return dataclasses.replace(self, crop=crop, resize=resize)


def resize_geometry(w: int, h: int, t: EvalTransform) -> tuple[int, int, int, int]:
    """(width, height, top, left) of a ``w`` x ``h`` image resized to ``t.resize`` on its short
    side, and where the centre crop of ``t.crop`` starts in it: the arithmetic of torchvision's
    Resize(int) + CenterCrop, shared by the CPU (:func:`preprocess`) and GPU decoders."""
    if w <= h:
        nw, nh = t.resize, int(t.resize * h / w)
    else:
        nw, nh = int(t.resize * w / h), t.resize
    return nw, nh, int(round((nh - t.crop) / 2.0)), int(round((nw - t.crop) / 2.0))


def preprocess(path: str | Path, t: EvalTransform, thumbnails: dict | None = None) -> np.ndarray:
    """Decode, resize the short side to ``t.resize``, centre-crop ``t.crop``; with
    ``thumbnails``, also put the image's grey thumbnail there under ``id(path)`` (from the image
    just decoded: a second decode for it cost 1.1-1.7 ms a photo, half the whole decode's).

    Returns
    -------
    ndarray of shape (crop, crop, 3), uint8 — channels last, as decoded; normalisation
    happens later, on the device (:class:`embedcache.backbones.Normalise`).
    """
    img = load_rgb(path, short_side=t.resize if t.jpeg_draft else None)
    if thumbnails is not None:
        thumbnails[id(path)] = thumbnail_of(img)  # by identity: a shard member is unhashable
    w, h = img.size
    nw, nh, top, left = resize_geometry(w, h, t)
    if (nw, nh) == (w, h):
        img = img.crop((left, top, left + t.crop, top + t.crop))
    else:
        # Resample only the source region that survives the crop: the same pixels as
        # resize-then-crop (same centres, same filter support), for about half the work.
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + t.crop) * sx, (top + t.crop) * sy)
        img = img.resize((t.crop, t.crop), RESAMPLE[t.interpolation], box=box)
    return np.array(img, dtype=np.uint8)  # a writable copy, so torch.from_numpy can share it
