"""Fine-tuning: reattach a head, unfreeze the last N blocks, cache the frozen prefix.

Everything before the first unfrozen block is frozen and in eval mode, so for a
given input it always computes the same activations. With no augmentation (or
a fixed number of augmented views per image) those activations are computed
once, stored in float16, and every epoch trains only the unfrozen tail.

``finetune`` runs four phases, each a function below: prepare (data, backbone,
head, what trains), plan the prefix cache, fit (the epochs), summarise (the
best checkpoint, metrics and plots).
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from .backbones import Backbone, Normalise, build_backbone
from .cache import Rows, memory_budget
from .checkpoint import FinetuneState, HeadCheckpoint, ModelCheckpoint, Recorded, TrainedOn
from .config import FinetuneConfig
from .data import ImageSet, augment, decoded_batches, paths_digest, scan
from .distributed import Group, process_group
from .errors import EmbedcacheError
from .exclusion import excluded
from .forward import check_batch_memory, forward_images
from .heads import Head, Standardize, init_template
from .locks import exclusive
from .models import FinetunedModel, build_model
from .runtime import (
    Run,
    autocast_dtype,
    default_num_workers,
    seeded,
    tune_allocator,
)


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


def _set_trainable(name: str, module: nn.Module, trainable: bool) -> dict:
    for p in module.parameters():
        p.requires_grad_(trainable)
    params = sum(p.numel() for p in module.parameters())
    return {"block": name, "params": params, "trainable": trainable}


def freeze(model: FinetunedModel) -> list[dict]:
    """Set requires_grad by block; return a row per block (name, parameters, trainable)."""
    net = model.net
    rows = [
        _set_trainable(name, block, i >= model.start)
        for i, (name, block) in enumerate(zip(net.block_names, net.blocks, strict=True))
    ]
    pool = _set_trainable(
        "pool", net.pool, model.start < len(net.blocks)
    )  # goes with the last block
    if pool["params"]:
        rows.append(pool)
    rows.append(_set_trainable("head", model.head, True))
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
# Phase 1: prepare the data, the backbone and the head


@dataclass
class _Setup:
    """Everything the later phases need, decided once."""

    cfg: FinetuneConfig
    data: Path
    out: Path
    bb: Backbone
    classes: list[str]
    model: FinetunedModel
    head_config: dict
    table: list[dict]  # what trains (see freeze)
    train: tuple[list[Path], np.ndarray]  # image paths, labels
    val: tuple[list[Path], np.ndarray]
    val_source: str
    run: Run
    unfreeze: int
    group: Group = Group()
    trained: TrainedOn | None = None  # the images the model trains on, for its checkpoint

    def owns(self, items: np.ndarray) -> np.ndarray:
        """Which of ``items`` (item numbers) this rank handles: those of every world-th block of
        --batch-size items. Blocks, not single items, so that each rank runs the frozen prefix on
        exactly the batches one process would: the cached float16 activations are then the
        same bits (other batch shapes round differently, which moved gradients by ~1%)."""
        items = np.asarray(items)
        return (items // self.cfg.batch_size) % self.group.world == self.group.rank

    def own(self, n: int) -> np.ndarray:
        """The items of ``n`` this rank handles (all of them in one process)."""
        items = np.arange(n)
        return items[self.owns(items)]

    def config_record(self) -> dict:
        """The settings a checkpoint records and --resume compares (plain values)."""
        c = self.cfg
        d = {k: v for k, v in dataclasses.asdict(c).items() if k not in _NOT_RECORDED}
        return {
            **d,
            "data": str(self.data),
            "backbone": self.bb.name,
            "weights": self.bb.weights,
            "unfreeze": self.unfreeze,
            "lr": c.head_lr,
            "views": c.num_views,
        }


# How a run is executed, not what it trains: free to change on --resume.
_NOT_RECORDED = (
    "resume",
    "device",
    "num_workers",
    "max_memory",
    "prefix_cache",
    "image_size",
    "patience",
)


def _items(images: ImageSet, split: str) -> tuple[list[Path], np.ndarray]:
    samples = images.splits[split]
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return [images.root / s.path for s in samples], labels


def _fresh_head(bb: Backbone, classes: list[str], seed: int) -> tuple[Head, dict]:
    config = {
        "kind": "linear",
        "dim": bb.feature_dim,
        "num_classes": len(classes),
        "hidden": 512,
        "dropout": 0.0,
    }
    classifier = init_template(
        "linear", bb.feature_dim, len(classes), hidden=0, dropout=0.0, seed=seed
    )
    norm = Standardize(torch.zeros(bb.feature_dim), torch.ones(bb.feature_dim))
    return Head(norm, classifier), config


def _reattach(ckpt: HeadCheckpoint, bb: Backbone, images: ImageSet, cfg: FinetuneConfig, carved):
    """The trained head, checked against the backbone's features and the data's classes, as
    it was before any refit when the refit saw finetune's validation images (see
    :func:`_unseen_val`). Returns (head, its config, a note or None)."""
    if ckpt.config["kind"] == "knn":
        raise EmbedcacheError(
            f"{ckpt.path} is a knn head, which has no weights to fine-tune; train a linear or mlp head"
        )
    ckpt.recorded.identity.check(
        bb.identity(),
        subject=f"{ckpt.path} was trained on other features than this backbone gives",
        mine="head",
        theirs="backbone",
        hint="pass --backbone and --weights as used for the cache",
    )
    classes = images.classes
    if list(ckpt.classes) != list(classes):
        raise EmbedcacheError(
            f"{ckpt.path} was trained on classes {', '.join(ckpt.classes[:8])} but the data has {', '.join(classes[:8])}; train the head on a cache of this data"
        )
    selected = _unseen_val(ckpt, images, cfg, carved)
    note = None
    if selected:
        note = f"reattached {ckpt.path.name} as chosen before its refit, which saw these val images"
    return ckpt.module(selected=selected), dict(ckpt.config), note


def _unseen_val(ckpt: HeadCheckpoint, images: ImageSet, cfg: FinetuneConfig, carved: bool) -> bool:
    """Whether the head must be taken as it was before its refit so that it has never seen
    finetune's validation images (``carved``: held out of train); refuses when no version of
    the head qualifies."""
    trained = ckpt.trained
    if trained is None:  # a head from before the record: nothing to check against
        return False
    val = paths_digest([s.path for s in images.splits["val"]])
    if trained.holdout is not None and carved:
        same = trained.holdout == {"fraction": cfg.val_fraction, "seed": cfg.seed}
        if not same:
            h = trained.holdout
            raise EmbedcacheError(
                f"{ckpt.path} was trained on part of finetune's validation images (it held out "
                f"{h['fraction']:g} of train with seed {h['seed']}, finetune {cfg.val_fraction:g} "
                f"with seed {cfg.seed}); pass --val-fraction {h['fraction']:g} --seed {h['seed']}"
            )
        return trained.refit
    if trained.seen(val) == "train":
        raise EmbedcacheError(
            f"{ckpt.path} was trained on finetune's validation images; train the head on a cache "
            "whose train split does not hold them"
        )
    return trained.seen(val) == "val" and ckpt.selected is not None


def _backbone_for(cfg: FinetuneConfig, head: HeadCheckpoint | None) -> Backbone:
    """The backbone to fine-tune: as asked, else the one the head was trained on."""
    name = cfg.backbone or (head.recorded.identity.backbone if head else None)
    if name is None:
        raise EmbedcacheError("pass --backbone (or --head, whose backbone is then used)")
    weights = cfg.weights or (head.recorded.weights_arg if head else "DEFAULT")
    size = cfg.image_size or (head.recorded.crop if head else None)
    return build_backbone(name, weights=weights, image_size=size, device="cpu")


def _labelled(data, cfg: FinetuneConfig) -> tuple[ImageSet, str]:
    """The images with train and val splits (val held out of train as train-head does)."""
    images, val_source = scan(data, val_fraction=cfg.val_fraction, seed=cfg.seed).with_val(
        val_fraction=cfg.val_fraction, seed=cfg.seed
    )
    images = excluded(images, cfg.exclude, str(data))
    if "train" not in images.splits or not images.classes:
        raise EmbedcacheError(
            f"{data} has no labelled train split; finetune needs class folders or a CSV with labels"
        )
    if "val" not in images.splits:
        raise EmbedcacheError(
            f"{data} has no val split; add a val/ folder or pass a --val-fraction above 0"
        )
    labels = [s.label for split in ("train", "val") for s in images.splits[split]]
    if min(labels) < 0:
        raise EmbedcacheError(
            f"{data} has unlabelled images in train or val; finetune needs labels"
        )
    return images, val_source


def _prepare(data, cfg: FinetuneConfig, out: Path, progress: bool, group: Group) -> _Setup:
    dev = group.device(cfg.device)
    if group.world > 1 and cfg.bn_stats and dev.type != "cuda":
        raise EmbedcacheError(
            "--bn-stats under torchrun needs GPUs (SyncBatchNorm runs on CUDA only); drop --bn-stats or use --device cuda"
        )
    head_ckpt = HeadCheckpoint.load(cfg.head) if cfg.head is not None else None
    bb = _backbone_for(cfg, head_ckpt)
    images, val_source = _labelled(data, cfg)
    classes = images.classes
    carved = val_source != "val split"
    if head_ckpt:
        head, head_config, note = _reattach(head_ckpt, bb, images, cfg, carved)
        val_source = f"{val_source}; {note}" if note else val_source
    else:
        head, head_config = _fresh_head(bb, classes, cfg.seed)
    holdout = {"fraction": cfg.val_fraction, "seed": cfg.seed} if carved else None
    # the train split as the data has it (with the held-out images): what evaluate is given
    seen = [s.path for split in ("train", "val")[: 1 + carved] for s in images.splits[split]]
    trained = TrainedOn({"train": paths_digest(seen)}, holdout)
    n_blocks = len(bb.block_names)
    n = parse_unfreeze(cfg.unfreeze, n_blocks, bb.name)
    model = FinetunedModel(bb.net, head, n_blocks - n, bb.transform, cfg.bn_stats)
    table = freeze(model)
    if group.world > 1 and cfg.bn_stats:  # statistics over the global batch, not each rank's part
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(dev).to(memory_format=torch.channels_last).train()
    n_train = len(images.splits["train"])
    check_batch_memory(min(cfg.batch_size, n_train), bb.transform.crop, dev, training=True)
    workers = default_num_workers(dev) if cfg.num_workers is None else cfg.num_workers
    run = Run(
        dev, cfg.batch_size, workers, autocast_dtype(dev, cfg.precision), progress and group.is_main
    )
    return _Setup(
        cfg,
        Path(data).resolve(),
        out,
        bb,
        classes,
        model,
        head_config,
        table,
        _items(images, "train"),
        _items(images, "val"),
        val_source,
        run,
        n,
        group,
        trained,
    )


def _describe(setup: _Setup) -> str:
    table = setup.table
    trainable = [r for r in table if r["trainable"]]
    frozen = ", ".join(r["block"] for r in table if not r["trainable"]) or "nothing"
    n_train = sum(r["params"] for r in trainable)
    return (
        f"{setup.bb.name}: training {', '.join(r['block'] for r in trainable)} "
        f"({n_train:,} of {sum(r['params'] for r in table):,} parameters); frozen: {frozen}"
    )


# ---------------------------------------------------------------------------
# Phase 2: plan the prefix cache


@dataclass(frozen=True)
class _PrefixPlan:
    where: str  # memory | disk | off
    shape: tuple[int, ...]  # one image's prefix activations
    need_bytes: int


def _prefix_shape(model: FinetunedModel, crop: int) -> tuple[int, ...]:
    import copy

    meta = copy.deepcopy(model.net).to("meta")
    with torch.no_grad():
        x = torch.empty(1, 3, crop, crop, device="meta")
        return tuple(meta.prefix(x, model.start).shape[1:])


def _plan_prefix(setup: _Setup) -> _PrefixPlan:
    """Cache the frozen prefix's output when it is deterministic; in memory if it fits."""
    cfg, model = setup.cfg, setup.model
    deterministic = cfg.augment == "none" or cfg.views > 0
    has_prefix = model.start > 0
    if cfg.prefix_cache in ("memory", "disk") and not (deterministic and has_prefix):
        why = (
            "nothing is frozen (--unfreeze all)"
            if not has_prefix
            else "augmentation changes the input every epoch; pass --views V to cache V augmented views"
        )
        raise EmbedcacheError(f"--prefix-cache {cfg.prefix_cache} is not possible: {why}")
    if not (deterministic and has_prefix) or cfg.prefix_cache == "off":
        return _PrefixPlan("off", (), 0)
    shape = _prefix_shape(model, setup.bb.transform.crop)
    train, val = len(setup.own(len(setup.train[0]))), len(setup.own(len(setup.val[0])))
    need = (train * max(1, cfg.num_views) + val) * int(np.prod(shape)) * 2  # float16, this rank's
    where = cfg.prefix_cache
    if where == "auto":
        where = "memory" if need <= memory_budget(cfg.max_memory) else "disk"
    return _PrefixPlan(where, shape, need)


