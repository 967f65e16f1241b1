"""calibration.py: the temperature, the ECE, the reliability diagram, and every verb applying it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import blobs, make_tree
from PIL import Image

from embedcache import evaluate, extract, predict, train_head
from embedcache.calibration import (
    TEMPERATURE_RANGE,
    calibration_record,
    expected_calibration_error,
    fit_temperature,
    probabilities,
    reliability_diagram,
    softmax,
)
from embedcache.checkpoint import HeadCheckpoint
from embedcache.cli import main
from embedcache.errors import EmbedcacheError
from embedcache.models import load_model
from embedcache.train import load_head

FAST = {"device": "cpu", "progress": False}
CPU = {"device": "cpu", "num_workers": 0}


def _calibrated(n: int = 4000, classes: int = 5, seed: int = 0):
    """Logits (n, C) and labels drawn from their own softmax: calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, classes)) * 2
    p = softmax(z)
    y = (rng.random(n)[:, None] > np.cumsum(p, 1)).sum(1)
    return z, y


# ---------------------------------------------------------------------------
# The temperature and the ECE


@pytest.mark.parametrize("scale", [3.0, 1.0, 0.5])
def test_the_fitted_temperature_undoes_a_known_scale_of_calibrated_logits(scale):
    z, y = _calibrated()
    assert fit_temperature(z * scale, y) == pytest.approx(scale, rel=0.08)
    assert fit_temperature(torch.from_numpy(z * scale), torch.from_numpy(y)) == pytest.approx(
        fit_temperature(z * scale, y)
    )  # tensors as arrays


def test_the_ece_of_calibrated_probabilities_is_near_zero_and_of_overconfident_ones_large():
    z, y = _calibrated()
    assert expected_calibration_error(softmax(z), y) < 0.03
    assert expected_calibration_error(softmax(3 * z), y) > 0.15
    t = fit_temperature(3 * z, y)
    assert expected_calibration_error(softmax(3 * z, t), y) < 0.03


