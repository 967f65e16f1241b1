"""Compare's plan: the rows it will run and how long they should take, from one timed batch
of training images per way the backbone runs (see embedcache.finetuning.estimate)."""

from __future__ import annotations

import functools

from ..backbones import Backbone
from ..config import CompareConfig, FinetuneConfig
from ..data import ImageSet, augment
from ..finetuning.estimate import backbone_costs, duration, passes, piped
from ..finetuning.prefix import cached_views
from ..finetuning.setup import parse_unfreeze
from ..runtime import Run, autocast_dtype, default_batch_size, default_num_workers, resolve_device
from .tutorial import TUTORIAL_BATCH


def timings(cfg: CompareConfig, bb: Backbone, images: ImageSet) -> dict[str, float]:
    """Seconds each step with backbone passes should take: "tutorial", "extract", "views" and
    one finetune run per --unfreeze value. The heads on a cache are left out (seconds each)."""
    dev = resolve_device(cfg.device)
    ft = FinetuneConfig(augment=cfg.augment, epochs=cfg.finetune_epochs)
    n_train, n_val, n_all = len(images.splits["train"]), len(images.splits["val"]), len(images)
    probe = images.splits["train"][: ft.batch_size]
    items = [(images.root / x.path, (cfg.seed, 1, 0, i)) for i, x in enumerate(probe)]
    plain = functools.partial(augment, t=bb.transform, kind="none")
    blocks = len(bb.block_names)
    fp32 = Run(dev, TUTORIAL_BATCH, 0)  # the tutorial's: fp32, decoded in the loop
    whole = backbone_costs(bb, blocks, [(path, 0) for path, _ in items], plain, fp32)
    forward = whole.prefix + whole.tail_eval
    epoch = n_train * (whole.decode + whole.prefix + whole.tail_train)
    epoch += n_val * (whole.decode + forward)
    run = Run(dev, default_batch_size(dev), default_num_workers(dev))  # as extract runs
    # extract --views: each training image and its views, each other image and its mirror
    views = n_train * piped((1 + cfg.views) * forward, whole.decode, run)
    views += (n_all - n_train) * piped(2 * forward, whole.decode, run)
    out = {
        "tutorial": cfg.tutorial_epochs * epoch,
        "extract": n_all * piped(forward, whole.decode, run),
        "views": views,
    }
    run = Run(dev, ft.batch_size, default_num_workers(dev), autocast_dtype(dev, ft.precision))
    decode = functools.partial(augment, t=bb.transform, kind=cfg.augment)
    for n in cfg.unfreeze:
        start = blocks - parse_unfreeze(n, blocks, bb.name)
        cached = start > 0 and (cfg.augment == "none" or ft.views > 0)  # as plan_prefix decides
        costs = backbone_costs(bb, start, items, decode, run)
        plan = {"views": cached_views(ft) if cached else 0, "epochs": ft.epochs, "epoch0": True}
        out[n] = passes(costs, run, n_train=n_train, n_val=n_val, cached=cached, **plan).total_s
    return out


def lines(cfg: CompareConfig, images: ImageSet, estimate: dict[str, float], steps: int) -> list:
    """What compare will run and about how long that should take, in plain words (2 lines)."""
    rows = cfg.tutorial + 2 + 2 * bool(cfg.views) + 2 * len(cfg.unfreeze)
    runs = ["extract once and two heads on the cache"]
    spent = {"extract": estimate["extract"]}
    if cfg.tutorial:
        runs.insert(0, f"the tutorial recipe (up to {cfg.tutorial_epochs} epochs)")
        spent = {"tutorial recipe": estimate["tutorial"], **spent}
    if cfg.views:
        runs.append(f"extract --views {cfg.views} and a linear head on them (plain and TTA)")
        spent[f"extract --views {cfg.views}"] = estimate["views"]
    if cfg.unfreeze:
        runs.append(
            f"finetune --unfreeze {' and '.join(cfg.unfreeze)} from the cached head and from a "
            f"fresh one (up to {cfg.finetune_epochs} epochs each)"
        )
        spent["finetune"] = 2 * sum(estimate[n] for n in cfg.unfreeze)
    n = f"{len(images.splits['train'])} train and {len(images.splits['val'])} val images"
    parts = ", ".join(f"{k} {duration(v)}" for k, v in spent.items())
    return [
        f"plan: {rows} rows in {steps} steps on {n}: {'; '.join(runs)}",
        f"estimate: about {duration(sum(spent.values()))} ({parts}; the heads on the cache "
        "add seconds each; from one timed batch)",
    ]
