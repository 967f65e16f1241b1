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

from ..runtime import threads_for

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # lambda of the mean cross-entropy + lambda/2 |W|^2
MAX_ITER = 100  # L-BFGS iterations per fit (each about one pass over the rows)
L2_SEARCH_ROWS = 20_000  # lambda is chosen on a sample of at most this many rows


def folds_of(labels: np.ndarray, *, folds: int, seed: int) -> np.ndarray:
    """A stratified fold number (0..folds-1) for every row: each class dealt round-robin in a
    seeded random order, so every fold holds about 1/folds of each class."""
    rng = np.random.default_rng(seed)
    out = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        out[members] = (np.arange(len(members)) + rng.integers(folds)) % folds
    return out


def _moments(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (d,) of the rows of ``x`` whose weight is 1."""
    n = weight.sum()
    mean = weight @ x / n
    var = weight @ (x * x) / n - mean * mean  # no centred copy of x
    return mean, var.clamp_min(1e-12).sqrt().clamp_min(1e-6)


def _logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, mean, std) -> torch.Tensor:
    """Logits of the standardised rows, (x - mean) / std @ w + b, without a standardised copy."""
    scaled = w / std[:, None]
    return x @ scaled + (b - mean @ scaled)


def _fit(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, classes: int, l2: float, start=None
):
    """(W, b, mean, std) of an L2-regularised multinomial logistic regression on the standardised
    rows of (x, y) whose weight is 1, by full-batch L-BFGS. The other rows are multiplied by
    zero rather than left out, so no fold ever copies the features."""
    mean, std = _moments(x, weight)
    w = torch.zeros(x.shape[1], classes) if start is None else start[0].clone()
    b = torch.zeros(classes) if start is None else start[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b], max_iter=MAX_ITER, history_size=10, line_search_fn="strong_wolfe"
    )
    n = weight.sum()

    def closure():
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(_logits(x, w, b, mean, std), y, reduction="none")
        loss = ce @ weight / n + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), mean, std


def _choose_l2(x: torch.Tensor, y: torch.Tensor, classes: int, seed: int) -> float:
    """The lambda of L2_GRID with the lowest log-loss on a stratified fifth held out of (x, y)
    (at most L2_SEARCH_ROWS of them, a seeded sample)."""
    if len(y) > L2_SEARCH_ROWS:
        pick = np.sort(np.random.default_rng(seed).choice(len(y), L2_SEARCH_ROWS, replace=False))
        x, y = x[torch.from_numpy(pick)], y[torch.from_numpy(pick)]
    inner = torch.from_numpy(folds_of(y.numpy(), folds=5, seed=seed + 1))
    train = (inner != 0).float()
    best, start = (float("inf"), L2_GRID[-1]), None
    for l2 in sorted(L2_GRID, reverse=True):  # strongest first, each fit warm-starting the next
        start = _fit(x, y, train, classes, l2, start[:2] if start else None)
        held = inner == 0
        loss = torch.nn.functional.cross_entropy(_logits(x[held], *start), y[held]).item()
        best = min(best, (loss, l2))
    return best[1]


def out_of_fold_probabilities(
    features: np.ndarray, labels: np.ndarray, *, folds: int = 5, seed: int = 0
) -> np.ndarray:
    """Class probabilities of every row from a model trained on the other folds.

    features : ndarray of shape (n, d), float16 or float32 (held as float32: n x d x 4 bytes)
    labels : ndarray of shape (n,), int64 in 0..C-1 (C = labels.max() + 1)
    Returns ndarray of shape (n, C), float32, rows summing to 1.
    """
    x = torch.from_numpy(np.asarray(features, np.float32))
    y = torch.from_numpy(np.asarray(labels, np.int64))
    classes = int(y.max()) + 1
    fold = torch.from_numpy(folds_of(labels, folds=folds, seed=seed))
    probs = np.zeros((len(y), classes), np.float32)
    with threads_for(x.shape[0] * x.shape[1] * classes, torch.device("cpu")):
        l2 = _choose_l2(x, y, classes, seed)
        for f in range(folds):
            held = fold == f
            if held.any():
                w, b, mean, std = _fit(x, y, (~held).float(), classes, l2)
                probs[held.numpy()] = torch.softmax(_logits(x[held], w, b, mean, std), 1).numpy()
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