@dataclass
class PrefixCache:
    """Frozen-prefix activations of train (one Rows per view) and val, in memory or in an HDF5 file."""

    views: list[Rows]
    val: Rows
    bytes: int
    where: str
    seconds: float
    h5: object = None  # the open h5py.File when on disk; removed on close
    index: list[np.ndarray] = field(default_factory=list)  # per view: the train item of each row

    def positions(self, view: int, items: np.ndarray) -> np.ndarray:
        """Rows of ``view`` holding ``items`` (train item numbers); items not cached are left out."""
        index = self.index[view]
        at = np.searchsorted(index, items)
        hit = (at < len(index)) & (index[np.minimum(at, len(index) - 1)] == items)
        return at[hit]

    def close(self) -> None:
        if self.h5 is not None:
            path = Path(self.h5.filename)
            self.h5.close()
            path.unlink(missing_ok=True)


def _prefix_of(model: FinetunedModel, items: list, decode, run: Run, desc: str):
    """float16 prefix activations (n_ok, C, H, W) of the decodable items, and their indices."""
    norm = Normalise(model.transform).to(run.device)
    acts, ok, _ = forward_images(
        lambda x: model.prefix(norm(x)).half(), items, decode, run, desc=desc
    )
    return (acts if acts is not None else np.zeros((0,), np.float16)), ok


