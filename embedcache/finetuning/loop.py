"""Finetune's phase 3: the epochs, with the best epoch saved and the state kept for --resume."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Normalise
from ..checkpoint import FinetuneState, ModelCheckpoint, Recorded
from ..data import augment, decoded_batches
from ..models import FinetunedModel
from ..multilabel import DEFAULT_THRESHOLD, mean_average_precision
from ..runtime import (
    seeded,
)
from ..tblog import RunLog, Runs
from .estimate import Meter
from .prefix import PrefixCache
from .setup import Setup


def _schedule(
    optimizer, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to zero, stepped per batch."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _optimizer(
    model: FinetunedModel, *, lr: float, backbone_lr_mult: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW: the head at ``lr``, unfrozen blocks at ``lr * backbone_lr_mult``; no decay on
    biases and norms."""
    groups = {(True, True): [], (True, False): [], (False, True): [], (False, False): []}
    for module, is_head in ((model.head, True), (model.net, False)):
        for p in module.parameters():
            if p.requires_grad:
                groups[(is_head, p.ndim > 1)].append(p)
    param_groups = [
        {
            "params": ps,
            "lr": lr if is_head else lr * backbone_lr_mult,
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (is_head, decay), ps in groups.items()
        if ps
    ]
    return torch.optim.AdamW(param_groups)


@dataclass
class Fit:
    """The optimisation state and the record of the epochs."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    tail: nn.Module  # what the optimisation steps call (DDP-wrapped under torchrun)
    history: dict = field(default_factory=lambda: {k: [] for k in _HISTORY})
    best: dict = field(default_factory=lambda: {"acc": -1.0, "loss": math.inf, "epoch": -1})
    # (labels, predictions, top-5 hits, logits) of the best epoch on validation (without the
    # logits when resumed from a state saved before they were kept)
    best_val: tuple | None = None
    epoch: int = 0  # epochs done


_HISTORY = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")
_BEST_VAL = ("labels", "pred", "top5", "logits")  # Fit.best_val's parts as the state saves them


def _history_keys(setup: Setup) -> tuple[str, ...]:
    """What the history records per epoch; with several labels per image the val mAP too."""
    return (*_HISTORY, "val_map") if setup.multi_label else _HISTORY


def _losses(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Each image's loss (N,): the cross-entropy against labels (N,), or against (N, C) 0/1
    targets (several labels per image) the sum over classes of the binary cross-entropy of
    their sigmoids, unsmoothed as train-head's (see embedcache.train.sweep._per_head_loss)."""
    if y.dim() == 2:
        return F.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(1)
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction="none")


