"""Linear probes by L-BFGS (logreg, the default head's linear candidate) and kNN, on a cache's
rows: standardised in memory, fitted by :mod:`embedcache.probe`."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

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
    lbfgs,
    logreg_path,
    loss_count,
    sampled_path,
    seeded_sample,
    summed_loss,
)
from ..runtime import threads_for
from .features import array_standardization, balanced_weights, feature_stats

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
    weight, done = None, {}
    if balanced:
        weight = torch.from_numpy(balanced_weights(train.labels, len(classes))).to(device)
    if not train.in_memory:
        if lam is not None or "rows" not in path:
            require_in_memory("logreg", train)
        norm, fit, rows, done = _streamed_path(train, val, len(classes), device, path, weight)
    elif lam is None:
        norm, (x, *xv) = _standardized(train, val)
        y = torch.from_numpy(train.labels).to(device)
        xv, yv = xv[0].to(device), torch.from_numpy(val.labels).to(device)
        if "rows" in path:  # the strength chosen on a sample, then one fit on every row
            fit, rows, done = sampled_path(
                x.to(device), y, xv, yv, len(classes), **path, class_weight=weight
            )
        else:
            fit, rows = logreg_path(
                x.to(device), y, xv, yv, len(classes), **path, class_weight=weight
            )
    else:
        norm, (x,) = _standardized(train)
        y = torch.from_numpy(train.labels).to(device)
        fit = fit_logreg(x.to(device), y, len(classes), lam=lam, start=start, class_weight=weight)
        rows = []
    if not finite(fit):
        raise EmbedcacheError("the logistic regression diverged (non-finite weights)")
    labels = train.labels
    present = np.flatnonzero(labels.any(0)) if labels.ndim == 2 else np.unique(labels)
    head = Head(norm, _as_linear(fit, present))
    best = {"lam": fit.lam}
    if "sample_lam" in done:  # the path ran on a sample of the train rows
        best |= {k: done[k] for k in ("sample_rows", "sample_lam", "val_rows") if k in done}
    return head, {"sweep": rows, "best": best, "iterations": fit.iterations}


# Streamed train rows (past --max-memory): validation rows that the path scores at most, a
# seeded uniform sample of them when there are more
VAL_ROWS = 50_000
# L-BFGS iterations of the streamed fit on every row: each evaluation reads every row, and it
# starts from the sample's fit at the same prior
STREAM_ITER = 10


def sample_rows(rows: Rows, k: int, seed: int = 0) -> Rows:
    """A seeded uniform sample of ``k`` of the rows (:func:`embedcache.probe.seeded_sample`, the
    rows a sampled path draws), in memory in their stored dtype; ``rows`` itself when k covers
    them."""
    return rows if k >= rows.n else rows.subset(seeded_sample(rows.n, k, seed))


def _streamed_path(train: Rows, val: Rows, num_classes: int, device, path: dict, weight):
    """:func:`embedcache.probe.sampled_path` on rows streamed from the file: the standardisation
    from one pass over every row, the path on a seeded sample of ``path["rows"]`` of them (and
    of VAL_ROWS validation rows at most), then one streamed L-BFGS fit on every row at the
    chosen strength x sample / n, warm-started from the sample's fit. Returns (standardisation,
    fit, the path's rows, what was done)."""
    mean, std = (torch.from_numpy(a.astype(np.float32)) for a in feature_stats(train))
    norm = Standardize(mean, std)
    small_rows, options = sample_rows(train, path["rows"]), dict(path)
    k = options.pop("rows")
    some_val = sample_rows(val, VAL_ROWS)
    x, xv = (
        torch.from_numpy(r.all()).sub_(mean).div_(std).to(device) for r in (small_rows, some_val)
    )
    y, yv = (torch.from_numpy(r.labels).to(device) for r in (small_rows, some_val))
    small, fitted = logreg_path(x, y, xv, yv, num_classes, **options, class_weight=weight)
    del x, xv
    lam = small.lam * k / train.n
    fit = fit_streamed(
        train,
        norm,
        num_classes,
        lam=lam,
        start=small,
        grad_tol=options.get("grad_tol", GRAD_TOL),
        class_weight=weight,
        device=device,
    )
    done = {"sample_rows": k, "sample_lam": small.lam, "lam": lam, "val_rows": some_val.n}
    return norm, fit, [{**r, "rows": k} for r in fitted], done


def fit_streamed(
    rows: Rows,
    norm: Standardize,
    num_classes: int,
    *,
    lam: float,
    start: LinearFit,
    grad_tol: float,
    class_weight=None,
    device=None,
) -> LinearFit:
    """:func:`embedcache.probe.fit_logreg`'s objective over rows streamed in blocks: each L-BFGS
    evaluation is one pass over the rows, summing each block's loss and gradient; at most
    STREAM_ITER iterations. On 10,000,000 x 1280 float16 rows a pass read the disk for about 49 s
    (2 cores; benchmarks/results/logreg_grid_cpu.md)."""
    device = device or torch.device("cpu")
    labels = torch.from_numpy(rows.labels)
    denominator = loss_count(labels, class_weight)
    mean, std = norm.mean.to(device), norm.std.to(device)
    w = start.weight.to(device).clone().requires_grad_(True)
    b = start.bias.to(device).clone().requires_grad_(True)
    opt = lbfgs([w, b], max_iter=STREAM_ITER, grad_tol=grad_tol)

    # each evaluation reads every row: a bar of passes in a terminal (none in a pipe or a test)
    bar = tqdm(desc=f"probe on {rows.n:,} streamed rows", unit="pass", disable=None, leave=False)

    def closure():
        opt.zero_grad()
        bar.update()
        total = 0.0
        for pos, x in rows.blocks():
            x = torch.from_numpy(x).to(device).sub_(mean).div_(std)
            yb = labels[pos].to(device)
            loss = summed_loss(F.linear(x, w, b), yb, class_weight) / denominator
            loss.backward()
            total += float(loss.detach())
        reg = 0.5 * lam * w.pow(2).sum()
        reg.backward()
        return torch.tensor(total + float(reg.detach()))

    with threads_for(rows.n * rows.dim * num_classes, device), bar:
        opt.step(closure)
    iterations = int(opt.state[opt._params[0]].get("n_iter", 0))
    return LinearFit(w.detach().cpu(), b.detach().cpu(), lam, iterations)


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
