"""Linear probes by L-BFGS: L2-regularised multinomial logistic regression in torch.

The protocol of Kornblith et al. (2019), "Do Better ImageNet Models Transfer
Better?": standardised features, one softmax layer, the L2 strength searched
over 45 log-spaced values and the best kept on validation. Here the fit is a
full-batch L-BFGS in torch on the cached tensor (CPU, or GPU when there is
one), each value warm-started from the previous, stronger one.

The objective for one strength ``lam`` is::

    mean_i CE(x_i W + b, y_i) + lam / 2 * ||W||^2       (the bias is not penalised)

so ``lam`` is scikit-learn's ``1 / (C * n_train)``. This module knows nothing
of caches or checkpoints: it maps arrays to weights, for train-head and for
the dataset checks alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .runtime import threads_for

# Kornblith et al. (2019): 45 log-spaced L2 strengths from 1e-6 to 1e5
KORNBLITH_LAMBDAS = tuple(float(v) for v in np.logspace(-6, 5, 45))
MAX_ITER = 100  # L-BFGS iterations for one strength, as scikit-learn (warm starts stop sooner)
# stop when the largest gradient entry is below this: probabilities then within ~2e-3 of a
# converged scikit-learn fit (1e-4, its default tolerance, left 2e-2 at lam 1e-3)
GRAD_TOL = 1e-5
# The default head's path: every other strength (half a decade apart) and a looser tolerance.
# On grocery81 (2,640 x 1280, 81 classes, 1 thread) the full 45 at 1e-5 took 43.6 s, these
# 23 at 1e-3 7.0 s; test accuracy of the loss pick 76.98% vs 76.86% (3 images of 2,485).
DEFAULT_LAMBDAS = KORNBLITH_LAMBDAS[::2]
DEFAULT_GRAD_TOL = 1e-3


@dataclass
class LinearFit:
    """Weights of a linear probe: logits = x @ weight.T + bias for standardised x."""

    weight: torch.Tensor  # (C, D) float32
    bias: torch.Tensor  # (C,) float32
    lam: float
    iterations: int


def _loss(logits, y, weight=None):
    """Mean cross-entropy against labels (n,), or, against (n, C) 0/1 targets (several labels
    per image), the mean over images of the summed binary cross-entropies of their classes."""
    if y.dim() == 2:
        return F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / len(y)
    return F.cross_entropy(logits, y, weight=weight)


def summed_loss(logits, y, weight=None):
    """:func:`_loss` before its mean: the sum over the rows given, each class-weighted with
    ``weight``; block sums divided by :func:`loss_count` of every row are :func:`_loss` of all
    the rows."""
    if y.dim() == 2:
        return F.binary_cross_entropy_with_logits(logits, y, reduction="sum")
    return F.cross_entropy(logits, y, weight=weight, reduction="sum")


def loss_count(y, weight=None) -> float:
    """What :func:`_loss` divides :func:`summed_loss` of every row by: the rows' count, or with
    class weights (single labels) the sum of their classes' weights."""
    if weight is None or y.dim() == 2:
        return float(len(y))
    return float(weight.cpu()[y.cpu()].sum())


def _objective(x, y, w, b, lam, weight=None):
    # w is (C, D), as nn.Linear keeps it: the gradient is then g.T @ x, which reads x row by
    # row; with w as (D, C) it is x.T @ g, 7.5x slower on 100,000 x 1280 rows (627 vs 84 ms,
    # 2 cores), and one objective with its gradient cost 773 ms against 173 ms.
    return _loss(F.linear(x, w, b), y, weight) + 0.5 * lam * w.pow(2).sum()


def lbfgs(params: list[torch.Tensor], *, max_iter: int, grad_tol: float) -> torch.optim.LBFGS:
    """The probes' optimiser: full-batch L-BFGS, unit steps with a strong-Wolfe line search,
    stopping when the largest gradient entry is under ``grad_tol`` or after ``max_iter``
    iterations."""
    return torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        history_size=10,
        tolerance_grad=grad_tol,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )


def fit_logreg(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    lam: float,
    start: LinearFit | None = None,
    max_iter: int = MAX_ITER,
    grad_tol: float = GRAD_TOL,
    class_weight: torch.Tensor | None = None,
) -> LinearFit:
    """One L2-regularised softmax regression, fitted by full-batch L-BFGS.

    Parameters
    ----------
    x : tensor of shape (n, dim), float32, standardised
    y : tensor of shape (n,), int64 in ``0..num_classes-1``; or (n, num_classes) float 0/1
        targets, for several labels per image: one sigmoid per class (binary cross-entropy)
    lam : the L2 strength (see the module docstring)
    start : a previous fit to warm-start from (same shapes)
    class_weight : tensor of shape (num_classes,), each class's weight in the mean
        cross-entropy (the weighted mean, as ``F.cross_entropy(weight=...)``); None: all 1
    """
    D = x.shape[1]
    if start is None:
        w = torch.zeros(num_classes, D, device=x.device)
        b = torch.zeros(num_classes, device=x.device)
    else:
        w = start.weight.to(x.device).clone(memory_format=torch.contiguous_format)
        b = start.bias.clone().to(x.device)
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = lbfgs([w, b], max_iter=max_iter, grad_tol=grad_tol)

    def closure():
        opt.zero_grad()
        loss = _objective(x, y, w, b, lam, class_weight)
        loss.backward()
        return loss

    with threads_for(x.shape[0] * D * num_classes, x.device):
        opt.step(closure)
    iterations = int(opt.state[opt._params[0]].get("n_iter", 0))
    return LinearFit(w.detach().clone(), b.detach().clone(), lam, iterations)