def build_prefix_cache(setup: _Setup, plan: _PrefixPlan) -> PrefixCache:
    """Run the frozen prefix once per image (per view) and keep its output."""
    cfg, model, t = setup.cfg, setup.model, setup.model.transform
    start = time.perf_counter()
    views = cfg.num_views
    train_decode = functools.partial(augment, t=t, kind=cfg.augment if views else "none")
    (train_items, train_labels), (val_items, val_labels) = setup.train, setup.val
    mine, vmine = setup.own(len(train_items)), setup.own(len(val_items))  # under torchrun: a part
    arrays, labels, index = [], [], []
    for v in range(max(1, views)):
        items = [(train_items[i], (cfg.seed, 1, v, int(i))) for i in mine]
        desc = f"prefix train view {v + 1}/{views}" if views else "prefix train"
        acts, ok = _prefix_of(model, items, train_decode, setup.run, desc)
        arrays.append(acts)
        labels.append(train_labels[mine[ok]])
        index.append(mine[ok])
    eval_decode = functools.partial(augment, t=t, kind="none")
    vacts, vok = _prefix_of(
        model, [(val_items[i], 0) for i in vmine], eval_decode, setup.run, "prefix val"
    )
    total = sum(a.nbytes for a in arrays) + vacts.nbytes
    h5 = None
    if plan.where == "disk":
        rank = f".rank{setup.group.rank}" if setup.group.world > 1 else ""
        h5, arrays, vacts = _to_disk(
            setup.out.with_name(f"{setup.out.stem}.prefix{rank}.h5"), arrays, vacts
        )
    in_memory = plan.where == "memory"
    view_rows = [
        Rows(a, lab, np.arange(len(lab)), in_memory) for a, lab in zip(arrays, labels, strict=True)
    ]
    val_rows = Rows(vacts, val_labels[vmine[vok]], np.arange(len(vok)), in_memory)
    seconds = time.perf_counter() - start
    return PrefixCache(view_rows, val_rows, total, plan.where, seconds, h5, index)


