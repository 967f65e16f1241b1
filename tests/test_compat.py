"""Files written by an earlier embedcache still open: a cache and heads from commit 3e1f287."""

from pathlib import Path

import numpy as np

import embedcache
from embedcache.cache import open_cache

OLD = Path(__file__).parent / "fixtures" / "main_3e1f287"


def test_a_cache_from_an_earlier_version_opens_with_its_labels_and_features():
    with open_cache(OLD / "cache.h5") as c:
        assert c.classes == ["cat", "dog", "owl"]
        assert sorted(c.splits) == ["train", "val"]
        labels = c.labels("train")
        assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert c.features("train")[:].shape == (12, 512)


def test_heads_from_an_earlier_version_load_and_predict_the_classes_they_were_chosen_with():
    with open_cache(OLD / "cache.h5") as c:
        x, y = c.features("val")[:], c.labels("val")
    for name in ("head.pt", "linear.pt"):
        head, ckpt = embedcache.load_head(OLD / name)
        import torch

        with torch.no_grad():
            logits = head(torch.from_numpy(np.asarray(x, np.float32))).numpy()
        acc = float((logits.argmax(1) == y).mean())
        assert abs(acc - ckpt.metrics["val_acc"]) < 1e-6, name
        assert ckpt.temperature == 1.0, name  # saved before temperatures were fitted
