"""The work of one rank on a shard source: whole shards, batches that never straddle one,
members listed again shard by shard as the rows come."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..config import ExtractConfig
from .base import Broken
from .listing import list_shard
from .patterns import LAYOUTS

SHARDS_LISTED = 4  # shard listings a rank keeps while it extracts (a million rows: ~100 MB)


def is_shard_layout(layout: str) -> bool:
    """Whether a cache's ``layout`` attribute says its rows come from shards."""
    return layout in LAYOUTS.values()


def shard_of(path: str, layout: str) -> str:
    """The shard part of a row's path (``SHARD/KEY``)."""
    suffix = next(s for s, name in LAYOUTS.items() if name == layout) + "/"
    return path[: path.index(suffix) + len(suffix) - 1]


class Members(Sequence):
    """Row ``i`` of ``flat`` -> its member, each shard listed the first time one of its rows
    is asked for (so the first batch waits for one shard's listing, not all of them); the
    last :data:`SHARDS_LISTED` listings are kept."""

    def __init__(self, root: Path, layout: str, names: list[str], cfg: ExtractConfig):
        self.root, self.layout, self.names, self.cfg = root, layout, names, cfg
        self._shards: OrderedDict[str, dict[str, object]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        name = self.names[i]
        shard = shard_of(name, self.layout)
        with self._lock:  # rows come shard after shard: the last few listings are enough
            if shard not in self._shards:
                entries, _ = list_shard(self.root / shard, self.cfg)
                self._shards[shard] = {e.key: e.member for e in entries}
                while len(self._shards) > SHARDS_LISTED:
                    self._shards.popitem(last=False)
            members = self._shards[shard]
        gone = Broken("not in the shard any more (it changed while extracting)")
        return members.get(name[len(shard) + 1 :], gone)


def plan(
    attrs,
    todo: dict[str, np.ndarray],
    paths: dict[str, list[str]],
    *,
    batch_size: int,
    rank: int,
    world: int,
    cfg: ExtractConfig,
) -> tuple[list, list[list[int]], Members]:
    """This rank's work on a shard source: (flat, batches, members).

    flat : (split, row) of every row to do; batches : this rank's, lists of indices into
    flat, each ``batch_size`` rows of one shard counted from its first row (so a shard
    of n rows makes n // batch_size full batches and one more, the same in a resumed run as in
    an uninterrupted one, and few batch shapes); members : flat index -> member.
    Shards go to ranks whole and in order, each to the rank whose even share of the rows
    to do holds the shard's middle row.
    """
    layout = str(attrs["layout"])
    flat, batches, units, last = [], [], [], None
    for split, rows in todo.items():
        names = paths[split]
        first: dict[str, int] = {}  # a shard's first row in the split: where its batches start
        for r, name in enumerate(names):
            first.setdefault(shard_of(name, layout), r)
        for r in rows.tolist():
            shard = shard_of(names[r], layout)
            at = (split, shard, (r - first[shard]) // batch_size)
            if at != last:
                batches.append([])
                units.append(at[1])
                last = at
            batches[-1].append(len(flat))
            flat.append((split, r))
    sizes: dict[str, int] = {}
    for unit, batch in zip(units, batches, strict=True):
        sizes[unit] = sizes.get(unit, 0) + len(batch)
    owner, start = {}, 0
    for unit, n in sizes.items():
        owner[unit] = (2 * start + n) * world // (2 * len(flat))  # by its middle row
        start += n
    mine = [b for b, unit in zip(batches, units, strict=True) if owner[unit] == rank]
    names = [paths[s][r] for s, r in flat]
    return flat, mine, Members(Path(str(attrs["source"])), layout, names, cfg)
