"""Sigmoid heads' scores and thresholds (embedcache.multilabel)."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score

from embedcache.multilabel import (
    average_precision,
    choose_thresholds,
    f1_scores,
    mean_average_precision,
)


def _random(n=200, C=5, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    t = rng.random((n, C)) < 0.3
    s = t * 0.4 + rng.random((n, C))
    if ties:
        s = np.round(s, 1)  # many equal scores
    t[:, -1] = False  # a class with no positive
    return s, t


@pytest.mark.parametrize("ties", [False, True])
def test_average_precision_is_scikit_learns(ties):
    s, t = _random(ties=ties)
    ap = average_precision(s, t)
    for c in range(t.shape[1] - 1):
        assert ap[c] == pytest.approx(average_precision_score(t[:, c], s[:, c]))
    assert np.isnan(ap[-1])
    assert mean_average_precision(s, t) == pytest.approx(np.nanmean(ap))


def test_f1_thresholds_are_the_best_on_the_images_they_were_chosen_on():
    s, t = _random(seed=1)
    th = choose_thresholds(s, t, shrink=0)
    for c in range(t.shape[1] - 1):
        best = f1_score(t[:, c], s[:, c] >= th[c])
        for other in np.unique(s[:, c]):
            assert f1_score(t[:, c], s[:, c] >= other) <= best + 1e-12
    f = f1_scores(s >= th, t)
    assert f["micro_f1"] == pytest.approx(f1_score(t, s >= th, average="micro"))


def test_thresholds_of_classes_with_few_positives_are_drawn_to_the_global_one():
    s, t = _random(n=400, seed=3)
    t[:, 0] = False
    t[:2, 0] = True  # class 0: two positives
    own = choose_thresholds(s, t, shrink=0)
    drawn = choose_thresholds(s, t)  # the default: towards the best micro-F1 cut
    flat = np.unique(s)
    micro = [f1_score(t.ravel(), s.ravel() >= c) for c in flat]
    overall = choose_thresholds(s.ravel()[:, None], t.ravel()[:, None], shrink=0)[0]
    assert f1_score(t.ravel(), s.ravel() >= overall) == pytest.approx(max(micro))
    assert drawn[-1] == pytest.approx(overall)  # no positive: the global threshold
    for c in range(4):
        w = t[:, c].sum() / (t[:, c].sum() + 5)
        assert drawn[c] == pytest.approx(w * own[c] + (1 - w) * overall)
    assert abs(drawn[0] - overall) < abs(drawn[1] - overall) or own[1] == overall


def test_a_precision_target_gives_the_most_recall_at_that_precision():
    s, t = _random(seed=2)
    th = choose_thresholds(s, t, precision_at=0.9)
    for c in range(t.shape[1] - 1):
        pred = s[:, c] >= th[c]
        if pred.any():
            assert t[pred, c].mean() >= 0.9
        lower = s[:, c][s[:, c] < th[c]]
        if len(lower):  # the next threshold down falls short of the target
            nxt = s[:, c] >= lower.max()
            assert t[nxt, c].mean() < 0.9


# ---------------------------------------------------------------------------
# Heads on a multi-label cache


def _tagged(n, seed, dim=12, C=4):
    """Features whose class c is present where feature c is high: several labels per row."""
    rng = np.random.default_rng(seed)
    y = rng.random((n, C)) < 0.35
    x = rng.normal(0, 1, (n, dim))
    x[:, :C] += 2.5 * y
    return x.astype(np.float16), y


@pytest.fixture
def tagged_cache(make_cache):
    return make_cache(
        "tags.h5",
        classes=("beach", "dog", "sunset", "tree"),
        train=_tagged(240, 0),
        val=_tagged(120, 1),
    )


@pytest.mark.parametrize("head", ["auto", "logreg", "linear", "mlp"])
def test_heads_on_a_multi_label_cache_score_every_class_by_a_sigmoid(tagged_cache, tmp_path, head):
    import torch

    import embedcache

    out = tmp_path / f"{head}.pt"
    fast = {"lr": 0.03} if head == "linear" else {}  # full batch: 80 steps at 1e-3 is too few
    r = embedcache.train_head(tagged_cache, out=out, head=head, progress=False, epochs=80, **fast)
    m = r.metrics
    assert m["val_map"] > 0.85, m["val_map"]
    assert 0.0 < m["val_micro_f1"] <= 1.0 and len(m["thresholds"]) == 4
    head_module, ckpt = embedcache.load_head(out)
    assert ckpt.multi_label and len(ckpt.thresholds) == 4
    x, y = _tagged(120, 1)
    with torch.no_grad():
        probs = torch.sigmoid(
            head_module(torch.from_numpy(x.astype(np.float32))) / ckpt.temperature
        )
    pred = probs.numpy() >= np.array(ckpt.thresholds)
    assert f1_scores(pred, y)["micro_f1"] == pytest.approx(m["val_micro_f1"], abs=1e-6)
    assert (out.parent / f"{head}.report.txt").read_text().count("\n") >= 5


def test_the_default_head_keeps_the_candidate_with_the_best_val_map(tagged_cache):
    import embedcache

    m = embedcache.train_head(tagged_cache, progress=False).metrics
    maps = m["auto"]["val_map"]
    assert set(maps) == {"linear", "mlp", "blend"}
    assert maps[m["auto"]["chosen"]] == max(maps.values())
    assert m["val_map"] == pytest.approx(maps[m["auto"]["chosen"]], abs=1e-9)


def test_a_precision_target_raises_precision_on_validation(tagged_cache):
    import embedcache

    f1 = embedcache.train_head(tagged_cache, head="logreg", progress=False).metrics
    strict = embedcache.train_head(tagged_cache, head="logreg", precision_at=0.97, progress=False)
    assert strict.metrics["threshold_rule"] == "precision at least 0.97"
    assert all(a >= b for a, b in zip(strict.metrics["thresholds"], f1["thresholds"], strict=True))


def test_what_needs_one_label_per_image_is_refused_on_a_multi_label_cache(tagged_cache):
    import embedcache
    from embedcache.errors import EmbedcacheError

    with pytest.raises(EmbedcacheError, match="knn votes for one class"):
        embedcache.train_head(tagged_cache, head="knn", progress=False)
    with pytest.raises(EmbedcacheError, match="weigh one label per image"):
        embedcache.train_head(tagged_cache, class_weight="balanced", progress=False)


def test_evaluate_scores_a_multi_label_head_by_map_and_f1_at_its_thresholds(make_cache, tmp_path):
    import torch

    import embedcache
    from embedcache.cli import show

    test = _tagged(150, 2)
    cache = make_cache(
        "tags3.h5",
        classes=("beach", "dog", "sunset", "tree"),
        train=_tagged(240, 0),
        val=_tagged(120, 1),
        test=test,
    )
    embedcache.train_head(cache, out=tmp_path / "h.pt", progress=False)
    r = embedcache.evaluate(tmp_path / "h.pt", cache, split="test", progress=False)
    head, ckpt = embedcache.load_head(tmp_path / "h.pt")
    with torch.no_grad():
        z = head(torch.from_numpy(test[0].astype(np.float32))).numpy()
    probs = 1 / (1 + np.exp(-z / ckpt.temperature))
    assert r["multi_label"] and r["images"] == 150
    assert r["map"] == pytest.approx(mean_average_precision(probs, test[1]), abs=1e-5)
    f1 = f1_scores(probs >= np.array(ckpt.thresholds), test[1])
    assert r["micro_f1"] == pytest.approx(f1["micro_f1"], abs=1e-6)
    assert r["per_class"]["dog"]["support"] == int(test[1][:, 1].sum())
    assert r["scored"]["true"][0] == np.flatnonzero(test[1][0]).tolist()
    assert r["calibration"]["temperature"] == pytest.approx(ckpt.temperature)
    show.evaluation(r)  # the CLI's lines: mAP first, no accuracy


def test_evaluate_line_of_a_multi_label_model_leads_with_map(capsys):
    from embedcache.cli import show

    per = {
        "dog": {"ap": 0.5, "precision": 1, "recall": 1, "f1": 1, "support": 3},
        "cat": {"ap": 0.9, "precision": 1, "recall": 1, "f1": 1, "support": 4},
    }
    show.evaluation(
        {
            "multi_label": True,
            "split": "test",
            "data": "tags.h5",
            "tta": False,
            "map": 0.7,
            "micro_f1": 0.8,
            "macro_f1": 0.75,
            "images": 5,
            "per_class": per,
            "skipped": [],
        }
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("test: mAP 70.0% (micro F1 80.0%, macro F1 75.0%")
    assert out[1] == "  weakest: dog AP 50.0% (3 images), cat AP 90.0% (4 images)"
