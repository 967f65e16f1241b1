"""Several labels per image: the scores of sigmoid heads (average precision, F1) and the
per-class thresholds that turn their probabilities into labels.

Pure numpy on (N, C) arrays: ``scores`` are probabilities (or any score monotone in them),
``targets`` booleans. A class with no positive image in ``targets`` has no average precision
and is left out of the means, as scikit-learn's ``average_precision_score`` leaves it
undefined.
"""

from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLD = 0.5  # a class with no positive validation image keeps this


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Each class's average precision (NaN where it has no positive): the mean of the
    precision at each positive's rank, ties counted as one threshold (scikit-learn's
    definition: sum over thresholds of (R_n - R_{n-1}) P_n)."""
    n, C = scores.shape
    out = np.full(C, np.nan)
    for c in range(C):
        y = targets[:, c].astype(bool)
        pos = int(y.sum())
        if pos == 0:
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        s, yy = scores[order, c], y[order]
        tp = np.cumsum(yy)
        last = np.r_[np.flatnonzero(s[1:] != s[:-1]), n - 1]  # the last row of each tie
        tp_t, seen = tp[last], last + 1
        recall_gain = np.diff(np.r_[0, tp_t]) / pos
        out[c] = float(np.sum(recall_gain * tp_t / seen))
    return out


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """mAP over the classes with at least one positive (NaN if none has)."""
    ap = average_precision(scores, targets)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


# Per-class thresholds are drawn towards the global one by a class's validation positives:
# weight n / (n + SHRINK_POSITIVES) on its own. On grocery81 as tags (101 labels, 296 val
# images, median 5 positives a class), test micro / macro F1 of the default head: per-class
# 80.1% / 67.8%, global 86.2% / 71.1%, drawn with 3: 85.3% / 72.2%, with 10: 85.8% / 71.9%
# (benchmarks/results/multilabel_grocery81.md).
SHRINK_POSITIVES = 5.0


def _cuts(scores: np.ndarray, y: np.ndarray):
    """(cut points halfway below each distinct score, true positives and rows at or above
    each) of one column, highest cut first."""
    n = len(scores)
    order = np.argsort(-scores, kind="stable")
    s, yy = scores[order], y[order]
    tp = np.cumsum(yy)
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), n - 1]  # the last row of each tie
    # each cut halfway to the next lower score: a probability a rounding away from the one
    # chosen on (float32 features against float16, another thread count) falls the same side
    below = np.r_[s[last[:-1] + 1], min(0.0, s[-1])]
    return (s[last] + below) / 2, tp[last].astype(np.float64), (last + 1).astype(np.float64)


def _best_f1_cut(scores: np.ndarray, y: np.ndarray) -> float:
    cuts, tp, seen = _cuts(scores, y)
    precision, recall = tp / seen, tp / max(1, y.sum())
    f1 = np.where(tp > 0, 2 * precision * recall / (precision + recall + 1e-12), 0.0)
    return float(cuts[int(np.flatnonzero(f1 == f1.max())[0])])  # first: the highest cut


def choose_thresholds(
    probs: np.ndarray,
    targets: np.ndarray,
    *,
    precision_at: float | None = None,
    shrink: float = SHRINK_POSITIVES,
) -> np.ndarray:
    """Per-class thresholds on validation. By default each class's threshold of best F1,
    drawn towards the one threshold of best micro F1 over every (image, class) pair by
    weight ``n / (n + shrink)`` on its own (n: its positives; a class with none takes the
    global one): a handful of positives picks a threshold by chance. With ``precision_at``,
    the lowest threshold whose precision reaches it (the most recall at that precision; none
    does: above every score, the class is never predicted; a class with no positive keeps
    DEFAULT_THRESHOLD). Each threshold lies halfway between the score it keeps and the next
    lower one. Labels are predicted where ``probs >= threshold``."""
    n, C = probs.shape
    y = targets.astype(bool)
    pos = y.sum(0)
    if precision_at is None:
        overall = _best_f1_cut(probs.ravel(), y.ravel()) if y.any() else DEFAULT_THRESHOLD
        own = np.array(
            [_best_f1_cut(probs[:, c], y[:, c]) if pos[c] else overall for c in range(C)]
        )
        w = pos / (pos + shrink) if shrink > 0 else (pos > 0).astype(np.float64)
        return w * own + (1 - w) * overall
    out = np.full(C, DEFAULT_THRESHOLD, np.float64)
    for c in np.flatnonzero(pos):
        cuts, tp, seen = _cuts(probs[:, c], y[:, c])
        ok = np.flatnonzero(tp / seen >= precision_at)
        out[c] = float(cuts[ok[-1]]) if len(ok) else float((probs[:, c].max() + 1.0) / 2)
    return out


def f1_scores(predicted: np.ndarray, targets: np.ndarray) -> dict:
    """Micro F1 (every (image, class) decision pooled), macro F1 (the mean over classes with a
    positive or a prediction), and each class's precision, recall and F1."""
    p, t = predicted.astype(bool), targets.astype(bool)
    tp, fp, fn = (p & t).sum(0), (p & ~t).sum(0), (~p & t).sum(0)
    micro = 2 * tp.sum() / max(1, 2 * tp.sum() + fp.sum() + fn.sum())
    per = 2 * tp / np.maximum(1, 2 * tp + fp + fn)
    counted = (tp + fp + fn) > 0
    return {
        "micro_f1": float(micro),
        "macro_f1": float(per[counted].mean()) if counted.any() else float("nan"),
        "precision": (tp / np.maximum(1, tp + fp)).tolist(),
        "recall": (tp / np.maximum(1, tp + fn)).tolist(),
        "f1": per.tolist(),
    }


def scores(probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray) -> dict:
    """mAP, micro and macro F1 at ``thresholds``, and the per-class AP of some probabilities."""
    ap = average_precision(probs, targets)
    f1 = f1_scores(probs >= thresholds, targets)
    return {
        "map": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
        "micro_f1": f1["micro_f1"],
        "macro_f1": f1["macro_f1"],
        "per_class_ap": [None if np.isnan(a) else float(a) for a in ap],
        "per_class_f1": f1["f1"],
    }
