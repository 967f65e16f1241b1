"""``--exclude FILE.csv``: the images a verb leaves out, read once, matched by path.

The file is a CSV with a ``path`` column (any audit CSV has one: the copy or image to leave
out), or one path per line without a header; paths are relative to the data root, as the
cache and the audit write them. Paths are compared normalised (``./a//b.jpg`` is ``a/b.jpg``,
and ``a\\b.jpg`` is ``a/b.jpg`` where no file has the backslash in its name), and the paths that
name no image of the data are counted, so that a file written otherwise cannot leave its
images in silently: :meth:`Matched.note` is the line each verb shows.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.csvfile import csv_rows
from .errors import EmbedcacheError
from .outputs import shown


def normal_path(path: str) -> str:
    """``path`` as the match compares it: ``./a//b/../c.jpg`` is ``a/c.jpg``."""
    return posixpath.normpath(path)


@dataclass(frozen=True)
class Exclusion:
    """The paths of one exclusion file, as the file writes them."""

    file: Path
    paths: frozenset[str]

    def match(self, data: Iterable[str], where: str) -> Matched:
        """The images of ``data`` (paths relative to the data root) that this file lists.

        Refuses a file none of whose paths is among them (a wrong file or root); ``where``
        names the data in that message."""
        index: dict[str, list[str]] = {}
        for p in data:
            index.setdefault(normal_path(p), []).append(p)
        drop: set[str] = set()
        unmatched = []
        for p in sorted(self.paths):
            found = index.get(normal_path(p)) or index.get(normal_path(p.replace("\\", "/")))
            if found:
                drop.update(found)
            else:
                unmatched.append(p)
        if self.paths and not drop:
            raise EmbedcacheError(
                f"none of the {len(self.paths)} paths in --exclude {self.file} is in {where} "
                f"(e.g. {unmatched[0]!r}); "
                "paths must be relative to the data root, as the audit CSVs write them"
            )
        return Matched(self, frozenset(drop), tuple(unmatched))


@dataclass(frozen=True)
class Matched:
    """An exclusion file matched against one data set (see :meth:`Exclusion.match`)."""

    exclusion: Exclusion
    drop: frozenset[str]  # the data's paths to leave out, as the data writes them
    unmatched: tuple[str, ...]  # the file's paths that name no image of the data, sorted

    def keep(self, paths: Sequence[str]) -> np.ndarray:
        """Which of ``paths`` stay: bool ndarray of shape (len(paths),)."""
        return np.array([p not in self.drop for p in paths], bool)

    def filter(self, splits: dict[str, list]) -> dict[str, list]:
        """``splits`` (split -> items with a ``path``, e.g. samples) without the excluded items."""
        return {k: [s for s in v if s.path not in self.drop] for k, v in splits.items()}

    def check_left(self, split: str, before: int, after: int) -> None:
        """Refuse an exclusion that takes every image out of ``split`` (it had ``before``)."""
        if before and not after:
            raise EmbedcacheError(
                f"--exclude {self.exclusion.file} leaves no images in {split} (all {before} "
                f"listed); leave at least one of them out of {self.exclusion.file.name}"
            )

    def check_classes(self, before: Sequence[int], after: Sequence[int], classes) -> None:
        """Refuse an exclusion that leaves train (labels ``before``, ``after`` it) with one class
        of the several it had: a classifier needs two."""
        left = {int(c) for c in after if c >= 0}
        if len(left) == 1 and len({int(c) for c in before if c >= 0}) > 1:
            file = self.exclusion.file
            raise EmbedcacheError(
                f"--exclude {file} leaves a single class in train ({classes[left.pop()]}); "
                "a classifier needs at least two: list fewer of the other classes' images in "
                f"{file.name}"
            )

    def note(self, left_out: int, scope: str) -> str:
        """One line for the user: how many images of ``scope`` (e.g. ``train and val``) were
        left out, and how many of the file's paths matched no image, with one of them."""
        total = len(self.exclusion.paths)
        images = "image" if left_out == 1 else "images"
        line = f"--exclude {shown(self.exclusion.file)}: left out {left_out} {images} ({scope})"
        if self.unmatched:
            line += (
                f"; {len(self.unmatched)} of its {total} path{'s' * (total != 1)} matched no "
                f"image (e.g. {self.unmatched[0]!r})"
            )
        return line

    def record(self, left_out: int, scope: str) -> dict:
        """What a verb's metrics record: the file, the images left out, the paths unmatched,
        and :meth:`note`."""
        return {
            "file": str(self.exclusion.file),
            "left_out": int(left_out),
            "unmatched": len(self.unmatched),
            "note": self.note(left_out, scope),
        }


Rows = Callable[[str, np.ndarray], np.ndarray]


def row_filter(cache, file: str | Path | None) -> tuple[Rows, Matched | None]:
    """For a cache (:class:`embedcache.cache.Cache`), a function ``(split, rows) -> rows`` that
    keeps the rows (int64 ndarray) whose image ``file`` does not list, and the match (None
    without a file)."""
    drop = read_exclude(file)
    if drop is None:
        return (lambda split, rows: rows), None
    paths = [p for s in cache.splits for p in cache.paths(s)]
    matched = drop.match(paths, f"cache {cache.path}")
    return (lambda split, rows: rows[matched.keep(cache.paths(split))[rows]]), matched


def excluded(images, file: str | Path | None, where: str):
    """(``images`` (an :class:`embedcache.data.ImageSet`) without the images ``file`` lists,
    the line that says what was left out, or None without a file). Refuses a file that leaves
    train or val without an image."""
    drop = read_exclude(file)
    if drop is None:
        return images, None
    matched = drop.match([s.path for v in images.splits.values() for s in v], where)
    splits = matched.filter(images.splits)
    for split in ("train", "val"):
        if split in splits:
            matched.check_left(split, len(images.splits[split]), len(splits[split]))
    if "train" in splits:
        labels = [[s.label for s in v] for v in (images.splits["train"], splits["train"])]
        matched.check_classes(*labels, images.classes)
    left_out = len(images) - sum(len(v) for v in splits.values())
    note = matched.note(left_out, ", ".join(images.splits) or where)
    return dataclasses.replace(images, splits=splits), note


def read_exclude(file: str | Path | None) -> Exclusion | None:
    """The exclusion list in ``file``, or None without one."""
    if file is None:
        return None
    file = Path(file)
    rows = [r for _, r in csv_rows(file, f"--exclude {file}")]
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
