"""Fine-tuning: reattach a head, unfreeze the last N blocks, cache the frozen prefix.

Everything before the first unfrozen block is frozen and in eval mode, so for a
given input it always computes the same activations. With no augmentation (or
a fixed number of augmented views per image) those activations are computed
once, stored in float16, and every epoch trains only the unfrozen tail.
"""

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
from tqdm.auto import tqdm

from .backbones import Backbone, EvalTransform, FeatureNet, Normalise, build_backbone
from .checkpoint import load_checkpoint, save_checkpoint
from .data import AUGMENTS, ImageSet, augment, decoded_batches, scan
from .errors import EmbedcacheError
from .heads import Head, Standardize, init_template
from .runtime import autocast_dtype, default_num_workers, resolve_device
from .train import HEAD_FORMAT, MEMORY_FRACTION, Rows, available_memory_bytes, build_head_module

MODEL_FORMAT = "embedcache.model"
PREFIX_MODES = ("auto", "memory", "disk", "off")
DEFAULT_BATCH = 32


class FinetunedModel(nn.Module):
    """Backbone blocks, pooling and head: normalised images (N, 3, H, W) -> logits (N, C).

    ``start`` is the index of the first trainable block. ``train()`` leaves the
    frozen blocks in eval mode, so their BatchNorm statistics never move; with
    ``bn_stats=False`` (the default) the unfrozen blocks' BatchNorm layers keep
    their pretrained statistics too and only their scale and shift learn.
    """

    def __init__(
        self,
        net: FeatureNet,
        head: Head,
        start: int,
        transform: EvalTransform,
        bn_stats: bool = False,
    ):
        super().__init__()
        self.net, self.head, self.start, self.bn_stats = net, head, start, bn_stats
        self.transform = transform  # the preprocessing it expects (see Normalise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen blocks' output (what the prefix cache stores)."""
        return self.net.prefix(x, self.start)

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from prefix activations: the trainable part only."""
        return self.head(self.net(h, start=self.start))

    def train(self, mode: bool = True) -> FinetunedModel:
        super().train(mode)
        for block in self.net.blocks[: self.start]:
            block.eval()
        if self.start == len(self.net.blocks):  # --unfreeze 0: pooling layers stay frozen too
            self.net.pool.eval()
        if not self.bn_stats:
            # Small fine-tuning batches drag running statistics away from what the cached
            # head was trained on: on hymenoptera, val accuracy fell from 95.4% to 90.8%
            # after one epoch at lr 3e-5 with them updating (Keras' guide advises the same).
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


@dataclass
class FinetuneResult:
    """What finetune returns: the best model (in eval mode), its metrics and files."""

    model: FinetunedModel
    metrics: dict
    path: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)


def parse_unfreeze(value: int | str, num_blocks: int, name: str) -> int:
    """``--unfreeze`` as a number of blocks: 0..num_blocks, or 'all'."""
    if str(value).lower() == "all":
        return num_blocks
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if not 0 <= n <= num_blocks:
        raise EmbedcacheError(
            f"--unfreeze must be between 0 and {num_blocks} for {name} (or all), got {value}"
        )
    return n


def freeze(model: FinetunedModel) -> list[dict]:
    """Set requires_grad by block; return a row per block (name, parameters, trainable)."""
    rows = []
    for i, (name, block) in enumerate(zip(model.net.block_names, model.net.blocks, strict=True)):
        trainable = i >= model.start
        for p in block.parameters():
            p.requires_grad_(trainable)
        rows.append(
            {
                "block": name,
                "params": sum(p.numel() for p in block.parameters()),
                "trainable": trainable,
            }
        )
    pool_trainable = model.start < len(model.net.blocks)
    for p in model.net.pool.parameters():  # parameters after the last block go with it
        p.requires_grad_(pool_trainable)
    if any(True for _ in model.net.pool.parameters()):
        rows.append(
            {
                "block": "pool",
                "params": sum(p.numel() for p in model.net.pool.parameters()),
                "trainable": pool_trainable,
            }
        )
    for p in model.head.parameters():
        p.requires_grad_(True)
    rows.append(
        {
            "block": "head",
            "params": sum(p.numel() for p in model.head.parameters()),
            "trainable": True,
        }
    )
    return rows


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
    """AdamW: the head at ``lr``, unfrozen blocks at ``lr * backbone_lr_mult``; no decay on biases and norms."""
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


# ---------------------------------------------------------------------------
# Data: image items, prefix cache


def _items(images: ImageSet, split: str) -> tuple[list[Path], np.ndarray]:
    samples = images.splits[split]
    return [images.root / s.path for s in samples], np.array(
        [s.label for s in samples], dtype=np.int64
    )


def _run_prefix(
    model: FinetunedModel,
    items: list,
    decode,
    *,
    device,
    batch_size: int,
    workers: int,
    autocast,
    desc: str,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Prefix activations of every decodable item, float16: (n_ok, C, H, W), indices, failures."""
    norm = Normalise(model.transform).to(device)
    batches = [
        list(range(i, min(len(items), i + batch_size))) for i in range(0, len(items), batch_size)
    ]
    out, ok, failed = [], [], {}
    with (
        torch.inference_mode(),
        tqdm(
            total=len(items), desc=desc, unit="img", disable=not progress, dynamic_ncols=True
        ) as bar,
    ):
        for index, x, bad in decoded_batches(
            items, batches, decode, device=device, num_workers=workers
        ):
            if x is not None:
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    out.append(model.prefix(norm(x)).half().cpu().numpy())
                ok.append(index)
            failed.update(bad)
            bar.update(len(index) + len(bad))
    if not out:
        return np.zeros((0,)), np.zeros(0, np.int64), failed
    return np.concatenate(out), np.concatenate(ok), failed


