"""The torch heads (linear, mlp): a sweep of (lr, weight decay) heads trained in one pass per
epoch, each kept at its best epoch on validation."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import HeadConfig
from ..errors import EmbedcacheError
from ..feed import Rows, ViewRows
from ..heads import Head, StackedAdamW, StackedHeads, Standardize, init_template
from ..runtime import seeded
from ..tblog import RunLog, Runs, number, run_name
from .features import Data, balanced_weights, feature_stats


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


def _per_head_loss(
    z: torch.Tensor, y: torch.Tensor, label_smoothing: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of logits (H, B, C) against labels (B,): losses (H, B), each image's
    multiplied by its class's ``weight`` when given.

    Laid out as (B, C, H), one call covers every head without repeating the
    labels H times (4x faster than flattening the heads into the batch).
    """
    H, B, _ = z.shape
    if y.dim() == 2:  # several labels per image: a sigmoid per class, no smoothing
        # smoothing towards 1/2 gives each of C - k absent classes a floor of loss: on grocery81
        # as tags (120 labels, about 3 an image) the MLP's val loss then flattened at 7.3 after
        # learning the priors, early stopping ended it at epoch 24 with val mAP 0.30; unsmoothed
        # it ran 100 epochs to 0.85
        return F.binary_cross_entropy_with_logits(z, y.expand_as(z), reduction="none").sum(-1)
    target = y.unsqueeze(1).expand(B, H)
    return F.cross_entropy(
        z.permute(1, 2, 0),
        target,
        weight=weight,
        reduction="none",
        label_smoothing=label_smoothing,
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
    weight: torch.Tensor | None = None  # per-class loss weights (--class-weight balanced)

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
        sweep = cls(
            cfg.head, template, grid, heads, opt, Standardize(mean, std).to(device), best, params
        )
        if cfg.class_weight == "balanced":
            sweep.weight = torch.from_numpy(balanced_weights(train.labels, num_classes)).to(device)
        return sweep

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

    The loss is the cross-entropy without label smoothing (class-weighted as in training, then
    normalised by the weights): what heads are chosen on."""
    losses, correct, total = 0.0, 0.0, 0.0
    sweep.heads.eval()
    mirrored = mirror.blocks() if mirror is not None else None
    with torch.no_grad():
        for pos, x in val.blocks():
            y = _to_device(val.labels[pos], device)
            z = sweep.heads(_standardize(x, sweep.norm, device))  # (H, B, C)
            if mirrored is not None:
                z = (z + sweep.heads(_standardize(next(mirrored)[1], sweep.norm, device))) / 2
            losses = losses + _per_head_loss(z, y, 0.0, sweep.weight).sum(1)
            correct = correct + _right(z, y).sum(1)
            total += float(sweep.weight[y].sum()) if sweep.weight is not None else len(y)
    sweep.heads.train()
    return (losses / max(total, 1e-12)).cpu(), (correct.float() / val.n).cpu()


def _train_epoch(sweep: _Sweep, train: Rows, cfg: HeadConfig, batch_size: int, device) -> None:
    """One pass over train for every head; appends train loss and accuracy to the history."""
    H = len(sweep.grid)
    rng = np.random.default_rng([cfg.seed, sweep.epoch])
    if isinstance(train, ViewRows):  # this epoch's picture of every image
        train.pick(np.random.default_rng([cfg.seed, sweep.epoch, 1]))
    tl, tc = torch.zeros(H, device=device), torch.zeros(H, device=device)
    batches = (
        train.balanced_batches(batch_size, rng)
        if cfg.sampler == "balanced"
        else train.batches(batch_size, rng)
    )
    with seeded(
        cfg.seed * 1_000_003 + sweep.epoch, device
    ):  # dropout: the same per epoch, resumed or not
        for xb, yb in batches:
            y = _to_device(yb, device)
            z = sweep.heads(_standardize(xb, sweep.norm, device))
            loss = _per_head_loss(z, y, cfg.label_smoothing, sweep.weight)
            sweep.opt.zero_grad()
            loss.mean(1).sum().backward()  # heads share nothing, so each gets its own gradient
            sweep.opt.step()
            tl += loss.detach().sum(1)
            tc += _right(z.detach(), y).sum(1)
    sweep.history["train_loss"].append((tl / train.n).cpu())
    sweep.history["train_acc"].append((tc / train.n).cpu())


def _right(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per head and image (H, B): 1 where the top class is the label; with several labels per
    image, the share of the classes decided right at probability 1/2."""
    if y.dim() == 2:
        return ((z > 0) == (y > 0.5)).float().mean(-1)
    return (z.argmax(-1) == y).float()


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


def train_sweep(
    data: Data, classes, cfg: HeadConfig, *, batch_size, device, progress, state=None, runs=None
):
    """Train every (lr, weight decay) head; returns (best head, metrics, resume state). Heads are
    chosen on validation as evaluate will score them: with test-time averaging when the cache
    stores the mirrors of the validation images. ``runs``: where each head's epochs are logged
    (see :func:`_run_logs`)."""
    sweep = _Sweep.create(data.train, len(classes), cfg, device)
    if state is not None:
        sweep.restore(state, device)
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(log) for log in _run_logs(runs or Runs(), cfg, sweep.grid)]
        return _epochs(sweep, data, cfg, batch_size, device, progress, logs)