def _to_disk(path: Path, arrays: list[np.ndarray], val: np.ndarray):
    """Move the activations into an HDF5 file (one chunk per image); returns (file, datasets)."""
    import h5py

    h5 = h5py.File(path, "w")
    views = [
        h5.create_dataset(f"view{v}", data=a, chunks=(1, *a.shape[1:]))
        for v, a in enumerate(arrays)
    ]
    val_ds = h5.create_dataset("val", data=val, chunks=(1, *val.shape[1:]))
    h5.flush()
    return h5, views, val_ds


# ---------------------------------------------------------------------------
# Phase 3: fit


@dataclass
class _Fit:
    """The optimisation state and the record of the epochs."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    tail: nn.Module  # what the optimisation steps call (DDP-wrapped under torchrun)
    history: dict = field(default_factory=lambda: {k: [] for k in _HISTORY})
    best: dict = field(default_factory=lambda: {"acc": -1.0, "loss": math.inf, "epoch": -1})
    best_val: tuple | None = None  # (labels, predictions, top-5 hits) of the best epoch
    epoch: int = 0  # epochs done


_HISTORY = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")


def _new_fit(setup: _Setup) -> _Fit:
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
    return _Fit(optimizer, scheduler, scaler, _trainable_tail(setup))


class _Batches:
    """Training and validation batches: from the prefix cache, or decoded images every epoch.

    An epoch shuffles every training item with one seeded permutation and cuts it into global
    batches of --batch-size; under torchrun each rank takes the items of each global batch it
    owns (see :meth:`_Setup.own`), so the ranks together see exactly one process's batches.
    """

    def __init__(self, setup: _Setup, prefix: PrefixCache | None):
        self.setup, self.prefix = setup, prefix
        self.norm = Normalise(setup.bb.transform).to(setup.run.device)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What the trainable tail takes: cached activations as they are, images through the prefix."""
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


