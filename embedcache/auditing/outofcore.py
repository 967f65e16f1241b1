"""Re-scoring the index's candidates exactly when the rows stay on disk (:class:`.rows.DiskRows`).

In memory each row's candidates are gathered from the unit rows and their similarities computed
in float32 (:func:`.index._best`). Past memory the rows are taken CHUNK_ROWS at a time in file
order: the chunk is read, its candidates found through the index, and then the file is read
once from start to end, KEY_ROWS rows at a time, each block scoring the pairs whose candidate
it holds (the pairs sorted by candidate once per chunk). So N rows cost N / CHUNK_ROWS + 1
passes of the file, and memory holds one chunk with its candidates (about 4.5 KB a row) besides
the neighbours found. The similarities are the in-memory search's: float32 dot products of the
same unit rows.
"""

from __future__ import annotations

import numpy as np
import torch

from ..feed import _read_ahead
from .search import _rows, best_of_blocks

CHUNK_ROWS = 1 << 20  # query rows re-scored per pass of the file (2.7 GB of 1280-d float16)
KEY_ROWS = 65536  # rows of the file read at a time in a pass
# pairs scored at a time: two float32 (PAIRS, D) gathers, 2.6 MB each at 1280, which stay in the
# processor's cache between the gather, the product and the sum; 1.76x faster than 16,384 on
# 65,536 x 120 pairs (benchmarks/results/probe_rescore_pairs.md)
PAIRS = 512


def rescored(unit, q: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """float32 (len(q), c): each row of ``q`` (unit rows, as ``unit`` gives them) dotted with
    its candidates ``cand`` (len(q), c) (rows of ``unit``; -1: none, -inf), in one pass over
    the blocks of ``unit`` that hold a candidate (read one ahead in a thread)."""
    flat = cand.reshape(-1)
    order = np.argsort(flat, kind="stable")
    ids = flat[order]
    out = np.full(len(flat), -np.inf, np.float32)
    starts = np.arange(0, len(unit), KEY_ROWS)
    bounds = np.searchsorted(ids, np.append(starts, len(unit)))
    jobs = [(lo, bounds[i], bounds[i + 1]) for i, lo in enumerate(starts.tolist())]
    jobs = [job for job in jobs if job[1] < job[2]]  # the blocks some candidate is in

    def read(job):
        lo = job[0]
        return job, torch.from_numpy(unit[lo : min(len(unit), lo + KEY_ROWS)])

    queries, width = torch.from_numpy(q), cand.shape[1]
    pairs = _Pairs(min(PAIRS, max(1, len(flat))), q.shape[1], queries.dtype)
    for (lo, a, b), keys in _read_ahead(jobs, read, threaded=True):
        for p0 in range(a, b, PAIRS):
            where = order[p0 : min(b, p0 + PAIRS)]
            k = torch.from_numpy(ids[p0 : p0 + len(where)] - lo)
            out[where] = pairs.dots(keys, k, queries, torch.from_numpy(where // width)).numpy()
    return out.reshape(cand.shape)


class _Pairs:
    """Buffers for the dot products of up to ``size`` pairs of rows, made once: a fresh
    84 MB block per step is mapped and faulted in anew (past glibc's mmap threshold), which
    made a step of gathers and products 4x slower here."""

    def __init__(self, size: int, dim: int, dtype: torch.dtype):
        self.stored = [torch.empty((size, dim), dtype=dtype) for _ in range(2)]
        self.wide = [torch.empty((size, dim)) for _ in range(2)]
        self.sums = torch.empty(size)

    def dots(self, a: torch.Tensor, ia: torch.Tensor, b: torch.Tensor, ib: torch.Tensor):
        """float32 (a[ia] * b[ib]).sum(1), a view of a buffer."""
        m = len(ia)
        for side, (x, i) in enumerate(((a, ia), (b, ib))):
            self.wide[side][:m].copy_(_rows(x, i, out=self.stored[side][:m]))
        wide = self.wide
        torch.mul(wide[0][:m], wide[1][:m], out=wide[0][:m])
        return torch.sum(wide[0][:m], 1, out=self.sums[:m])


def best(unit, rows: np.ndarray, k: int, candidates_of, progress: bool = False):
    """The ``k`` best of each row's candidates by float32 similarity, CHUNK_ROWS rows at a
    time, as :func:`.index._best` returns them: (similarity, index) float32 and int32 (int64
    from 2**31 rows) tensors (rows, k).

    candidates_of : (rows, their unit rows) -> (len(rows), c) int rows of ``unit``; -1 or the
        row itself is left out (-inf where fewer than k remain)
    """

    def scored(r):
        contiguous = len(r) and r[-1] - r[0] == len(r) - 1
        q = unit[int(r[0]) : int(r[-1]) + 1] if contiguous else unit[r]
        cand = np.asarray(candidates_of(r, q), np.int64)
        cand = np.where(cand < 0, r[:, None], cand)  # none found: the row itself, left out
        s = torch.from_numpy(rescored(unit, q, cand))
        s.masked_fill_(torch.from_numpy(cand == r[:, None]), -float("inf"))
        return s, torch.from_numpy(cand)

    return best_of_blocks(rows, k, len(unit), CHUNK_ROWS, scored, progress)
