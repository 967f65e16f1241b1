"""rank_backbones: the subsample, the cross-validated scores, the order, the reused caches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SIZE, blobs, make_tree

import embedcache.extraction as extraction
import embedcache.ranking as ranking
from embedcache import rank_backbones, scan
from embedcache.data import Sample
from embedcache.errors import EmbedcacheError
from embedcache.ranking import RankConfig, score_features, stratified_subsample

TINY = ("resnet18", "timm:test_efficientnet")
CLASSES = ("cat", "dog", "fox")


def _samples(per_class: dict[int, int]) -> list[Sample]:
    return [
        Sample(f"c{label}/{i:03d}.png", label, 1, 1)
        for label, n in per_class.items()
        for i in range(n)
    ]


@pytest.fixture
def flat(tmp_path):
    """Class folders without splits (3 classes x 10): validation is held out of them."""
    return make_tree(tmp_path / "data", splits=(), classes=CLASSES, per_class=10)


def _rank(data, workdir, **options):
    kw = {"backbones": TINY, "weights": "none", "image_size": SIZE, "device": "cpu"}
    return rank_backbones(data, workdir=workdir, progress=False, **{**kw, **options})


def test_the_subsample_takes_k_per_class_or_all_of_a_smaller_class_and_is_seeded():
    samples = _samples({0: 30, 1: 4, 2: 12})
    chosen = stratified_subsample(samples, per_class=10, seed=0)
    counts = np.bincount([s.label for s in chosen])
    assert counts.tolist() == [10, 4, 10]
    assert chosen == stratified_subsample(samples, per_class=10, seed=0)
    assert chosen != stratified_subsample(samples, per_class=10, seed=1)
    smaller = stratified_subsample(samples, per_class=5, seed=0)
    assert set(smaller) <= set(chosen)  # nested: a larger K keeps a smaller one's images
    assert [s.path for s in chosen] == sorted(s.path for s in chosen)


def test_the_subsample_comes_from_train_with_validation_held_out(flat, tmp_path):
    r = _rank(flat, tmp_path / "rank", backbones=TINY[:1], per_class=5)
    images, _ = scan(flat).with_val(val_fraction=0.2, seed=0)
    val = {str(images.root / s.path) for s in images.splits["val"]}
    rows = (tmp_path / "rank" / "subsample.csv").read_text().splitlines()
    assert rows[0] == "path,label,split" and len(rows) == 1 + 15
    assert not val & {row.split(",")[0] for row in rows[1:]}
    assert "held out" in r.held_out and r.images == 15 and r.classes == 3


def test_a_backbone_with_useless_features_ranks_last(flat, tmp_path, monkeypatch):
    real = ranking._cached_features

    def noise_for_efficientnet(cache):
        features, labels, dim = real(cache)
        if cache.name.startswith("timm_test_efficientnet"):
            features = np.random.default_rng(0).normal(size=features.shape).astype(np.float32)
        return features, labels, dim

    monkeypatch.setattr(ranking, "_cached_features", noise_for_efficientnet)
    r = _rank(flat, tmp_path / "rank", per_class=8)
    assert [row.backbone for row in r.rows] == ["resnet18", "timm:test_efficientnet"]
    good, noise = r.rows
    assert good.knn_acc >= 0.8 and good.probe_acc >= 0.8
    assert noise.knn_acc < good.knn_acc and noise.probe_acc < good.probe_acc
    assert good.images == 24 and good.feature_dim == 512 and good.seconds > 0
    lines = r.summary_lines()
    assert lines[0].startswith("resnet18 (none) ranks first of 2") and len(lines) == 3
    assert lines[1].startswith("1. resnet18 (none)") and "512-d" in lines[1]
    assert "| 2 | timm:test_efficientnet (none) |" in r.markdown()
    assert json.loads(json.dumps(r.as_dict()))["rows"][0]["backbone"] == "resnet18"


def test_a_second_call_reuses_the_caches(flat, tmp_path, monkeypatch):
    first = _rank(flat, tmp_path / "rank", per_class=4)
    built = []
    original = extraction.build_backbone
    monkeypatch.setattr(
        extraction, "build_backbone", lambda *a, **k: built.append(a) or original(*a, **k)
    )
    again = _rank(flat, tmp_path / "rank", per_class=4)
    assert built == [] and [r.extracted for r in again.rows] == [0, 0]
    assert [r.extracted for r in first.rows] == [12, 12]
    assert [(r.name, r.knn_acc, r.probe_acc) for r in again.rows] == [
        (r.name, r.knn_acc, r.probe_acc) for r in first.rows
    ]
    more = _rank(flat, tmp_path / "rank", backbones=TINY[:1], per_class=6)
    assert len(built) == 1 and more.rows[0].extracted == 6  # only the images new to the cache


def test_cross_validation_never_scores_an_image_with_a_model_that_saw_it():
    # Every image orthogonal to every other, labels drawn at random: a model that had seen an
    # image would know its label (its own nearest neighbour, a weight of its own); one that had
    # not can only guess.
    n = 80
    labels = np.random.default_rng(0).permutation(np.arange(n) % 4)
    knn, probe = score_features(np.eye(n, dtype=np.float32), labels, folds=5, seed=0)
    assert knn < 0.45 and probe < 0.45
    features, labels = blobs(20, classes=4)
    assert min(score_features(features, labels, folds=5, seed=0)) >= 0.9


def test_settings_are_checked_before_any_work(tmp_path):
    with pytest.raises(EmbedcacheError, match=r"--weights must be one value or one per backbone"):
        RankConfig(backbones=("resnet18", "resnet34"), weights=("none", "none", "none"))
    with pytest.raises(EmbedcacheError, match=r"lists resnet18 with weights none twice"):
        RankConfig(backbones="resnet18,resnet18", weights="none")
    with pytest.raises(EmbedcacheError, match=r"--per-class must be at least 2, got 1"):
        RankConfig(per_class=1)
    assert RankConfig(backbones="a, b", weights="none").pairs() == [("a", "none"), ("b", "none")]
    one = make_tree(tmp_path / "one", splits=("train",), classes=("cat",), per_class=4)
    with pytest.raises(EmbedcacheError, match=r"at least 2 classes; .* has 1"):
        _rank(one, tmp_path / "rank")