def _evaluate(setup: _Setup, data: _Batches):
    """(loss, accuracy, labels, predictions, top-5 hits) on validation, every rank's part
    gathered; the top-5 hits are empty with 5 classes or fewer."""
    model, run, ls = setup.model, setup.run, setup.cfg.label_smoothing
    model.eval()
    loss_sum, ys, preds, hits = 0.0, [], [], []
    with torch.inference_mode(), run.amp():
        for x, y in data.val():
            y = y.to(run.device)
            logits = model.tail(data.inputs(x)).float()
            loss_sum += float(F.cross_entropy(logits, y, label_smoothing=ls, reduction="sum"))
            ys.append(y.cpu().numpy())
            preds.append(logits.argmax(1).cpu().numpy())
            if logits.shape[1] > 5:
                hits.append((logits.topk(5, 1).indices == y[:, None]).any(1).cpu().numpy())
    model.train()
    kinds = ((ys, np.int64), (preds, np.int64), (hits, bool))
    local = [np.concatenate(a) if a else np.zeros(0, t) for a, t in kinds]
    parts = setup.group.gather((loss_sum, *local))
    loss_sum = sum(p[0] for p in parts)
    y, pred, hit5 = (np.concatenate([p[k] for p in parts]) for k in (1, 2, 3))
    n = max(len(y), 1)
    return loss_sum / n, float((pred == y).sum()) / n, y, pred, hit5


class _Tail(nn.Module):
    """The trainable part as one module, for DistributedDataParallel: prefix output -> logits."""

    def __init__(self, model: FinetunedModel):
        super().__init__()
        self.model = model

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.tail(h)