def _right(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image (N,): 1 where the top class is the label; with several labels per image, the
    share of its classes decided right at probability 1/2."""
    if y.dim() == 2:
        return ((logits > 0) == (y > 0.5)).float().mean(1)
    return (logits.argmax(1) == y).float()


def _new_fit(setup: Setup) -> Fit:
    cfg, model = setup.cfg, setup.model
    optimizer = _optimizer(
        model, lr=cfg.head_lr, backbone_lr_mult=cfg.backbone_lr_mult, weight_decay=cfg.weight_decay
    )
    steps = math.ceil(len(setup.train[0]) / cfg.batch_size)
    warmup = max(1, int(cfg.warmup * steps))
    scheduler = _schedule(optimizer, warmup_steps=warmup, total_steps=cfg.epochs * steps)
    scaler = torch.amp.GradScaler(
        setup.run.device.type, enabled=setup.run.autocast == torch.float16
    )
    history = {k: [] for k in _history_keys(setup)}
    return Fit(optimizer, scheduler, scaler, _trainable_tail(setup), history)


class Batches:
    """Training and validation batches: from the prefix cache, or decoded images every epoch.

    An epoch shuffles every training item with one seeded permutation and cuts it into global
    batches of --batch-size; under torchrun each rank takes the items of each global batch it
    owns (see :meth:`Setup.own`), so the ranks together see exactly one process's batches.
    """

    def __init__(self, setup: Setup, prefix: PrefixCache | None, meter: Meter):
        self.setup, self.prefix, self.meter = setup, prefix, meter
        self.norm = Normalise(setup.bb.transform).to(setup.run.device)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the trainable tail takes: cached activations as they are, images through the
        prefix."""
        if self.prefix is not None:
            return (
                x.to(self.setup.run.device, non_blocking=True)
                .float()
                .contiguous(memory_format=torch.channels_last)
            )
        with torch.no_grad():  # the frozen prefix needs no graph
            return self.setup.model.prefix(self.norm(x))

    def _global_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's items of each global batch (possibly none), in the epoch's order."""
        cfg = self.setup.cfg
        n = len(self.setup.train[0])
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        batches = [perm[lo : lo + cfg.batch_size] for lo in range(0, n, cfg.batch_size)]
        return [np.sort(b[self.setup.owns(b)]) for b in batches]

    def train(self, epoch: int):
        """(inputs, labels) per global batch; a rank may get an empty part of a batch."""
        self.meter.bar.phase(f"epoch {epoch} of {self.setup.cfg.epochs}")
        for x, y in self._train(epoch):
            yield x, y
            self.meter.train(len(y))

    def _train(self, epoch: int):
        cfg, run = self.setup.cfg, self.setup.run
        batches = self._global_batches(epoch)
        if self.prefix is not None:
            view = (epoch - 1) % len(self.prefix.views)
            rows = self.prefix.views[view]
            for items in batches:
                pos = self.prefix.positions(view, items)
                yield torch.from_numpy(rows.take(pos)), torch.from_numpy(rows.labels[pos])
            return
        paths, labels = self.setup.train
        seeded_items = [(p, (cfg.seed, 2, epoch, i)) for i, p in enumerate(paths)]
        decode = functools.partial(augment, t=self.setup.bb.transform, kind=cfg.augment)
        crop = self.setup.bb.transform.crop
        empty = torch.zeros((0, crop, crop, 3), dtype=torch.uint8)  # this rank's part may be empty
        lists = [b.tolist() for b in batches]
        for index, x, _ in decoded_batches(
            seeded_items, lists, decode, device=run.device, num_workers=run.workers
        ):
            yield (x if x is not None else empty), torch.from_numpy(labels[index])

    def val(self):
        """(inputs, labels) of this rank's validation items."""
        for x, y in self._val():
            yield x, y
            self.meter.val(len(y))

    def _val(self):
        bs = self.setup.cfg.batch_size
        if self.prefix is not None:
            rows = self.prefix.val
            for pos, x in rows.blocks():
                for lo in range(0, len(pos), bs):
                    yield (
                        torch.from_numpy(x[lo : lo + bs]),
                        torch.from_numpy(rows.labels[pos[lo : lo + bs]]),
                    )
            return
        paths, labels = self.setup.val
        mine = self.setup.own(len(paths))
        decode = functools.partial(augment, t=self.setup.bb.transform, kind="none")
        run = self.setup.run
        batches = [mine[lo : lo + bs].tolist() for lo in range(0, len(mine), bs)]
        items = [(p, 0) for p in paths]
        for index, x, _ in decoded_batches(
            items, batches, decode, device=run.device, num_workers=run.workers
        ):
            if x is not None:
                yield x, torch.from_numpy(labels[index])


def _evaluate(setup: Setup, data: Batches):
    """(loss, accuracy, labels, predictions, top-5 hits, logits (N, C) float32) on validation,
    every rank's part gathered; the top-5 hits are empty with 5 classes or fewer. With several
    labels per image the labels are (N, C) targets, the predictions (N, C) booleans (logit
    above 0) and the accuracy the share of (image, class) decisions right."""
    model, run, ls = setup.model, setup.run, setup.cfg.label_smoothing
    model.eval()
    loss_sum, right, ys, preds, hits, zs = 0.0, 0.0, [], [], [], []
    with torch.inference_mode(), run.amp():
        for x, y in data.val():
            y = y.to(run.device)
            logits = model.tail(data.inputs(x)).float()
            loss_sum += float(_losses(logits, y, ls).sum())
            right += float(_right(logits, y).sum())
            ys.append(y.cpu().numpy())
            preds.append((logits > 0 if setup.multi_label else logits.argmax(1)).cpu().numpy())
            zs.append(logits.cpu().numpy())  # what finetune's temperature is fitted on
            if logits.shape[1] > 5 and not setup.multi_label:
                hits.append((logits.topk(5, 1).indices == y[:, None]).any(1).cpu().numpy())
    model.train()
    C = len(setup.classes)
    kinds = ((ys, *_label_kind(setup)), (preds, *_label_kind(setup, bool)), (hits, (0,), bool))
    local = [np.concatenate(a) if a else np.zeros(shape, t) for a, shape, t in kinds]
    local.append(np.concatenate(zs) if zs else np.zeros((0, C), np.float32))
    parts = setup.group.gather((loss_sum, right, *local))
    loss_sum, right = sum(p[0] for p in parts), sum(p[1] for p in parts)
    y, pred, hit5, z = (np.concatenate([p[k] for p in parts]) for k in (2, 3, 4, 5))
    n = max(len(y), 1)
    return loss_sum / n, right / n, y, pred, hit5, z


def _label_kind(setup: Setup, multi_dtype=np.float32) -> tuple[tuple[int, ...], type]:
    """The shape of no labels (or predictions) and their dtype: (0,) int64, or (0, C)."""
    if setup.multi_label:
        return (0, len(setup.classes)), multi_dtype
    return (0,), np.int64


class _Tail(nn.Module):
    """The trainable part as one module, for DistributedDataParallel: prefix output -> logits."""

    def __init__(self, model: FinetunedModel):
        super().__init__()
        self.model = model

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.tail(h)


def _trainable_tail(setup: Setup) -> nn.Module:
    """The tail; under torchrun wrapped in DDP, which averages the gradients across ranks."""
    tail = _Tail(setup.model)
    if setup.group.world == 1:
        return tail
    dev = setup.run.device
    ids = [dev.index] if dev.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(tail, device_ids=ids, broadcast_buffers=False)


def _global_count(setup: Setup, n: int) -> int:
    """Images in the global batch: every rank's part, summed."""
    if setup.group.world == 1:
        return n
    count = torch.tensor([n], dtype=torch.float64, device=setup.run.device)
    torch.distributed.all_reduce(count)
    return int(count.item())


def _train_epoch(setup: Setup, fit: Fit, data: Batches, epoch: int) -> tuple[float, float]:
    """One epoch of optimisation steps; returns (mean train loss, train accuracy)."""
    run, cfg, world = setup.run, setup.cfg, setup.group.world
    loss_sum = correct = seen = 0.0
    with seeded(cfg.seed * 1_000_003 + epoch + setup.group.rank, run.device):  # dropout: per epoch
        for x, y in data.train(epoch):
            y = y.to(run.device)
            n = _global_count(setup, len(y))
            with run.amp():
                logits = fit.tail(data.inputs(x))
            # The sum over this rank's images / the global count, x world since DDP averages the
            # ranks' gradients: every rank then steps with the one-process batch-mean gradient.
            losses = _losses(logits.float(), y, cfg.label_smoothing)
            loss = losses.sum() * (world / max(n, 1))
            fit.optimizer.zero_grad(set_to_none=True)
            fit.scaler.scale(loss).backward()
            fit.scaler.step(fit.optimizer)
            fit.scaler.update()
            fit.scheduler.step()
            loss_sum += float(losses.detach().sum())
            correct += float(_right(logits.detach(), y).sum())
            seen += len(y)
    total = setup.group.gather((loss_sum, correct, seen))
    loss_sum, correct, seen = (sum(t[k] for t in total) for k in range(3))
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def _record(setup: Setup, fit: Fit, row: dict, val: tuple[np.ndarray, np.ndarray]) -> None:
    """Append an epoch to the history; a better validation result is saved as the model:
    higher accuracy (then lower loss), or with several labels per image lower loss."""
    for k in fit.history:
        fit.history[k].append(row[k])
    best, va, vl = fit.best, row["val_acc"], row["val_loss"]
    if setup.multi_label:  # the share of image-class decisions right ties and jumps: the loss
        better = vl < best["loss"]
    else:
        better = va > best["acc"] or (va == best["acc"] and vl < best["loss"])
    if better:
        best.update(acc=va, loss=vl, epoch=row["epoch"])
        fit.best_val = val
        if setup.group.is_main:  # under torchrun rank 0 writes, the others hold the same weights
            _model_checkpoint(
                setup, {"history": fit.history, "best": best, "trainable": setup.table}
            ).save(setup.out)


def _model_checkpoint(setup: Setup, metrics: dict) -> ModelCheckpoint:
    bb, model = setup.bb, setup.model
    recorded = Recorded(bb.identity(), bb.weights_arg, bb.feature_dim)
    return ModelCheckpoint(
        recorded,
        model.net.state_dict(),
        setup.head_config,
        model.head.state_dict(),
        setup.classes,
        model.start,
        setup.config_record(),
        metrics,
        trained=setup.trained,
        # until finetune chooses them on validation after the last epoch (see _summarise)
        thresholds=[DEFAULT_THRESHOLD] * len(setup.classes) if setup.multi_label else None,
    )


def last_path(out: Path) -> Path:
    """Where the state after the last epoch goes, for --resume: OUT.last.pt beside OUT.pt."""
    return out.with_name(out.stem + ".last" + out.suffix)


def _save_state(setup: Setup, fit: Fit) -> None:
    if not setup.group.is_main:
        return
    best_val = {k: torch.from_numpy(a) for k, a in zip(_BEST_VAL, fit.best_val, strict=False)}
    state = FinetuneState(
        setup.config_record(),
        fit.epoch,
        setup.model.net.state_dict(),
        setup.model.head.state_dict(),
        fit.optimizer.state_dict(),
        fit.scheduler.state_dict(),
        fit.scaler.state_dict(),
        fit.history,
        fit.best,
        best_val,
    )
    state.save(last_path(setup.out))


def _resume(setup: Setup, fit: Fit) -> None:
    state = FinetuneState.load(last_path(setup.out), config=setup.config_record())
    setup.model.net.load_state_dict(state.net_state_dict)
    setup.model.head.load_state_dict(state.head_state_dict)
    fit.optimizer.load_state_dict(state.optimizer)
    fit.scheduler.load_state_dict(state.scheduler)
    fit.scaler.load_state_dict(state.scaler)
    fit.history = {k: list(v) for k, v in state.history.items()}
    fit.best, fit.epoch = dict(state.best), int(state.epoch)
    if state.best_val:  # the kept epoch's validation predictions, for the reports
        fit.best_val = tuple(state.best_val[k].numpy() for k in _BEST_VAL if k in state.best_val)


def start(setup: Setup) -> Fit:
    """The optimisation state: new, or with --resume as the last run left it."""
    fit = _new_fit(setup)
    if setup.cfg.resume:
        _resume(setup, fit)
    return fit


def epochs_left(setup: Setup, fit: Fit) -> int:
    """Epochs :func:`fit` will run at most: none once --epochs are done or --patience ran out."""
    cfg = setup.cfg
    if fit.epoch > 0 and fit.epoch - fit.best["epoch"] >= cfg.patience:
        return 0
    return max(0, cfg.epochs - fit.epoch)


def fit(setup: Setup, fit: Fit, data: Batches, say: Callable[[str], None]) -> Fit:
    """Epoch 0 (the head as reattached), then epochs until --epochs or --patience; with
    --log-dir each epoch is logged too (see :func:`_run_log`)."""
    with _run_log(setup) as log:
        return _epochs(setup, fit, data, say, log)


def _run_log(setup: Setup) -> RunLog:
    """The run's TensorBoard events (--log-dir, written by rank 0): LOG_DIR/STEM-unfreezeN, STEM
    the --out file's, with the settings the checkpoint records."""
    log_dir = setup.cfg.log_dir if setup.group.is_main else None
    settings = {"verb": "finetune", "out": str(setup.out), **setup.config_record()}
    return Runs.of(log_dir, setup.out.stem, settings).open(f"unfreeze{setup.cfg.unfreeze}")


def _epochs(setup: Setup, fit: Fit, data: Batches, say: Callable[[str], None], log: RunLog) -> Fit:
    cfg = setup.cfg
    if fit.epoch == 0:  # epoch 0: the reattached head on the live backbone, before any step
        data.meter.bar.phase("epoch 0, the head as reattached")
        vl, va, *val = _evaluate(setup, data)
        row = _val_row(setup, vl, va, val)
        say(f"epoch 0 (as reattached): {_said(row)}")
        row.update(train_loss=None, train_acc=None)
        _record(setup, fit, {"epoch": 0, **row, "seconds": 0.0}, tuple(val))
        log.scalars(0, row)
    while fit.epoch < cfg.epochs and fit.epoch - fit.best["epoch"] < cfg.patience:
        epoch, t0 = fit.epoch + 1, time.perf_counter()
        tl, ta = _train_epoch(setup, fit, data, epoch)
        vl, va, *val = _evaluate(setup, data)
        seconds = time.perf_counter() - t0
        fit.epoch = epoch
        row = {"train_loss": tl, "train_acc": ta, **_val_row(setup, vl, va, val)}
        _record(setup, fit, {"epoch": epoch, **row, "seconds": seconds}, tuple(val))
        log.scalars(epoch, row)
        _save_state(setup, fit)
        say(f"epoch {epoch}: train loss {tl:.4f} acc {ta:.4f}, {_said(row)}, {seconds:.1f} s")
    return fit


def _val_row(setup: Setup, loss: float, acc: float, val: list) -> dict:
    """An epoch's validation scores: loss and accuracy, and with several labels per image the
    mAP of its logits (``val``: :func:`_evaluate`'s labels, predictions, top-5 hits, logits)."""
    row = {"val_loss": loss, "val_acc": acc}
    if setup.multi_label:
        row["val_map"] = mean_average_precision(val[3], val[0] > 0.5)
    return row


def _said(row: dict) -> str:
    """'val loss 0.4123 acc 0.9000', or with several labels per image 'val loss 1.2345 mAP
    0.8123 acc 0.9000' (acc: the share of image-class decisions right at probability 1/2)."""
    score = f" mAP {row['val_map']:.4f}" if "val_map" in row else ""
    return f"val loss {row['val_loss']:.4f}{score} acc {row['val_acc']:.4f}"
