"""Metrics files and plots: metrics JSON, loss/accuracy curves,
confusion matrix, classification report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .outputs import shown, write_file, write_text

# Up to this many classes metrics.json holds the confusion matrix itself; above, only its
# non-zero cells (it grew with the square of the class count: 36 MB for 2,000 classes).
DENSE_CONFUSION_CLASSES = 100


SIDE_FILES = (".metrics.json", ".report.txt", ".confusion.png", ".curves.png")


def side_files(out: Path) -> list[Path]:
    """The files :func:`write_reports` writes next to ``out`` (none for a name that is no file's,
    such as '' or '.', which :func:`embedcache.outputs.claim` refuses)."""
    if Path(out).name in ("", ".", ".."):
        return []
    return [_sidecar(Path(out), suffix) for suffix in SIDE_FILES]


def _sidecar(out: Path, suffix: str) -> Path:
    """head.pt -> head.metrics.json etc., next to the checkpoint."""
    return out.with_name(out.stem + suffix)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs, shape (C, C), int64."""
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def classification_text(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> str:
    """scikit-learn's per-class precision/recall/F1 table, class names escaped (a newline in a
    folder name would forge a row of it)."""
    from sklearn.metrics import classification_report

    return classification_report(
        y_true,
        y_pred,
        labels=list(range(len(classes))),
        target_names=[shown(c) for c in classes],
        digits=3,
        zero_division=0,
    )


def scores(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1 accuracy, balanced accuracy and, with more than 5 classes, top-5 accuracy.

    logits : (N, C) float; labels : (N,) int in 0..C-1. Balanced accuracy is the mean
    recall over the classes present in ``labels`` (as clip_benchmark and Kornblith et al.
    report "mean per-class accuracy"), so a class the split lacks does not count.
    """
    pred = logits.argmax(1)
    right = pred == labels
    out = {
        "accuracy": float(right.mean()),
        "balanced_accuracy": float(np.mean([right[labels == c].mean() for c in np.unique(labels)])),
    }
    if logits.shape[1] > 5:
        top5 = np.argpartition(-logits, 4, axis=1)[:, :5]
        out["top5"] = float((top5 == labels[:, None]).any(1).mean())
    return out


def per_class(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Precision, recall, F1 and support per class, as plain numbers."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(classes))), zero_division=0
    )
    return {
        c: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
        for i, c in enumerate(classes)
    }


def figure(**kw):
    """A matplotlib Figure drawn through the object API: no pyplot,
    no backend switch, no global state."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    n = len(classes)
    size = min(2 + 0.5 * n, 16)
    fig = figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0)
        ax.set_yticks(range(n), classes)
        top = matrix.max() or 1
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(matrix[i, j]),
                    ha="center",
                    va="center",
                    color="white" if matrix[i, j] > top / 2 else "black",
                    fontsize=8,
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _series(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def plot_curves(history: dict, path: Path, title: str) -> Path:
    """Loss and accuracy per epoch, train and val (an epoch without training shows val only)."""
    epochs = np.array(history.get("epoch") or range(1, len(history["val_loss"]) + 1))
    fig = figure(figsize=(10, 4))
    a, b = fig.subplots(1, 2)
    a.plot(epochs, _series(history["train_loss"]), label="train")
    a.plot(epochs, _series(history["val_loss"]), label="val", marker=".")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    b.plot(epochs, _series(history["train_acc"]), label="train")
    b.plot(epochs, _series(history["val_acc"]), label="val", marker=".")
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    return write_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def confusion_record(matrix: np.ndarray) -> dict:
    """The confusion matrix as metrics.json holds it: ``confusion`` (C, C) for up to
    DENSE_CONFUSION_CLASSES classes, else ``confusion_cells``, [true, predicted, count] per
    non-zero cell (at most one per validation image)."""
    if len(matrix) <= DENSE_CONFUSION_CLASSES:
        return {"confusion": matrix.tolist()}
    cells = np.argwhere(matrix)
    return {"confusion_cells": [[int(i), int(j), int(matrix[i, j])] for i, j in cells]}


def write_reports(
    out: Path,
    metrics: dict,
    y_true: np.ndarray,
    y_pred: np.ndarray,
    classes: list[str],
    *,
    title: str,
) -> dict[str, Path]:
    """Write OUT.metrics.json, OUT.report.txt, OUT.confusion.png and OUT.curves.png next to ``out``.

    ``y_true``/``y_pred`` are the validation labels and predictions of the kept
    model; ``metrics`` gains the confusion matrix and per-class scores, and needs
    ``val_acc`` (and ``history`` for the curves).
    """
    files = {}
    matrix = confusion(y_true, y_pred, len(classes))
    metrics.update(confusion_record(matrix))
    metrics["per_class"] = per_class(y_true, y_pred, classes)
    text = json.dumps(metrics, indent=2) + "\n"
    files["metrics"] = write_text(_sidecar(out, ".metrics.json"), text)
    report = classification_text(y_true, y_pred, classes)
    files["report"] = write_text(_sidecar(out, ".report.txt"), report)
    files["confusion"] = plot_confusion(
        matrix,
        classes,
        _sidecar(out, ".confusion.png"),
        f"{title}, val accuracy {metrics['val_acc']:.3f}",
    )
    if "history" in metrics:
        files["curves"] = plot_curves(metrics["history"], _sidecar(out, ".curves.png"), title)
    return files
