"""Skewed classes: balanced class weights, the balanced sampler, and reports that lead with
balanced accuracy."""

import numpy as np
import pytest
from click.testing import CliRunner

import embedcache
from embedcache.cli import main
from embedcache.errors import EmbedcacheError
from embedcache.feed import Rows
from embedcache.train.features import balanced_weights, skew


def _skewed(n_major=400, n_minor=8, seed=0, dim=8):
    """Two overlapping classes, 50:1 in train: a plain fit all but ignores the minor one."""
    rng = np.random.default_rng(seed)
    x0 = rng.normal(0.0, 1.0, (n_major, dim))
    x1 = rng.normal(0.9, 1.0, (n_minor, dim))
    x = np.concatenate([x0, x1]).astype(np.float32)
    return x, np.r_[np.zeros(n_major, np.int64), np.ones(n_minor, np.int64)]


def test_balanced_weights_make_every_present_class_weigh_the_same():
    y = np.array([0] * 10 + [2] * 2)
    w = balanced_weights(y, 3)
    assert w.tolist() == pytest.approx([12 / 20, 0.0, 12 / 4])
    assert np.bincount(y, weights=w[y], minlength=3).tolist() == pytest.approx([6, 0, 6])
    assert skew(y, 3) == 5.0
    assert skew(np.array([0, 1, -1]), 2) == 1.0


@pytest.fixture
def skewed_cache(make_cache):
    train = _skewed()
    val = _skewed(100, 100, seed=1)  # balanced validation: balanced accuracy is accuracy
    return make_cache("skewed.h5", classes=("common", "rare"), train=train, val=val)


@pytest.mark.parametrize("head", ["logreg", "linear"])
def test_balanced_class_weights_raise_balanced_accuracy_on_skewed_classes(skewed_cache, head):
    kw = {"head": head, "progress": False, "epochs": 60}
    plain = embedcache.train_head(skewed_cache, class_weight="none", **kw).metrics
    balanced = embedcache.train_head(skewed_cache, class_weight="balanced", **kw).metrics
    assert plain["class_weight"] == {"skew": 50.0, "used": "none"}
    assert balanced["class_weight"]["used"] == "balanced"
    assert plain["val_recall"]["rare"]["recall"] < 0.5
    assert balanced["val_balanced_acc"] > plain["val_balanced_acc"] + 0.1


def test_the_default_head_tries_balanced_weights_on_skewed_classes_and_keeps_the_better(
    skewed_cache, make_cache
):
    m = embedcache.train_head(skewed_cache, progress=False).metrics
    w = m["class_weight"]
    assert set(w["val_balanced_acc"]) == {"none", "balanced"}
    assert w["used"] == "balanced" and w["p_value"] < 0.01  # on this set it helps, by a lot
    assert w["val_balanced_acc"]["balanced"] > w["val_balanced_acc"]["none"] + 0.1
    # not skewed: nothing tried, no weights
    even = make_cache("even.h5", classes=("a", "b"), train=_skewed(50, 40), val=_skewed(20, 20, 1))
    m = embedcache.train_head(even, progress=False).metrics
    assert m["class_weight"] == {"skew": 1.25, "used": "none"}


def test_a_refit_keeps_the_class_weights_it_chose(make_cache):
    x, y = _skewed()
    cache = make_cache("noval.h5", classes=("common", "rare"), train=(x, y))
    r = embedcache.train_head(cache, head="logreg", class_weight="balanced", progress=False)
    plain = embedcache.train_head(cache, head="logreg", class_weight="none", progress=False)
    assert "refit" in r.metrics
    xs = torch_predict(r.head, x)
    assert (xs[y == 1] == 1).mean() > (torch_predict(plain.head, x)[y == 1] == 1).mean()


def torch_predict(head, x):
    import torch

    with torch.no_grad():
        return head.eval()(torch.from_numpy(x)).argmax(1).numpy()


def test_the_balanced_sampler_shows_every_class_about_as_often():
    x, y = _skewed(900, 100)
    rows = Rows(x, y, np.arange(len(y)), in_memory=True)
    seen = np.concatenate([yb for _, yb in rows.balanced_batches(64, np.random.default_rng(0))])
    assert len(seen) == len(y)
    assert 0.45 < seen.mean() < 0.55  # class 1 is 10% of the rows, half of the draws
    streamed = Rows(x, y, np.arange(len(y)), in_memory=False)
    again = [b for b in streamed.balanced_batches(64, np.random.default_rng(0))]
    assert np.array_equal(np.concatenate([b[1] for b in again]), seen)
    first = next(rows.balanced_batches(64, np.random.default_rng(0)))
    assert np.array_equal(first[0], again[0][0])  # the same images, in memory or streamed