def test_the_ece_is_the_count_weighted_gap_between_accuracy_and_confidence_per_bin():
    probs = np.array([[0.92, 0.08], [0.98, 0.02], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    labels = np.array([0, 1, 1, 1, 0])
    # bins (lo, hi] of 0.1: {0.92 right, 0.98 wrong} (gap |0.5 - 0.95|), 0.6 wrong, 0.7 right,
    # and 0.9 right in (0.8, 0.9], not with the first two
    want = (2 * abs(0.5 - 0.95) + abs(0 - 0.6) + abs(1 - 0.7) + abs(1 - 0.9)) / 5
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(want)
    assert expected_calibration_error(np.zeros((0, 2)), np.zeros(0, np.int64)) == 0.0


@pytest.mark.parametrize(
    "logits, labels",
    [
        (np.zeros((0, 3)), np.zeros(0)),  # no image
        (np.random.default_rng(0).normal(size=(20, 3)), np.zeros(20)),  # one class
        (np.random.default_rng(0).normal(size=(20, 1)), np.zeros(20)),  # one column
        (np.zeros((4, 3)), np.array([0, 1, 2, 0])),  # rows without a difference
        (np.array([[np.nan, 0.0], [0.0, 1.0], [1.0, 0.0]]), np.array([0, 0, 1])),
    ],
    ids=["empty", "one-class", "one-column", "flat", "non-finite"],
)
def test_degenerate_inputs_give_a_temperature_of_one(logits, labels):
    assert fit_temperature(logits, labels) == 1.0


@pytest.mark.parametrize("gap", [0.2, 9.0], ids=["underconfident", "confident"])
def test_with_no_error_only_an_underconfident_head_is_sharpened_to_laplaces_estimate(gap):
    labels = np.arange(18) % 3
    logits = np.random.default_rng(0).normal(0, 0.01, (18, 3))
    logits[np.arange(18), labels] += gap  # every image right
    t = fit_temperature(logits, labels)
    if gap < 1:  # mean confidence 0.4: up to 19/20, (n + 1) / (n + 2) of 18 right in 18
        assert t < 1 and softmax(logits, t).max(1).mean() == pytest.approx(19 / 20, abs=1e-6)
    else:  # already more confident than that: nothing says it should be less
        assert t == 1.0
    before, after = (expected_calibration_error(softmax(logits, x), labels) for x in (1, t))
    assert after <= before


def test_the_temperature_is_clipped_and_shapes_are_checked_in_one_line():
    z, y = _calibrated(n=500)
    wrong = (y + 1) % z.shape[1]  # always wrong: the likelihood wants T -> infinity
    assert fit_temperature(z, wrong) == TEMPERATURE_RANGE[1]
    with pytest.raises(
        EmbedcacheError,
        match=r"^calibration needs logits of shape \(N, C\) and labels of shape \(N,\) or "
        r"\(N, C\), got \(500, 5\) and \(499,\)$",
    ):
        fit_temperature(z, y[:-1])
    with pytest.raises(EmbedcacheError, match=r"^labels must be class indices in 0..4, got 0..7$"):
        fit_temperature(z, np.r_[y[:-1], 7])


def test_with_several_labels_per_image_the_temperature_and_ece_are_those_of_sigmoids():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (3000, 4))
    y = (rng.random(z.shape) < probabilities(z, multi_label=True)).astype(np.float32)
    assert fit_temperature(3 * z, y) == pytest.approx(3.0, rel=0.08)
    assert expected_calibration_error(probabilities(z, multi_label=True), y) < 0.02
    hot = probabilities(3 * z, multi_label=True)
    assert expected_calibration_error(hot, y) > 0.1
    record = calibration_record(3 * z, y, fit_temperature(3 * z, y))
    assert record["ece_after"] < 0.02 < 0.1 < record["ece_before"]


def test_the_reliability_diagram_shows_both_curves_the_diagonal_and_each_ece(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda f, *a, **k: (figures.append(f), save(f, *a, **k)))
    z, y = _calibrated(n=1000)
    t = fit_temperature(3 * z, y)
    path = reliability_diagram(3 * z, y, temperature=t, path=tmp_path / "r.png", title="head")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300
    legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
    record = calibration_record(3 * z, y, t)
    assert legend == [
        "perfectly calibrated",
        f"before: ECE {100 * record['ece_before']:.1f}%",
        f"after, T = {t:.3g}: ECE {100 * record['ece_after']:.1f}%",
    ]
    assert record["ece_after"] < record["ece_before"]


# ---------------------------------------------------------------------------
# train-head, checkpoints, predict, evaluate


@pytest.fixture
def noisy_cache(make_cache):
    """Overlapping blobs: validation has errors, so there is a temperature to fit."""
    return make_cache(train=blobs(40, seed=0, spread=2.0), val=blobs(40, seed=1, spread=2.0))


@pytest.mark.parametrize("head", ["logreg", "auto"])
def test_train_head_fits_the_temperature_of_the_chosen_head_on_validation(
    noisy_cache, tmp_path, head
):
    out = tmp_path / "h.pt"
    r = train_head(noisy_cache, out=out, head=head, epochs=20, refit=True, **FAST)
    cal = r.metrics["calibration"]
    _, ckpt = load_head(out)
    assert ckpt.temperature == cal["temperature"] != 1.0
    assert cal["val_ece_after"] <= cal["val_ece_before"]
    from embedcache import open_cache

    with open_cache(noisy_cache) as c:
        xv, yv = c["val"].features.astype(np.float32), c["val"].labels
    with torch.no_grad():  # the head chosen on validation, not the one refit on it
        logits = ckpt.module(selected=True)(torch.from_numpy(xv)).numpy()
    assert cal["temperature"] == pytest.approx(fit_temperature(logits, yv), rel=1e-6)
    assert r.files["reliability"] == tmp_path / "h.reliability.png"
    assert r.files["reliability"].stat().st_size > 0
    assert json.loads((tmp_path / "h.metrics.json").read_text())["calibration"] == cal


def test_a_knn_head_keeps_a_temperature_of_one_and_says_why(noisy_cache, tmp_path):
    r = train_head(noisy_cache, out=tmp_path / "h.pt", head="knn", **FAST)
    cal = r.metrics["calibration"]
    assert cal["temperature"] == HeadCheckpoint.load(tmp_path / "h.pt").temperature == 1.0
    assert cal["note"].startswith("not applicable to knn")
    assert cal["val_ece_after"] == cal["val_ece_before"] > 0


def test_a_head_checkpoint_round_trips_its_temperature_and_refuses_a_bad_one(noisy_cache, tmp_path):
    train_head(noisy_cache, out=tmp_path / "h.pt", head="logreg", **FAST)
    ckpt = HeadCheckpoint.load(tmp_path / "h.pt")
    ckpt.temperature = 2.5
    ckpt.save(tmp_path / "t.pt")
    assert HeadCheckpoint.load(tmp_path / "t.pt").temperature == 2.5
    assert load_model(tmp_path / "t.pt").temperature == 2.5
    ckpt.temperature = -1.0
    ckpt.save(tmp_path / "bad.pt")
    with pytest.raises(EmbedcacheError, match=r"bad\.pt has a temperature of -1\.0; it must be"):
        HeadCheckpoint.load(tmp_path / "bad.pt")


@pytest.fixture
def image_head(tmp_path, extract_kw):
    """A head on a tiny image tree, saved once as trained and once with T = 3."""
    data = make_tree(tmp_path / "d", splits=("train", "val", "test"), per_class=5)
    extract(data, out=tmp_path / "c.h5", **extract_kw)
    train_head(tmp_path / "c.h5", out=tmp_path / "h.pt", epochs=20, **FAST)
    ckpt = HeadCheckpoint.load(tmp_path / "h.pt")
    ckpt.temperature = 3.0
    ckpt.save(tmp_path / "hot.pt")
    return data, tmp_path / "c.h5", tmp_path / "h.pt", tmp_path / "hot.pt"


def test_predict_shows_calibrated_probabilities_and_the_same_classes(image_head, tmp_path):
    data, _, plain, hot = image_head
    files = sorted((data / "test").rglob("*.png"))
    clf = load_model(hot)
    from embedcache.forward import image_features
    from embedcache.runtime import Run

    feats, ok, _ = image_features(
        clf.backbone(torch.device("cpu")), files, Run(torch.device("cpu"), 4, 0)
    )
    logits = clf.logits(feats)
    want = torch.softmax(logits / 3.0, 1).max(1).values.numpy()
    rows = predict(hot, files, top_k=2, **CPU)
    got = np.array([r["predictions"][0]["probability"] for r in rows])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, torch.softmax(logits, 1).max(1).values.numpy(), atol=1e-3)
    uncalibrated = predict(plain, files, top_k=2, **CPU)
    assert [r["predictions"][0]["class"] for r in rows] == [
        r["predictions"][0]["class"] for r in uncalibrated
    ]  # argmax is the same at any temperature
    shown = CliRunner().invoke(main, ["predict", str(hot), str(files[0]), "-q", "--device", "cpu"])
    assert shown.exit_code == 0, shown.output
    assert f"{100 * got[0]:.1f}%" in shown.output


