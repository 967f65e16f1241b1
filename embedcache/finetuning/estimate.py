"""Before the heavy work: what a finetune run will do and how long it should take, from one
timed batch, and the meter that moves the run's one progress bar as it goes."""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..backbones import Backbone, Normalise
from ..data import UnreadableImage, augment
from ..models import FinetunedModel
from ..runtime import Overall, Run
from .prefix import PrefixPlan
from .setup import Setup, _fresh_head, freeze


@dataclass(frozen=True)
class Costs:
    """Seconds per image of each kind of pass, measured on one batch (see :func:`measure`)."""

    decode: float  # decoding (and augmenting) one image, on one thread
    prefix: float  # the frozen prefix, no graph
    tail_eval: float  # the trainable tail, forward only
    tail_train: float  # the trainable tail, forward and backward (the optimiser step left out)


def _synced(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _prefix(model: FinetunedModel, x: torch.Tensor, run: Run) -> tuple[torch.Tensor, float]:
    """The prefix's output of the batch ``x`` and the seconds it took."""
    t0 = _synced(run.device)
    with torch.no_grad(), run.amp():
        h = model.prefix(x)
    return h.float(), _synced(run.device) - t0


def _tail(model: FinetunedModel, h: torch.Tensor, run: Run) -> tuple[float, float]:
    """Seconds of the tail over the batch ``h``: forward only, then forward and backward."""
    t0 = _synced(run.device)
    with torch.no_grad(), run.amp():
        model.tail(h)
    t1 = _synced(run.device)
    with run.amp():
        logits = model.tail(h).float()
    logits.logsumexp(1).sum().backward()
    return t1 - t0, _synced(run.device) - t1


def measure(model: FinetunedModel, items: list, decode, run: Run) -> Costs:
    """Time one batch, ``items`` (unreadable ones left out), through ``model`` as finetune runs
    it: decoding with ``decode``, the frozen prefix, the tail forward, the tail forward and
    backward. The model runs in eval mode (no statistics move, no dropout draws) and its
    gradients are cleared after, so the run it plans is the same as without it. Each part runs
    once untimed first: a first call pays for memory and kernel plans (random-init lite0, 224
    px, 2-core CPU, ms per image over a batch of 32: prefix 61 then 59 after two images had
    warmed it; the tail forward 5.9 then 0.7, forward and backward 18.5 then 2.1)."""
    t0 = time.perf_counter()
    images = []
    for item in items:
        with contextlib.suppress(UnreadableImage):  # the probe times the readable ones
            images.append(decode(item))
    decode_s = (time.perf_counter() - t0) / max(1, len(items))
    crop = model.transform.crop
    x = (
        torch.from_numpy(np.stack(images))
        if images
        else torch.zeros((1, crop, crop, 3), torch.uint8)
    )
    x = Normalise(model.transform).to(run.device)(x.to(run.device))
    x = x.contiguous(memory_format=torch.channels_last)
    training = model.training
    model.eval()
    try:
        _prefix(model, x[:2], run)  # warm-up: memory and kernel plans
        h, prefix = _prefix(model, x, run)
        _tail(model, h, run)
        tail = _tail(model, h, run)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(training)
    return Costs(decode_s, prefix / len(x), tail[0] / len(x), tail[1] / len(x))


def piped(compute: float, decode: float, run: Run) -> float:
    """Seconds per image of a pass whose images ``run.workers`` decoders prepare: beside a GPU
    they decode while it computes; on a CPU they decode each batch while the model waits (see
    :func:`embedcache.data.decoded_batches`)."""
    decoding = decode / max(1, run.workers)
    return max(compute, decoding) if run.device.type == "cuda" else compute + decoding


@dataclass(frozen=True)
class Estimate:
    """The passes a finetune run will make and the seconds per image of each."""

    n_train: int
    n_val: int
    views: int  # augmented views of each training image in the prefix cache (0: the plain image)
    cached: bool  # whether the frozen prefix runs once (prefix cache) or every epoch
    epochs: int  # epochs left to run, at most (--patience may stop it sooner)
    epoch0: bool  # the head as reattached is scored before any step
    prefix_image_s: float  # one image through the prefix cache build
    train_image_s: float  # one training image in an epoch
    val_image_s: float  # one validation image

    @property
    def prefix_s(self) -> float:
        if not self.cached:
            return 0.0
        return (self.n_train * max(1, self.views) + self.n_val) * self.prefix_image_s

    @property
    def epoch_s(self) -> float:
        return self.n_train * self.train_image_s + self.n_val * self.val_image_s

    @property
    def total_s(self) -> float:
        first = self.n_val * self.val_image_s if self.epoch0 else 0.0
        return self.prefix_s + first + self.epochs * self.epoch_s


def passes(costs: Costs, run: Run, *, n_train: int, n_val: int, cached: bool, **plan) -> Estimate:
    """The :class:`Estimate` of a run (``plan``: views, epochs, epoch0) from measured costs."""
    if cached:  # decoding and the prefix once; the epochs read float16 activations
        per = (piped(costs.prefix, costs.decode, run), costs.tail_train, costs.tail_eval)
    else:
        per = (
            0.0,
            piped(costs.prefix + costs.tail_train, costs.decode, run),
            piped(costs.prefix + costs.tail_eval, costs.decode, run),
        )
    return Estimate(
        n_train,
        n_val,
        cached=cached,
        **plan,
        prefix_image_s=per[0],
        train_image_s=per[1],
        val_image_s=per[2],
    )


def duration(seconds: float) -> str:
    """'40 s', '3.5 min', '2.1 h': how long, in the unit a person reads best."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Meter:
    """Moves a run's bar by the estimated seconds of each batch done."""

    bar: Overall
    estimate: Estimate

    def prefix(self, n: int) -> None:
        self.bar.advance(n * self.estimate.prefix_image_s)

    def train(self, n: int) -> None:
        self.bar.advance(n * self.estimate.train_image_s)

    def val(self, n: int) -> None:
        self.bar.advance(n * self.estimate.val_image_s)


def for_setup(setup: Setup, plan: PrefixPlan, done: int, left: int) -> Estimate:
    """Time one batch of this rank's training images, then plan the run's passes: the prefix
    cache (``plan``), the head as reattached scored (a new run), ``left`` epochs after ``done``."""
    cfg, t = setup.cfg, setup.model.transform
    mine = setup.own(len(setup.train[0]))
    probe = [(setup.train[0][i], (cfg.seed, 1, 0, int(i))) for i in mine[: cfg.batch_size]]
    decode = functools.partial(augment, t=t, kind=cfg.augment)
    costs = measure(setup.model, probe, decode, setup.run)
    return passes(
        costs,
        setup.run,
        n_train=len(mine),
        n_val=len(setup.own(len(setup.val[0]))),
        cached=plan.where != "off" and (left > 0 or done == 0),
        views=plan.views,
        epochs=left,
        epoch0=done == 0,
    )


def plan_lines(setup: Setup, plan: PrefixPlan, est: Estimate, done: int) -> list[str]:
    """What the run will do and about how long it will take, in plain words (1-3 lines)."""
    cfg = setup.cfg
    if done and not est.epochs:
        return [f"plan: nothing left to train after epoch {done}; the kept epoch's reports again"]
    images = f"{len(setup.train[0])} train and {len(setup.val[0])} val images"
    epochs = f"up to {est.epochs} epoch{'s' * (est.epochs != 1)}"
    resumed = f"resuming after epoch {done}: " if done else ""
    if not est.cached:
        lines = [f"plan: {resumed}{epochs} of the whole network over {images} ({plan.why})"]
    else:
        views = f"{plan.views} augmented views of " if plan.views else ""
        lines = [
            f"plan: {resumed}the frozen prefix once over {views}{images}, "
            f"then {epochs} of the trainable tail on its cached output"
        ]
        if plan.views < cfg.num_views:
            lines.append(
                f"--views {cfg.num_views} cut to {plan.views}: each epoch trains on one view, "
                f"so {cfg.epochs} epochs use at most {plan.views}"
            )
    cost = f"{duration(est.epoch_s)} per epoch"
    if est.cached:
        cost = f"{duration(est.prefix_s)} for the prefix cache, {cost}"
    lines.append(f"estimate: about {duration(est.total_s)} ({cost}; from one timed batch)")
    return lines


def backbone_costs(bb: Backbone, start: int, items: list, decode, run: Run) -> Costs:
    """:func:`measure` on ``bb`` cut before block ``start`` with a fresh linear head, as a
    finetune of it would run; the backbone is left as it was (eval mode, its trainable flags)."""
    flags = [p.requires_grad for p in bb.net.parameters()]
    head, _ = _fresh_head(bb, ["a", "b"], seed=0)
    model = FinetunedModel(bb.net, head, start, bb.transform).to(run.device)
    model = model.to(memory_format=torch.channels_last)
    freeze(model)
    try:
        return measure(model.eval(), items, decode, run)
    finally:
        for p, flag in zip(bb.net.parameters(), flags, strict=True):
            p.requires_grad_(flag)
