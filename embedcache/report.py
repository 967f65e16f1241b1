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


SIDE_FILES = (".metrics.json", ".report.txt", ".confusion.png", ".curves.png", ".reliability.png")


def side_files(out: Path) -> list[Path]:
    """The files :func:`write_reports` writes next to ``out``, and train-head's reliability
    diagram (none for a name that is no file's, such as '' or '.', which
    :func:`embedcache.outputs.claim` refuses)."""
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


def better_p_value(a_right: np.ndarray, b_right: np.ndarray) -> float:
    """One-sided exact McNemar test: the chance of ``a`` beating ``b`` this often on the same
    images if neither were better (only the images where exactly one is right count)."""
    import math

    wins, losses = int(np.sum(a_right & ~b_right)), int(np.sum(~a_right & b_right))
    n = wins + losses
    return sum(math.comb(n, i) for i in range(wins, n + 1)) / 2**n if n else 1.0


def wilson_interval(right: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of an accuracy of ``right`` of ``n`` (95% for z = 1.96): unlike
    the normal approximation it stays inside [0, 1] and is honest at 0 or n right."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = right / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


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


# ---------------------------------------------------------------------------------------------
# Confusion matrix

# Up to this many classes the plot shows the whole matrix, a count in every cell; above, only the
# CONFUSION_TOP_CLASSES classes with the most errors. At 81 classes the whole matrix needs cells
# too small for a count or a name (it was drawn with axes 0-80 and no names at all).
CONFUSION_ALL_CLASSES = 25
CONFUSION_TOP_CLASSES = 20
NAME_CHARS = 28  # longer class names are cut on the axes (the report and metrics keep them whole)


def most_confused(matrix: np.ndarray, k: int) -> np.ndarray:
    """Indices of at most ``k`` classes with the most errors, counted as the true class and as
    the predicted one, in class order. Classes without an error are left out, unless fewer than
    two have one (then the first ``k`` of the most confused, ties in class order).

    matrix : (C, C) int counts of (true, predicted).
    """
    off = matrix - np.diag(np.diag(matrix))
    errors = off.sum(0) + off.sum(1)
    top = np.argsort(-errors, kind="stable")[:k]
    wrong = top[errors[top] > 0]
    return np.sort(wrong if len(wrong) >= 2 else top)


def _name(c: object) -> str:
    text = shown(c)
    return text if len(text) <= NAME_CHARS else text[: NAME_CHARS - 1] + "\u2026"


def _confusion_shown(matrix: np.ndarray, classes: list[str]):
    """What the confusion plot draws: (counts (k, k) float, NaN where nothing is drawn, names,
    a note for the title or ""). Above CONFUSION_ALL_CLASSES classes, the most confused ones and
    a last row and column that sum the others, so that every row still adds up to its class's
    images (without it a class whose errors all went elsewhere looked perfect)."""
    n = len(classes)
    if n <= CONFUSION_ALL_CLASSES:
        return matrix.astype(float), [_name(c) for c in classes], ""
    keep = most_confused(matrix, CONFUSION_TOP_CLASSES)
    k, rest = len(keep), n - len(keep)
    shown = np.full((k + 1, k + 1), np.nan)
    shown[:k, :k] = matrix[np.ix_(keep, keep)]
    shown[:k, k] = matrix[keep].sum(1) - shown[:k, :k].sum(1)  # true shown, predicted other
    shown[k, :k] = matrix[:, keep].sum(0) - shown[:k, :k].sum(0)  # true other, predicted shown
    names = [_name(classes[i]) for i in keep] + [f"({rest} others)"]
    note = f"the {k} most confused of {n} classes; the other {rest} summed in the last row/column"
    return shown, names, note


def confusion_figure(matrix: np.ndarray, classes: list[str], title: str):
    """The confusion matrix as a Figure, class names on both axes and a count in each cell:
    every class up to CONFUSION_ALL_CLASSES, else the CONFUSION_TOP_CLASSES most confused (the
    title says so). matrix : (C, C) int counts of (true, predicted)."""
    shown, names, note = _confusion_shown(matrix, classes)
    k = len(names)
    cell = min(1.2, max(0.42, 6 / k))  # inches: large for 2 classes, still room for a count at 25
    label = 0.07 * max(map(len, names)) + 0.6  # room for the longest name, rotated or not
    fig = figure(figsize=(k * cell + label + 1.6, k * cell + label + 1.0), layout="constrained")
    ax = fig.subplots()
    from matplotlib import colormaps

    blues = colormaps["Blues"].with_extremes(bad="0.85")  # grey: the cell of others by others
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=blues)
    fig.colorbar(image, ax=ax, shrink=0.8, label="images")
    upright = all(len(c) <= 6 for c in names) and k <= 6
    ax.set_xticks(
        range(k), names, rotation=0 if upright else 45, ha="center" if upright else "right"
    )
    for t in ax.get_xticklabels():
        t.set_rotation_mode("anchor")
    ax.set_yticks(range(k), names)
    if note:  # the summed others apart from the classes shown
        ax.axhline(k - 1.5, color="0.3", linewidth=1)
        ax.axvline(k - 1.5, color="0.3", linewidth=1)
    top = np.nanmax(shown) or 1
    for (i, j), v in np.ndenumerate(shown):
        if np.isnan(v) or (v == 0 and i != j and k > 10):  # a sea of zeros hides the errors
            continue
        color = "white" if v > top / 2 else "black"
        ax.text(j, i, f"{v:.0f}", ha="center", va="center", color=color, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\n{note}" if note else title)
    return fig


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """Write :func:`confusion_figure` to ``path`` as PNG; returns the path."""
    return save_figure(confusion_figure(matrix, classes, title), path)


# ---------------------------------------------------------------------------------------------
# Curves


def _series(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _epoch_axis(ax, ylabel: str) -> None:
    """An axis over epochs: whole epochs only (ticks at 0.5 marked no epoch)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)


def _epoch_panels(a, b, history: dict, kept: int | None, who: str = "") -> None:
    """Loss on ``a``, accuracy on ``b``, train and val per epoch, the kept epoch a dashed line
    (an epoch without training, finetune's epoch 0, shows val only)."""
    epochs = np.array(history.get("epoch") or range(1, len(history["val_loss"]) + 1))
    for ax, key, ylabel in ((a, "loss", "loss"), (b, "acc", "accuracy")):
        # a marker on train too: finetune's first trained epoch alone is a point, not a line
        ax.plot(epochs, _series(history[f"train_{key}"]), label=f"{who}train", marker=".", ms=4)
        ax.plot(epochs, _series(history[f"val_{key}"]), label=f"{who}val", marker=".")
        if kept is not None:
            ax.axvline(kept, color="0.35", linestyle="--", linewidth=1, label=f"kept: epoch {kept}")
        _epoch_axis(ax, ylabel)


def _legend_below(fig, *axes) -> None:
    """One legend for the figure, under the panels, where it covers no curve; its entries are
    those of ``axes`` (one panel of each kind: the others repeat them)."""
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)


def curves_figure(history: dict, title: str, kept: int | None = None):
    """Loss and accuracy per epoch as a Figure, train and val, ``kept`` (the epoch kept as the
    model, numbered as ``history["epoch"]`` or from 1) marked."""
    fig = figure(figsize=(10, 4.2), layout="constrained")
    a, b = fig.subplots(1, 2)
    _epoch_panels(a, b, history, kept)
    _legend_below(fig, a)
    fig.suptitle(title)
    return fig


def plot_curves(history: dict, path: Path, title: str, kept: int | None = None) -> Path:
    """Write :func:`curves_figure` to ``path`` as PNG; returns the path."""
    return save_figure(curves_figure(history, title, kept), path)


_AUTO_KEPT = {"linear": "the probe", "mlp": "the MLP", "blend": "the blend of probe and MLP"}


def auto_curves_figure(auto: dict, title: str):
    """The default head's two candidates as a Figure: the probe's validation loss and accuracy
    along its L2 path (the chosen strength marked), the MLP's curves per epoch (the kept epoch
    marked). ``auto`` is the default head's ``metrics["auto"]``, with ``linear["path"]`` and
    ``mlp["history"]``."""
    linear, mlp = auto["linear"], auto["mlp"]
    path = sorted(linear["path"], key=lambda r: r["lam"])
    lams = [r["lam"] for r in path]
    fig = figure(figsize=(10, 7.5), layout="constrained")
    (pl, pa), (ml, ma) = fig.subplots(2, 2)
    score = ("val_map", "val mAP") if "val_map" in path[0] else ("val_acc", "val accuracy")
    for ax, key, ylabel in ((pl, "val_loss", "val loss"), (pa, *score)):
        ax.plot(lams, [r[key] for r in path], marker=".", color="C2", label="probe val")
        ax.axvline(
            linear["lam"], color="0.35", linestyle=":", label=f"chosen: L2 {linear['lam']:.1e}"
        )
        ax.set_xscale("log")
        ax.set_xlabel("L2 strength (weaker \u2190 \u2192 stronger)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"linear probe (L-BFGS): {ylabel} by L2 strength", fontsize=10)
    _epoch_panels(ml, ma, mlp["history"], mlp["best_epoch"], who="MLP ")
    for ax, what in ((ml, "loss"), (ma, "accuracy")):
        ax.set_title(f"MLP: {what} per epoch", fontsize=10)
    _legend_below(fig, pl, ml)
    kept = _AUTO_KEPT.get(auto["chosen"], auto["chosen"])
    fig.suptitle(f"{title}: kept {kept}")
    return fig


def save_figure(fig, path: Path) -> Path:
    """Write a Figure to ``path`` as PNG (atomically, as every output); returns the path."""
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
    ``val_acc``. The curves need ``history`` (``best_epoch``, numbered as its epochs, is marked
    as kept), or for the default head ``auto`` with the probe's ``path`` and the MLP's
    ``history`` (:func:`auto_curves_figure`).
    """
    files = {}
    if y_pred is None:  # several labels per image: no confusion matrix, a per-class table
        return _multi_label_reports(out, metrics, classes, title)
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
    curves = _sidecar(out, ".curves.png")
    if "history" in metrics.get("auto", {}).get("mlp", {}):  # the default head: both candidates
        files["curves"] = save_figure(auto_curves_figure(metrics["auto"], title), curves)
    elif "history" in metrics:
        files["curves"] = plot_curves(metrics["history"], curves, title, metrics.get("best_epoch"))
    return files


def _multi_label_reports(out: Path, metrics: dict, classes: list[str], title: str) -> dict:
    """A multi-label head's OUT.metrics.json, OUT.report.txt (each class's validation AP, F1
    and threshold, worst AP first) and OUT.curves.png."""
    files = {"metrics": write_text(_sidecar(out, ".metrics.json"), json.dumps(metrics, indent=2))}
    rows = sorted(
        zip(
            classes,
            metrics["val_per_class_ap"],
            metrics["val_per_class_f1"],
            metrics["thresholds"],
            strict=True,
        ),
        key=lambda r: (r[1] is None, r[1] if r[1] is not None else 0.0),
    )
    width = max(12, *(len(c) for c in classes))
    lines = [f"{'class':>{width}}  {'AP':>6}  {'F1':>6}  threshold"]
    for name, ap, f1, th in rows:
        shown = "   n/a" if ap is None else f"{ap:6.3f}"
        lines.append(f"{name:>{width}}  {shown}  {f1:6.3f}  {th:.3f}")
    lines.append(
        f"\nmAP {metrics['val_map']:.4f}  micro F1 {metrics['val_micro_f1']:.4f}  "
        f"macro F1 {metrics['val_macro_f1']:.4f}  (validation; n/a: no positive image)"
    )
    files["report"] = write_text(_sidecar(out, ".report.txt"), "\n".join(lines) + "\n")
    curves = _sidecar(out, ".curves.png")
    if "history" in metrics.get("auto", {}).get("mlp", {}):
        files["curves"] = save_figure(auto_curves_figure(metrics["auto"], title), curves)
    elif "history" in metrics:
        files["curves"] = plot_curves(metrics["history"], curves, title, metrics.get("best_epoch"))
    return files
