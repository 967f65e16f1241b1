"""Finetune's phase 1: the data, the backbone and the head, and what of them trains."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backbones import Backbone, build_backbone
from ..checkpoint import HeadCheckpoint, TrainedOn
from ..config import FinetuneConfig
from ..data import ImageSet, paths_digest, scan
from ..distributed import Group
from ..errors import EmbedcacheError
from ..exclusion import excluded
from ..forward import check_batch_memory
from ..heads import Head, Standardize, init_template
from ..models import FinetunedModel, labelled
from ..runtime import (
    Run,
    autocast_dtype,
    default_num_workers,
)


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


@dataclass
class Setup:
    """Everything the later phases need, decided once."""

    cfg: FinetuneConfig
    data: Path
    out: Path
    bb: Backbone
    classes: list[str]
    model: FinetunedModel
    head_config: dict
    table: list[dict]  # what trains (see freeze)
    # image paths, labels: (N,) int64, or (N, C) float32 0/1 targets with several labels per image
    train: tuple[list[Path], np.ndarray]
    val: tuple[list[Path], np.ndarray]
    val_source: str
    run: Run
    unfreeze: int
    group: Group = Group()
    trained: TrainedOn | None = None  # the images the model trains on, for its checkpoint
    excluded: str | None = None  # what --exclude left out, one line (None without it)

    @property
    def multi_label(self) -> bool:
        """Whether each image has a set of labels (sigmoid head, binary cross-entropy)."""
        return self.train[1].ndim == 2

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
    "log_dir",
)


def _items(images: ImageSet, split: str) -> tuple[list[Path], np.ndarray]:
    """A split's image paths and labels: (N,) int64, or for a multi-label set (N, C) float32
    targets, 1 where the image carries the class."""
    samples = images.splits[split]
    paths = [images.root / s.path for s in samples]
    if not images.multi_label:
        return paths, np.array([s.label for s in samples], dtype=np.int64)
    targets = np.zeros((len(samples), len(images.classes)), np.float32)
    for i, s in enumerate(samples):
        targets[i, list(s.label_set)] = 1.0
    return paths, targets


def _fresh_head(
    bb: Backbone, classes: list[str], seed: int, multi_label: bool = False
) -> tuple[Head, dict]:
    config = {
        "kind": "linear",
        "dim": bb.feature_dim,
        "num_classes": len(classes),
        "hidden": 512,
        "dropout": 0.0,
    }
    if multi_label:  # a sigmoid per class, as train-head's multi-label heads
        config["multi_label"] = True
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
            f"{ckpt.path} is a knn head, which has no weights to fine-tune; "
            "train a linear or mlp head"
        )
    ckpt.recorded.identity.check(
        bb.identity(),
        subject=f"{ckpt.path} was trained on other features than this backbone gives",
        mine="head",
        theirs="backbone",
        hint="pass --backbone and --weights as used for the cache",
    )
    _same_kind(ckpt, images)
    classes = images.classes
    if list(ckpt.classes) != list(classes):
        raise EmbedcacheError(
            f"{ckpt.path} was trained on classes {', '.join(ckpt.classes[:8])} but the data "
            f"has {', '.join(classes[:8])}; train the head on a cache of this data"
        )
    selected = _unseen_val(ckpt, images, cfg, carved)
    note = None
    if selected:
        note = f"reattached {ckpt.path.name} as chosen before its refit, which saw these val images"
    return ckpt.module(selected=selected), dict(ckpt.config), note


def _same_kind(ckpt: HeadCheckpoint, images: ImageSet) -> None:
    """Refuse a multi-label head on data with one label per image, and the reverse."""
    if ckpt.multi_label and not images.multi_label:
        raise EmbedcacheError(
            f"{ckpt.path} is a multi-label head but the data has one label per image; train a "
            "head on a cache of this data"
        )
    if images.multi_label and not ckpt.multi_label:
        raise EmbedcacheError(
            f"{ckpt.path} is a one-label head but the data is multi-label (several labels per "
            "image); train a head on a multi-label cache of this data"
        )


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


def _labelled(data, cfg: FinetuneConfig) -> tuple[ImageSet, str, str | None]:
    """The images with train and val splits (val held out of train as train-head does), and
    what --exclude left out."""
    listed = scan(data, val_fraction=cfg.val_fraction, seed=cfg.seed, multi_label=cfg.multi_label)
    images, val_source = listed.with_val(val_fraction=cfg.val_fraction, seed=cfg.seed)
    images, note = excluded(images, cfg.exclude, str(data))
    if note and val_source != "val split":  # the holdout counts what --exclude left
        left = {k: len(images.splits.get(k, [])) for k in ("train", "val")}
        val_source += f"; --exclude left {left['train']} train and {left['val']} val images"
    no_train = (
        f"{data} has no labelled train split; finetune needs class folders or a CSV with labels"
    )
    if "train" not in images.splits or not images.classes:
        raise EmbedcacheError(no_train)
    if "val" not in images.splits:
        raise EmbedcacheError(
            f"{data} has no val split; add a val/ folder or pass a --val-fraction above 0"
        )
    if not images.multi_label:  # a multi-label image may carry no label: its targets are all 0
        labelled(
            np.array([s.label for split in ("train", "val") for s in images.splits[split]]),
            empty=no_train,
            unlabelled=f"{data} has unlabelled images in train or val; finetune needs labels",
        )
    return images, val_source, note


def prepare(data, cfg: FinetuneConfig, out: Path, progress: bool, group: Group) -> Setup:
    dev = group.device(cfg.device)
    if group.world > 1 and cfg.bn_stats and dev.type != "cuda":
        raise EmbedcacheError(
            "--bn-stats under torchrun needs GPUs (SyncBatchNorm runs on CUDA only); "
            "drop --bn-stats or use --device cuda"
        )
    head_ckpt = HeadCheckpoint.load(cfg.head) if cfg.head is not None else None
    bb = _backbone_for(cfg, head_ckpt)
    images, val_source, note = _labelled(data, cfg)
    classes = images.classes
    carved = val_source != "val split"
    if head_ckpt:
        head, head_config, note = _reattach(head_ckpt, bb, images, cfg, carved)
        val_source = f"{val_source}; {note}" if note else val_source
    else:
        head, head_config = _fresh_head(bb, classes, cfg.seed, images.multi_label)
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
    return Setup(
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
        note,
    )


def describe(setup: Setup) -> str:
    table = setup.table
    trainable = [r for r in table if r["trainable"]]
    frozen = ", ".join(r["block"] for r in table if not r["trainable"]) or "nothing"
    n_train = sum(r["params"] for r in trainable)
    return (
        f"{setup.bb.name}: training {', '.join(r['block'] for r in trainable)} "
        f"({n_train:,} of {sum(r['params'] for r in table):,} parameters); frozen: {frozen}"
    )
