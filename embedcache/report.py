"""Metrics files and plots: metrics JSON, loss/accuracy curves, confusion matrix, classification report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _sidecar(out: Path, suffix: str) -> Path:
    """head.pt -> head.metrics.json etc., next to the checkpoint."""
    return out.with_name(out.stem + suffix)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs, shape (C, C), int64."""
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def classification_text(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> str:
    """scikit-learn's per-class precision/recall/F1 table."""
    from sklearn.metrics import classification_report

    return classification_report(
        y_true,
        y_pred,
        labels=list(range(len(classes))),
        target_names=classes,
        digits=3,
        zero_division=0,
    )


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


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    size = min(2 + 0.5 * n, 16)
    fig, ax = plt.subplots(figsize=(size, size))
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(history: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history["train_loss"]) + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, history["train_loss"], label="train")
    a.plot(epochs, history["val_loss"], label="val")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    b.plot(epochs, history["train_acc"], label="train")
    b.plot(epochs, history["val_acc"], label="val")
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_head_reports(
    out: Path, metrics: dict, y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]
) -> dict[str, Path]:
    """Write metrics JSON, curves and confusion PNGs and the classification report next to ``out``."""
    files = {}
    matrix = confusion(y_true, y_pred, len(classes))
    metrics["confusion"] = matrix.tolist()
    metrics["per_class"] = per_class(y_true, y_pred, classes)
    files["metrics"] = _sidecar(out, ".metrics.json")
    files["metrics"].write_text(json.dumps(metrics, indent=2) + "\n")
    files["report"] = _sidecar(out, ".report.txt")
    files["report"].write_text(classification_text(y_true, y_pred, classes))
    files["confusion"] = plot_confusion(
        matrix,
        classes,
        _sidecar(out, ".confusion.png"),
        f"{metrics['head']} head, val accuracy {metrics['val_acc']:.3f}",
    )
    if "history" in metrics:
        files["curves"] = plot_curves(
            metrics["history"], _sidecar(out, ".curves.png"), f"{metrics['head']} head"
        )
    return files
