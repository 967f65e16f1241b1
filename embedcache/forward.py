"""The forward pass every verb shares: a backbone (or part of one) over images, in batches.

Extract, finetune, evaluate and predict all run images through here, so a change to how
images are batched, decoded or checked for memory changes them all alike, and on purpose.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import Backbone, Normalise
from .data import decoded_batches, preprocess, with_views
from .errors import EmbedcacheError
from .feed import available_memory_bytes
from .runtime import (
    Run,
    auto_batch_size,
    compile_mode,
    compiled,
)

# Peak memory of a forward pass as a multiple of its float32 input batch, measured on a CPU at
# 768 px (ru_maxrss): resnet18 7x, efficientnet_lite0 25x, timm test_efficientnet 9x. Training
# keeps the activations for the backward pass: three times that, as a floor.
FORWARD_MEMORY_FACTOR = 32
TRAINING_MEMORY_FACTOR = 3 * FORWARD_MEMORY_FACTOR


def check_batch_memory(
    batch_size: int, crop: int, device: torch.device, *, training: bool = False
) -> None:
    """Refuse a batch of ``batch_size`` images of ``crop`` pixels whose forward pass (and
    backward, ``training``) cannot fit in the memory available now, before any work (on a GPU
    the batch is the device's business: --batch-size auto probes it)."""
    if device.type == "cuda":
        return
    factor = TRAINING_MEMORY_FACTOR if training else FORWARD_MEMORY_FACTOR
    need, free = batch_size * 3 * crop * crop * 4 * factor, available_memory_bytes()
    if need > free:
        raise EmbedcacheError(
            f"a batch of {batch_size} images of {crop} x {crop} pixels needs about "
            f"{need / 1e9:.1f} GB and {free / 1e9:.1f} GB of memory is available; "
            "lower --image-size or --batch-size"
        )


def forward_images(
    fn: Callable[[torch.Tensor], torch.Tensor],
    items: list,
    decode: Callable[..., np.ndarray],
    run: Run,
    *,
    desc: str,
) -> tuple[np.ndarray | None, np.ndarray, dict[int, str]]:
    """``fn`` over every decodable item, in batches of ``run.batch_size`` under ``run.amp()``.

    ``fn`` takes a normalised float batch (N, 3, H, W) on the device; ``decode(items[i])``
    gives one uint8 image (see :func:`embedcache.data.decoded_batches`).

    Returns
    -------
    outputs : ndarray of shape (n_ok, ...) as ``fn`` returns them (on the CPU), or None if
        none decoded
    ok : ndarray of shape (n_ok,), indices into ``items``
    failed : {index: reason} for items that could not be decoded
    """
    batches = [
        list(range(i, min(len(items), i + run.batch_size)))
        for i in range(0, len(items), run.batch_size)
    ]
    loader = decoded_batches(items, batches, decode, device=run.device, num_workers=run.workers)
    outs, ok, failed = [], [], {}
    bar = tqdm(
        total=len(items), desc=desc, unit="img", disable=not run.progress, dynamic_ncols=True
    )
    with torch.inference_mode(), bar:
        for index, x, bad in loader:
            if x is not None:
                with run.amp():
                    outs.append(fn(x).cpu().numpy())
                ok.append(index)
            failed.update(bad)
            bar.update(len(index) + len(bad))
    if not outs:
        return None, np.zeros(0, np.int64), failed
    return np.concatenate(outs), np.concatenate(ok), failed


def image_features(
    bb: Backbone, files: list[Path], run: Run, *, desc: str = "features", mirror: bool = False
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Run the backbone over image files (with ``mirror``, over each image and its mirror).

    Returns
    -------
    features : ndarray of shape (n_ok, D), float32; with ``mirror`` (n_ok, 2, D)
    ok : ndarray of shape (n_ok,), indices into ``files``
    failed : {index: reason} for files that could not be decoded
    """
    net = bb.net.to(run.device).eval().to(memory_format=torch.channels_last)
    if run.batch_size == "auto":  # as extract resolves it
        size = auto_batch_size(net, bb.transform.crop, run.device, run.autocast)
        run = dataclasses.replace(run, batch_size=size)
    batch = min(run.batch_size, max(1, len(files))) * (1 + mirror)
    check_batch_memory(batch, bb.transform.crop, run.device)
    net = compiled(
        net, compile_mode(run.compile, run.device, len(files) * (1 + mirror), net, run.autocast)
    )
    norm = Normalise(bb.transform).to(run.device)
    if mirror:  # each item decodes to (2, H, W, 3): the eval crop and its mirror
        files = [(f, 1, (0, 0)) for f in files]
        decode = functools.partial(with_views, t=bb.transform)
        fn = lambda x: net(norm(x.flatten(0, 1))).float().unflatten(0, (len(x), 2))  # noqa: E731
    else:
        decode = functools.partial(preprocess, t=bb.transform)
        fn = lambda x: net(norm(x)).float()  # noqa: E731
    feats, ok, failed = forward_images(fn, files, decode, run, desc=desc)
    if feats is None:
        feats = np.zeros((0, 2, bb.feature_dim) if mirror else (0, bb.feature_dim), np.float32)
    return feats, ok, failed