def _scores(fit: LinearFit, x: torch.Tensor, y: torch.Tensor, weight=None) -> tuple[float, float]:
    """(accuracy, or mAP for (n, C) targets; loss as fitted, class-weighted with ``weight``) of
    a fit on labelled rows."""
    with torch.no_grad():
        logits = F.linear(x, fit.weight, fit.bias)
        loss = float(_loss(logits, y, weight))
        if y.dim() == 2:
            from .multilabel import mean_average_precision

            return mean_average_precision(logits.cpu().numpy(), y.cpu().numpy() > 0), loss
        return float((logits.argmax(1) == y).float().mean()), loss


def logreg_path(
    x: torch.Tensor,
    y: torch.Tensor,
    xv: torch.Tensor,
    yv: torch.Tensor,
    num_classes: int,
    *,
    lambdas: tuple[float, ...] = KORNBLITH_LAMBDAS,
    patience: int | None = None,
    **fit,
) -> tuple[LinearFit, list[dict]]:
    """Fit along ``lambdas`` from strong to weak, each warm-started; keep the best on validation.

    The best has the lowest validation cross-entropy. Chosen on accuracy, a
    small validation set picks noise: on flowers12 (144 held-out images, 12
    classes) 20 of 23 strengths tied within two images, the accuracy pick
    (lam 3.2) scored 92.50% on test, the loss pick (lam 3e-5) 96.25%. With
    ``patience``, the path stops after that many strengths in a row worse than
    the best (weak strengths are the slow fits). ``fit``: options of :func:`fit_logreg`
    (``grad_tol``, ``class_weight``); with ``class_weight`` the validation loss weighs each
    class as the fits do. Returns (best fit, one row per
    strength fitted: lam, val_acc, val_loss, iterations, ascending in lam).
    """
    rows, best, current, worse = [], None, None, 0
    for lam in sorted(lambdas, reverse=True):
        current = fit_logreg(x, y, num_classes, lam=lam, start=current, **fit)
        acc, loss = _scores(current, xv, yv, fit.get("class_weight"))
        score = "val_map" if yv.dim() == 2 else "val_acc"
        rows.append({"lam": lam, score: acc, "val_loss": loss, "iterations": current.iterations})
        worse = 0 if best is None or loss < best[0] else worse + 1
        if worse == 0:
            best = (loss, current)
        if patience is not None and worse >= patience:
            break
    return best[1], sorted(rows, key=lambda r: r["lam"])


def seeded_sample(n: int, k: int, seed: int = 0) -> np.ndarray:
    """``k`` of the positions ``0..n-1``, drawn uniformly without replacement from ``seed``,
    increasing: the rows a sampled path is tried on, in memory or streamed."""
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def sampled_path(
    x: torch.Tensor,
    y: torch.Tensor,
    xv: torch.Tensor,
    yv: torch.Tensor,
    num_classes: int,
    *,
    rows: int,
    seed: int = 0,
    **path,
) -> tuple[LinearFit, list[dict], dict]:
    """:func:`logreg_path` on a seeded sample of ``rows`` training rows, then one fit on every
    row at the chosen strength x rows / n, warm-started from the sample's fit.

    The strength of a mean loss is a prior spread over the rows: the same prior over all n
    rows weighs rows / n as much. The path's fits cost rows / n of each evaluation on all rows,
    and the one full fit starts close to its optimum. Measured on 100,000 x 1280 rows, 2 cores
    (benchmarks/results/probe_subsample_cpu.md): 10 classes 17.7 s -> 3.4 s, val accuracy
    0.7976 -> 0.7985; grocery81's features with noise, 81 classes, 76.0 s -> 11.7 s,
    0.9817 -> 0.9804. With n <= rows it is :func:`logreg_path` itself.

    Returns (the fit on every row, the path's rows (each with ``rows``: the rows it was
    fitted on), what was done: ``sample_rows``, ``sample_lam``, ``lam``).
    """
    n = len(y)
    if n <= rows:
        fit, fitted = logreg_path(x, y, xv, yv, num_classes, **path)
        return fit, [{**r, "rows": n} for r in fitted], {"sample_rows": n, "lam": fit.lam}
    keep = torch.from_numpy(seeded_sample(n, rows, seed)).to(x.device)
    small, fitted = logreg_path(x[keep], y[keep], xv, yv, num_classes, **path)
    lam = small.lam * rows / n
    options = {k: path[k] for k in ("grad_tol", "class_weight") if k in path}
    fit = fit_logreg(x, y, num_classes, lam=lam, start=small, **options)
    done = {"sample_rows": rows, "sample_lam": small.lam, "lam": lam}
    return fit, [{**r, "rows": rows} for r in fitted], done


def finite(fit: LinearFit) -> bool:
    """Whether every weight of a fit is a finite number."""
    return bool(torch.isfinite(fit.weight).all() and torch.isfinite(fit.bias).all())
