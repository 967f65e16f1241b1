"""Duplicate groups: the images that exact and near duplicate pairs join, counted once each.

A photo with 40 byte copies is one group of 40, not 39 pairs; a chain of near pairs a~b, b~c
is one group of 3, though a and c were never paired. Groups are the connected components of
the exact and near pairs together, so a photo with a byte copy and a resized copy is one
group. Each group keeps one image, its first by :meth:`.findings.Pool.rank` (the earliest
split, then the earliest row); ``groups.csv`` names the others in ``path``, so that
``--exclude groups.csv`` leaves one image of each group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..data import SPLIT_ORDER
from .findings import Pairs, Pool


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The connected component of each of ``n`` nodes joined by the edges ``a[i] -- b[i]``:
    (n,) int64, each node's smallest member (a node without an edge is its own).

    A union-find over all edges at once: every root hooks under the smallest root an edge
    joins it to, then every node jumps to its root, until no edge joins two roots. A chain of
    1,000,000 nodes in random order took 14 rounds (0.5 s on a 2-core CPU); random graphs of
    as many nodes 4 to 6, every result the same partition as scipy's connected_components.
    """
    parent = np.arange(n, dtype=np.int64)
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    while True:
        ra, rb = parent[a], parent[b]
        across = ra != rb
        if not across.any():
            return parent
        lo, hi = np.minimum(ra[across], rb[across]), np.maximum(ra[across], rb[across])
        np.minimum.at(parent, hi, lo)  # parent[x] <= x always: no cycle can form
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up


@dataclass(frozen=True)
class Group:
    """One group: ``rows`` (size,) int64 by :meth:`.findings.Pool.rank`, the first the image
    to keep; whether it spans splits; whether its labelled images disagree on the label."""

    id: int
    rows: np.ndarray
    spans_splits: bool
    labels_disagree: bool

    @property
    def size(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class Groups:
    """Every group, numbered 1.. by size (largest first), then by first row (by rank); ``of``
    (n,) int64 each row's group id, 0 for a row in none."""

    groups: list[Group]
    of: np.ndarray

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def images(self) -> int:
        return int(np.count_nonzero(self.of))

    def reach(self, pairs: Pairs) -> dict:
        """The distinct images (rows) and groups that ``pairs`` hold."""
        rows = np.unique(np.concatenate([pairs.a, pairs.b]))
        return {"images": len(rows), "groups": len(np.unique(self.of[rows]))}

    def summary(self) -> dict:
        """The counts of summary.json's ``groups`` section."""
        return {
            "count": len(self),
            "images": self.images,
            "largest": max((g.size for g in self.groups), default=0),
            "spanning_splits": sum(g.spans_splits for g in self.groups),
            "label_conflicts": sum(g.labels_disagree for g in self.groups),
        }


def _rank_order(pool: Pool) -> np.ndarray:
    """Every row in :meth:`.findings.Pool.rank` order (its split's place, then the row)."""
    place = np.array([SPLIT_ORDER.index(s) for s in pool.splits], np.int64)
    return np.lexsort((np.arange(len(pool)), place[pool.split]))


def _disagree(pool: Pool, rows: np.ndarray) -> bool:
    """Whether the labelled images of ``rows`` carry more than one label (label set)."""
    if pool.label_sets is not None:
        return len(np.unique(pool.label_sets[rows], axis=0)) > 1
    labels = pool.labels[rows]
    return len(np.unique(labels[labels >= 0])) > 1


def duplicate_groups(pool: Pool, *pairs: Pairs) -> Groups:
    """The groups that ``pairs`` (exact and near duplicates) join, see :class:`Groups`."""
    n = len(pool)
    a = np.concatenate([p.a for p in pairs] or [np.zeros(0, np.int64)])
    b = np.concatenate([p.b for p in pairs] or [np.zeros(0, np.int64)])
    root = components(n, a, b)
    order = _rank_order(pool)
    grouped = order[np.bincount(root, minlength=n)[root[order]] > 1]  # by rank
    grouped = grouped[np.argsort(root[grouped], kind="stable")]  # each group together, by rank
    _, starts, sizes = np.unique(root[grouped], return_index=True, return_counts=True)
    place = np.empty(n, np.int64)
    place[order] = np.arange(n)
    numbered = np.lexsort((place[grouped[starts]], -sizes))
    found, of = [], np.zeros(n, np.int64)
    for number, g in enumerate(numbered.tolist(), start=1):
        rows = grouped[starts[g] : starts[g] + sizes[g]]
        of[rows] = number
        spans = len(np.unique(pool.split[rows])) > 1
        found.append(Group(number, rows, spans, _disagree(pool, rows)))
    return Groups(found, of)


def group_rows(pool: Pool, groups: Groups) -> list[dict]:
    """groups.csv: one row per image of a group, group by group, the kept image first.

    ``image`` names every image; ``path`` only those to leave out (empty for the kept one),
    since ``--exclude`` leaves out every path the file lists."""
    rows = []
    for g in groups.groups:
        for i, r in enumerate(g.rows.tolist()):
            rows.append(
                {
                    "group": g.id,
                    "size": g.size,
                    "image": pool.paths[r],
                    "split": pool.split_name(r),
                    "label": pool.label_name(r),
                    "keep": "true" if i == 0 else "false",
                    "path": "" if i == 0 else pool.paths[r],
                }
            )
    return rows
