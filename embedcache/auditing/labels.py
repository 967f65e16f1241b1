"""Likely label errors: out-of-fold probabilities and the confident-learning ranking.

Each labelled image is scored by a model that never saw it: K stratified folds, one
multinomial logistic regression per fold on that fold's training rows, standardised with their
own statistics (:func:`embedcache.probe.fit_logreg`, full-batch L-BFGS in torch), the L2
strength chosen once from a small grid on a held-out fifth of a sample of the rows
(:func:`embedcache.probe.logreg_path`); one temperature fitted on all the out-of-fold logits
calibrates their probabilities (:mod:`embedcache.calibration`). An image is a likely error
when confident learning (Northcutt et al., 2021) assigns it to another class than its label:
among the classes whose out-of-fold probability reaches that class's mean self-confidence, the
most probable is not the given one. Issues are ranked by self-confidence (the probability of the
given label), lowest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..calibration import calibration_record, fit_temperature, softmax
from ..probe import LinearFit, fit_logreg, logreg_path

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # lambda of the mean cross-entropy + lambda/2 |W|^2
MAX_ITER = 100  # L-BFGS iterations per fit (each about one pass over the rows)
L2_SEARCH_ROWS = 20_000  # lambda is chosen on a sample of at most this many rows
GATHER_ROWS = 16384  # rows converted to float32 at a time
# each fold's probe trains on at most this many of its rows (or 100 a class, if more), every
# row of a class kept where the class is small: a linear probe of 1280-d features gains little
# past tens of thousands of rows, a float32 copy of 800,000 training rows is 4 GB, and on
# 50,000 rows of 81 classes the label check took 137 s of a 100,000-row audit's 187 s
PROBE_ROWS = 20_000
PROBE_PER_CLASS = 100


def folds_of(labels: np.ndarray, *, folds: int, seed: int) -> np.ndarray:
    """A stratified fold number (0..folds-1) for every row: each class dealt round-robin in a
    seeded random order, so every fold holds about 1/folds of each class."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        out[members] = (np.arange(len(members)) + rng.integers(folds)) % folds
    return out