@dataclass
class PrefixCache:
    """Frozen-prefix activations of train (one Rows per view) and val, in memory or in an HDF5 file."""

    views: list[Rows]
    val: Rows
    bytes: int
    where: str
    seconds: float
    h5: object = None  # the open h5py.File when on disk; removed on close

    def close(self) -> None:
        if self.h5 is not None:
            path = Path(self.h5.filename)
            self.h5.close()
            path.unlink(missing_ok=True)


def _prefix_shape(model: FinetunedModel, crop: int) -> tuple[int, ...]:
    import copy

    meta = copy.deepcopy(model.net).to("meta")
    with torch.no_grad():
        return tuple(
            meta.prefix(torch.empty(1, 3, crop, crop, device="meta"), model.start).shape[1:]
        )


def build_prefix_cache(
    model,
    train_items,
    train_labels,
    val_items,
    val_labels,
    *,
    views: int,
    augment_kind: str,
    seed: int,
    where: str,
    path: Path,
    device,
    batch_size,
    workers,
    autocast,
    progress,
) -> PrefixCache:
    """Run the frozen prefix once per image (per view) and keep its output."""
    t = model.transform
    start = time.perf_counter()
    n_views = max(1, views)
    eval_decode = functools.partial(augment, t=t, kind="none")
    train_decode = functools.partial(augment, t=t, kind=augment_kind if views else "none")
    arrays, labels_per_view = [], []
    for v in range(n_views):
        items = [(p, (seed, 1, v, i)) for i, p in enumerate(train_items)]
        acts, ok, _ = _run_prefix(
            model,
            items,
            train_decode,
            device=device,
            batch_size=batch_size,
            workers=workers,
            autocast=autocast,
            desc=f"prefix train view {v + 1}/{n_views}" if views else "prefix train",
            progress=progress,
        )
        arrays.append(acts)
        labels_per_view.append(train_labels[ok])
    vacts, vok, _ = _run_prefix(
        model,
        [(p, 0) for p in val_items],
        eval_decode,
        device=device,
        batch_size=batch_size,
        workers=workers,
        autocast=autocast,
        desc="prefix val",
        progress=progress,
    )
    total = sum(a.nbytes for a in arrays) + vacts.nbytes
    h5 = None
    if where == "disk":
        import h5py

        h5 = h5py.File(path, "w")
        arrays = [
            h5.create_dataset(f"view{v}", data=a, chunks=(1, *a.shape[1:]))
            for v, a in enumerate(arrays)
        ]
        vacts = h5.create_dataset("val", data=vacts, chunks=(1, *vacts.shape[1:]))
        h5.flush()
    in_memory = where == "memory"
    view_rows = [
        Rows(a, lab, np.arange(len(lab)), in_memory)
        for a, lab in zip(arrays, labels_per_view, strict=True)
    ]
    val_rows = Rows(vacts, val_labels[vok], np.arange(len(vok)), in_memory)
    return PrefixCache(view_rows, val_rows, total, where, time.perf_counter() - start, h5)


