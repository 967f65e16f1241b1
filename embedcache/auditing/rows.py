"""The audit's unit rows read from the cache when they do not fit memory (past --max-memory).

In memory the audit scales every feature row to unit length once and keeps them (N x D x 2
bytes: 25.6 GB for 10,000,000 rows of 1280 in float16). Past the memory budget it reads them
from the file instead, each time it needs them, through :class:`DiskRows`: spans of rows in
order (the label check's scoring, the index's filling, each pass of the out-of-core re-scoring,
:mod:`.outofcore`) and sets of rows anywhere (a sample, the candidates of a few rows), each
read as runs of the file's chunks that hold them.

Scaling the rows as they are read cost more than reading them: 21.3 s for 1,000,000 rows of
1280 against 4.1 s for the bytes (7.1 s checked), and an audit reads every row about 16 times.
So the audit first writes the unit rows, once, to a scratch file beside its output
(:meth:`DiskRows.scratch`, deleted when the audit ends) and reads them from there, plain.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .search import unit_rows

RUN_CHUNKS = 64  # chunks of the file (about 1 MiB each) read at a time
SCRATCH_ROWS = 65536  # rows scaled and written to the scratch file at a time


class DiskRows:
    """The unit-length features of a cache's splits one after another (the audit's
    :class:`.findings.Pool` order), read when asked: ``x[lo:hi]`` and ``x[rows]`` (an int array
    in any order) give float arrays of the stored dtype, scaled to unit length; ``shape``,
    ``dtype``, ``len``. ``subset(rows)`` is the view of those rows.

    sources : each split's features, sliced like h5py datasets (a cache's
        :meth:`embedcache.cache.Cache.features`), with ``shape`` and ``dtype`` (and, where they
        have one, ``chunks``: the rows one read of the file returns)
    """

    def __init__(self, sources: list, rows: np.ndarray | None = None, *, scaled: bool = False):
        self._sources, self._scaled = sources, scaled  # scaled: the sources hold unit rows
        self._starts = np.cumsum([0] + [len(s) for s in sources])
        self._rows = rows  # the view's rows of the whole, or None for all
        n = int(self._starts[-1]) if rows is None else len(rows)
        self.shape = (n, int(sources[0].shape[1]) if sources else 0)
        self.dtype = sources[0].dtype if sources else np.dtype(np.float16)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def subset(self, rows: np.ndarray) -> DiskRows:
        """The view of ``rows`` (int array) of this one."""
        rows = np.asarray(rows, np.int64)
        whole = rows if self._rows is None else self._rows[rows]
        return DiskRows(self._sources, whole, scaled=self._scaled)

    def scratch(self, folder: Path, progress: bool = False) -> DiskRows:
        """These rows, scaled, written once to ``folder``/unit_rows.bin (raw, row after row) and
        read from there: one pass of the cache instead of a scaling per read."""
        path = Path(folder) / "unit_rows.bin"
        bar = tqdm(total=len(self), desc="unit rows", unit="row", disable=not progress)
        with open(path, "wb") as f, bar:
            for lo in range(0, len(self), SCRATCH_ROWS):
                block = self[lo : lo + SCRATCH_ROWS]
                f.write(np.ascontiguousarray(block).data)
                bar.update(len(block))
        return DiskRows([RawRows(path, self.shape, self.dtype)], scaled=True)

    def close(self) -> None:
        """Close the sources that hold a file open (a scratch copy's)."""
        for source in self._sources:
            getattr(source, "close", lambda: None)()

    @property
    def nbytes(self) -> int:
        return len(self) * self.shape[1] * self.dtype.itemsize

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            lo, hi, step = key.indices(len(self))
            if step != 1:
                raise IndexError("DiskRows slices take a step of 1")
            if self._rows is None:
                span = self._span(lo, hi)
                return span if self._scaled else unit_rows(span, out=span)
            key = self._rows[lo:hi]
        elif self._rows is not None:
            key = self._rows[np.asarray(key, np.int64)]
        return self._take(np.asarray(key, np.int64))

    def _span(self, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi of the whole, as stored (not scaled)."""
        out = np.empty((max(0, hi - lo), self.shape[1]), self.dtype)
        for i, source in enumerate(self._sources):
            a, b = max(lo, self._starts[i]), min(hi, self._starts[i + 1])
            if a < b:
                s = self._starts[i]
                out[a - lo : b - lo] = source[int(a - s) : int(b - s)]
        return out

    def _take(self, rows: np.ndarray) -> np.ndarray:
        """Rows of the whole in the order asked, scaled: each run of the file's chunks that
        holds some of them read once, in order."""
        wanted, back = np.unique(rows, return_inverse=True)
        got = np.empty((len(wanted), self.shape[1]), self.dtype)
        for i, source in enumerate(self._sources):
            lo, hi = np.searchsorted(wanted, self._starts[i : i + 2])
            local = wanted[lo:hi] - self._starts[i]
            for a, b, first in _runs(local, _chunk_rows(source), len(source)):
                inside = local_in(local, a, b)
                got[lo + first : lo + first + len(inside)] = source[a:b][inside - a]
        back = back.reshape(-1)
        if len(back) != len(got) or (back != np.arange(len(got))).any():
            got = got[back]  # the order asked, repeats included
        return got if self._scaled else unit_rows(got, out=got)


def local_in(local: np.ndarray, a: int, b: int) -> np.ndarray:
    """The entries of sorted ``local`` in [a, b)."""
    return local[np.searchsorted(local, a) : np.searchsorted(local, b)]


def _chunk_rows(source) -> int:
    chunks = getattr(getattr(source, "_ds", source), "chunks", None)
    return int(chunks[0]) if chunks else 4096


def _runs(local: np.ndarray, chunk: int, n: int):
    """(start, stop, index of the first row in ``local``) of each run of consecutive chunks,
    RUN_CHUNKS at most, that hold the sorted rows ``local`` of a source of ``n`` rows."""
    if not len(local):
        return
    chunks = np.unique(local // chunk)
    # a new run where the chunks are not consecutive or the run is full
    breaks = np.flatnonzero(np.diff(chunks) != 1) + 1
    for group in np.split(chunks, breaks):
        for g0 in range(0, len(group), RUN_CHUNKS):
            part = group[g0 : g0 + RUN_CHUNKS]
            a, b = int(part[0]) * chunk, min(n, (int(part[-1]) + 1) * chunk)
            yield a, b, int(np.searchsorted(local, a))


class RawRows:
    """Rows of ``shape`` and ``dtype`` stored raw in the file ``path``, read by slices
    (``os.pread``: safe from several threads); ``chunks``: the rows read apart."""

    chunks = (256,)

    def __init__(self, path: Path, shape: tuple[int, int], dtype):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), np.dtype(dtype)
        self._row = self.shape[1] * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice) -> np.ndarray:
        lo, hi, _ = key.indices(len(self))
        out = np.empty((max(0, hi - lo), self.shape[1]), self.dtype)
        view, at = memoryview(out).cast("B"), 0
        while at < len(view):  # pread may return less than asked
            got = os.preadv(self._fd, [view[at:]], lo * self._row + at)
            if not got:
                raise OSError(f"{self.path} ended before row {hi}")
            at += got
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
