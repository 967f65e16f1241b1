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


# ---------------------------------------------------------------------------------------------
# What the plots show (issue 33): read off the Figure objects the code saves


@pytest.fixture
def drawn(monkeypatch) -> list:
    """Every Figure the code saves, in order."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def record(fig, *args, **kw):
        figures.append(fig)
        return save(fig, *args, **kw)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def epoch_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.get_xlabel() == "epoch"]


def kept_at(ax) -> list[float]:
    """Where the lines labelled "kept ..." stand on the x axis (a vertical line: one x)."""
    return [
        x for line in ax.get_lines() if "kept" in line.get_label() for x in set(line.get_xdata())
    ]


def visible_ticks(ax) -> np.ndarray:
    lo, hi = ax.get_xlim()
    ticks = ax.get_xticks()
    return ticks[(ticks >= lo) & (ticks <= hi)]


def assert_legends_cover_no_panel(fig) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)


@pytest.mark.parametrize(
    "history, kept", [(HEAD_HISTORY, 2), (FINETUNE_HISTORY, 0)], ids=["head", "finetune"]
)
def test_curves_mark_the_kept_epoch_on_whole_epochs_with_the_legend_off_the_data(
    tmp_path, drawn, history, kept
):
    """Issue 33: no mark of the kept epoch, ticks at epoch 0.5, a legend over the curves."""
    metrics = {"val_acc": 0.75, "history": history, "best_epoch": kept}
    write_reports(tmp_path / "m.pt", metrics, Y_TRUE, Y_PRED, CLASSES, title="t")
    (curves,) = [fig for fig in drawn if epoch_axes(fig)]
    assert len(epoch_axes(curves)) == 2  # loss and accuracy
    for ax in epoch_axes(curves):
        assert kept_at(ax) == [kept]
        assert any(line.get_label() == f"kept: epoch {kept}" for line in ax.get_lines())
        ticks = visible_ticks(ax)
        assert len(ticks) >= 1 and np.array_equal(ticks, ticks.round())
    assert_legends_cover_no_panel(curves)


def tick_names(ax, axis: str = "x") -> list[str]:
    return [t.get_text() for t in getattr(ax, f"get_{axis}ticklabels")()]


@pytest.mark.parametrize("n", [2, 12])
def test_a_confusion_plot_of_few_classes_names_every_class_and_counts_every_error(
    tmp_path, drawn, n
):
    rng = np.random.default_rng(n)
    classes = [f"class-{i}" for i in range(n)]
    y = np.repeat(np.arange(n), 6)
    pred = np.where(rng.random(len(y)) < 0.7, y, rng.integers(0, n, len(y)))
    write_reports(tmp_path / "m.pt", {"val_acc": 0.7}, y, pred, classes, title="t")
    (fig,) = drawn
    ax = fig.axes[0]
    assert tick_names(ax, "x") == tick_names(ax, "y") == classes
    counts = {
        (round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts
    }
    matrix = np.zeros((n, n), int)
    np.add.at(matrix, (y, pred), 1)
    for (i, j), c in np.ndenumerate(matrix):
        if c or i == j:
            assert counts[i, j] == str(c)


def test_a_confusion_plot_of_81_classes_names_the_most_confused_and_keeps_rows_whole(
    tmp_path, drawn
):
    """Issue 33: 81 classes were drawn with axes 0-80, no names and no key."""
    from embedcache.report import CONFUSION_TOP_CLASSES

    classes = [f"grocery-{i}" for i in range(81)]
    y = np.repeat(np.arange(81), 5)
    pred = y.copy()
    confused = {10: 11, 40: 3, 77: 12}  # true -> predicted, for 3 of each class's 5 images
    for t, p in confused.items():
        pred[np.flatnonzero(y == t)[:3]] = p
    write_reports(tmp_path / "m.pt", {"val_acc": 0.9}, y, pred, classes, title="t")
    (fig,) = drawn
    ax = fig.axes[0]
    names = tick_names(ax, "x")
    assert names == tick_names(ax, "y")
    assert (
        len(names) <= CONFUSION_TOP_CLASSES + 1 and names[-1] == f"({81 - len(names) + 1} others)"
    )
    # the classes with an error, in class order; none of the 75 without one
    assert names[:-1] == [classes[i] for i in sorted({3, 10, 11, 12, 40, 77})]
    assert "most confused of 81 classes" in ax.get_title()
    shown = ax.images[0].get_array()
    rows = np.asarray(shown[:-1].sum(1))  # each class shown keeps all its images: 5
    assert np.array_equal(rows, np.full(len(names) - 1, 5))
    assert any(a.get_ylabel() == "images" for a in fig.axes[1:])  # a key to the colours
    everywhere = (y + 1) % 81  # every class wrong: the plot stops at CONFUSION_TOP_CLASSES
    write_reports(tmp_path / "n.pt", {"val_acc": 0.0}, y, everywhere, classes, title="t")
    assert len(tick_names(drawn[-1].axes[0])) == CONFUSION_TOP_CLASSES + 1