def test_evaluate_reports_the_ece_before_and_after_the_temperature(image_head):
    _, cache, _, hot = image_head
    r = evaluate(hot, cache, split="test", progress=False)
    cal = r["calibration"]
    assert cal["temperature"] == 3.0 and set(cal) == {"temperature", "ece_before", "ece_after"}
    assert cal["ece_before"] != cal["ece_after"]
    out = CliRunner().invoke(main, ["evaluate", str(hot), str(cache), "-q"])
    assert out.exit_code == 0, out.output
    want = f"temperature 3, ECE {100 * cal['ece_before']:.1f}% -> {100 * cal['ece_after']:.1f}%"
    assert f"  probabilities: {want} on test" in out.output.splitlines()


def test_train_head_says_the_temperature_and_the_ece_in_one_line(noisy_cache, tmp_path):
    out = CliRunner().invoke(
        main, ["train-head", str(noisy_cache), "--out", str(tmp_path / "h.pt"), "-q"]
    )
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    cal = HeadCheckpoint.load(tmp_path / "h.pt").metrics["calibration"]
    line = (
        f"  probabilities calibrated on val: temperature {cal['temperature']:.3g}, "
        f"ECE {100 * cal['val_ece_before']:.1f}% -> {100 * cal['val_ece_after']:.1f}%"
    )
    assert line in lines[1:-2], lines  # the answer first, then "wrote", then "next:"
    assert "h.reliability.png" in lines[-2]
