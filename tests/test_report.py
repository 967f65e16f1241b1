"""report.py: the metrics, report and plots written next to a checkpoint, without global state."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
from PIL import Image

from embedcache.report import write_reports

CLASSES = ["ant", "bee", "wasp"]
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 1, 1, 1, 2, 0, 2])

HEAD_HISTORY = {  # train-head: one entry per epoch, no epoch column
    "train_loss": [1.1, 0.8, 0.6],
    "train_acc": [0.4, 0.6, 0.7],
    "val_loss": [1.0, 0.9, 0.85],
    "val_acc": [0.5, 0.6, 0.75],
}
FINETUNE_HISTORY = {  # finetune: epoch 0 is the reattached head, before any training step
    "epoch": [0, 1, 2],
    "train_loss": [None, 0.7, 0.5],
    "train_acc": [None, 0.7, 0.8],
    "val_loss": [0.9, 0.8, 0.7],
    "val_acc": [0.6, 0.7, 0.75],
    "seconds": [0.0, 1.5, 1.4],
}


@pytest.mark.parametrize("history", [HEAD_HISTORY, FINETUNE_HISTORY], ids=["head", "finetune"])
def test_write_reports_writes_metrics_report_and_two_plots(tmp_path, history):
    out = tmp_path / "model.pt"
    files = write_reports(
        out, {"val_acc": 0.75, "history": history}, Y_TRUE, Y_PRED, CLASSES, title="t"
    )
    assert {k: p.name for k, p in files.items()} == {
        "metrics": "model.metrics.json",
        "report": "model.report.txt",
        "confusion": "model.confusion.png",
        "curves": "model.curves.png",
    }
    metrics = json.loads(files["metrics"].read_text())
    assert metrics["val_acc"] == 0.75 and metrics["history"] == history
    assert metrics["confusion"] == [[2, 1, 0], [0, 2, 0], [1, 0, 2]]
    assert metrics["per_class"]["ant"] == {
        "precision": pytest.approx(2 / 3),
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(2 / 3),
        "support": 3,
    }
    assert metrics["per_class"]["bee"]["precision"] == pytest.approx(2 / 3)
    assert metrics["per_class"]["bee"]["recall"] == 1.0
    report = files["report"].read_text()
    assert "precision" in report and all(c in report for c in CLASSES)
    for key in ("confusion", "curves"):
        with Image.open(files[key]) as im:
            assert im.format == "PNG" and im.size[0] > 100
            im.verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files.values())


def test_without_a_history_there_are_no_curves(tmp_path):
    files = write_reports(tmp_path / "h.pt", {"val_acc": 0.5}, Y_TRUE, Y_PRED, CLASSES, title="t")
    assert set(files) == {"metrics", "report", "confusion"}
    assert not (tmp_path / "h.curves.png").exists()


def test_write_reports_leaves_the_backend_and_pyplot_alone(tmp_path):
    import matplotlib.pyplot as plt

    before = matplotlib.get_backend()
    plt.switch_backend("svg")  # a backend the code would not pick, so a switch would show
    try:
        plt.close("all")
        write_reports(
            tmp_path / "m.pt",
            {"val_acc": 0.75, "history": FINETUNE_HISTORY},
            Y_TRUE,
            Y_PRED,
            CLASSES,
            title="t",
        )
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == []
    finally:
        plt.switch_backend(before)


def test_scores_give_top1_balanced_accuracy_and_top5_beyond_five_classes():
    from embedcache.report import scores

    labels = np.array([0, 0, 0, 1])
    two = np.array([[2.0, 1.0]] * 4)  # always class 0
    assert scores(two, labels) == {"accuracy": 0.75, "balanced_accuracy": 0.5}  # no top-5
    six = np.tile(np.arange(6, dtype=float)[::-1], (4, 1))  # ranks 0 > 1 > ... > 5
    six[3] = [1, -5, 1, 1, 1, 9.0]  # the last image: class 5 first, class 1 last
    s = scores(six, np.array([0, 4, 5, 1]))
    assert s["accuracy"] == 0.25 and s["balanced_accuracy"] == 0.25
    assert s["top5"] == 0.5  # 0 and 4 are in their top five, 5 and 1 are not


def test_metrics_json_grows_with_the_val_images_not_the_square_of_the_classes(tmp_path):
    """Issue 19, also seen: 2,000 classes made a 36 MB metrics.json (the dense C x C matrix)."""
    from embedcache.report import DENSE_CONFUSION_CLASSES, confusion_record

    rng = np.random.default_rng(0)
    sizes = {}
    for n in (200, 800):
        classes = [f"c{i}" for i in range(n)]
        y = rng.integers(0, n, 500)
        pred = np.where(rng.random(500) < 0.8, y, rng.integers(0, n, 500))
        files = write_reports(tmp_path / f"h{n}.pt", {"val_acc": 0.8}, y, pred, classes, title="t")
        metrics = json.loads(files["metrics"].read_text())
        assert "confusion" not in metrics and len(metrics["confusion_cells"]) <= 500
        cells = {(i, j): c for i, j, c in metrics["confusion_cells"]}
        assert sum(cells.values()) == 500 and cells.get((y[0], pred[0]), 0) >= 1
        sizes[n] = files["metrics"].stat().st_size
    assert sizes[800] < 6 * sizes[200]  # per-class scores grow linearly (4x); C^2 would be 16x
    small = np.array([[2, 1], [0, 3]])
    assert confusion_record(small) == {"confusion": [[2, 1], [0, 3]]}
    assert DENSE_CONFUSION_CLASSES >= 30