def _trainable_tail(setup: _Setup) -> nn.Module:
    """The tail; under torchrun wrapped in DDP, which averages the gradients across ranks."""
    tail = _Tail(setup.model)
    if setup.group.world == 1:
        return tail
    dev = setup.run.device
    ids = [dev.index] if dev.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(tail, device_ids=ids, broadcast_buffers=False)


def _global_count(setup: _Setup, n: int) -> int:
    """Images in the global batch: every rank's part, summed."""
    if setup.group.world == 1:
        return n
    count = torch.tensor([n], dtype=torch.float64, device=setup.run.device)
    torch.distributed.all_reduce(count)
    return int(count.item())


def _train_epoch(setup: _Setup, fit: _Fit, data: _Batches, epoch: int) -> tuple[float, float]:
    """One epoch of optimisation steps; returns (mean train loss, train accuracy)."""
    run, cfg, world = setup.run, setup.cfg, setup.group.world
    loss_sum = correct = seen = 0.0
    steps = math.ceil(len(setup.train[0]) / cfg.batch_size)
    bar = tqdm(
        data.train(epoch),
        total=steps,
        desc=f"epoch {epoch}/{cfg.epochs}",
        unit="batch",
        disable=not run.progress,
        dynamic_ncols=True,
        leave=False,
    )
    with seeded(cfg.seed * 1_000_003 + epoch + setup.group.rank, run.device):  # dropout: per epoch
        for x, y in bar:
            y = y.to(run.device)
            n = _global_count(setup, len(y))
            with run.amp():
                logits = fit.tail(data.inputs(x))
            # The sum over this rank's images / the global count, x world since DDP averages the
            # ranks' gradients: every rank then steps with the one-process batch-mean gradient.
            losses = F.cross_entropy(
                logits.float(), y, label_smoothing=cfg.label_smoothing, reduction="none"
            )
            loss = losses.sum() * (world / max(n, 1))
            fit.optimizer.zero_grad(set_to_none=True)
            fit.scaler.scale(loss).backward()
            fit.scaler.step(fit.optimizer)
            fit.scaler.update()
            fit.scheduler.step()
            loss_sum += float(losses.detach().sum())
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += len(y)
    total = setup.group.gather((loss_sum, correct, seen))
    loss_sum, correct, seen = (sum(t[k] for t in total) for k in range(3))
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def _record(setup: _Setup, fit: _Fit, row: dict, val: tuple[np.ndarray, np.ndarray]) -> None:
    """Append an epoch to the history; a better validation result is saved as the model."""
    for k in _HISTORY:
        fit.history[k].append(row[k])
    best, va, vl = fit.best, row["val_acc"], row["val_loss"]
    if va > best["acc"] or (va == best["acc"] and vl < best["loss"]):
        best.update(acc=va, loss=vl, epoch=row["epoch"])
        fit.best_val = val
        if setup.group.is_main:  # under torchrun rank 0 writes, the others hold the same weights
            _model_checkpoint(
                setup, {"history": fit.history, "best": best, "trainable": setup.table}
            ).save(setup.out)


def _model_checkpoint(setup: _Setup, metrics: dict) -> ModelCheckpoint:
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
    )


def _claim(out: Path, data, cfg: FinetuneConfig) -> None:
    """Refuse an --out that is an input (the head, the data), another kind of file, or puts the
    plots among the images."""
    from .outputs import claim
    from .report import side_files

    inputs = [("the head", cfg.head), ("the data", data)]
    root = Path(data) if Path(data).is_dir() else None
    claim(out, kind="model", verb="finetune", inputs=inputs, beside=side_files(out), data_root=root)
    claim(_last_path(out), kind="state", verb="finetune", inputs=inputs)


def _last_path(out: Path) -> Path:
    return out.with_name(out.stem + ".last" + out.suffix)


def _save_state(setup: _Setup, fit: _Fit) -> None:
    if not setup.group.is_main:
        return
    names = ("labels", "pred", "top5")
    best_val = {k: torch.from_numpy(a) for k, a in zip(names, fit.best_val, strict=False)}
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
    state.save(_last_path(setup.out))