# ---------------------------------------------------------------------------
# Epochs


def _loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)


def _step(
    model,
    optimizer,
    scheduler,
    scaler,
    x,
    y,
    *,
    cached: bool,
    norm,
    autocast,
    device,
    label_smoothing,
) -> tuple[float, int]:
    """One optimisation step; returns (summed loss, correct) over the batch."""
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        if cached:
            h = (
                x.to(device, non_blocking=True)
                .float()
                .contiguous(memory_format=torch.channels_last)
            )
        else:
            with torch.no_grad():  # the frozen prefix needs no graph
                h = model.prefix(norm(x))
        logits = model.tail(h)
    loss = _loss(logits, y, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return float(loss.detach()) * len(y), int((logits.detach().argmax(1) == y).sum())


def _evaluate(
    model, batches, *, cached: bool, norm, autocast, device, label_smoothing
) -> tuple[float, float, np.ndarray]:
    """(loss, accuracy, predictions) on validation batches."""
    model.eval()
    loss_sum, correct, n, preds = 0.0, 0, 0, []
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=autocast, enabled=autocast is not None),
    ):
        for x, y in batches:
            y = y.to(device)
            h = (
                x.to(device).float().contiguous(memory_format=torch.channels_last)
                if cached
                else model.prefix(norm(x))
            )
            logits = model.tail(h).float()
            loss_sum += float(F.cross_entropy(logits, y, label_smoothing=label_smoothing)) * len(y)
            pred = logits.argmax(1)
            correct += int((pred == y).sum())
            n += len(y)
            preds.append(pred.cpu().numpy())
    model.train()
    return (
        loss_sum / max(n, 1),
        correct / max(n, 1),
        np.concatenate(preds) if preds else np.zeros(0, np.int64),
    )


def _cached_batches(rows: Rows, batch_size: int, rng: np.random.Generator | None):
    if rng is None:
        for pos, x in rows.blocks():
            for lo in range(0, len(pos), batch_size):
                yield (
                    torch.from_numpy(x[lo : lo + batch_size]),
                    torch.from_numpy(rows.labels[pos[lo : lo + batch_size]]),
                )
        return
    for x, y in rows.batches(batch_size, rng):
        yield torch.from_numpy(x), torch.from_numpy(y)


def _image_batches(items, labels, batch_size, decode, *, rng, device, workers):
    order = rng.permutation(len(items)) if rng is not None else np.arange(len(items))
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    for index, x, _ in decoded_batches(items, batches, decode, device=device, num_workers=workers):
        if x is not None:
            yield x, torch.from_numpy(labels[index])


# ---------------------------------------------------------------------------
# Public API


def _head_for(
    head: str | Path | None, bb: Backbone, classes: list[str], *, seed: int
) -> tuple[Head, dict]:
    """The reattached head (checked against backbone and classes), or a fresh linear one."""
    if head is None:
        classifier = init_template(
            "linear", bb.feature_dim, len(classes), hidden=0, dropout=0.0, seed=seed
        )
        norm = Standardize(torch.zeros(bb.feature_dim), torch.ones(bb.feature_dim))
        return Head(norm, classifier), {
            "kind": "linear",
            "dim": bb.feature_dim,
            "num_classes": len(classes),
            "hidden": 512,
            "dropout": 0.0,
        }
    ckpt = load_checkpoint(head, kind=HEAD_FORMAT)
    config, ident = ckpt["config"], ckpt["identity"]
    if config["kind"] == "knn":
        raise EmbedcacheError(
            f"{head} is a knn head, which has no weights to fine-tune; train a linear or mlp head"
        )
    mine = {"backbone": bb.name, "weights": bb.weights, "transform": bb.transform.to_json()}
    for key in ("backbone", "weights", "transform"):
        if str(ident[key]) != str(mine[key]):
            raise EmbedcacheError(
                f"{head} was trained on other features than this backbone gives: {key} {ident[key]} (head) vs {mine[key]} (backbone); pass --backbone and --weights as used for the cache"
            )
    if list(ckpt["classes"]) != list(classes):
        raise EmbedcacheError(
            f"{head} was trained on classes {', '.join(ckpt['classes'][:8])} but the data has {', '.join(classes[:8])}; train the head on a cache of this data"
        )
    return build_head_module(config, ckpt["state_dict"]), dict(config)


