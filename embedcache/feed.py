"""The training feed: a split's rows in blocks and shuffled batches, in memory when they fit.

Nothing here knows HDF5: :class:`Rows` reads from any ``source`` that slices like an array
(``source[lo:hi]``, ``source[rows]``, ``source[:]``, with ``shape`` and ``dtype``, and
``read_direct`` when it can read into a given array), such as the checked features of an
open cache (:meth:`embedcache.cache.Cache.features`) or a plain numpy array.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

import numpy as np

from .errors import EmbedcacheError

MEMORY_FRACTION = 0.5  # default --max-memory: this share of the memory available now
BLOCK_ROWS = 2048  # rows read from the file at a time
SHUFFLE_ROWS = 65536  # rows shuffled together (the whole split when it is smaller)


def available_memory_bytes() -> int:
    """Memory available to new allocations now (MemAvailable), or total memory if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget(max_memory: int | None) -> int:
    """Bytes of features that may be loaded: ``max_memory``, or half the memory available now."""
    return max_memory if max_memory is not None else int(MEMORY_FRACTION * available_memory_bytes())


def _f32(a: np.ndarray) -> np.ndarray:
    """float16 -> float32 through torch: vectorised, about 9x numpy's astype here."""
    import torch  # here, so that reading a cache's attributes (info) does not load torch

    return a if a.dtype == np.float32 else torch.from_numpy(np.ascontiguousarray(a)).float().numpy()


def _read_ahead(jobs: list, read, threaded: bool, slots: int = 2):
    """Yield ``read(job)`` for each job in order, the next one read in a background thread.

    At most ``slots`` results exist at once: the one the caller holds and the
    one being read (a result is let go when the caller asks for the next). An
    error in the reader is raised here; closing the generator stops the reader.
    Not ``threaded``: each job is read here when asked for, in the same order.
    """
    if not threaded:
        for job in jobs:
            yield read(job)
        return
    free, ready, stop = threading.Semaphore(slots), queue.Queue(), threading.Event()

    def reader() -> None:
        try:
            for job in jobs:
                free.acquire()
                if stop.is_set():
                    return
                ready.put((read(job), None))
        except BaseException as e:  # handed to the caller, raised there
            ready.put((None, e))

    thread = threading.Thread(target=reader, name="embedcache-read-ahead", daemon=True)
    thread.start()
    try:
        for _ in jobs:
            result, error = ready.get()
            if error is not None:
                raise error
            yield result
            free.release()  # the caller is done with this result: its slot may be refilled
    finally:
        stop.set()
        free.release()  # wake a reader waiting for a slot, so that it sees stop
        thread.join()