def _resume(setup: _Setup, fit: _Fit) -> None:
    state = FinetuneState.load(_last_path(setup.out), config=setup.config_record())
    setup.model.net.load_state_dict(state.net_state_dict)
    setup.model.head.load_state_dict(state.head_state_dict)
    fit.optimizer.load_state_dict(state.optimizer)
    fit.scheduler.load_state_dict(state.scheduler)
    fit.scaler.load_state_dict(state.scaler)
    fit.history = {k: list(v) for k, v in state.history.items()}
    fit.best, fit.epoch = dict(state.best), int(state.epoch)
    if state.best_val:  # the kept epoch's validation predictions, for the reports
        names = ("labels", "pred", "top5")
        fit.best_val = tuple(state.best_val[k].numpy() for k in names if k in state.best_val)


def _fit(setup: _Setup, data: _Batches, say: Callable[[str], None]) -> _Fit:
    """Epoch 0 (the head as reattached), then epochs until --epochs or --patience."""
    cfg, fit = setup.cfg, _new_fit(setup)
    if cfg.resume:
        _resume(setup, fit)
    if fit.epoch == 0:  # epoch 0: the reattached head on the live backbone, before any step
        vl, va, *val = _evaluate(setup, data)
        say(f"epoch 0 (as reattached): val loss {vl:.4f} acc {va:.4f}")
        _record(
            setup,
            fit,
            {
                "epoch": 0,
                "train_loss": None,
                "train_acc": None,
                "val_loss": vl,
                "val_acc": va,
                "seconds": 0.0,
            },
            tuple(val),
        )
    while fit.epoch < cfg.epochs and fit.epoch - fit.best["epoch"] < cfg.patience:
        epoch, t0 = fit.epoch + 1, time.perf_counter()
        tl, ta = _train_epoch(setup, fit, data, epoch)
        vl, va, *val = _evaluate(setup, data)
        seconds = time.perf_counter() - t0
        fit.epoch = epoch
        _record(
            setup,
            fit,
            {
                "epoch": epoch,
                "train_loss": tl,
                "train_acc": ta,
                "val_loss": vl,
                "val_acc": va,
                "seconds": seconds,
            },
            tuple(val),
        )
        _save_state(setup, fit)
        say(
            f"epoch {epoch}: train loss {tl:.4f} acc {ta:.4f}, val loss {vl:.4f} acc {va:.4f}, {seconds:.1f} s"
        )
    return fit


# ---------------------------------------------------------------------------
# Phase 4: summarise


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


def _metrics(setup: _Setup, fit: _Fit, plan: _PrefixPlan, prefix: PrefixCache | None) -> dict:
    h, best = fit.history, fit.best
    trained = [
        (s, a) for e, s, a in zip(h["epoch"], h["seconds"], h["val_acc"], strict=True) if e > 0
    ]
    epoch_times = [s for s, _ in trained]
    return {
        "history": h,
        "best_epoch": best["epoch"],
        "best_val_acc": best["acc"],
        "best_val_loss": best["loss"],
        "val_acc": best["acc"],
        "epochs_run": h["epoch"][-1],
        "trainable": setup.table,
        "unfreeze": setup.unfreeze,
        "classes": setup.classes,
        "val_source": setup.val_source,
        "prefix_cache": {
            "where": plan.where,
            "bytes": prefix.bytes if prefix else 0,
            "seconds": round(prefix.seconds, 3) if prefix else 0.0,
            "shape": list(plan.shape),
        },
        "seconds_per_epoch": float(np.mean(epoch_times)) if epoch_times else 0.0,
        "config": setup.config_record(),
        "estimated_speedup": _speedup(prefix, epoch_times, len(setup.train[0]), len(setup.val[0])),
        "head_val_acc_before": h["val_acc"][0] if h["epoch"] and h["epoch"][0] == 0 else None,
        "best_trained_val_acc": max((a for _, a in trained), default=None),
        **_kept_scores(fit.best_val),
    }


