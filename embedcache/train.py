"""Training heads on cached features: in memory or streamed from HDF5, one head or a whole sweep."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .cache import Cache, open_cache
from .checkpoint import HeadCheckpoint, Recorded, TrainedOn, check_finite
from .config import HeadConfig
from .data import holdout, holdout_note, paths_digest
from .errors import EmbedcacheError
from .exclusion import row_filter
from .feed import Rows, ViewRows, join_rows, memory_budget
from .heads import Head, KNNHead, StackedAdamW, StackedHeads, Standardize, init_template, make_head
from .probe import (
    DEFAULT_GRAD_TOL,
    DEFAULT_LAMBDAS,
    GRAD_TOL,
    KORNBLITH_LAMBDAS,
    LinearFit,
    finite,
    fit_logreg,
    logreg_path,
)
from .runtime import read_ahead, resolve_device, seeded

FULL_BATCH_BYTES = 64 << 20  # train features up to this size (as float32) go in one batch
STREAM_BATCH = 1024  # batch size when the features are larger than that
KNN_KS = (1, 3, 5, 7, 11, 15, 21)


@dataclass
class HeadResult:
    """What train_head returns: the head (standardisation included) and its metrics."""

    head: torch.nn.Module
    metrics: dict
    path: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Features of one split, in memory or streamed


def standardization(mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre each dimension, divide all by one scale: the root of the mean variance.

    Returns (mean, std), both of shape (D,); std holds that one scale D times.
    Per-dimension scaling blows up the near-dead features that pooled CNN
    features often have (422 of 1280 on the 64 px digits): a linear head on
    them reached 88.0% there against 92.8% with one scale, while on
    hymenoptera the two differ by one image of 153.
    """
    scale = math.sqrt(float(np.mean(var))) + 1e-6
    return mean, np.full_like(mean, scale)


