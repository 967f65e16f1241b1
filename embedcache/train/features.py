"""Train-head's inputs: a cache's train and validation rows, checked, and their statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..cache import Cache
from ..config import HeadConfig
from ..data import holdout, holdout_note, paths_digest
from ..errors import EmbedcacheError
from ..exclusion import Matched, row_filter
from ..feed import Rows, ViewRows, memory_budget
from ..models import labelled


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
    """Standardisation statistics of some rows: per-dimension mean, one scale (see
    :func:`standardization`)."""
    total = sq = None
    for _, x in rows.blocks():
        x = x.astype(np.float64)
        total = x.sum(0) if total is None else total + x.sum(0)
        sq = (x * x).sum(0) if sq is None else sq + (x * x).sum(0)
    mean = total / rows.n
    return standardization(mean, np.maximum(sq / rows.n - mean * mean, 0.0))


STATS_ROWS = 8192  # rows made float64 at a time


def array_standardization(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`standardization` of rows in memory, ``x`` (n, d): the per-dimension mean and
    variance in float64, two passes of STATS_ROWS-row blocks, as numpy's mean and var give them
    without a float64 copy of every row (on 100,000 x 1280 rows that copy's way took 4.9 s,
    2 cores)."""
    total = np.zeros(x.shape[1])
    for lo in range(0, len(x), STATS_ROWS):
        total += x[lo : lo + STATS_ROWS].sum(0, dtype=np.float64)
    mean, squares = total / len(x), np.zeros(x.shape[1])
    for lo in range(0, len(x), STATS_ROWS):
        squares += np.square(x[lo : lo + STATS_ROWS] - mean).sum(0)
    return standardization(mean, squares / len(x))


def _labels(cache: Cache, split: str) -> np.ndarray:
    """Labels of a split that a head can learn from, or a one-line error. On a multi-label
    cache the first label of each image, -1 for an image with none (its targets say so)."""
    if getattr(cache, "multi_label", False):
        labels = cache.labels(split)
        if len(labels) == 0:
            raise EmbedcacheError(f"the {split} split of {cache.path} is empty")
        return labels
    return labelled(
        cache.labels(split),
        empty=f"the {split} split of {cache.path} is empty",
        unlabelled=f"cache {cache.path} has unlabelled {split} images; "
        "train-head needs class folders or a CSV with labels",
    )


@dataclass
class Data:
    """What a head trains and is chosen on: train rows (with views when used), validation rows,
    the mirrored validation images when the cache stores them (for test-time averaging)."""

    train: Rows
    val: Rows
    val_source: str
    val_mirror: Rows | None
    views: int  # views per training image used (0: plain features only)
    carved: bool = False  # validation held out of train (not the cache's own val split)
    digests: dict = field(default_factory=dict)  # split -> digest of its paths (TrainedOn)
    exclude: dict | None = None  # what --exclude left out (Matched.record), None without it

    @property
    def multi_label(self) -> bool:
        """Whether the rows' labels are (N, C) 0/1 targets (several labels per image)."""
        return self.train.labels.ndim == 2


def read_splits(cache: Cache, cfg: HeadConfig) -> Data:
    """Train and validation rows of a cache, checked; and where validation comes from.

    Without a val split, validation is held out of train by :func:`embedcache.data.holdout`
    on the image paths: the same images finetune and compare hold out of that data. On a
    multi-label cache the rows' labels are its (N, C) 0/1 targets as float32 (the holdout
    stratifies on each image's first label).
    """
    data = _read_splits(cache, cfg)
    if getattr(cache, "multi_label", False):
        targets = {
            s: cache.label_matrix(s).astype(np.float32)
            for s in ("train", "val")[: 1 + ("val" in cache)]
        }
        val_split = "train" if data.carved else "val"
        for rows, split in (
            (data.train, "train"),
            (data.val, val_split),
            (data.val_mirror, val_split),
        ):
            if rows is not None:
                rows.labels = targets[split][rows.rows]
    return data