def _run_logs(runs: Runs, cfg: HeadConfig, grid: list[tuple[float, float]]) -> Iterator[RunLog]:
    """One TensorBoard run per head: PREFIX-KIND, or PREFIX-KIND-lrX-wdY for each head of a
    sweep."""
    many = len(grid) > 1
    for lr, wd in grid:
        name = run_name(cfg.head, *((f"lr{number(lr)}", f"wd{number(wd)}") if many else ()))
        yield runs.open(name, head=cfg.head, lr=lr, weight_decay=wd, patience=cfg.patience)


def _epochs(sweep: _Sweep, data: Data, cfg: HeadConfig, batch_size, device, progress, logs):
    """The epochs of train_sweep, until --epochs or every head stalled; each epoch's results
    logged to ``logs`` (one per head)."""
    train, val = data.train, data.val
    H = len(sweep.grid)
    bar = tqdm(
        range(sweep.epoch, cfg.epochs),
        desc=f"train-head {cfg.head} x{H}",
        unit="epoch",
        disable=not progress,
        dynamic_ncols=True,
    )
    # wall time per epoch of this run (not resumed ones): for time/accuracy curves
    epoch_seconds = []
    for _ in bar:
        t_epoch = time.perf_counter()
        _train_epoch(sweep, train, cfg, batch_size, device)
        _stop_if_diverged(sweep, cfg)
        _keep_best(sweep, *_evaluate(sweep, val, device, data.val_mirror), device)
        epoch_seconds.append(time.perf_counter() - t_epoch)
        for h, log in enumerate(logs):
            log.scalars(sweep.epoch + 1, {k: v[-1][h] for k, v in sweep.history.items()})
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


def train_last(rows: Rows, num_classes: int, cfg: HeadConfig, device, *, batch_size, progress):
    """One head (``cfg``'s one lr and weight decay) trained on ``rows`` for ``cfg.epochs``
    epochs with no selection: the last epoch is kept (a refit)."""
    sweep = _Sweep.create(rows, num_classes, cfg, device)
    epochs = cfg.epochs
    for _ in tqdm(range(epochs), desc="refit on train + val", unit="epoch", disable=not progress):
        _train_epoch(sweep, rows, cfg, batch_size, device)
        _stop_if_diverged(sweep, cfg)
        sweep.epoch += 1
    classifier = sweep.heads.export(0, sweep.template).cpu()
    return Head(Standardize(sweep.norm.mean.cpu(), sweep.norm.std.cpu()), classifier)
