"""Likely label errors: out-of-fold probabilities and the confident-learning ranking.

Each labelled image is scored by a model that never saw it: K stratified folds, one
multinomial logistic regression per fold on standardised features (full-batch L-BFGS in
torch, L2 strength chosen once from a small grid on a held-out part of the first fold's
training rows). An image is a likely error when confident learning (Northcutt et al., 2021)
assigns it to another class than its label: among the classes whose out-of-fold probability
reaches that class's mean self-confidence, the most probable is not the given one. Issues are
ranked by self-confidence (the probability of the given label), lowest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # lambda of the mean cross-entropy + lambda/2 |W|^2
MAX_ITER = 200  # L-BFGS iterations per fit (each one pass over the fold's rows)
# Below this many multiply-adds per pass (rows x dim x classes) the fits run on one thread: on
# 930 x 1280 x 12 a pass took 2.6 ms on one thread and 43 ms on two beside another busy process
# (OpenMP threads spin waiting for a core), and small passes gain nothing from a second thread.
ONE_THREAD_MACS = 1 << 27


def folds_of(labels: np.ndarray, *, folds: int, seed: int) -> np.ndarray:
    """A stratified fold number (0..folds-1) for every row: each class dealt round-robin in a
    seeded random order, so every fold holds about 1/folds of each class."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        out[members] = (np.arange(len(members)) + rng.integers(folds)) % folds
    return out


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def _fit(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, start=None):
    """(W, b) of an L2-regularised multinomial logistic regression on (x, y), by L-BFGS."""
    w = torch.zeros(x.shape[1], classes) if start is None else start[0].clone()
    b = torch.zeros(classes) if start is None else start[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b], max_iter=MAX_ITER, history_size=10, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _choose_l2(x: torch.Tensor, y: torch.Tensor, classes: int, seed: int) -> float:
    """The lambda of L2_GRID with the lowest log-loss on a stratified fifth held out of (x, y)."""
    inner = folds_of(y.numpy(), folds=5, seed=seed + 1)
    tr, va = torch.from_numpy(inner != 0), torch.from_numpy(inner == 0)
    xt, xv = _standardise(x[tr], x[va])
    best, start = (float("inf"), L2_GRID[-1]), None
    for l2 in sorted(L2_GRID, reverse=True):  # strongest first, each fit warm-starting the next
        start = _fit(xt, y[tr], classes, l2, start)
        loss = torch.nn.functional.cross_entropy(xv @ start[0] + start[1], y[va]).item()
        best = min(best, (loss, l2))
    return best[1]


def out_of_fold_probabilities(
    features: np.ndarray, labels: np.ndarray, *, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Class probabilities of every row from a model trained on the other folds.

    features : ndarray of shape (n, d), float16 or float32
    labels : ndarray of shape (n,), int64 in 0..C-1 (C = labels.max() + 1)
    Returns ndarray of shape (n, C), float32, rows summing to 1.
    """
    x = torch.from_numpy(np.asarray(features, np.float32))
    y = torch.from_numpy(np.asarray(labels, np.int64))
    classes = int(y.max()) + 1
    fold = folds_of(labels, folds=folds, seed=seed)
    probs = np.zeros((len(y), classes), np.float32)
    l2 = None
    threads = torch.get_num_threads()
    if x.shape[0] * x.shape[1] * classes < ONE_THREAD_MACS:
        torch.set_num_threads(1)
    try:
        for f in range(folds):
            held = torch.from_numpy(fold == f)
            if not held.any():
                continue
            l2 = _choose_l2(x[~held], y[~held], classes, seed) if l2 is None else l2
            xt, xh = _standardise(x[~held], x[held])
            w, b = _fit(xt, y[~held], classes, l2)
            probs[held.numpy()] = torch.softmax(xh @ w + b, dim=1).numpy()
    finally:
        torch.set_num_threads(threads)
    return probs


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
    thresholds = np.array(
        [self_conf[labels == c].mean() if np.any(labels == c) else 1.0 for c in range(classes)]
    )
    confident = np.where(probs >= thresholds[None, :], probs, -1.0)
    assigned = confident.argmax(1)
    flagged = (confident.max(1) >= 0) & (assigned != labels)
    order = np.argsort(self_conf, kind="stable")
    return LabelIssues(self_conf.astype(np.float32), probs.argmax(1), flagged, order)