def _read_splits(cache: Cache, cfg: HeadConfig) -> Data:
    if "train" not in cache:
        raise EmbedcacheError(
            f"cache {cache.path} has no train split (it has {', '.join(cache.splits)}); "
            "extract a labelled folder"
        )
    labels = _labels(cache, "train")
    present = np.unique(labels[labels >= 0])
    if len(present) < 2 and not getattr(cache, "multi_label", False):
        name = cache.classes[present[0]] if cache.classes else present[0]
        raise EmbedcacheError(
            f"the train split of {cache.path} has a single class ({name}); "
            "a classifier needs at least two"
        )
    kept, matched = row_filter(cache, cfg.exclude)  # (split, rows) -> the rows left in
    feats = cache.features("train")
    # views train the epoch-based heads; logreg on plain + 4 views of the digits took 268 s
    # against 4 s
    torch_head = cfg.head in ("auto", "linear", "mlp")
    views = cache.views("train") if cfg.views == "use" and torch_head else None
    values = feats.shape[0] * feats.shape[1] + (
        int(np.prod(views.shape)) if views is not None else 0
    )
    need = values * feats.dtype.itemsize
    in_memory = need <= memory_budget(cfg.max_memory) if cfg.stream is None else not cfg.stream
    if views is not None and not in_memory:
        raise EmbedcacheError(
            f"training on the views of {cache.path} needs them in memory "
            f"({need / 1e9:.1f} GB); raise --max-memory or pass --views ignore"
        )

    def train_rows(rows: np.ndarray) -> Rows:
        if views is not None:
            return ViewRows(feats, views, labels, rows)
        return Rows(feats, labels, rows, in_memory)

    used = views.shape[1] if views is not None else 0
    paths = cache.paths("train")
    digests = {"train": paths_digest(paths)}
    if "val" in cache:
        vlabels = _labels(cache, "val")
        every, tr = kept("val", np.arange(len(vlabels))), kept("train", np.arange(len(labels)))
        counts = {"train": (len(labels), len(tr)), "val": (len(vlabels), len(every))}
        excl = _excluded(matched, counts, cache, labels[tr])
        val = Rows(cache.features("val"), vlabels, every, in_memory)
        mirror = _mirror(cache, "val", vlabels, every, in_memory)
        digests["val"] = paths_digest(cache.paths("val"))
        return Data(train_rows(tr), val, "val split", mirror, used, False, digests, excl)
    tr, va = holdout(paths, labels, fraction=cfg.val_fraction, seed=cfg.seed)
    before = len(tr), len(va)
    tr, va = kept("train", tr), kept("train", va)
    counts = {"train": (before[0], len(tr)), "val (held out of train)": (before[1], len(va))}
    excl = _excluded(matched, counts, cache, labels[tr])
    if len(va) == 0 and cfg.val_fraction == 0:
        raise EmbedcacheError(
            f"cache {cache.path} has no val split and --val-fraction is 0: nothing to validate on; "
            "pass a --val-fraction above 0 (e.g. 0.2) or extract data with a val split"
        )
    if len(va) == 0:
        raise EmbedcacheError(
            f"too few training images in {cache.path} to hold out a validation set"
        )
    how = holdout_note(len(va), len(tr) + len(va), cfg.val_fraction, cfg.seed)
    if len(tr) + len(va) < len(labels):  # the images --exclude left, not those it took out
        how += f"; --exclude left {len(tr) + len(va)} of the {len(labels)} train images"
    mirror = _mirror(cache, "train", labels, va, in_memory)
    val = Rows(feats, labels, va, in_memory)
    return Data(train_rows(tr), val, how, mirror, used, True, digests, excl)


def _excluded(
    matched: Matched | None, counts: dict[str, tuple[int, int]], cache: Cache, labels: np.ndarray
) -> dict | None:
    """What the metrics record of --exclude (None without it), given the rows of each split
    before and after it and the train labels left; refuses an exclusion that leaves a split
    empty or train with one class."""
    if matched is None:
        return None
    for split, (before, after) in counts.items():
        matched.check_left(split, before, after)
    matched.check_classes(cache.labels("train"), labels, cache.classes)
    return matched.record(sum(b - a for b, a in counts.values()), ", ".join(counts))


def _mirror(cache: Cache, split: str, labels, rows: np.ndarray, in_memory: bool) -> Rows | None:
    """The mirrored images of some rows (view 1 of a cache with views), or None."""
    views = cache.views(split)
    if views is None or not in_memory:
        return None
    return Rows(views[:, 0], labels, rows, in_memory=True)


# The classes count as skewed past this ratio of the largest to the smallest (present) class:
# the default head then tries balanced class weights, and the reports lead with balanced
# accuracy and the worst-recalled classes.
SKEW = 5.0


def skew(labels: np.ndarray, num_classes: int) -> float:
    """The largest class's count over the smallest's, among the classes present (1.0 for none)."""
    counts = np.bincount(labels[labels >= 0], minlength=num_classes)
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def balanced_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Each class's weight n / (classes present x its count), as scikit-learn's "balanced":
    every present class then weighs n / classes in the loss. Absent classes weigh 0."""
    counts = np.bincount(labels[labels >= 0], minlength=num_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(num_classes, np.float32)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def val_logits(module: torch.nn.Module, data: Data) -> np.ndarray:
    """Validation logits as evaluate will compute them (averaged with the mirror when stored)."""
    z = rows_logits(module, data.val)
    if data.val_mirror is not None:
        z = (z + rows_logits(module, data.val_mirror)) / 2
    return z


def rows_logits(module: torch.nn.Module, rows: Rows) -> np.ndarray:
    """A head's logits of some rows, in order."""
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(x)).numpy() for _, x in rows.blocks()])
