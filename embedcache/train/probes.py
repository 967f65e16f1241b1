"""Linear probes by L-BFGS (logreg, the default head's linear candidate) and kNN, on a cache's
rows: standardised in memory, fitted by :mod:`embedcache.probe`."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import EmbedcacheError
from ..feed import Rows
from ..heads import Blend, Head, KNNHead, Standardize, make_head
from ..probe import (
    DEFAULT_GRAD_TOL,
    DEFAULT_LAMBDAS,
    GRAD_TOL,
    KORNBLITH_LAMBDAS,
    LinearFit,
    finite,
    fit_logreg,
    logreg_path,
    sampled_path,
)
from .features import array_standardization, balanced_weights

KNN_KS = (1, 3, 5, 7, 11, 15, 21)


def _standardized(train: Rows, *others: Rows) -> tuple[Standardize, list[torch.Tensor]]:
    """train's features and the others' in memory, standardised with train's statistics."""
    x = train.all()  # a new float32 array: standardised in place below
    mean, std = (torch.from_numpy(a.astype(np.float32)) for a in array_standardization(x))
    xs = [torch.from_numpy(a).sub_(mean).div_(std) for a in (x, *(o.all() for o in others))]
    return Standardize(mean, std), xs


def require_in_memory(kind: str, train: Rows) -> None:
    if not train.in_memory:
        raise EmbedcacheError(
            f"--head {kind} needs the features in memory; raise --max-memory or use --head linear"
        )


def _as_linear(fit: LinearFit, present: np.ndarray) -> torch.nn.Linear:
    """A probe's weights as a linear layer; a class with no training image is never predicted."""
    C, D = fit.weight.shape
    linear = make_head("linear", D, C)
    absent = torch.from_numpy(~np.isin(np.arange(C), present))
    with torch.no_grad():
        linear.weight.copy_(fit.weight.cpu().masked_fill(absent[:, None], 0.0))
        linear.bias.copy_(fit.bias.cpu().masked_fill(absent, -1e4))
    return linear


def fit_probe(
    train: Rows,
    val: Rows | None,
    classes,
    device,
    *,
    path: dict,
    lam=None,
    balanced=False,
    start=None,
):
    """A softmax regression on standardised features (see :mod:`embedcache.probe`): the L2
    strength chosen on ``val`` along ``path`` (logreg_path's options), or fitted at ``lam`` on
    ``train`` (a refit, from the LinearFit ``start`` where given); ``balanced``: with balanced
    class weights. Returns (head, metrics)."""
    norm, (x, *xv) = _standardized(train, *([val] if lam is None else []))
    y = torch.from_numpy(train.labels).to(device)
    weight, done = None, {}
    if balanced:
        weight = torch.from_numpy(balanced_weights(train.labels, len(classes))).to(device)
    if lam is None:
        yv = torch.from_numpy(val.labels).to(device)
        xv = xv[0].to(device)
        if "rows" in path:  # the strength chosen on a sample, then one fit on every row
            fit, rows, done = sampled_path(
                x.to(device), y, xv, yv, len(classes), **path, class_weight=weight
            )
        else:
            fit, rows = logreg_path(
                x.to(device), y, xv, yv, len(classes), **path, class_weight=weight
            )
    else:
        fit = fit_logreg(x.to(device), y, len(classes), lam=lam, start=start, class_weight=weight)
        rows = []
    if not finite(fit):
        raise EmbedcacheError("the logistic regression diverged (non-finite weights)")
    labels = train.labels
    present = np.flatnonzero(labels.any(0)) if labels.ndim == 2 else np.unique(labels)
    head = Head(norm, _as_linear(fit, present))
    best = {"lam": fit.lam}
    if "sample_lam" in done:  # the path ran on a sample of the train rows
        best |= {k: done[k] for k in ("sample_rows", "sample_lam")}
    return head, {"sweep": rows, "best": best, "iterations": fit.iterations}


def warm_start(module: torch.nn.Module) -> LinearFit | None:
    """A chosen probe's weights (a blend's: its probe's) as a refit's starting point; None for
    another head. Classes without a training image were masked at a bias of -1e4: started there,
    a class that val brings would cost the fit many steps, so the bias starts at -30 at most."""
    if isinstance(module, Blend):
        module = module.members[0]
    layer = getattr(module, "classifier", None)
    if not isinstance(layer, torch.nn.Linear):
        return None
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clamp(min=-30.0)
    return LinearFit(weight, bias, lam=0.0, iterations=0)


# The logreg reference: the literature's 45 strengths, fitted to a tight tolerance.
LOGREG_PATH = {"lambdas": KORNBLITH_LAMBDAS, "grad_tol": GRAD_TOL}
# The default head's linear candidate: every other strength, stopping two decades past the best,
# on at most PATH_ROWS train rows; then one fit on all of them (embedcache.probe.sampled_path).
# head_protocol's sets all have fewer train rows, so their paths are unchanged.
PATH_ROWS = 10_000
AUTO_PATH = {
    "lambdas": DEFAULT_LAMBDAS,
    "grad_tol": DEFAULT_GRAD_TOL,
    "patience": 4,
    "rows": PATH_ROWS,
}


def fit_knn(train: Rows, val: Rows | None, classes, *, k: int | None = None):
    """Cosine kNN on standardised features: k chosen on ``val``, or ``k`` given (a refit)."""
    norm, (x, *xv) = _standardized(train, *([val] if k is None else []))
    bank, labels, C = x, torch.from_numpy(train.labels), len(classes)
    if k is not None:
        return Head(norm, KNNHead(bank, labels, C, k)), {"sweep": [], "best": {"k": k}}
    fits, rows = [], []
    for k in (k for k in KNN_KS if k <= len(x)):
        knn = KNNHead(bank, labels, C, k)
        acc = float((knn(xv[0]).argmax(1).numpy() == val.labels).mean())
        fits.append((acc, -k, knn))
        rows.append({"k": k, "val_acc": acc})
    acc, _, knn = max(fits, key=lambda t: (t[0], t[1]))
    return Head(norm, knn), {"sweep": rows, "best": {"k": knn.k}}
