"""Shared fixtures: tiny generated image folders and small random-init backbones."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

HYMENOPTERA = Path(
    os.environ.get(
        "EMBEDCACHE_HYMENOPTERA",
        Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera",
    )
)
# Small random-init backbones from both providers; image size 64 keeps a forward pass in
# milliseconds.
SMALL_BACKBONES = ["resnet18", "timm:test_efficientnet"]
SIZE = 64
# Hue per class, so that even a random-init backbone separates the classes a little.
CLASS_COLOURS = [(200, 40, 40), (40, 60, 200), (40, 180, 60)]


def tool(name: str) -> ModuleType:
    """A script of the checkout's tools/ folder (not part of the package), imported by file."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_image(
    path: Path, label: int, seed: int, size: tuple[int, int] = (48, 40), fmt: str | None = None
) -> Path:
    """A noisy image whose mean colour depends on ``label``."""
    rng = np.random.default_rng(seed)
    base = np.array(CLASS_COLOURS[label % len(CLASS_COLOURS)], np.float64)
    pixels = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, format=fmt)
    return path


def make_tree(
    root: Path,
    *,
    splits=("train", "val"),
    classes=("cat", "dog"),
    per_class=6,
    ext=".png",
    start_seed=0,
) -> Path:
    """root/<split>/<class>/<i>.png (or root/<class>/... when ``splits`` is empty)."""
    seed = start_seed
    for split in splits or (None,):
        for label, cls in enumerate(classes):
            folder = root / split / cls if split else root / cls
            for i in range(per_class):
                make_image(folder / f"{cls}_{i:03d}{ext}", label, seed)
                seed += 1
    return root


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file below ``root`` (to prove nothing was modified)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = (
                hashlib.sha256(p.read_bytes()).hexdigest(),
                p.stat().st_mtime_ns,
            )
    return out


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A labelled split tree: train/val x cat/dog x 6 images."""
    return make_tree(tmp_path / "data")


@pytest.fixture
def extract_kw() -> dict:
    """Fast, deterministic extract settings for unit tests."""
    return {
        "backbone": "resnet18",
        "weights": "none",
        "image_size": SIZE,
        "batch_size": 4,
        "num_workers": 0,
        "device": "cpu",
        "precision": "fp32",  # the same arithmetic on every CPU (auto is bf16 where it is native)
        "progress": False,
    }


@pytest.fixture(scope="session")
def lite0_available() -> bool:
    from embedcache.backbones import lite0_weights_available

    return lite0_weights_available()


def blobs(
    n_per_class: int,
    dim: int = 16,
    classes: int = 3,
    seed: int = 0,
    spread: float = 1.0,
    dtype=np.float16,
):
    """Gaussian blobs: features (N, dim), labels (N,), one centre per class."""
    centres = np.random.default_rng(1234).normal(0, 3, (classes, dim))  # shared by every split
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    features = (
        centres[labels] + rng.normal(0, spread, (len(labels), dim)) * 3 + 5.0
    )  # offset: standardisation matters
    return features.astype(dtype), labels


@pytest.fixture
def make_cache(tmp_path):
    """Factory for small synthetic caches:
    ``make_cache(name, train=(X, y), val=(X, y), classes=[...])``."""
    from embedcache.cache import write_cache

    def make(
        name="blobs.h5", *, classes=("a", "b", "c"), backbone="resnet18", views=None, **splits
    ):
        arrays = {
            s: (x, y, [f"{s}/{i}.png" for i in range(len(y))]) for s, (x, y) in splits.items()
        }
        return write_cache(
            tmp_path / name,
            arrays,
            classes=list(classes),
            backbone=backbone,
            weights="none",
            transform='{"crop": 64}',
            views=views,
        )

    return make


@pytest.fixture
def blob_cache(make_cache):
    """3 classes x (40 train, 15 val) Gaussian blobs, 16-d."""
    return make_cache(train=blobs(40, seed=0), val=blobs(15, seed=1, spread=1.0))


def _recorded(monkeypatch, name: str) -> list:
    """Every ``runtime.<name>`` (a class the runs wrap the backbone in) the test makes, in
    order."""
    import embedcache.runtime as runtime

    made: list = []

    class Recorded(getattr(runtime, name)):
        def __init__(self, net):
            super().__init__(net)
            made.append(self)

    monkeypatch.setattr(runtime, name, Recorded)
    return made


@pytest.fixture
def frozen_graphs(monkeypatch) -> list:
    """Every runtime.FrozenGraph the test makes, in order (to see which runs used one)."""
    return _recorded(monkeypatch, "FrozenGraph")


@pytest.fixture
def folds(monkeypatch) -> list:
    """Every runtime.Folded (BatchNorm folded, folding.py) the test makes, in order."""
    return _recorded(monkeypatch, "Folded")
