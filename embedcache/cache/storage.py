"""How rows reach an HDF5 file so that a SIGKILL at any moment leaves it readable.

Every dataset a writer fills is allocated when its file is created (and the file's
blocks reserved), so later writes touch raw data only and never HDF5 metadata.
:func:`write_batch` is the one order of writes and flushes that lets a resume trust
the rows marked done; the rest copies rows between files in runs of slices.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from ..outputs import replacing
from .schema import CHUNK_BYTES, COPY_ROWS, DONE, REASON_BYTES, SKIPPED, row_arrays


def reserve(path: Path) -> None:
    """Allocate disk blocks for the whole file now, so that later writes cannot run out of space.

    HDF5 does not survive a failed write well (its close can crash the process),
    so every dataset is allocated at creation and the file's blocks are reserved
    here: after this, filling the file in only overwrites bytes already on disk.
    """
    if not hasattr(os, "posix_fallocate"):  # macOS: best effort
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def early() -> h5py.h5p.PropDCID:
    """A layout allocated at creation and never filled: later writes change raw data only."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


@contextlib.contextmanager
def atomic_h5(path: Path, layout) -> Iterator[h5py.File]:
    """Create an HDF5 file under a temporary name with ``layout(h5)``, reserve its
    blocks, yield it reopened for filling, then fsync and rename it to ``path``."""
    with replacing(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            layout(h5)
        reserve(tmp)
        with h5py.File(tmp, "r+") as h5:
            yield h5


def rows_per_chunk(dim: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // (dim * itemsize))


def rows_dataset(g: h5py.Group, name: str, shape: tuple, dtype: np.dtype) -> h5py.Dataset:
    """A finished cache's row array (``features``, ``views``): chunks of about 1 MiB, each with
    a Fletcher-32 checksum that HDF5 verifies on every read (format 2), allocated at creation."""
    n, per_row = shape[0], int(np.prod(shape[1:]))
    if not n:
        return g.create_dataset(name, shape, dtype=dtype)
    chunks = (min(n, rows_per_chunk(per_row, dtype.itemsize)), *shape[1:])
    return g.create_dataset(name, shape, dtype=dtype, chunks=chunks, fletcher32=True, dcpl=early())


def checked(g: h5py.Group, name: str, data: np.ndarray) -> None:
    """A small array of a finished cache, checksummed like the features (when not empty)."""
    g.create_dataset(name, data=data, fletcher32=len(data) > 0)


def write_batch(g: h5py.Group, pos: np.ndarray, arrays: dict, failed: dict[int, str]) -> None:
    """Store one batch in ``g`` (a partial file's split, or a shard file) and mark it: the rows
    at positions ``pos`` (ascending) done, the ``failed`` ones skipped with their reason.

    The order is the crash-safety guarantee: the row arrays reach the file (flushed)
    before any status marks their rows done, and reasons before the status that points
    at them, so a kill at any moment leaves every row either done with its features or
    to do.

    arrays : row array name -> ndarray of shape (len(pos), ...) in the stored dtype, or None
        (not stored: unknown hashes or thumbnails); arrays ``g`` does not hold are left out.
    failed : position -> why the file could not be read.
    """
    if len(pos):
        for name, values in arrays.items():
            if name in g and values is not None:
                put_span(g[name], pos, values)
        g.file.flush()  # features reach the file before the rows are marked done
    marked = [int(p) for p in pos] + [int(p) for p in failed]
    if not marked:
        return
    lo, hi = min(marked), max(marked) + 1
    status = g["status"][lo:hi]
    status[pos - lo] = DONE
    if failed:
        reasons = g["reasons"][lo:hi]
        for p, reason in failed.items():
            status[p - lo] = SKIPPED
            reasons[p - lo] = reason.encode()[:REASON_BYTES]
        g["reasons"][lo:hi] = reasons  # reasons before the status that points at them
        g.file.flush()
    g["status"][lo:hi] = status
    g.file.flush()


def put_span(ds: h5py.Dataset, rows: np.ndarray, values: np.ndarray) -> None:
    """ds[rows] = values for ascending ``rows`` of one batch, in one write of their span.
    ``values`` may hold fewer views than ``ds`` (a shard keeps train's number for every row):
    they fill the first ones."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo == len(rows) and values.shape[1:] == ds.shape[1:]:
        ds[lo:hi] = values
    else:  # rows with gaps (images reused from an older cache): read-modify-write the span
        span = ds[lo:hi]
        span[rows - lo, : values.shape[1]] = values
        ds[lo:hi] = span


def write_rows(dst: h5py.Dataset, rows: np.ndarray, values: np.ndarray) -> None:
    """dst[rows] = values, as one slice per run of consecutive rows."""
    order = np.argsort(rows, kind="stable")
    rows, values = rows[order], values[order]
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
        if b > a:
            dst[int(rows[a]) : int(rows[b - 1]) + 1] = values[a:b]


def copy_rows(
    src: h5py.Dataset, src_rows: np.ndarray, dst: h5py.Dataset, dst_rows: np.ndarray
) -> None:
    """dst[dst_rows] = src[src_rows], copying runs of consecutive rows as slices."""
    order = np.argsort(dst_rows, kind="stable")
    s, d = src_rows[order], dst_rows[order]
    breaks = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(d)], strict=True):
        for lo in range(a, b, COPY_ROWS):
            hi = min(b, lo + COPY_ROWS)
            dst[d[lo] : d[hi - 1] + 1] = src[s[lo] : s[hi - 1] + 1]


def reuse_rows(
    g: h5py.Group,
    samples: list,
    index: dict,
    src_arrays: dict | None,
    src_status: np.ndarray,
    src_reasons: np.ndarray,
) -> None:
    """Copy the rows of ``samples`` found in ``index`` (key -> source row) into group ``g``:
    each row array of ``g`` from ``src_arrays`` (name -> dataset; None: skipped files only)."""
    pairs = [
        (i, index[(s.path, s.size, s.mtime_ns)])
        for i, s in enumerate(samples)
        if (s.path, s.size, s.mtime_ns) in index
    ]
    if not pairs:
        return
    dst_rows, src_rows = (np.array(c) for c in zip(*pairs, strict=True))
    done = src_status[src_rows] == DONE
    if done.any():
        for name in row_arrays(g):
            if src_arrays.get(name) is not None:  # of an older format: stay unknown
                copy_rows(src_arrays[name], src_rows[done], g[name], dst_rows[done])
    status, reasons = g["status"][:], g["reasons"][:]
    status[dst_rows] = src_status[src_rows]
    reasons[dst_rows[~done]] = src_reasons[src_rows[~done]]
    g["reasons"][:] = reasons
    g["status"][:] = status