def _kept_scores(best_val: tuple | None) -> dict:
    """Balanced accuracy and top-5 (more than 5 classes) of the kept epoch on validation."""
    if best_val is None or not len(best_val[0]):
        return {}
    y, pred, *hit5 = best_val
    right = pred == y
    out = {"val_balanced_acc": float(np.mean([right[y == c].mean() for c in np.unique(y)]))}
    if hit5 and len(hit5[0]):
        out["val_top5"] = float(hit5[0].mean())
    return out


def _summarise(setup: _Setup, fit: _Fit, plan: _PrefixPlan, prefix: PrefixCache | None) -> dict:
    """Rank 0: store the final metrics in the best checkpoint and write the reports next to it."""
    from .report import write_reports

    ckpt = ModelCheckpoint.load(setup.out)
    ckpt.metrics = _metrics(setup, fit, plan, prefix)
    ckpt.save(setup.out)
    files = {"model": setup.out, "last": _last_path(setup.out)}
    if fit.best_val is not None:
        y, pred = fit.best_val[:2]
        title = f"finetune --unfreeze {setup.unfreeze} (best epoch {fit.best['epoch']})"
        files.update(
            write_reports(setup.out, dict(ckpt.metrics), y, pred, setup.classes, title=title)
        )
    return files


# ---------------------------------------------------------------------------
# Public API


def finetune(
    data: str | Path,
    *,
    out: str | Path,
    config: FinetuneConfig | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **options,
) -> FinetuneResult:
    """Fine-tune the last ``unfreeze`` blocks of a backbone together with a head.

    ``options`` are the fields of :class:`embedcache.config.FinetuneConfig` (or
    pass ``config``). The main ones: ``head``, a head from train_head to
    reattach (its backbone, weights and transform are checked, and default
    ``backbone``/``weights``; None for a fresh linear head); ``unfreeze``, the
    blocks trained, counted from the end as `embedcache backbones` lists them
    (0 trains the head only, 'all' everything); ``augment`` and ``views``;
    ``prefix_cache`` (auto caches the frozen prefix's output whenever it is
    deterministic). Without a val split, validation is held out of train exactly
    as train-head holds it out. ``log`` is called with one line per event.

    Under torchrun it trains with DistributedDataParallel: each rank caches the
    prefix of its part of the data, ``batch_size`` stays the global batch,
    validation is gathered from every rank, and rank 0 writes the files.

    Returns
    -------
    FinetuneResult : ``model`` (the best epoch, eval mode) maps normalised images
        (N, 3, H, W) to logits; metrics per epoch; ``path`` of the checkpoint;
        ``files``: OUT.last.pt, OUT.metrics.json, OUT.curves.png,
        OUT.confusion.png and OUT.report.txt.
    """
    cfg = FinetuneConfig.build(config, **options)
    tune_allocator()
    out = Path(out)
    with process_group(cfg.device) as group, contextlib.ExitStack() as held:
        group.on_main(lambda: _claim(out, data, cfg))
        group.on_main(
            lambda: held.enter_context(exclusive(out, "finetune"))
        )  # one writer per --out
        say = (log or (lambda line: None)) if group.is_main else (lambda line: None)
        setup = group.each(lambda: _prepare(data, cfg, out, progress, group))
        say(_describe(setup))
        if setup.val_source != "val split":
            say(setup.val_source)
        plan = _plan_prefix(setup)
        prefix = None
        try:
            if plan.where != "off":
                say(
                    f"prefix cache ({plan.where}): blocks up to {setup.bb.block_names[setup.model.start - 1]}, {plan.need_bytes / 1e6:.1f} MB of float16 activations"
                )
                prefix = build_prefix_cache(setup, plan)
            fit = _fit(setup, _Batches(setup, prefix), say)
        finally:
            if prefix is not None:
                prefix.close()
        files = group.on_main(lambda: _summarise(setup, fit, plan, prefix))
    ckpt = ModelCheckpoint.load(out)
    return FinetuneResult(build_model(ckpt, torch.device("cpu")), ckpt.metrics, out, files)