def test_the_sampler_helps_the_linear_head_on_skewed_classes(skewed_cache):
    kw = {"head": "linear", "progress": False, "epochs": 60, "class_weight": "none"}
    plain = embedcache.train_head(skewed_cache, **kw).metrics
    sampled = embedcache.train_head(skewed_cache, sampler="balanced", **kw).metrics
    assert sampled["config"]["sampler"] == "balanced"
    assert sampled["val_balanced_acc"] > plain["val_balanced_acc"] + 0.1


def test_knn_refuses_class_weights(skewed_cache):
    with pytest.raises(EmbedcacheError, match="knn has none"):
        embedcache.train_head(skewed_cache, head="knn", class_weight="balanced", progress=False)


def test_train_head_leads_with_balanced_accuracy_and_the_weakest_classes_when_skewed(
    skewed_cache, tmp_path
):
    out = tmp_path / "head.pt"
    r = CliRunner().invoke(main, ["train-head", str(skewed_cache), "--out", str(out)])
    assert r.exit_code == 0, r.output
    first = r.stdout.splitlines()[0]  # the progress bar went to stderr
    assert first.startswith(f"{out}: ")
    assert ", val balanced accuracy " in first and "(accuracy " in first
    assert "classes skewed 50:1" in r.output and "balanced class weights" in r.output
    assert "weakest: " in r.output
    bad = CliRunner().invoke(main, ["train-head", str(skewed_cache), "--class-weight", "some"])
    assert bad.exit_code != 0 and "--class-weight" in bad.output


def test_evaluate_leads_with_balanced_accuracy_where_the_split_is_skewed(capsys):
    from embedcache.cli import show

    def result(supports):
        per = {f"c{i}": {"support": n, "recall": 0.5 + 0.1 * i} for i, n in enumerate(supports)}
        classes = list(per)
        return {
            "split": "test",
            "data": "photos",
            "tta": False,
            "accuracy": 0.9,
            "balanced_accuracy": 0.6,
            "images": sum(supports),
            "classes": classes,
            "per_class": per,
            "skipped": [],
        }

    show.evaluation(result([60, 10, 5]))
    skewed = capsys.readouterr().out.splitlines()
    assert skewed[0].startswith("test: balanced accuracy 60.0% (accuracy 90.0%")
    assert skewed[1].startswith("  weakest: c0 50.0% recall (60 images)")
    show.evaluation(result([20, 10, 5]))
    assert capsys.readouterr().out.startswith("test: accuracy 90.0% (balanced 60.0%")


def test_train_head_says_which_trained_classes_validation_lacks(make_cache, tmp_path):
    x, y = _skewed(60, 20)
    xv, yv = _skewed(10, 0, seed=1)  # validation with the common class only
    cache = make_cache("lacks.h5", classes=("common", "rare"), train=(x, y), val=(xv, yv))
    r = CliRunner().invoke(main, ["train-head", str(cache), "--out", str(tmp_path / "h.pt")])
    assert r.exit_code == 0, r.output
    assert "validation holds no image of 1 of the classes in train (rare)" in r.stdout
    m = embedcache.train_head(cache, progress=False).metrics
    assert m["val_missing_classes"] == ["rare"]


def test_balanced_weights_must_win_significantly_on_the_images_of_each_class():
    from embedcache.train import weights_help

    y = np.array([0] * 500 + [1] * 10)
    plain = np.zeros(510, np.int64)
    fixes_rare = plain.copy()
    fixes_rare[500:505], fixes_rare[:20] = 1, 1  # 5 of 10 rare right, 20 of 500 common lost
    assert weights_help(fixes_rare, plain, y) < 0.05  # balanced accuracy: +0.5 - 0.04
    one = plain.copy()
    one[500], one[:3] = 1, 1  # one rare image against three common: could be chance
    assert 0.2 < weights_help(one, plain, y) < 1
    assert weights_help(plain, fixes_rare, y) == 1.0  # worse: never
    assert weights_help(plain, plain, y) == 1.0