def feature_stats(rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Standardisation statistics of some rows: per-dimension mean, one scale (see :func:`standardization`)."""
    total = sq = None
    for _, x in rows.blocks():
        x = x.astype(np.float64)
        total = x.sum(0) if total is None else total + x.sum(0)
        sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
    mean = total / rows.n
    return standardization(mean, np.maximum(sq / rows.n - mean * mean, 0.0))


def _labels(cache: Cache, split: str) -> np.ndarray:
    """Labels of a split that a head can learn from, or a one-line error."""
    labels = cache.labels(split)
    if len(labels) == 0:
        raise EmbedcacheError(f"the {split} split of {cache.path} is empty")
    if np.any(labels < 0):
        raise EmbedcacheError(
            f"cache {cache.path} has unlabelled {split} images; train-head needs class folders or a CSV with labels"
        )
    return labels


@dataclass
class _Data:
    """What a head trains and is chosen on: train rows (with views when used), validation rows,
    the mirrored validation images when the cache stores them (for test-time averaging)."""

    train: Rows
    val: Rows
    val_source: str
    val_mirror: Rows | None
    views: int  # views per training image used (0: plain features only)
    carved: bool = False  # validation held out of train (not the cache's own val split)
    digests: dict = field(default_factory=dict)  # split -> digest of its paths (TrainedOn)


def _splits(cache: Cache, cfg: HeadConfig) -> _Data:
    """Train and validation rows of a cache, checked; and where validation comes from.

    Without a val split, validation is held out of train by :func:`embedcache.data.holdout`
    on the image paths: the same images finetune and compare hold out of that data.
    """
    if "train" not in cache:
        raise EmbedcacheError(
            f"cache {cache.path} has no train split (it has {', '.join(cache.splits)}); extract a labelled folder"
        )
    labels = _labels(cache, "train")
    present = np.unique(labels)
    if len(present) < 2:
        name = cache.classes[present[0]] if cache.classes else present[0]
        raise EmbedcacheError(
            f"the train split of {cache.path} has a single class ({name}); a classifier needs at least two"
        )
    kept = row_filter(cache, cfg.exclude)  # (split, rows) -> the rows --exclude leaves in
    feats = cache.features("train")
    # views train the epoch-based heads; logreg on plain + 4 views of the digits took 268 s against 4 s
    torch_head = cfg.head in ("auto", "linear", "mlp")
    views = cache.views("train") if cfg.views == "use" and torch_head else None
    values = feats.shape[0] * feats.shape[1] + (
        int(np.prod(views.shape)) if views is not None else 0
    )
    need = values * feats.dtype.itemsize
    in_memory = need <= memory_budget(cfg.max_memory) if cfg.stream is None else not cfg.stream
    if views is not None and not in_memory:
        raise EmbedcacheError(
            f"training on the views of {cache.path} needs them in memory ({need / 1e9:.1f} GB); raise --max-memory or pass --views ignore"
        )

    def train_rows(rows: np.ndarray) -> Rows:
        if views is not None:
            return ViewRows(feats, views, labels, rows)
        return Rows(feats, labels, rows, in_memory)

    used = views.shape[1] if views is not None else 0
    paths = cache.paths("train")
    digests = {"train": paths_digest(paths)}
    if "val" in cache:
        vlabels, every = _labels(cache, "val"), kept("val", np.arange(len(cache.labels("val"))))
        val = Rows(cache.features("val"), vlabels, every, in_memory)
        mirror = _mirror(cache, "val", vlabels, every, in_memory)
        digests["val"] = paths_digest(cache.paths("val"))
        train = train_rows(kept("train", np.arange(len(labels))))
        return _Data(train, val, "val split", mirror, used, False, digests)
    tr, va = holdout(paths, labels, fraction=cfg.val_fraction, seed=cfg.seed)
    tr, va = kept("train", tr), kept("train", va)
    if len(va) == 0 and cfg.val_fraction == 0:
        raise EmbedcacheError(
            f"cache {cache.path} has no val split and --val-fraction is 0: nothing to validate on; "
            "pass a --val-fraction above 0 (e.g. 0.2) or extract data with a val split"
        )
    if len(va) == 0:
        raise EmbedcacheError(
            f"too few training images in {cache.path} to hold out a validation set"
        )
    how = holdout_note(len(va), len(labels), cfg.val_fraction, cfg.seed)
    mirror = _mirror(cache, "train", labels, va, in_memory)
    val = Rows(feats, labels, va, in_memory)
    return _Data(train_rows(tr), val, how, mirror, used, True, digests)


def _mirror(cache: Cache, split: str, labels, rows: np.ndarray, in_memory: bool) -> Rows | None:
    """The mirrored images of some rows (view 1 of a cache with views), or None."""
    views = cache.views(split)
    if views is None or not in_memory:
        return None
    return Rows(views[:, 0], labels, rows, in_memory=True)


# ---------------------------------------------------------------------------
# The torch heads (linear, mlp): a sweep trained in one pass per epoch


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """``a`` on ``device`` in one copy: on a GPU from pinned memory, without waiting for it.

    On the CPU the tensor shares ``a``'s memory (no copy at all).
    """
    t = torch.from_numpy(a)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _standardize(x: np.ndarray, norm: Standardize, device) -> torch.Tensor:
    """(x - mean) / std as Standardize computes it, in one new tensor."""
    return _to_device(x, device).sub(norm.mean).div_(norm.std)


def _per_head_loss(z: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy of logits (H, B, C) against labels (B,): losses (H, B).

    Laid out as (B, C, H), one call covers every head without repeating the
    labels H times (4x faster than flattening the heads into the batch).
    """
    H, B, _ = z.shape
    target = y.unsqueeze(1).expand(B, H)
    return F.cross_entropy(
        z.permute(1, 2, 0), target, reduction="none", label_smoothing=label_smoothing
    ).T


@dataclass
class _Sweep:
    """H heads (one per (lr, weight decay)) trained together, with their best epochs so far."""

    kind: str
    template: torch.nn.Module
    grid: list[tuple[float, float]]
    heads: StackedHeads
    opt: StackedAdamW
    norm: Standardize  # on the training device
    best: dict  # acc, loss, epoch: tensors of shape (H,)
    best_params: dict
    history: dict = field(default_factory=lambda: {k: [] for k in _HISTORY})
    epoch: int = 0  # epochs done

    @classmethod
    def create(cls, train: Rows, num_classes: int, cfg: HeadConfig, device) -> _Sweep:
        template = init_template(
            cfg.head, train.dim, num_classes, hidden=cfg.hidden, dropout=cfg.dropout, seed=cfg.seed
        )
        grid = [(lr, wd) for lr in cfg.lr for wd in cfg.weight_decay]
        heads = StackedHeads(template, len(grid)).to(device)
        opt = StackedAdamW(
            heads, torch.tensor([g[0] for g in grid]), torch.tensor([g[1] for g in grid])
        )
        mean, std = (torch.from_numpy(a).float() for a in feature_stats(train))
        H = len(grid)
        best = {
            "acc": torch.full((H,), -1.0),
            "loss": torch.full((H,), math.inf),
            "epoch": torch.zeros(H, dtype=torch.long),
        }
        params = {k: v.detach().clone() for k, v in heads.named_parameters()}
        return cls(
            cfg.head, template, grid, heads, opt, Standardize(mean, std).to(device), best, params
        )

    def restore(self, state: dict, device) -> None:
        """Continue from a saved :meth:`state` (--resume)."""
        self.heads.load_state_dict(state["heads"])
        self.opt.load_state_dict(state["optimizer"])
        self.best = {k: v.clone() for k, v in state["best"].items()}
        self.best_params = {k: v.to(device) for k, v in state["best_params"].items()}
        self.history = {k: [torch.as_tensor(v) for v in vs] for k, vs in state["history"].items()}
        self.epoch = int(state["epoch"])

    def state(self) -> dict:
        opt = self.opt.state_dict()
        return {
            "heads": {k: v.cpu() for k, v in self.heads.state_dict().items()},
            "optimizer": {
                "step": opt["step"],
                "m": {k: v.cpu() for k, v in opt["m"].items()},
                "v": {k: v.cpu() for k, v in opt["v"].items()},
            },
            "best": self.best,
            "best_params": {k: v.cpu() for k, v in self.best_params.items()},
            "history": {k: list(vs) for k, vs in self.history.items()},
            "epoch": self.epoch,
        }


_HISTORY = ("train_loss", "train_acc", "val_loss", "val_acc")


def _evaluate(sweep: _Sweep, val: Rows, device, mirror: Rows | None = None):
    """Per-head (cross-entropy, accuracy) on validation; with ``mirror``, of the logits averaged
    over each image and its mirror (test-time averaging, as evaluate does on such a cache).

    The loss is the plain cross-entropy (no label smoothing): what heads are chosen on."""
    losses, correct = 0.0, 0.0
    sweep.heads.eval()
    mirrored = mirror.blocks() if mirror is not None else None
    with torch.no_grad():
        for pos, x in val.blocks():
            y = _to_device(val.labels[pos], device)
            z = sweep.heads(_standardize(x, sweep.norm, device))  # (H, B, C)
            if mirrored is not None:
                z = (z + sweep.heads(_standardize(next(mirrored)[1], sweep.norm, device))) / 2
            losses = losses + _per_head_loss(z, y, 0.0).sum(1)
            correct = correct + (z.argmax(-1) == y).sum(1)
    sweep.heads.train()
    return (losses / val.n).cpu(), (correct.float() / val.n).cpu()


def _train_epoch(sweep: _Sweep, train: Rows, cfg: HeadConfig, batch_size: int, device) -> None:
    """One pass over train for every head; appends train loss and accuracy to the history."""
    H = len(sweep.grid)
    rng = np.random.default_rng([cfg.seed, sweep.epoch])
    if isinstance(train, ViewRows):  # this epoch's picture of every image
        train.pick(np.random.default_rng([cfg.seed, sweep.epoch, 1]))
    tl, tc = torch.zeros(H, device=device), torch.zeros(H, device=device)
    with seeded(
        cfg.seed * 1_000_003 + sweep.epoch, device
    ):  # dropout: the same per epoch, resumed or not
        for xb, yb in train.batches(batch_size, rng):
            y = _to_device(yb, device)
            z = sweep.heads(_standardize(xb, sweep.norm, device))
            loss = _per_head_loss(z, y, cfg.label_smoothing)
            sweep.opt.zero_grad()
            loss.mean(1).sum().backward()  # heads share nothing, so each gets its own gradient
            sweep.opt.step()
            tl += loss.detach().sum(1)
            tc += (z.detach().argmax(-1) == y).sum(1)
    sweep.history["train_loss"].append((tl / train.n).cpu())
    sweep.history["train_acc"].append((tc / train.n).cpu())


def _keep_best(sweep: _Sweep, vl: torch.Tensor, va: torch.Tensor, device) -> None:
    """Record validation results; heads that improved keep this epoch's weights."""
    best = sweep.best
    sweep.history["val_loss"].append(vl)
    sweep.history["val_acc"].append(va)
    improved = vl < best["loss"]  # a diverged head (NaN loss) is never kept
    best["acc"] = torch.where(improved, va, best["acc"])
    best["loss"] = torch.where(improved, vl, best["loss"])
    best["epoch"] = torch.where(
        improved, torch.full_like(best["epoch"], sweep.epoch), best["epoch"]
    )
    with torch.no_grad():
        for name, p in sweep.heads.named_parameters():
            mask = sweep.opt.per_head(name, improved.float().to(device), p).bool().expand_as(p)
            sweep.best_params[name] = torch.where(mask, p, sweep.best_params[name])


def _train_torch(
    data: _Data, classes, cfg: HeadConfig, *, batch_size, device, progress, state=None
):
    """Train every (lr, weight decay) head; returns (best head, metrics, resume state). Heads are
    chosen on validation as evaluate will score them: with test-time averaging when the cache
    stores the mirrors of the validation images."""
    train, val = data.train, data.val
    sweep = _Sweep.create(train, len(classes), cfg, device)
    if state is not None:
        sweep.restore(state, device)
    H = len(sweep.grid)
    bar = tqdm(
        range(sweep.epoch, cfg.epochs),
        desc=f"train-head {cfg.head} x{H}",
        unit="epoch",
        disable=not progress,
        dynamic_ncols=True,
    )
    epoch_seconds = []  # wall time per epoch of this run (not resumed ones): for time/accuracy curves
    for _ in bar:
        t_epoch = time.perf_counter()
        _train_epoch(sweep, train, cfg, batch_size, device)
        _stop_if_diverged(sweep, cfg)
        _keep_best(sweep, *_evaluate(sweep, val, device, data.val_mirror), device)
        epoch_seconds.append(time.perf_counter() - t_epoch)
        bar.set_postfix(val_acc=f"{sweep.best['acc'][_pick(sweep.best)]:.3f}", refresh=False)
        stalled = _stalled(sweep, cfg.patience)
        sweep.epoch += 1
        if stalled:
            break
    return _best_head(sweep, device), _sweep_metrics(sweep, epoch_seconds), sweep.state()


def _stop_if_diverged(sweep: _Sweep, cfg: HeadConfig) -> None:
    """Stop with a clear error once the training loss of every head is not finite."""
    if not torch.isfinite(sweep.history["train_loss"][-1]).any():
        lrs = ",".join(f"{v:g}" for v in cfg.lr)
        raise EmbedcacheError(
            f"training diverged at epoch {sweep.epoch + 1}: the loss is not finite "
            f"(--lr {lrs}); lower --lr"
        )


def _stalled(sweep: _Sweep, patience: int) -> bool:
    """Whether every head has gone ``patience`` epochs, or half its best epoch if that is more,
    without a lower validation loss: a head still improving late gets a wait that grows."""
    waited = sweep.epoch - sweep.best["epoch"]
    return bool((waited >= torch.clamp(sweep.best["epoch"] // 2, min=patience)).all())


def _best_head(sweep: _Sweep, device) -> Head:
    final = StackedHeads(sweep.template, len(sweep.grid)).to(device)
    final.load_state_dict(sweep.best_params)
    classifier = final.export(_pick(sweep.best), sweep.template).cpu()
    return Head(Standardize(sweep.norm.mean.cpu(), sweep.norm.std.cpu()), classifier)


def _sweep_metrics(sweep: _Sweep, epoch_seconds: list[float]) -> dict:
    best, top = sweep.best, _pick(sweep.best)
    hist = {k: torch.stack(v).numpy() for k, v in sweep.history.items()}  # (epochs, H)
    table = [
        {
            "lr": lr,
            "weight_decay": wd,
            "best_val_acc": float(best["acc"][h]),
            "best_val_loss": float(best["loss"][h]),
            "best_epoch": int(best["epoch"][h]) + 1,
        }
        for h, (lr, wd) in enumerate(sweep.grid)
    ]
    return {
        "history": {k: v[:, top].round(6).tolist() for k, v in hist.items()},
        "best_epoch": int(best["epoch"][top]) + 1,
        "epochs_run": sweep.epoch,
        "epoch_seconds": [round(t, 4) for t in epoch_seconds],
        "best": {"lr": sweep.grid[top][0], "weight_decay": sweep.grid[top][1]},
        "sweep": table,
    }


def _pick(best: dict) -> int:
    """The head with the lowest validation loss (the first of equals)."""
    return int(torch.argmin(best["loss"]))


# ---------------------------------------------------------------------------
# Linear probes by L-BFGS (logreg, the default head's linear candidate) and kNN


def _standardized(train: Rows, *others: Rows) -> tuple[Standardize, list[torch.Tensor]]:
    """train's features and the others' in memory, standardised with train's statistics."""
    x = train.all()
    x64 = x.astype(np.float64)
    mean, std = (a.astype(np.float32) for a in standardization(x64.mean(0), x64.var(0)))
    xs = [torch.from_numpy((a - mean) / std) for a in (x, *(o.all() for o in others))]
    return Standardize(torch.from_numpy(mean), torch.from_numpy(std)), xs


def _in_memory(kind: str, train: Rows) -> None:
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


def _probe(train: Rows, val: Rows | None, classes, device, *, path: dict, lam=None):
    """A softmax regression on standardised features (see :mod:`embedcache.probe`): the L2
    strength chosen on ``val`` along ``path`` (logreg_path's options), or fitted at ``lam`` on
    ``train`` (a refit). Returns (head, metrics)."""
    norm, (x, *xv) = _standardized(train, *([val] if lam is None else []))
    y = torch.from_numpy(train.labels).to(device)
    if lam is None:
        yv = torch.from_numpy(val.labels).to(device)
        fit, rows = logreg_path(x.to(device), y, xv[0].to(device), yv, len(classes), **path)
    else:
        fit, rows = fit_logreg(x.to(device), y, len(classes), lam=lam), []
    if not finite(fit):
        raise EmbedcacheError("the logistic regression diverged (non-finite weights)")
    head = Head(norm, _as_linear(fit, np.unique(train.labels)))
    return head, {"sweep": rows, "best": {"lam": fit.lam}, "iterations": fit.iterations}


# The logreg reference: the literature's 45 strengths, fitted to a tight tolerance.
LOGREG_PATH = {"lambdas": KORNBLITH_LAMBDAS, "grad_tol": GRAD_TOL}
# The default head's linear candidate: every other strength, stopping two decades past the best.
AUTO_PATH = {"lambdas": DEFAULT_LAMBDAS, "grad_tol": DEFAULT_GRAD_TOL, "patience": 4}


def _knn(train: Rows, val: Rows | None, classes, *, k: int | None = None):
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


# ---------------------------------------------------------------------------
# The default head: a linear probe, or an MLP where validation shows it is better


# The MLP replaces the linear probe where validation favours it at this one-sided p-value (4:1
# odds). A judgement, disclosed with its evidence: at 0.05 the 64 px digits (MLP 91.29% vs probe
# 89.90% of 288 held-out images, p = 0.17) kept the probe and lost 2.2 points on test (93.04% vs
# 95.26%); where the MLP led by an image or two (grocery81, p ~ 0.4) the probe won on test by 3.9.
MLP_P_VALUE = 0.2
# The MLP candidate's patience. It matters only on large splits, trained in mini-batches: there
# the best epoch comes early (100,000 rows: epoch 3) and patience 10 doubled the MLP's cost for
# nothing; full-batch splits (under 64 MB) peak late (digits: epoch 82), where half the best
# epoch, not the patience, decides when to stop.
AUTO_MLP_PATIENCE = 4


def better_p_value(a_right: np.ndarray, b_right: np.ndarray) -> float:
    """One-sided exact McNemar test: the chance of ``a`` beating ``b`` this often on the same
    images if neither were better (only the images where exactly one is right count)."""
    wins, losses = int(np.sum(a_right & ~b_right)), int(np.sum(~a_right & b_right))
    n = wins + losses
    return sum(math.comb(n, i) for i in range(wins, n + 1)) / 2**n if n else 1.0


def _auto(data: _Data, classes, arch: dict, cfg: HeadConfig, batch_size: int, progress: bool):
    """The default head (``--head auto``): a linear probe (L-BFGS along AUTO_PATH, the strength
    chosen on validation loss) and an MLP (early stopping on validation loss), and the MLP only
    when its validation accuracy beats the probe's significantly (:func:`better_p_value`).

    Measured (benchmarks/results/head_protocol_*.md): the probe beat the AdamW linear head by
    4.7 points on grocery81 and 0.8 on flowers12; the MLP beat the probe by 1.7 on the 64 px
    digits, whose features are far from linearly separable. Returns (module, metrics, None).
    """
    dev = resolve_device(cfg.device)
    linear, lm = _probe(data.train, data.val, classes, dev, path=AUTO_PATH)
    mcfg = cfg.replace(head="mlp", patience=min(cfg.patience, AUTO_MLP_PATIENCE))
    data.train.read_ahead = data.val.read_ahead = read_ahead(dev)
    mlp, mm, _ = _train_torch(
        data, classes, mcfg, batch_size=batch_size, device=dev, progress=progress
    )
    y = data.val.labels
    right = {k: _val_logits(m.eval(), data).argmax(1) == y for k, m in (("l", linear), ("m", mlp))}
    p = better_p_value(right["m"], right["l"])
    chosen = "mlp" if p < MLP_P_VALUE else "linear"
    summary = {
        "chosen": chosen,
        "mlp_p_value": round(p, 6),
        "linear": {"val_acc": float(right["l"].mean()), **lm["best"]},
        "mlp": {"val_acc": float(right["m"].mean()), "best_epoch": mm["best_epoch"]},
    }
    arch["kind"] = chosen
    metrics = {**(mm if chosen == "mlp" else lm), "auto": summary}
    return (mlp if chosen == "mlp" else linear), metrics, None


def _val_logits(module: torch.nn.Module, data: _Data) -> np.ndarray:
    """Validation logits as evaluate will compute them (averaged with the mirror when stored)."""
    logits = _logits(module, data.val)
    if data.val_mirror is not None:
        logits = (logits + _logits(module, data.val_mirror)) / 2
    return logits


def _refit(data: _Data, classes, cfg: HeadConfig, metrics: dict, progress: bool):
    """The chosen configuration trained again on train + val, as Kornblith et al. (2019) do:
    a probe at its chosen strength, knn at its k with val in its bank, a torch head for its
    chosen number of epochs (no selection: the last epoch is kept). Returns (head, what was done).
    """
    both, best = join_rows(data.train, data.val), metrics["best"]
    dev = resolve_device(cfg.device)
    if "lam" in best:
        module, m = _probe(both, None, classes, dev, path={}, lam=best["lam"])
        return module, {"images": both.n, "config": best, "iterations": m["iterations"]}
    if "k" in best:
        return _knn(both, None, classes, k=best["k"])[0], {"images": both.n, "config": best}
    epochs = int(metrics["best_epoch"])
    kind = metrics.get("auto", {}).get("chosen", cfg.head)
    one = cfg.replace(
        head=kind, lr=(best["lr"],), weight_decay=(best["weight_decay"],), epochs=epochs
    )
    sweep = _Sweep.create(both, len(classes), one, dev)
    batch_size = _batch_size(cfg, both.n, both.dim)
    for _ in tqdm(range(epochs), desc="refit on train + val", unit="epoch", disable=not progress):
        _train_epoch(sweep, both, one, batch_size, dev)
        _stop_if_diverged(sweep, one)
        sweep.epoch += 1
    classifier = sweep.heads.export(0, sweep.template).cpu()
    head = Head(Standardize(sweep.norm.mean.cpu(), sweep.norm.std.cpu()), classifier)
    return head, {"images": both.n, "epochs": epochs, "config": best, "batch_size": batch_size}


def _batch_size(cfg: HeadConfig, n: int, dim: int) -> int:
    """--batch-size, or the whole set when it is under FULL_BATCH_BYTES as float32."""
    return cfg.batch_size or (n if n * dim * 4 <= FULL_BATCH_BYTES else STREAM_BATCH)


# ---------------------------------------------------------------------------
# Public API


def train_head(
    cache: str | Path,
    *,
    out: str | Path | None = None,
    config: HeadConfig | None = None,
    progress: bool = True,
    **options,
) -> HeadResult:
    """Train a head on a cache's ``train`` split, selected on ``val``.

    ``options`` are the fields of :class:`embedcache.config.HeadConfig` (or pass
    ``config``): ``head``, ``epochs``, ``lr``, ``weight_decay``, ``hidden``, ...
    The default head (``auto``, see :func:`_auto`) is a linear probe whose L2
    strength is chosen on validation loss, or an MLP where validation shows it
    significantly better. ``lr`` and ``weight_decay`` accept lists: every
    combination is trained at once and the one with the lowest validation loss is
    kept. Features are standardised with the training statistics, stored in the
    head. When the training features exceed ``max_memory`` bytes (default: half
    the memory available), they are streamed from the file instead of loaded.

    With a cache made by ``extract --views`` (and ``views="use"``), each epoch
    shows one picture of every training image, drawn from its plain features and
    its views (torch heads; probes and knn fit the plain features); validation
    stays on the plain features, and ``metrics["val_acc_tta"]`` adds the accuracy of
    the logits averaged over each val image and its mirror. ``refit`` trains the
    chosen configuration again on train + val (see :func:`_refit`) and saves that
    head; by default (None) it does so when validation was held out of train.

    Returns
    -------
    HeadResult : ``head`` maps features (N, D) to logits (N, C); ``metrics``
        holds histories, the sweep table and validation results.
    """
    cfg = HeadConfig.build(config, **options)
    start = time.perf_counter()
    with open_cache(cache) as c:
        _claim(out, cache, c)
        data = _splits(c, cfg)
        classes = list(c.classes)
        recorded = Recorded(c.features_identity, c.weights_arg, c.feature_dim, c.identity.dtype)
        arch = {"kind": cfg.head, "dim": c.feature_dim, "num_classes": len(classes)}
        arch.update(hidden=cfg.hidden, dropout=cfg.dropout)
        batch_size = _batch_size(cfg, data.train.n, c.feature_dim)
        resume = _resume_state(out, recorded, arch, cfg, data.views) if cfg.resume else None
        module, metrics, state = _fit(data, classes, arch, cfg, batch_size, progress, resume)
        val_logits = _validate(module.eval(), data, metrics)
        refit = data.carved if cfg.refit is None else cfg.refit
        selected = module
        if refit:
            module, metrics["refit"] = _refit(data, classes, cfg, metrics, progress)
        trained = _trained_on(cfg, data, refit)
    metrics.update(_summary(cache, c, cfg, data, arch, batch_size, time.perf_counter() - start))
    result = HeadResult(module, metrics)
    if out is not None:
        resumable = state and not refit  # a refit head continues nothing
        ckpt = HeadCheckpoint(arch, module.state_dict(), classes, recorded, _plain(metrics))
        ckpt.train_state = _train_state(state, cfg, data) if resumable else None
        ckpt.trained, ckpt.selected = trained, selected.state_dict() if refit else None
        result.path = ckpt.save(out)
        preds = val_logits.argmax(1)
        result.files = _reports(Path(out), metrics, data.val.labels, preds, classes)
    return result


def _summary(cache, c: Cache, cfg: HeadConfig, data: _Data, arch: dict, batch_size, seconds):
    """What train_head adds to a head's metrics besides its training results."""
    config = {**arch, "epochs": cfg.epochs, "lr": list(cfg.lr)}
    config.update(weight_decay=list(cfg.weight_decay), label_smoothing=cfg.label_smoothing)
    config.update(patience=cfg.patience, seed=cfg.seed)
    return {
        "head": cfg.head,
        "cache": str(cache),
        "classes": list(c.classes),
        "train_images": data.train.n,
        "val_images": data.val.n,
        "val_source": data.val_source,
        "streamed": not data.train.in_memory,
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "views": {"stored": c.num_views, "used": data.views},
        "config": config,
    }


def _train_state(state: dict, cfg: HeadConfig, data: _Data) -> dict:
    """What --resume checks and continues from."""
    lrs, wds = list(cfg.lr), list(cfg.weight_decay)
    return {"state": state, "lrs": lrs, "wds": wds, "seed": cfg.seed, "views": data.views}


def _trained_on(cfg: HeadConfig, data: _Data, refit: bool) -> TrainedOn:
    """Which images the saved head has seen (what later verbs must not score it on)."""
    seen = ["train", "val"] if refit and not data.carved else ["train"]
    holdout = {"fraction": cfg.val_fraction, "seed": cfg.seed} if data.carved else None
    return TrainedOn({k: data.digests[k] for k in seen}, holdout, refit)


def _validate(module: torch.nn.Module, data: _Data, metrics: dict) -> np.ndarray:
    """Validation loss and accuracy into ``metrics`` (and with test-time averaging over each
    image and its mirror, ``*_tta``, when the cache stores mirrors); returns the plain logits."""
    check_finite(module.state_dict(), None, "head")  # a diverged head is never a result
    logits = _logits(module, data.val)
    metrics.update(_val_metrics(logits, data.val.labels))
    if data.val_mirror is not None:
        tta = (logits + _logits(module, data.val_mirror)) / 2
        metrics.update({f"{k}_tta": v for k, v in _val_metrics(tta, data.val.labels).items()})
    return logits


def _fit(data: _Data, classes, arch: dict, cfg: HeadConfig, batch_size, progress, resume=None):
    """The head of ``cfg.head`` trained on ``data.train``: (module, metrics, state for --resume
    or None). Probes and knn choose their strength and k on the plain validation features."""
    dev = resolve_device(cfg.device)
    if cfg.head == "auto" and data.train.in_memory:
        return _auto(data, classes, arch, cfg, batch_size, progress)
    if cfg.head in ("auto", "linear", "mlp"):  # auto on streamed features: the AdamW linear head
        arch["kind"] = "mlp" if cfg.head == "mlp" else "linear"
        data.train.read_ahead = data.val.read_ahead = read_ahead(dev)
        run = cfg.replace(head=arch["kind"])
        return _train_torch(
            data, classes, run, batch_size=batch_size, device=dev, progress=progress, state=resume
        )
    _in_memory(cfg.head, data.train)
    if cfg.head == "logreg":
        module, metrics = _probe(data.train, data.val, classes, dev, path=LOGREG_PATH)
        return module, metrics, None
    module, metrics = _knn(data.train, data.val, classes)
    arch.update(metrics["best"])  # k for knn: part of the architecture
    return module, metrics, None


def _val_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """val_acc, val_balanced_acc, val_top5 (more than 5 classes) and val_loss of some logits."""
    from .report import scores

    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    named = {"accuracy": "val_acc", "balanced_accuracy": "val_balanced_acc", "top5": "val_top5"}
    return {**{named[k]: v for k, v in scores(logits, labels).items()}, "val_loss": float(loss)}


def _claim(out, cache, c: Cache) -> None:
    """Refuse an --out that is the cache, another kind of file, or puts plots among the images."""
    from .outputs import claim
    from .report import side_files

    if out is not None:
        root = c.attrs.get("source") if c.attrs.get("layout") not in ("csv", "arrays") else None
        sides = side_files(Path(out))
        claim(
            out,
            kind="head",
            verb="train-head",
            inputs=[("the cache", cache)],
            beside=sides,
            data_root=root or None,
        )


def _reports(out: Path, metrics: dict, y_true, y_pred, classes) -> dict[str, Path]:
    from .report import write_reports

    title = f"{metrics['head']} head"
    return write_reports(out, metrics, y_true, y_pred, classes, title=title)


def _logits(module: torch.nn.Module, rows: Rows) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(x)).numpy() for _, x in rows.blocks()])


def _plain(obj):
    """Metrics as JSON-like plain values (for the checkpoint)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _resume_state(out, recorded: Recorded, arch: dict, cfg: HeadConfig, views: int) -> dict:
    if out is None or not Path(out).exists():
        raise EmbedcacheError(
            f"--resume needs an existing head checkpoint at --out, {out} does not exist"
        )
    ckpt = HeadCheckpoint.load(out)
    ts = ckpt.train_state
    if not ts or not ts.get("state"):
        raise EmbedcacheError(
            f"{out} holds no training state to resume (logreg and knn heads do not train in epochs)"
        )
    same = (
        ckpt.recorded.to_dict() == recorded.to_dict()
        and ckpt.config == arch
        and ts["lrs"] == list(cfg.lr)
        and ts["wds"] == list(cfg.weight_decay)
        and ts["seed"] == cfg.seed
        and ts.get("views", 0) == views
    )
    if not same:
        raise EmbedcacheError(
            f"{out} was trained with another cache or configuration; resume with the same cache, --head, --lr, --weight-decay, --hidden, --dropout, --seed and --views"
        )
    return ts["state"]


def load_head(path: str | Path) -> tuple[torch.nn.Module, HeadCheckpoint]:
    """Rebuild a head saved by train_head; returns (module in eval mode, its checkpoint)."""
    ckpt = HeadCheckpoint.load(path)
    return ckpt.module(), ckpt
