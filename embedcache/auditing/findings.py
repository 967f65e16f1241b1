"""The findings of an audit, as tables: one row per pair of images or per image.

Every split of a cache is pooled into one table of rows (``Pool``); a finding refers to rows by
their position in it. Pairs are ordered so that ``a`` is the copy in the earlier split
(train, val, test) or, within a split, the earlier row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..cache import Cache, duplicate_groups
from ..data import SPLIT_ORDER

MAD_SCALE = 1.4826  # median absolute deviation to the standard deviation of a normal
READ_ROWS = 65536  # rows read from the cache at a time


@dataclass
class Pool:
    """Every split of a cache in one table.

    features : (n, d) stored dtype; split : (n,) index into ``splits``; labels : (n,) int64,
    -1 unlabelled; paths : n str, relative to the data root; hashes : (n, 16) uint8 or None
    (a cache written before format 3)
    """

    features: np.ndarray
    split: np.ndarray
    labels: np.ndarray
    paths: list[str]
    hashes: np.ndarray | None
    splits: list[str]
    classes: list[str]

    @classmethod
    def read(cls, cache: Cache) -> Pool:
        names = [s for s in cache.splits if cache.num_images(s)]
        sizes = [cache.num_images(s) for s in names]
        dtype = cache.features(names[0]).dtype if names else np.float16
        features = np.empty((sum(sizes), cache.feature_dim), dtype)  # filled in place: one copy
        at = 0
        for name, n in zip(names, sizes, strict=True):
            source = cache.features(name)
            for lo in range(0, n, READ_ROWS):
                features[at + lo : at + min(n, lo + READ_ROWS)] = source[lo : lo + READ_ROWS]
            at += n
        hashes = [cache.hashes(s) for s in names]
        return cls(
            features,
            np.repeat(np.arange(len(names)), sizes).astype(np.int64),
            np.concatenate([cache.labels(s) for s in names] or [np.zeros(0, np.int64)]),
            [p for s in names for p in cache.paths(s)],
            None if any(h is None for h in hashes) or not hashes else np.concatenate(hashes),
            names,
            cache.classes,
        )

    def __len__(self) -> int:
        return len(self.labels)

    def label_name(self, row: int) -> str:
        label = int(self.labels[row])
        return self.classes[label] if 0 <= label < len(self.classes) else ""

    def split_name(self, row: int) -> str:
        return self.splits[int(self.split[row])]

    def rank(self, row: int) -> tuple[int, int]:
        """Where a row comes in the usual order: its split's place, then the row."""
        return SPLIT_ORDER.index(self.split_name(row)), row

    def ordered(self, a: int, b: int) -> tuple[int, int]:
        """The pair with the row of the earlier split (then the earlier row) first."""
        return (a, b) if self.rank(a) <= self.rank(b) else (b, a)


@dataclass
class Pairs:
    """Pairs of rows: ``a``, ``b`` (n,) int64 and ``score`` (n,) float32 (cosine similarity)."""

    a: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    b: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    score: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.a)

    def sorted(self) -> Pairs:
        order = np.lexsort((self.b, self.a, -self.score))
        return Pairs(self.a[order], self.b[order], self.score[order])


def exact_pairs(pool: Pool) -> tuple[Pairs, int]:
    """Byte-identical files: each group's first copy paired with every other; and the groups."""
    if pool.hashes is None:
        return Pairs(), 0
    pairs = []
    for group in duplicate_groups(pool.hashes):
        first = min(group.tolist(), key=pool.rank)
        pairs += [(first, int(r)) for r in group if r != first]
    a, b = (
        (np.array(c, np.int64) for c in zip(*pairs, strict=True))
        if pairs
        else (np.zeros(0, np.int64),) * 2
    )
    return Pairs(a, b, np.ones(len(a), np.float32)).sorted(), len(duplicate_groups(pool.hashes))


def near_pairs(
    pool: Pool, index: np.ndarray, sims: np.ndarray, threshold: float, exact: Pairs
) -> Pairs:
    """Pairs whose cosine similarity is at least ``threshold`` among each row's neighbours
    (index, sims: (n, k) from :func:`embedcache.auditing.search.nearest`), byte-identical ones
    left out (they are exact duplicates)."""
    rows, cols = np.nonzero(sims >= threshold)
    a, b = rows.astype(np.int64), index[rows, cols]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    n = len(pool)
    keys, first = np.unique(lo * n + hi, return_index=True)
    same = np.minimum(exact.a, exact.b) * n + np.maximum(exact.a, exact.b)
    keep = ~np.isin(keys, same)
    lo, hi, score = lo[first][keep], hi[first][keep], sims[rows, cols][first][keep]
    ordered = [pool.ordered(int(x), int(y)) for x, y in zip(lo, hi, strict=True)]
    a = np.array([p[0] for p in ordered], np.int64)
    b = np.array([p[1] for p in ordered], np.int64)
    return Pairs(a, b, score.astype(np.float32)).sorted()


@dataclass
class Leaks:
    """Duplicate pairs (exact or near) across splits or with different labels."""

    pairs: Pairs
    kind: list[str]  # exact or near
    reason: list[str]  # cross-split, different labels, or both


def leaks(pool: Pool, exact: Pairs, near: Pairs) -> Leaks:
    """The exact and near duplicates that straddle splits or whose copies disagree on the label."""
    a, b, score, kind, reason = [], [], [], [], []
    for name, pairs in (("exact", exact), ("near", near)):
        for x, y, s in zip(pairs.a.tolist(), pairs.b.tolist(), pairs.score.tolist(), strict=True):
            why = []
            if pool.split[x] != pool.split[y]:
                why.append("cross-split")
            if pool.labels[x] >= 0 and pool.labels[y] >= 0 and pool.labels[x] != pool.labels[y]:
                why.append("different labels")
            if why:
                a.append(x), b.append(y), score.append(s), kind.append(name)
                reason.append(", ".join(why))
    pairs = Pairs(np.array(a, np.int64), np.array(b, np.int64), np.array(score, np.float32))
    return Leaks(pairs, kind, reason)


@dataclass
class Outliers:
    """Rows far from their neighbours: ``rows`` by decreasing ``score`` (mean cosine distance
    to the k nearest), their robust z-scores, and the threshold they exceed."""

    rows: np.ndarray
    score: np.ndarray
    z: np.ndarray
    threshold: float


def outliers(sims: np.ndarray, *, z: float) -> tuple[Outliers, np.ndarray]:
    """Rows whose mean kNN distance is more than ``z`` robust standard deviations (median
    absolute deviation x 1.4826) above the median; and every row's distance (n,) float32."""
    distance = (
        (1.0 - sims).mean(1).astype(np.float32)
        if sims.shape[1]
        else np.zeros(len(sims), np.float32)
    )
    median = float(np.median(distance)) if len(distance) else 0.0
    spread = MAD_SCALE * float(np.median(np.abs(distance - median))) if len(distance) else 0.0
    robust = (distance - median) / max(spread, 1e-12)
    threshold = median + z * spread
    rows = np.flatnonzero(robust > z)
    rows = rows[np.argsort(-distance[rows], kind="stable")]
    return Outliers(rows, distance[rows], robust[rows].astype(np.float32), threshold), distance