@dataclass(frozen=True)
class _Scale:
    """Per-dimension standardisation: (x - mean) / std, both (d,) float32."""

    mean: torch.Tensor
    std: torch.Tensor

    def apply(self, features: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        """The standardised float32 copy of ``features[rows]`` (one copy, filled in blocks)."""
        out = _gathered(features, rows)
        return out.sub_(self.mean).div_(self.std)


def _gathered(features: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """``features[rows]`` as a new float32 tensor, converted GATHER_ROWS at a time so that no
    second full-size copy is made."""
    out = torch.empty((len(rows), features.shape[1]))
    for lo in range(0, len(rows), GATHER_ROWS):
        block = features[rows[lo : lo + GATHER_ROWS]]
        out[lo : lo + len(block)] = torch.from_numpy(block)
    return out


def _standardised(features: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, _Scale]:
    """``features[rows]`` in float32, standardised in place with their own per-dimension mean
    and standard deviation, and that standardisation."""
    x = _gathered(features, rows)
    # one reduction, no temporary: float64 blocks of the squares took 1.3 GB more at 80,000 rows
    var, mean = torch.var_mean(x, dim=0, correction=0)
    scale = _Scale(mean, var.clamp_min(1e-12).sqrt().clamp_min(1e-6))
    return x.sub_(scale.mean).div_(scale.std), scale


def _l2_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held): the rows lambda is chosen on, a stratified fifth held out of at most
    L2_SEARCH_ROWS of them (a seeded sample)."""
    rows = np.arange(len(labels))
    if len(rows) > L2_SEARCH_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), L2_SEARCH_ROWS, replace=False))
    inner = folds_of(labels[rows], folds=5, seed=seed + 1)
    return rows[inner != 0], rows[inner == 0]


class _Read:
    """The rows of ``features`` the fits use, read once: the features themselves when they are
    in memory (an ndarray), else those rows copied from the file in one pass (their rows
    renumbered, ``local``)."""

    def __init__(self, features, rows: np.ndarray):
        if isinstance(features, np.ndarray):
            self.rows, self.map = features, None
        else:
            self.map = np.unique(rows)
            self.rows = features[self.map]

    def local(self, rows: np.ndarray) -> np.ndarray:
        return rows if self.map is None else np.searchsorted(self.map, rows)


def _choose_l2(read: _Read, labels: np.ndarray, split, classes: int) -> float:
    """The lambda of L2_GRID with the lowest log-loss on ``split``'s held rows (:func:`_l2_split`),
    the fits warm-started strongest first."""
    train, held = split
    x, scale = _standardised(read.rows, read.local(train))
    y = torch.from_numpy(labels[train])
    xv, yv = scale.apply(read.rows, read.local(held)), torch.from_numpy(labels[held])
    best, _ = logreg_path(x, y, xv, yv, classes, lambdas=L2_GRID)
    return best.lam


def _logits(fit: LinearFit, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.nn.functional.linear(x, fit.weight, fit.bias).numpy()


def capped(labels: np.ndarray, rows: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """At most ``cap`` of ``rows`` (sorted), sampled within each class of ``labels[rows]``: every
    class keeps min(its rows, q) with q the largest quota that fits, so rare classes keep all."""
    if len(rows) <= cap:
        return rows
    classes, counts = np.unique(labels[rows], return_counts=True)
    q, left = int(counts.max()), cap
    for i, n in enumerate(np.sort(counts)):  # smallest first: a class under the quota keeps all
        share = left // (len(counts) - i)
        if n > share:
            q = max(1, share)
            break
        left -= n
    rng = np.random.default_rng(seed)
    kept = [
        rng.choice(rows[labels[rows] == c], size=min(n, q), replace=False)
        for c, n in zip(classes, counts, strict=True)
    ]
    return np.sort(np.concatenate(kept))


def out_of_fold_logits(
    features, labels: np.ndarray, *, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Class logits of every row from a model trained on the other folds.

    features : (n, d), float16 or float32: an ndarray, or rows read from the file
        (:class:`.rows.DiskRows`). Each fold's training rows, at most max(PROBE_ROWS,
        PROBE_PER_CLASS x C) of them (:func:`capped`), are copied as float32; every fold's
        rows are read before the first fit (one pass of the file) and every row is scored by its
        fold's fit in one more pass, GATHER_ROWS rows at a time.
    labels : ndarray of shape (n,), int64 in 0..C-1 (C = labels.max() + 1)
    Returns ndarray of shape (n, C), float32.
    """
    labels = np.asarray(labels, np.int64)
    classes = int(labels.max()) + 1
    fold = folds_of(labels, folds=folds, seed=seed)
    cap = max(PROBE_ROWS, PROBE_PER_CLASS * classes)
    trains = [capped(labels, np.flatnonzero(fold != f), cap, seed + f) for f in range(folds)]
    split = _l2_split(labels, seed)
    read = _Read(features, np.concatenate([*split, *trains]))
    l2 = _choose_l2(read, labels, split, classes)
    fits = []
    for f in range(folds):
        if not (fold == f).any():  # nothing to score: no fit
            fits.append(None)
            continue
        x, scale = _standardised(read.rows, read.local(trains[f]))
        fit = fit_logreg(x, torch.from_numpy(labels[trains[f]]), classes, lam=l2, max_iter=MAX_ITER)
        del x  # one training copy at a time
        fits.append((fit, scale))
    del read  # the fits' rows
    logits = np.zeros((len(labels), classes), np.float32)
    for lo in range(0, len(labels), GATHER_ROWS):  # every row in order: one pass of the file
        block = torch.from_numpy(np.asarray(features[lo : lo + GATHER_ROWS])).float()
        own = fold[lo : lo + len(block)]
        for f, fitted in enumerate(fits):
            mine = np.flatnonzero(own == f)
            if len(mine):
                fit, scale = fitted
                x = block[torch.from_numpy(mine)].sub_(scale.mean).div_(scale.std)
                logits[lo + mine] = _logits(fit, x)
    return logits


CALIBRATION_ROWS = 50_000  # the temperature is fitted on a seeded sample of this many rows


def calibrated(
    logits: np.ndarray, labels: np.ndarray, *, out: np.ndarray | None = None
) -> tuple[np.ndarray, dict]:
    """(probabilities (n, C) float32, the calibration record) of out-of-fold ``logits`` (n, C):
    their softmax after dividing them by one temperature fitted on them and ``labels`` (n,).
    Every row is held out of the fit that scored it, so the logits of all folds together are
    the held-out set a temperature needs; the ranking then reads calibrated probabilities (the
    L2 strength chosen on log-loss leaves a probe under- or overconfident).

    Past CALIBRATION_ROWS rows the temperature and the record come from a seeded sample of
    them (the record says how many); the probabilities are made GATHER_ROWS rows at a time
    into ``out`` (default: a new float32 array; ``out=logits`` overwrites the logits).
    """
    rows = np.arange(len(labels))
    if len(rows) > CALIBRATION_ROWS:
        rows = np.sort(np.random.default_rng(0).choice(rows, CALIBRATION_ROWS, replace=False))
    t = fit_temperature(logits[rows], labels[rows])
    record = calibration_record(logits[rows], labels[rows], t)
    if len(rows) < len(labels):
        record["rows"] = len(rows)
    out = np.empty(logits.shape, np.float32) if out is None else out
    for lo in range(0, len(logits), GATHER_ROWS):
        out[lo : lo + GATHER_ROWS] = softmax(logits[lo : lo + GATHER_ROWS], t)
    return out, record


def out_of_fold_probabilities(
    features: np.ndarray, labels: np.ndarray, *, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Calibrated class probabilities of every row from a model trained on the other folds:
    :func:`out_of_fold_logits`, then :func:`calibrated`. Shapes as there; returns (n, C)
    float32, rows summing to 1."""
    labels = np.asarray(labels, np.int64)
    logits = out_of_fold_logits(features, labels, folds=folds, seed=seed)
    return calibrated(logits, labels)[0]


@dataclass
class LabelIssues:
    """Confident learning on out-of-fold probabilities.

    self_confidence : (n,) float32, the probability of each row's given label
    suggested : (n,) int64, the most probable class
    flagged : (n,) bool, confident learning assigns the row to another class than its label
    order : (n,) int64, rows by self-confidence, lowest first (the ranking)
    """

    self_confidence: np.ndarray
    suggested: np.ndarray
    flagged: np.ndarray
    order: np.ndarray


def label_issues(probs: np.ndarray, labels: np.ndarray) -> LabelIssues:
    """Rank and flag likely label errors from out-of-fold ``probs`` (n, C) and ``labels`` (n,)."""
    n, classes = probs.shape
    self_conf = probs[np.arange(n), labels]
    per_class = np.bincount(labels, weights=self_conf, minlength=classes)
    counts = np.bincount(labels, minlength=classes)
    thresholds = np.where(counts > 0, per_class / np.maximum(counts, 1), 1.0)
    flagged, suggested = np.zeros(n, bool), np.zeros(n, np.int64)
    for lo in range(0, n, GATHER_ROWS):  # (rows, C) at a time: no float64 copy of every row
        p = probs[lo : lo + GATHER_ROWS]
        confident = np.where(p >= thresholds[None, :], p, -1.0)
        assigned = confident.argmax(1)
        flagged[lo : lo + len(p)] = (confident.max(1) >= 0) & (assigned != labels[lo : lo + len(p)])
        suggested[lo : lo + len(p)] = p.argmax(1)
    order = np.argsort(self_conf, kind="stable")
    return LabelIssues(self_conf.astype(np.float32), suggested, flagged, order)
