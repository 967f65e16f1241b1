"""Shard files, one per torchrun rank, and the two joins that make one cache of them.

Under torchrun each rank writes its rows to ``NAME.h5.partial.shardR`` (see
:class:`ShardFile`). A copy join (:func:`merge_shard`) takes them into the partial
file, which then writes one ordinary cache; a virtual join writes ``NAME.h5`` with each
split's row arrays as HDF5 virtual datasets over the shard files, kept in
``NAME.h5.parts/`` (relative paths, so both move together). Every other dataset is the
same in both.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import os
from pathlib import Path

import h5py
import numpy as np

from ..data import HASH_BYTES, THUMB_SIDE
from .schema import (
    COPY_ROWS,
    DONE,
    REASON_BYTES,
    SKIPPED,
    TODO,
    partial_path,
    row_arrays,
    split_names,
)
from .storage import atomic_h5, copy_rows, early, write_batch, write_rows


def shard_path(out: Path, rank: int) -> Path:
    """Where rank ``rank`` of a torchrun extraction keeps its rows of ``out``."""
    return Path(f"{partial_path(out)}.shard{rank}")


def shard_paths(out: Path) -> list[Path]:
    """Every shard file next to ``out``, by rank (left by this run or by an earlier one)."""
    found = partial_path(out).parent.glob(glob.escape(partial_path(out).name) + ".shard*")
    return sorted(
        (p for p in found if p.name.rsplit("shard", 1)[-1].isdigit()),
        key=lambda p: int(p.name.rsplit("shard", 1)[-1]),
    )


class ShardFile:
    """The rows one rank extracts, in the order it extracts them: ``split`` (index into the
    partial file's splits), ``row``, ``features``, ``status`` and ``reasons`` per row.

    Allocated in full when created, like the partial file, and filled batch by
    batch (features flushed before their status), so a killed rank leaves rows
    that are either done or to do; :meth:`PartialCache.merge` takes in the done ones.
    """

    def __init__(self, h5: h5py.File, splits: list[str]):
        self.h5, self.splits = h5, splits
        pos = {}
        for i, (s, r) in enumerate(zip(h5["split"][:], h5["row"][:], strict=True)):
            pos[(splits[int(s)], int(r))] = i
        self._pos = pos

    @classmethod
    def create(
        cls,
        path: Path,
        splits: list[str],
        items: list[tuple[str, int]],
        *,
        feature_dim: int,
        dtype: str,
        views: int = 0,
    ) -> ShardFile:
        """A new shard file for ``items`` (split, row), in that order, opened for filling;
        with ``views``, room for train's number of views on every row."""
        index = {s: i for i, s in enumerate(splits)}

        def layout(h5: h5py.File) -> None:
            n = len(items)
            h5.create_dataset("split", data=np.array([index[s] for s, _ in items], np.uint8))
            h5.create_dataset("row", data=np.array([r for _, r in items], np.int64))
            h5.create_dataset("features", (n, feature_dim), dtype=dtype, dcpl=early())
            if views:
                h5.create_dataset("views", (n, views, feature_dim), dtype=dtype, dcpl=early())
            h5.create_dataset("hashes", data=np.zeros((n, HASH_BYTES), np.uint8))
            h5.create_dataset("thumbnails", data=np.zeros((n, THUMB_SIDE, THUMB_SIDE), np.uint8))
            h5.create_dataset("status", data=np.zeros(n, np.uint8))
            h5.create_dataset("reasons", data=np.zeros(n, f"S{REASON_BYTES}"))

        with atomic_h5(path, layout):
            pass
        return cls(h5py.File(path, "r+"), splits)

    @property
    def dtype(self) -> str:
        """The stored feature dtype."""
        return str(self.h5["features"].dtype)

    def write(
        self,
        split: str,
        rows: np.ndarray,
        features: np.ndarray,
        failed: dict[int, str],
        views: np.ndarray | None = None,
        hashes: np.ndarray | None = None,
        thumbnails: np.ndarray | None = None,
    ) -> None:
        """Store one batch: the same contract as :meth:`PartialCache.write`; the views of a
        split with fewer than train's fill the first of each row's."""
        pos = np.array([self._pos[(split, int(r))] for r in rows], np.int64)
        bad = {self._pos[(split, int(r))]: reason for r, reason in failed.items()}
        arrays = {"features": features, "views": views, "hashes": hashes, "thumbnails": thumbnails}
        write_batch(self.h5, pos, arrays, bad)

    def close(self) -> None:
        self.h5.close()


def merge_shard(h5: h5py.File, splits: list[str], shard: Path) -> int:
    """Take into the partial file ``h5`` the rows a shard file has done or skipped; returns how
    many. Features are copied in runs of consecutive rows and flushed before the rows are
    marked, as :func:`~embedcache.cache.storage.write_batch` does, so a kill loses nothing."""
    with h5py.File(shard, "r") as sh:
        status = sh["status"][:]
        done = np.flatnonzero(status != TODO)
        where, rows = sh["split"][:], sh["row"][:]
        for lo in range(0, len(done), COPY_ROWS):
            pos = done[lo : lo + COPY_ROWS]
            arrays = {
                n: sh[n][int(pos[0]) : int(pos[-1]) + 1][pos - pos[0]] for n in row_arrays(sh)
            }
            marks = {}
            for i, split in enumerate(splits):
                mine = np.flatnonzero(where[pos] == i)
                ok = mine[status[pos[mine]] == DONE]
                for name in (n for n in row_arrays(h5[split]) if n in arrays):
                    dst = h5[split][name]  # a shard keeps train's V views for every row
                    write_rows(dst, rows[pos[ok]], arrays[name][ok][:, : dst.shape[1]])
                marks[split] = mine
            h5.flush()  # features before the status that points at them
            for split, mine in marks.items():
                src = pos[mine]
                _mark(h5[split], rows[src], status[src], sh["reasons"], src)
            h5.flush()
    return len(done)


def _mark(g: h5py.Group, rows: np.ndarray, status: np.ndarray, reasons, src: np.ndarray) -> None:
    """Set the status of ``rows`` of split group ``g`` (and the reasons of the skipped ones,
    read from ``reasons[src]``)."""
    if not len(rows):
        return
    for r, p in zip(rows[status == SKIPPED], src[status == SKIPPED], strict=True):
        g["reasons"][int(r)] = reasons[int(p)]
    all_status = g["status"][:]
    all_status[rows] = status
    g["status"][:] = all_status


# ---------------------------------------------------------------------------
# The virtual join


def parts_dir(out: Path) -> Path:
    """The folder of the files a virtual cache ``out`` reads its features from."""
    return Path(f"{out}.parts")


def gather_parts(partial, out: Path, shards: list[Path], status: dict, reasons: dict):
    """Overlay what each shard has done or skipped on the partial file's ``status`` and
    ``reasons`` (per split, updated in place) and keep the files a virtual cache ``out`` will
    read (see :func:`_keep_parts`). Returns (part names, where): ``where[split]`` is (part
    index, position) of each row, -1 for the base part."""
    where = {
        s: (np.full(len(status[s]), -1, np.int64), np.arange(len(status[s])))
        for s in partial.splits
    }
    for i, shard in enumerate(shards):
        with h5py.File(shard, "r") as sh:
            _overlay(sh, i, partial.splits, status, reasons, where)
    return _keep_parts(out, shards, partial, status, where), where


def _overlay(
    sh: h5py.File, index: int, splits: list[str], status: dict, reasons: dict, where: dict
) -> None:
    """Record what shard file ``sh`` (number ``index``) has done or skipped: its status and
    reasons over the partial file's, and where each done row's features are (shard, position)."""
    st, split_of, rows = sh["status"][:], sh["split"][:], sh["row"][:]
    shard_reasons = sh["reasons"][:]
    for i, split in enumerate(splits):
        mine = np.flatnonzero((split_of == i) & (st != TODO))
        r = rows[mine]
        status[split][r] = st[mine]
        reasons[split][r] = shard_reasons[mine]
        where[split][0][r] = index
        where[split][1][r] = mine


def _keep_parts(out: Path, shards: list[Path], partial, status: dict, where: dict) -> list[str]:
    """Put the files a virtual cache will read into ``OUT.parts/`` under a new name each: the
    shards (hard links, so the shards stay resumable until the cache is in place) and, when the
    partial file holds done rows itself, a base file with those rows (index -1). Returns the
    names relative to ``out``'s folder, by shard index, the base file last."""
    folder = parts_dir(out)
    folder.mkdir(exist_ok=True)
    token = f"{os.getpid()}-{int(dt.datetime.now().timestamp() * 1e6):x}"
    names = []
    for i, shard in enumerate(shards):
        name = f"{token}-shard{i}.h5"
        try:
            os.link(shard, folder / name)
        except OSError:  # a filesystem without hard links: move it (resumable no longer)
            os.replace(shard, folder / name)
        names.append(f"{folder.name}/{name}")
    base = f"{token}-base.h5"
    with h5py.File(folder / base, "w") as h5:
        for split in partial.splits:
            own = np.flatnonzero((status[split] == DONE) & (where[split][0] == -1))
            for name in row_arrays(partial.h5[split]):
                src = partial.h5[split][name]
                dst = h5.create_dataset(
                    _base_name(split, name), (len(own), *src.shape[1:]), dtype=src.dtype
                )
                copy_rows(src, own, dst, np.arange(len(own)))
            where[split][1][own] = np.arange(len(own))
    return [*names, f"{folder.name}/{base}"]


def _base_name(split: str, name: str) -> str:
    """The dataset of the base part holding a split's row array ``name``."""
    return split if name == "features" else f"{split}.{name}"


def virtual_arrays(
    h5: h5py.File, partial, out: Path, parts: list[str], status: dict, where: dict
) -> None:
    """Every split's row arrays of the finished cache ``h5`` as virtual datasets over
    ``parts``, the done rows only (``where`` from :func:`gather_parts`)."""
    for split in partial.splits:
        ok = np.flatnonzero(status[split] == DONE)
        src, pos = where[split][0][ok], where[split][1][ok]
        for name in row_arrays(partial.h5[split]):
            _virtual_rows(h5[split], name, out, parts, src, pos, partial.h5[split][name])


def _virtual_rows(
    g: h5py.Group,
    name: str,
    out: Path,
    parts: list[str],
    src: np.ndarray,
    pos: np.ndarray,
    like: h5py.Dataset,
) -> None:
    """``g[name]`` (a row array) as a virtual dataset: row k is row ``pos[k]`` of part ``src[k]``
    (-1: the base part), one mapping per run of consecutive rows of one part. Shards keep
    train's views for every row; a split with fewer maps the first of them."""
    n, tail, dtype = len(src), like.shape[1:], like.dtype
    if not n:
        g.create_dataset(name, (0, *tail), dtype=dtype)
        return
    layout = h5py.VirtualLayout((n, *tail), dtype)
    sources = {}
    for i in np.unique(src).tolist():  # -1 picks the base part, the last
        inner = name if i >= 0 else _base_name(g.name.strip("/"), name)
        with h5py.File(out.parent / parts[i], "r") as f:
            shape = f[inner].shape
        sources[i] = h5py.VirtualSource(parts[i], inner, shape=shape, dtype=dtype)
    breaks = np.flatnonzero((np.diff(src) != 0) | (np.diff(pos) != 1)) + 1
    within = tuple(slice(0, k) for k in tail)
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, n], strict=True):
        rows = slice(int(pos[a]), int(pos[b - 1]) + 1)
        layout[int(a) : int(b)] = sources[int(src[a])][(rows, *within)]
    g.create_virtual_dataset(name, layout)


def virtual_parts(h5: h5py.File) -> list[str]:
    """The files (relative to the cache's folder) the virtual features of ``h5`` read from."""
    names = []
    for split in split_names(h5):
        ds = h5[split].get("features")
        if ds is not None and ds.is_virtual:
            names += [m.file_name for m in ds.virtual_sources()]
    return sorted(set(names))


def remove_unused_parts(out: Path) -> None:
    """Delete the part files in ``OUT.parts/`` that the cache at ``out`` does not read (left by
    an earlier virtual cache, or by a join killed before its rename)."""
    folder = parts_dir(out)
    if not folder.is_dir():
        return
    try:
        with h5py.File(out, "r") as h5:
            used = {Path(name).name for name in virtual_parts(h5)}
    except OSError:  # no readable cache to ask: delete nothing
        return
    for f in folder.glob("*.h5"):
        if f.name not in used:
            f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when empty