class Rows:
    """Some rows of a split: labels in memory, features in memory or read in blocks from ``source``.

    Positions ``0..n-1`` index the chosen rows; ``rows[p]`` is the row in the file
    (increasing).
    Both modes read and shuffle the same way, so training gives the same result.
    Streaming reads blocks and shuffle buffers in row order; with ``read_ahead``
    (see :func:`embedcache.runtime.read_ahead`) the next one is read in a
    background thread while the current one is used.
    """

    def __init__(self, source, labels: np.ndarray, rows: np.ndarray, in_memory: bool):
        self.read_ahead = False
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = labels[self.rows]
        self.n = len(self.rows)
        self.in_memory = in_memory
        self._source = source
        self._data = None  # in memory: the stored dtype (float16 halves the footprint)
        # streamed: the two shuffle buffers, kept between epochs
        self._buffers: list[np.ndarray] = []
        if in_memory:
            everything = source[:]
            whole = self.n == len(everything) and np.array_equal(self.rows, np.arange(self.n))
            self._data = everything if whole else everything[self.rows]

    @property
    def dim(self) -> int:
        """Values per row (the feature dimension)."""
        return int(self._source.shape[1])

    def _read(self, lo: int, hi: int) -> np.ndarray:
        """Features of positions [lo, hi) as float32."""
        if self._data is not None:
            return _f32(self._data[lo:hi])
        r = self.rows[lo:hi]
        block = self._source[int(r[0]) : int(r[-1]) + 1]
        return _f32(block[r - r[0]])

    def _fill(self, spans: list[tuple[int, int]], out: np.ndarray) -> np.ndarray:
        """Features of the position spans, in the stored dtype, read into ``out``; returns the
        filled part.

        Adjacent spans whose rows are consecutive in the file are one read straight
        into ``out`` (no temporary array: fresh memory costs page faults, as much as
        the read itself here); rows with gaps are read one block at a time.
        """
        at = 0
        for lo, hi in _runs(spans):
            r0, r1 = int(self.rows[lo]), int(self.rows[hi - 1]) + 1
            if r1 - r0 == hi - lo and hasattr(self._source, "read_direct"):
                self._source.read_direct(out, np.s_[r0:r1], np.s_[at : at + hi - lo])
            else:
                for a in range(lo, hi, BLOCK_ROWS):
                    r = self.rows[a : min(hi, a + BLOCK_ROWS)]
                    block = self._source[int(r[0]) : int(r[-1]) + 1]
                    out[at + a - lo : at + a - lo + len(r)] = block[r - r[0]]
            at += hi - lo
        return out[:at]

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Features of the given positions, in that order, as float32 (one sorted read from the
        source)."""
        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        if self._data is not None:
            return _f32(self._data[np.asarray(positions, dtype=np.int64)])
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self._source.shape[1:]), self._source.dtype)
        if len(rows):
            out[order] = self._source[rows[order]]  # h5py reads increasing indices
        return _f32(out)

    def subset(self, positions: np.ndarray) -> Rows:
        """The rows at increasing ``positions`` as rows in memory, in the stored dtype.
        Streamed, every block is read once in row order: for positions spread over the whole
        file, where :meth:`take` would read each row apart."""
        positions = np.asarray(positions, dtype=np.int64)
        if self._data is not None:
            x = self._data[positions]
        else:
            x = np.empty((len(positions), self.dim), self._source.dtype)
            for pos, block in self.blocks():
                lo, hi = np.searchsorted(positions, [pos[0], pos[-1] + 1])
                x[lo:hi] = block[positions[lo:hi] - pos[0]]
        return Rows(x, self.labels[positions], np.arange(len(positions)), in_memory=True)

    def blocks(self):
        """(positions, features) in order, BLOCK_ROWS at a time (streamed: one block read ahead)."""
        spans = [(lo, min(self.n, lo + BLOCK_ROWS)) for lo in range(0, self.n, BLOCK_ROWS)]
        if self._data is not None:
            for lo, hi in spans:
                yield np.arange(lo, hi), self._read(lo, hi)
            return
        shape, dtype = self._source.shape[1:], self._source.dtype
        fresh = lambda s: self._fill([s], np.empty((s[1] - s[0], *shape), dtype))  # noqa: E731
        reads = _read_ahead(spans, fresh, self.read_ahead)
        try:  # the thread only reads: torch's conversion stays here, off a second thread pool
            for (lo, hi), x in zip(spans, reads, strict=True):
                yield np.arange(lo, hi), _f32(x)
        finally:
            reads.close()

    def _shuffle_groups(self, rng: np.random.Generator) -> list[list[tuple[int, int]]]:
        """Random blocks, SHUFFLE_ROWS of them at a time, each group's spans in increasing order."""
        starts = np.arange(0, self.n, BLOCK_ROWS)
        order = rng.permutation(len(starts))
        per_buffer = max(1, SHUFFLE_ROWS // BLOCK_ROWS)
        return [
            [
                (int(starts[g]), min(self.n, int(starts[g]) + BLOCK_ROWS))
                for g in np.sort(order[i : i + per_buffer])
            ]
            for i in range(0, len(order), per_buffer)
        ]

    def batches(self, batch_size: int, rng: np.random.Generator):
        """Shuffled (features, labels) batches: random blocks, shuffled within SHUFFLE_ROWS.

        Streaming reads each group of blocks once, in row order, into one of two
        reusable buffers in the stored dtype (the next group while this one's
        batches train); in memory the same rows are gathered directly. Either
        way a batch is gathered in the stored dtype, then made float32, so the
        batches are the same arrays.
        """
        groups = self._shuffle_groups(rng)
        if self._data is not None:
            for spans in groups:
                pos = np.concatenate([np.arange(lo, hi) for lo, hi in spans])
                for take in _chunks(rng.permutation(len(pos)), batch_size):
                    yield _f32(self._data[pos[take]]), self.labels[pos[take]]
            return
        buffers, self._buffers = self._buffers or self._new_buffers(), []  # lent to this pass only
        jobs = list(enumerate(groups))
        reads = _read_ahead(
            jobs, lambda job: self._fill(job[1], buffers[job[0] % 2]), self.read_ahead
        )
        try:
            for (_, spans), buffer in zip(jobs, reads, strict=True):
                pos = np.concatenate([np.arange(lo, hi) for lo, hi in spans])
                for take in _chunks(rng.permutation(len(pos)), batch_size):
                    yield _f32(buffer[take]), self.labels[pos[take]]
        finally:
            reads.close()  # the reader stops before its buffers are handed back
            self._buffers = buffers

    def balanced_batches(self, batch_size: int, rng: np.random.Generator):
        """(features, labels) batches of n images drawn with replacement, each with probability
        1 / its class's count: every class as often, a rare class's images repeated
        (--sampler balanced). Streamed rows are read per batch, in row order."""
        counts = np.bincount(self.labels, minlength=int(self.labels.max()) + 1)
        p = 1.0 / counts[self.labels]
        drawn = rng.choice(self.n, size=self.n, p=p / p.sum())
        for take in _chunks(np.arange(self.n), batch_size):
            pos = drawn[take]
            x = _f32(self._data[pos]) if self._data is not None else self.take(pos)
            yield x, self.labels[pos]

    def _new_buffers(self) -> list[np.ndarray]:
        """Two shuffle buffers of the stored dtype (one being trained on, one being read)."""
        rows = min(self.n, max(1, SHUFFLE_ROWS // BLOCK_ROWS) * BLOCK_ROWS)
        return [np.empty((rows, *self._source.shape[1:]), self._source.dtype) for _ in range(2)]

    def all(self) -> np.ndarray:
        """All features as float32 (only for the references that need them in memory)."""
        return np.concatenate([x for _, x in self.blocks()])


class ViewRows(Rows):
    """Training rows, in memory, that show one stored picture of each image per epoch: the
    plain features or one of the image's views, drawn uniformly by :meth:`pick`.

    views : (n_source, V, D) stored views of the source rows; counts : (n_source,) how many
    of them each row has (default: all V; 0 for the val rows a refit joins, see :func:`join_rows`).
    """

    def __init__(self, source, views, labels: np.ndarray, rows: np.ndarray, counts=None):
        super().__init__(source, labels, rows, in_memory=True)
        self._plain = self._data
        self._views = np.asarray(views[:])[self.rows] if len(self.rows) else np.asarray(views[:0])
        full = np.full(len(labels), self._views.shape[1], np.int64)
        self.counts = (full if counts is None else np.asarray(counts, np.int64))[self.rows]

    def pick(self, rng: np.random.Generator) -> None:
        """Draw this epoch's picture of every row: 0 the plain features, k the k-th view."""
        choice = np.floor(rng.random(self.n) * (self.counts + 1)).astype(np.int64)
        data = self._plain.copy()
        viewed = np.flatnonzero(choice > 0)
        data[viewed] = self._views[viewed, choice[viewed] - 1]
        self._data = data


def join_rows(a: Rows, val: Rows) -> Rows:
    """The rows of ``a`` then the (plain) rows of ``val`` as one in-memory set, for a refit on
    train + val; when ``a`` draws views, the val rows have none to draw (count 0)."""
    if not (a.in_memory and val.in_memory):
        raise EmbedcacheError("--refit needs the features in memory; raise --max-memory")
    plain = np.concatenate([a._plain if isinstance(a, ViewRows) else a._data, val._data])
    labels = np.concatenate([a.labels, val.labels])
    rows = np.arange(len(labels))
    if not isinstance(a, ViewRows):
        return Rows(plain, labels, rows, in_memory=True)
    none = np.zeros((val.n, *a._views.shape[1:]), a._views.dtype)  # padding, never drawn
    counts = np.r_[a.counts, np.zeros(val.n, np.int64)]
    return ViewRows(plain, np.concatenate([a._views, none]), labels, rows, counts)


def _runs(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Increasing spans [(lo, hi), ...] with touching neighbours joined."""
    out: list[tuple[int, int]] = []
    for lo, hi in spans:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _chunks(a: np.ndarray, size: int) -> list[np.ndarray]:
    return [a[lo : lo + size] for lo in range(0, len(a), size)]