def finetune(
    data: str | Path,
    *,
    out: str | Path,
    head: str | Path | None = None,
    backbone: str | None = None,
    weights: str | None = None,
    unfreeze: int | str = 2,
    epochs: int = 10,
    lr: float | None = None,
    backbone_lr_mult: float = 0.3,
    weight_decay: float = 0.05,
    warmup: float = 1.0,
    batch_size: int | None = None,
    augment_kind: str = "light",
    views: int = 4,
    prefix_cache: str = "auto",
    patience: int = 5,
    label_smoothing: float = 0.1,
    resume: bool = False,
    device: str = "auto",
    precision: str = "auto",
    seed: int = 0,
    image_size: int | None = None,
    val_fraction: float = 0.2,
    num_workers: int | None = None,
    max_memory: int | None = None,
    bn_stats: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune the last ``unfreeze`` blocks of a backbone together with a head.

    Parameters
    ----------
    head : a head from train_head to reattach (its backbone, weights and
        transform are checked, and default ``backbone``/``weights``); None for a
        fresh linear head.
    lr : the head's learning rate; default 3e-4 when reattaching a trained head
        (it only needs adjusting), 1e-3 for a fresh one (the tutorials' rate).
    unfreeze : blocks trained, counted from the end as `embedcache backbones`
        lists them; 0 trains the head only (through the live backbone); 'all'.
    augment_kind : none | light | strong; with ``views`` > 0 each training image
        gets that many augmented views, computed once through the frozen prefix.
    prefix_cache : auto | memory | disk | off. auto caches the frozen prefix's
        output whenever it is deterministic (no augmentation, or ``views``) and
        fits in memory, else on disk.
    bn_stats : let BatchNorm layers of unfrozen blocks update their running
        statistics (default: keep the pretrained ones; scale and shift still learn).
    log : called with one line per event (what is trainable, each epoch).

    Returns
    -------
    FinetuneResult : ``model`` (the best epoch, eval mode) maps normalised images
        (N, 3, H, W) to logits; metrics per epoch; ``path`` of the checkpoint.
    """
    if augment_kind not in AUGMENTS:
        raise EmbedcacheError(
            f"--augment must be one of {', '.join(AUGMENTS)}, got {augment_kind!r}"
        )
    if prefix_cache not in PREFIX_MODES:
        raise EmbedcacheError(
            f"--prefix-cache must be one of {', '.join(PREFIX_MODES)}, got {prefix_cache!r}"
        )
    if epochs < 1 or patience < 1 or views < 0:
        raise EmbedcacheError(
            f"--epochs and --patience must be at least 1 and --views at least 0, got {epochs}, {patience}, {views}"
        )
    out = Path(out)
    if augment_kind == "none":
        views = 0  # every view would be the same image: compute the prefix once
    lr = lr if lr is not None else (3e-4 if head is not None else 1e-3)
    dev = resolve_device(device)
    amp = autocast_dtype(dev, precision)
    torch.manual_seed(seed)
    head_ident = load_checkpoint(head, kind=HEAD_FORMAT)["identity"] if head is not None else {}
    name = backbone or head_ident.get("backbone")
    if name is None:
        raise EmbedcacheError("pass --backbone (or --head, whose backbone is then used)")
    if image_size is None and head_ident:
        image_size = json_crop(head_ident["transform"])
    bb = build_backbone(
        name,
        weights=weights or head_ident.get("weights_arg", "DEFAULT"),
        image_size=image_size,
        device="cpu",
    )
    images = scan(data, val_fraction=val_fraction, seed=seed)
    if "train" not in images.splits or not images.classes:
        raise EmbedcacheError(
            f"{data} has no labelled train split; finetune needs class folders or a CSV with labels"
        )
    classes = images.classes
    head_module, head_config = _head_for(head, bb, classes, seed=seed)
    n_blocks = len(bb.block_names)
    n = parse_unfreeze(unfreeze, n_blocks, bb.name)
    model = FinetunedModel(bb.net, head_module, n_blocks - n, bb.transform, bn_stats)
    table = freeze(model)
    say = log or (lambda line: None)
    trainable = [r for r in table if r["trainable"]]
    say(f"{bb.name}: training {', '.join(r['block'] for r in trainable)} "
        f"({sum(r['params'] for r in trainable):,} of {sum(r['params'] for r in table):,} parameters); frozen: "
        f"{', '.join(r['block'] for r in table if not r['trainable']) or 'nothing'}")  # fmt: skip
    model = model.to(dev).to(memory_format=torch.channels_last).train()

    if "val" not in images.splits:
        raise EmbedcacheError(
            f"{data} has no val split; add a val/ folder (or, for plain class folders, a --val-fraction above 0)"
        )
    train_items, train_labels = _items(images, "train")
    val_items, val_labels = _items(images, "val")
    if np.any(train_labels < 0) or np.any(val_labels < 0):
        raise EmbedcacheError(
            f"{data} has unlabelled images in train or val; finetune needs labels"
        )

    batch_size = batch_size or DEFAULT_BATCH
    workers = default_num_workers(dev) if num_workers is None else num_workers
    deterministic = augment_kind == "none" or views > 0
    has_prefix = model.start > 0
    shape = _prefix_shape(model, bb.transform.crop) if has_prefix else ()
    need = (
        (len(train_items) * max(1, views) + len(val_items)) * int(np.prod(shape)) * 2
        if has_prefix
        else 0
    )
    budget = (
        max_memory if max_memory is not None else int(MEMORY_FRACTION * available_memory_bytes())
    )
    where = prefix_cache
    if prefix_cache == "auto":
        where = (
            "off"
            if not (deterministic and has_prefix)
            else ("memory" if need <= budget else "disk")
        )
    elif prefix_cache in ("memory", "disk") and not (deterministic and has_prefix):
        why = (
            "nothing is frozen (--unfreeze all)"
            if not has_prefix
            else "augmentation changes the input every epoch; pass --views V to cache V augmented views"
        )
        raise EmbedcacheError(f"--prefix-cache {prefix_cache} is not possible: {why}")

    config = {
        "data": str(Path(data).resolve()), "backbone": bb.name, "weights": bb.weights, "unfreeze": n,
        "epochs": epochs, "lr": lr, "backbone_lr_mult": backbone_lr_mult, "weight_decay": weight_decay,
        "warmup": warmup, "batch_size": batch_size, "augment": augment_kind, "views": views,
        "label_smoothing": label_smoothing, "seed": seed, "head": str(head) if head else None, "precision": precision,
        "bn_stats": bn_stats,
    }  # fmt: skip
    optimizer = _optimizer(
        model, lr=lr, backbone_lr_mult=backbone_lr_mult, weight_decay=weight_decay
    )
    steps_per_epoch = math.ceil(len(train_items) / batch_size)
    scheduler = _schedule(
        optimizer,
        warmup_steps=max(1, int(warmup * steps_per_epoch)),
        total_steps=epochs * steps_per_epoch,
    )
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    norm = Normalise(bb.transform).to(dev)
    last_path = out.with_name(out.stem + ".last" + out.suffix)
    history = {
        k: [] for k in ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")
    }
    best = {"acc": -1.0, "loss": math.inf, "epoch": -1}
    start_epoch = 0
    if resume:
        start_epoch, history, best = _load_resume(
            last_path, config, model, optimizer, scheduler, scaler
        )

    prefix = None
    try:
        if where in ("memory", "disk"):
            say(
                f"prefix cache ({where}): blocks up to {bb.block_names[model.start - 1]}, {need / 1e6:.1f} MB of float16 activations"
            )
            prefix = build_prefix_cache(
                model, train_items, train_labels, val_items, val_labels, views=views, augment_kind=augment_kind,
                seed=seed, where=where, path=out.with_name(out.stem + ".prefix.h5"), device=dev,
                batch_size=batch_size, workers=workers, autocast=amp, progress=progress,
            )  # fmt: skip
        cached = prefix is not None
        train_decode = functools.partial(augment, t=bb.transform, kind=augment_kind)
        val_decode = functools.partial(augment, t=bb.transform, kind="none")

        def val_batches():
            if cached:
                return _cached_batches(prefix.val, batch_size, None)
            return _image_batches(
                [(p, 0) for p in val_items],
                val_labels,
                batch_size,
                val_decode,
                rng=None,
                device=dev,
                workers=workers,
            )

        kw = {
            "cached": cached,
            "norm": norm,
            "autocast": amp,
            "device": dev,
            "label_smoothing": label_smoothing,
        }
        if start_epoch == 0:  # epoch 0: the reattached head on the live backbone, before any step
            vl, va, _ = _evaluate(model, val_batches(), **kw)
            say(f"epoch 0 (as reattached): val loss {vl:.4f} acc {va:.4f}")
            if _record(history, best, 0, None, None, vl, va, 0.0):
                _save_best(out, model, head_config, bb, classes, config, history, best, table)
        for epoch in range(start_epoch + 1, epochs + 1):
            t0 = time.perf_counter()
            torch.manual_seed(
                seed * 1_000_003 + epoch
            )  # dropout and friends: the same per epoch, resumed or not
            rng = np.random.default_rng([seed, epoch])
            if cached:
                batches = _cached_batches(
                    prefix.views[(epoch - 1) % len(prefix.views)], batch_size, rng
                )
            else:
                items = [(p, (seed, 2, epoch, i)) for i, p in enumerate(train_items)]
                batches = _image_batches(
                    items,
                    train_labels,
                    batch_size,
                    train_decode,
                    rng=rng,
                    device=dev,
                    workers=workers,
                )
            loss_sum = correct = seen = 0
            bar = tqdm(
                batches,
                total=steps_per_epoch,
                desc=f"epoch {epoch}/{epochs}",
                unit="batch",
                disable=not progress,
                dynamic_ncols=True,
                leave=False,
            )
            for x, y in bar:
                y = y.to(dev)
                ls, c = _step(model, optimizer, scheduler, scaler, x, y, **kw)
                loss_sum, correct, seen = loss_sum + ls, correct + c, seen + len(y)
            vl, va, _ = _evaluate(model, val_batches(), **kw)
            seconds = time.perf_counter() - t0
            improved = _record(
                history,
                best,
                epoch,
                loss_sum / max(seen, 1),
                correct / max(seen, 1),
                vl,
                va,
                seconds,
            )
            if improved:
                _save_best(out, model, head_config, bb, classes, config, history, best, table)
            _save_last(last_path, model, optimizer, scheduler, scaler, config, history, best, epoch)
            say(
                f"epoch {epoch}: train loss {loss_sum / max(seen, 1):.4f} acc {correct / max(seen, 1):.4f}, val loss {vl:.4f} acc {va:.4f}, {seconds:.1f} s"
            )
            if epoch - best["epoch"] >= patience:
                break
    finally:
        if prefix is not None:
            prefix.close()
    ckpt = load_checkpoint(out, kind=MODEL_FORMAT)
    best_model = build_model(ckpt, torch.device("cpu"))
    epoch_times = [s for e, s in zip(history["epoch"], history["seconds"], strict=True) if e > 0]
    metrics = {
        "history": history, "best_epoch": best["epoch"], "best_val_acc": best["acc"], "best_val_loss": best["loss"],
        "epochs_run": history["epoch"][-1], "trainable": table, "unfreeze": n, "classes": classes,
        "prefix_cache": {"where": where, "bytes": prefix.bytes if prefix else 0, "seconds": round(prefix.seconds, 3) if prefix else 0.0, "shape": list(shape)},
        "seconds_per_epoch": float(np.mean(epoch_times)) if epoch_times else 0.0, "config": config,
        "estimated_speedup": _speedup(prefix, epoch_times, len(train_items), len(val_items)),
        "head_val_acc_before": history["val_acc"][0] if history["epoch"] and history["epoch"][0] == 0 else None,
        "best_trained_val_acc": max((a for e, a in zip(history["epoch"], history["val_acc"], strict=True) if e > 0), default=None),
    }  # fmt: skip
    ckpt["metrics"] = metrics
    save_checkpoint(ckpt, out)
    return FinetuneResult(best_model, metrics, out, {"model": out, "last": last_path})


def _speedup(
    prefix: PrefixCache | None, epoch_times: list[float], n_train: int, n_val: int
) -> float | None:
    """Per-epoch speed-up of the prefix cache: (frozen prefix over train + val, + a cached epoch) / a cached epoch.

    The frozen part's cost per epoch is read off the cache build, which ran it
    once over every train view and val image.
    """
    if prefix is None or not epoch_times:
        return None
    per_epoch_prefix = prefix.seconds * (n_train + n_val) / (n_train * len(prefix.views) + n_val)
    epoch = float(np.mean(epoch_times))
    return round((per_epoch_prefix + epoch) / epoch, 1)


def json_crop(transform_json: str) -> int:
    import json

    return int(json.loads(transform_json)["crop"])


def _record(history, best, epoch, tl, ta, vl, va, seconds) -> bool:
    for k, v in zip(
        ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"),
        (epoch, tl, ta, vl, va, seconds),
        strict=True,
    ):
        history[k].append(v)
    improved = va > best["acc"] or (va == best["acc"] and vl < best["loss"])
    if improved:
        best.update(acc=va, loss=vl, epoch=epoch)
    return improved


def _model_dict(model, head_config, bb, classes, config, history, best, table) -> dict:
    return {
        "format": MODEL_FORMAT, "format_version": 1,
        "identity": {"backbone": bb.name, "weights": bb.weights, "weights_arg": bb.weights_arg, "transform": bb.transform.to_json(), "feature_dim": bb.feature_dim},
        "net_state_dict": {k: v.detach().cpu() for k, v in model.net.state_dict().items()},
        "head_config": head_config, "head_state_dict": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
        "classes": classes, "start": model.start, "config": config,
        "metrics": {"history": history, "best": best, "trainable": table},
    }  # fmt: skip


def _save_best(out, model, head_config, bb, classes, config, history, best, table) -> None:
    save_checkpoint(_model_dict(model, head_config, bb, classes, config, history, best, table), out)


def _save_last(path, model, optimizer, scheduler, scaler, config, history, best, epoch) -> None:
    save_checkpoint(
        {
            "format": "embedcache.finetune-state", "format_version": 1, "config": config, "epoch": epoch,
            "net_state_dict": {k: v.detach().cpu() for k, v in model.net.state_dict().items()},
            "head_state_dict": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "history": history, "best": best, "rng": torch.get_rng_state(),
        },
        path,
    )  # fmt: skip


def _load_resume(path, config, model, optimizer, scheduler, scaler):
    if not path.exists():
        raise EmbedcacheError(
            f"--resume found no {path}; it is written after each epoch of a run with the same --out"
        )
    state = load_checkpoint(path, kind="embedcache.finetune-state")
    diff = [k for k in config if state["config"].get(k) != config[k]]
    if diff:
        k = diff[0]
        raise EmbedcacheError(
            f"{path} is from a run with other settings ({k} {state['config'].get(k)} vs {config[k]}); resume with the same options or start without --resume"
        )
    model.net.load_state_dict(state["net_state_dict"])
    model.head.load_state_dict(state["head_state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    return (
        int(state["epoch"]),
        {k: list(v) for k, v in state["history"].items()},
        dict(state["best"]),
    )


def build_model(ckpt: dict, device: torch.device) -> FinetunedModel:
    """A FinetunedModel (eval mode) from a finetune checkpoint dict."""
    bb = model_backbone(ckpt, device)
    head = build_head_module(ckpt["head_config"], ckpt["head_state_dict"])
    bn_stats = bool(ckpt.get("config", {}).get("bn_stats", False))
    return (
        FinetunedModel(bb.net, head, int(ckpt["start"]), bb.transform, bn_stats).to(device).eval()
    )


def model_backbone(ckpt: dict, device: torch.device) -> Backbone:
    """The fine-tuned backbone of a checkpoint: the architecture rebuilt, its weights loaded."""
    ident = ckpt["identity"]
    bb = build_backbone(
        ident["backbone"], weights="none", image_size=json_crop(ident["transform"]), device="cpu"
    )
    bb.net.load_state_dict(ckpt["net_state_dict"])
    bb.net.to(device).eval()
    bb.transform = EvalTransform.from_json(ident["transform"])
    bb.weights = f"finetuned from {ident['weights']}"
    return bb


def load_model(path: str | Path, device: str = "cpu") -> FinetunedModel:
    """A fine-tuned model as a plain nn.Module (eval mode): normalised images -> logits.

    ``model.transform`` is the preprocessing it expects (see embedcache.backbones.Normalise).
    """
    return build_model(load_checkpoint(path, kind=MODEL_FORMAT), resolve_device(device))
