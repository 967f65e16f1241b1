"""Finetune's phase 2: the frozen prefix's output, computed once and kept in memory or on disk."""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..backbones import Normalise
from ..config import FinetuneConfig
from ..data import augment
from ..errors import EmbedcacheError
from ..feed import Rows, memory_budget
from ..forward import forward_images
from ..models import FinetunedModel
from ..runtime import (
    Run,
)
from .setup import Setup

if TYPE_CHECKING:
    from .estimate import Meter


@dataclass(frozen=True)
class PrefixPlan:
    where: str  # memory | disk | off
    shape: tuple[int, ...]  # one image's prefix activations
    need_bytes: int
    views: int = 0  # augmented views cached per training image (0: the plain image once)
    why: str = ""  # with where off: why the prefix runs every epoch


def cached_views(cfg: FinetuneConfig) -> int:
    """Augmented views the prefix cache holds per training image: --views, but never more than
    --epochs. Epoch e trains on view (e - 1) mod views (see loop.Batches.train), so E epochs
    read views 0..E-1 alone, the same ones whether more were cached or not."""
    return min(cfg.num_views, cfg.epochs)


def _prefix_shape(model: FinetunedModel, crop: int) -> tuple[int, ...]:
    import copy

    meta = copy.deepcopy(model.net).to("meta")
    with torch.no_grad():
        x = torch.empty(1, 3, crop, crop, device="meta")
        return tuple(meta.prefix(x, model.start).shape[1:])


def plan_prefix(setup: Setup) -> PrefixPlan:
    """Cache the frozen prefix's output when it is deterministic; in memory if it fits."""
    cfg, model = setup.cfg, setup.model
    deterministic = cfg.augment == "none" or cfg.views > 0
    has_prefix = model.start > 0
    why = (
        "nothing is frozen (--unfreeze all)"
        if not has_prefix
        else "augmentation changes the input every epoch; pass --views V to cache V augmented views"
    )
    if cfg.prefix_cache in ("memory", "disk") and not (deterministic and has_prefix):
        raise EmbedcacheError(f"--prefix-cache {cfg.prefix_cache} is not possible: {why}")
    if not (deterministic and has_prefix) or cfg.prefix_cache == "off":
        return PrefixPlan(
            "off", (), 0, why=why if cfg.prefix_cache != "off" else "--prefix-cache off"
        )
    shape = _prefix_shape(model, setup.bb.transform.crop)
    train, val = len(setup.own(len(setup.train[0]))), len(setup.own(len(setup.val[0])))
    views = cached_views(cfg)
    need = (train * max(1, views) + val) * int(np.prod(shape)) * 2  # float16, this rank's
    where = cfg.prefix_cache
    if where == "auto":
        where = "memory" if need <= memory_budget(cfg.max_memory) else "disk"
    return PrefixPlan(where, shape, need, views)


@dataclass
class PrefixCache:
    """Frozen-prefix activations of train (one Rows per view) and val, in memory or in an HDF5
    file."""

    views: list[Rows]
    val: Rows
    bytes: int
    where: str
    seconds: float
    h5: object = None  # the open h5py.File when on disk; removed on close
    index: list[np.ndarray] = field(default_factory=list)  # per view: the train item of each row

    def positions(self, view: int, items: np.ndarray) -> np.ndarray:
        """Rows of ``view`` holding ``items`` (train item numbers); items not cached are left
        out."""
        index = self.index[view]
        at = np.searchsorted(index, items)
        hit = (at < len(index)) & (index[np.minimum(at, len(index) - 1)] == items)
        return at[hit]

    def close(self) -> None:
        if self.h5 is not None:
            path = Path(self.h5.filename)
            self.h5.close()
            path.unlink(missing_ok=True)


def _prefix_of(model: FinetunedModel, items: list, decode, run: Run, meter: Meter):
    """float16 prefix activations (n_ok, C, H, W) of the decodable items, and their indices."""
    norm = Normalise(model.transform).to(run.device)

    def prefix(x: torch.Tensor) -> torch.Tensor:
        h = model.prefix(norm(x)).half()
        meter.prefix(len(x))
        return h

    quiet = dataclasses.replace(run, progress=False)  # the run's one bar counts these batches
    acts, ok, _ = forward_images(prefix, items, decode, quiet, desc="prefix")
    meter.prefix(len(items) - len(ok))  # the unreadable ones, passed over
    return (acts if acts is not None else np.zeros((0,), np.float16)), ok


def build_prefix_cache(setup: Setup, plan: PrefixPlan, meter: Meter) -> PrefixCache:
    """Run the frozen prefix once per image (per view) and keep its output."""
    cfg, model, t = setup.cfg, setup.model, setup.model.transform
    start = time.perf_counter()
    views = plan.views
    train_decode = functools.partial(augment, t=t, kind=cfg.augment if views else "none")
    (train_items, train_labels), (val_items, val_labels) = setup.train, setup.val
    mine, vmine = setup.own(len(train_items)), setup.own(len(val_items))  # under torchrun: a part
    arrays, labels, index = [], [], []
    for v in range(max(1, views)):
        meter.bar.phase(f"prefix cache, view {v + 1} of {views}" if views else "prefix cache")
        items = [(train_items[i], (cfg.seed, 1, v, int(i))) for i in mine]
        acts, ok = _prefix_of(model, items, train_decode, setup.run, meter)
        arrays.append(acts)
        labels.append(train_labels[mine[ok]])
        index.append(mine[ok])
    eval_decode = functools.partial(augment, t=t, kind="none")
    meter.bar.phase("prefix cache, val images")
    vacts, vok = _prefix_of(
        model, [(val_items[i], 0) for i in vmine], eval_decode, setup.run, meter
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
