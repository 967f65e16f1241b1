"""``--exclude FILE.csv``: the images a verb leaves out, read once, matched by path.

The file is a CSV with a ``path`` column (any audit CSV has one: the copy or image to leave
out), or one path per line without a header; paths are relative to the data root, as the
cache and the audit write them.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EmbedcacheError


@dataclass(frozen=True)
class Exclusion:
    """The paths of one exclusion file."""

    file: Path
    paths: frozenset[str]

    def keep(self, paths: Sequence[str]) -> np.ndarray:
        """Which of ``paths`` stay: bool ndarray of shape (len(paths),)."""
        return np.array([p not in self.paths for p in paths], bool)

    def filter(self, splits: dict[str, list]) -> dict[str, list]:
        """``splits`` (split -> items with a ``path``, e.g. samples) without the excluded items."""
        return {k: [s for s in v if s.path not in self.paths] for k, v in splits.items()}

    def check_used(self, paths: Sequence[str], where: str) -> None:
        """Refuse a file none of whose paths is among ``paths`` (a wrong file or root)."""
        if self.paths and self.paths.isdisjoint(paths):
            example = next(iter(sorted(self.paths)))
            raise EmbedcacheError(
                f"none of the {len(self.paths)} paths in --exclude {self.file} is in {where} "
                f"(e.g. {example!r}); "
                "paths must be relative to the data root, as the audit CSVs write them"
            )


def row_filter(cache, file: str | Path | None) -> Callable[[str, np.ndarray], np.ndarray]:
    """For a cache (:class:`embedcache.cache.Cache`), a function ``(split, rows) -> rows`` that
    keeps the rows (int64 ndarray) whose image ``file`` does not list."""
    drop = read_exclude(file)
    if drop is None:
        return lambda split, rows: rows
    drop.check_used([p for s in cache.splits for p in cache.paths(s)], f"cache {cache.path}")
    return lambda split, rows: rows[drop.keep(cache.paths(split))[rows]]


def excluded(images, file: str | Path | None, where: str):
    """``images`` (an :class:`embedcache.data.ImageSet`) without the images ``file`` lists."""
    drop = read_exclude(file)
    if drop is None:
        return images
    drop.check_used([s.path for v in images.splits.values() for s in v], where)
    return dataclasses.replace(images, splits=drop.filter(images.splits))


def read_exclude(file: str | Path | None) -> Exclusion | None:
    """The exclusion list in ``file``, or None without one."""
    if file is None:
        return None
    file = Path(file)
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except OSError as e:
        raise EmbedcacheError(f"cannot read --exclude {file} ({e.strerror or e})") from None
    if not rows:
        return Exclusion(file, frozenset())
    header = [c.strip().lower() for c in rows[0]]
    if "path" in header:
        col = header.index("path")
        paths = [r[col].strip() for r in rows[1:] if len(r) > col]
    elif all(len(r) == 1 for r in rows):
        paths = [r[0].strip() for r in rows]
    else:
        raise EmbedcacheError(
            f"--exclude {file} has no path column; "
            "give a CSV with a header naming path (as the audit writes) or one path per line"
        )
    return Exclusion(file, frozenset(p for p in paths if p))
