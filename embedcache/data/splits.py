"""Splits: the one seeded, stratified validation holdout, and digests of what a split holds."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

import numpy as np

from ..errors import EmbedcacheError

if TYPE_CHECKING:
    from .listing import Sample


def name_bytes(name: str) -> bytes:
    """The bytes of a file name as the file system holds them: UTF-8, and the bytes of a name
    that is not UTF-8 as they are (Python reads them as surrogates: ``os.fsencode``)."""
    return name.encode("utf-8", "surrogateescape")


def _holdout_key(seed: int, path: str) -> str:
    # Hash order, not a shuffled list: adding images later moves few others across splits.
    return hashlib.sha256(name_bytes(f"{seed}:{path}")).hexdigest()


def holdout(
    paths: list[str], labels: np.ndarray, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The one seeded, stratified validation holdout: (train rows, val rows), each ascending.

    Used wherever data has no val split of its own (scan, train-head, finetune,
    compare), so a head's validation images are exactly fine-tuning's. Per class,
    ``round(n * fraction)`` images (at least 1, at most n - 1) with the smallest
    hash of (seed, path) are held out.
    """
    if not 0.0 <= fraction < 1.0:
        raise EmbedcacheError(f"--val-fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    val = []
    for label in np.unique(labels):
        members = sorted(
            np.flatnonzero(labels == label), key=lambda i: _holdout_key(seed, paths[i])
        )
        n_val = int(round(len(members) * fraction))
        if fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val += members[:n_val]
    is_val = np.zeros(len(labels), bool)
    is_val[np.asarray(val, dtype=np.int64)] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def nested_fractions(
    paths: list[str], labels: np.ndarray, *, fractions, seed: int
) -> dict[float, np.ndarray]:
    """Seeded, stratified, nested subsets of the training images: {fraction: rows, ascending}.

    Per class, the ``max(1, round(n * fraction))`` images with the smallest hash of (seed,
    ``"subset"``, path): every class keeps at least one image, and a smaller fraction's rows
    are always inside a larger one's (1% within 10% within 100%), as the same images are
    added in the same order. Hash order, as for :func:`holdout`: stable as images are added.
    """
    bad = [f for f in fractions if not 0.0 < f <= 1.0]
    if bad or not fractions:
        raise EmbedcacheError(f"--fractions must be in (0, 1], e.g. 0.01,0.1,1; got {bad}")
    labels = np.asarray(labels)
    order = {
        label: sorted(
            np.flatnonzero(labels == label), key=lambda i: _holdout_key(seed, f"subset:{paths[i]}")
        )
        for label in np.unique(labels)
    }
    return {
        f: np.sort(
            np.concatenate([m[: max(1, int(round(len(m) * f)))] for m in order.values()]).astype(
                np.int64
            )
        )
        for f in sorted(set(fractions))
    }


def stratified_split(
    samples: list[Sample], *, val_fraction: float, seed: int
) -> dict[str, list[Sample]]:
    """Split labelled samples into train/val per class (see :func:`holdout`)."""
    paths = [s.path for s in samples]
    train, val = holdout(
        paths, np.array([s.label for s in samples]), fraction=val_fraction, seed=seed
    )
    split = {"train": sorted((samples[i] for i in train), key=lambda s: s.path)}
    if len(val):
        split["val"] = sorted((samples[i] for i in val), key=lambda s: s.path)
    return split


def paths_digest(paths: list[str]) -> str:
    """A digest of a split's image paths (relative to the data root), in any order: how a
    checkpoint records the images it was trained on (:class:`embedcache.checkpoint.TrainedOn`)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(os.fsencode(p) + b"\0")
    return h.hexdigest()


def holdout_note(n_val: int, n_train: int, fraction: float, seed: int) -> str:
    """How a held-out validation set was made, for logs and metrics."""
    return (
        f"no val split: held out {n_val} of {n_train} train images "
        f"({fraction:.0%}, stratified, seed {seed})"
    )
