"""Exact cosine k-nearest-neighbour search over cached features, in blocks of bounded memory.

Every row is compared with every other (no index, no approximation): key blocks of ``KEY_ROWS``
rows, each converted once, against query blocks of ``QUERY_ROWS`` rows, one matmul each, the best
candidates kept per row as the blocks go by. Where the hardware computes bf16
(:func:`embedcache.runtime.similarity_dtype`) the matmuls run in bf16 and keep ``k + MARGIN``
candidates per row, which are then re-scored exactly in float32 (a gather of the candidate rows
and a batched dot product): the similarities reported and the neighbour order are float32's,
unless bf16 rounding (about 4e-3 near a similarity of 1) pushed a true neighbour below the
``k + MARGIN`` kept. Memory: the unit-length features in their stored dtype (N x D x 2 bytes
for float16), the candidates (N x (k + MARGIN) x 12 bytes), one similarity block (QUERY_ROWS x
KEY_ROWS x 4 bytes at most) and the converted copies of the two blocks. Time: N^2 x D
multiply-adds (benchmarks/results/audit_scale_exact_cpu.md).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..runtime import similarity_dtype

# bf16 search of 8,192 queries against 32,768 rows, 2 cores: 2048 x 32768 ran within 10% of the
# best of six shapes (1024-8192 x 8192-32768, 73-83 G multiply-adds/s, noise about as large);
# key blocks of 16,384 or 8,192 were 10% slower
QUERY_ROWS = 2048
KEY_ROWS = 32768
NORM_ROWS = 16384  # rows normalised at a time
RESCORE_ROWS = 1024  # rows re-scored at a time: RESCORE_ROWS x (k + MARGIN) x D x 4 bytes,
RESCORE_VALUES = 1 << 20  # or fewer, so that their candidates hold at most this many values
# extra bf16 candidates per row, re-scored in float32: on flowers12 (960 efficientnet_lite0
# features, k 10 and 50) 8 already gave float32's similarity at every rank (the few indices
# that differed were ties); 16 for a safety factor, as each costs a gather of D values per row
MARGIN = 16


def unit_rows(features, *, out: np.ndarray | None = None) -> np.ndarray:
    """``features`` scaled to unit length, in blocks, into ``out`` (default: a new array of
    their dtype; ``out=features`` scales them in place).

    features : array-like of shape (n, d) (an ndarray or a cache's features, read in slices)
    Returns ndarray of shape (n, d); all-zero rows stay zero.
    """
    n, d = features.shape
    out = np.empty((n, d), features.dtype) if out is None else out
    for lo in range(0, n, NORM_ROWS):
        x = torch.from_numpy(np.asarray(features[lo : lo + NORM_ROWS])).float()
        x = torch.nn.functional.normalize(x, dim=1)
        out[lo : lo + len(x)] = x.numpy().astype(out.dtype, copy=False)
    return out


def nearest(
    unit: np.ndarray,
    *,
    k: int,
    device: torch.device,
    progress: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar other rows of every row, by cosine similarity, exactly.

    unit : ndarray of shape (n, d), float16 or float32, rows of unit length (:func:`unit_rows`)
    dtype : of the similarity matmuls, torch.bfloat16 or torch.float32 (default: the device's,
        :func:`embedcache.runtime.similarity_dtype`); bf16 candidates are re-scored in float32
    Returns (index, similarity): int64 and float32 ndarrays of shape (n, min(k, n - 1)), each
    row's neighbours by decreasing similarity.
    """
    n = len(unit)
    k = max(0, min(k, n - 1))
    if k == 0:
        return np.zeros((n, 0), np.int64), np.zeros((n, 0), np.float32)
    dtype = similarity_dtype(device) if dtype is None else dtype
    rescore = dtype != torch.float32
    x = torch.from_numpy(unit).to(device)
    bar = tqdm(total=n, desc="neighbours", unit="row", disable=not progress, dynamic_ncols=True)
    with torch.inference_mode(), bar:
        kept = min(n - 1, k + MARGIN) if rescore else k
        sims, index = candidates(x, kept=kept, dtype=dtype, bar=bar)
        if rescore:
            sims, index = rescored(x, index, k=k)
    return index.cpu().numpy(), sims.cpu().numpy()


def candidates(
    x: torch.Tensor, *, kept: int, dtype: torch.dtype, queries: int | None = None, bar=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``kept`` best (similarity, index) of each of the first ``queries`` rows (default:
    all) against every other row of ``x``, similarities computed in ``dtype``.

    Key blocks go in the outer loop, so each is converted to ``dtype`` once (a query block's
    conversion is 1/16 of a key block's); the best so far of every row is kept meanwhile.
    Returns float32 (queries, kept) similarities and int64 (queries, kept) indices.
    """
    n = len(x) if queries is None else queries
    best_s = torch.full((n, kept), -float("inf"), device=x.device)
    best_i = torch.zeros((n, kept), dtype=torch.int64, device=x.device)
    passes = -(-len(x) // KEY_ROWS)
    for k0 in range(0, len(x), KEY_ROWS):
        keys = x[k0 : k0 + KEY_ROWS].to(dtype)
        for q0 in range(0, n, QUERY_ROWS):
            q1 = min(n, q0 + QUERY_ROWS)
            s, i = _block_best(x[q0:q1].to(dtype), keys, q0, k0, kept)
            merged_s = torch.cat([best_s[q0:q1], s.float()], dim=1)
            merged_i = torch.cat([best_i[q0:q1], i], dim=1)
            best_s[q0:q1], pick = merged_s.topk(kept, dim=1)
            best_i[q0:q1] = merged_i.gather(1, pick)
            if bar is not None:
                bar.update((q1 - q0) / passes)
    return best_s, best_i


def _block_best(
    q: torch.Tensor, keys: torch.Tensor, q0: int, k0: int, kept: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``kept`` (similarity, index) of query rows q0.. against key rows k0.., self excluded."""
    s = q @ keys.T
    q1, k1 = q0 + len(q), k0 + len(keys)
    if k0 < q1 and q0 < k1:  # the block holds the queries themselves
        rows = torch.arange(max(q0, k0), min(q1, k1), device=q.device)
        s[rows - q0, rows - k0] = -float("inf")
    top_s, top_i = s.topk(min(kept, s.shape[1]), dim=1)
    return top_s, top_i + k0


def rescored(
    x: torch.Tensor, index: torch.Tensor, *, k: int, keys: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` of each row's candidate ``index`` (n, c) into ``keys`` (default: ``x``
    itself), by float32 similarity.

    Returns float32 (n, k) similarities and int64 (n, k) indices, by decreasing similarity.
    """
    keys_of = x if keys is None else keys
    sims = torch.empty((len(index), k), device=x.device)
    best = torch.empty((len(index), k), dtype=torch.int64, device=x.device)
    step = max(1, min(RESCORE_ROWS, RESCORE_VALUES // max(1, index.shape[1] * x.shape[1])))
    for r0 in range(0, len(index), step):
        r1 = min(len(index), r0 + step)
        cand = index[r0:r1]
        keys = _rows(keys_of, cand.reshape(-1)).float().view(r1 - r0, cand.shape[1], -1)
        s = torch.bmm(keys, x[r0:r1].float().unsqueeze(2)).squeeze(2)
        sims[r0:r1], pick = s.topk(k, dim=1)
        best[r0:r1] = cand.gather(1, pick)
    return sims, best


def _rows(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x[index]``; on a CPU float16 rows are gathered as int16 (the same bytes), which
    torch's index_select copies faster than float16 or numpy's take does: 16,384 rows' 60
    candidates of 1280 re-scored in 1.20 s against 1.44 s by numpy's take, which was 3.5x
    faster than indexing the float16 rows (random rows of 1,000,000)."""
    # out: a buffer made once (a fresh large block is mapped and faulted in anew)
    if x.device.type == "cpu" and x.dtype == torch.float16:
        into = None if out is None else out.view(torch.int16)
        return torch.index_select(x.view(torch.int16), 0, index, out=into).view(torch.float16)
    if out is not None:
        return torch.index_select(x, 0, index, out=out)
    if x.device.type != "cpu":
        return x[index]
    return torch.from_numpy(np.take(x.numpy(), index.numpy(), axis=0))


def best_of_blocks(rows: np.ndarray, k: int, keys: int, step: int, scored, progress=False):
    """The ``k`` best of each row's candidates, ``step`` rows at a time (their candidates never
    all in memory): (similarity, index) float32 and int32 (int64 from 2**31 ``keys``) tensors
    (rows, k); int32 saves 120 MB at 1,000,000 rows of 30 neighbours.

    scored : (block of rows) -> (similarity, candidate rows) tensors (len(block), c), the row
        itself at -inf (so is a slot with no candidate: -inf where fewer than k remain)
    """
    sims = torch.empty((len(rows), k))
    best = torch.empty((len(rows), k), dtype=torch.int32 if keys < 2**31 else torch.int64)
    bar = tqdm(total=len(rows), desc="neighbours", unit="row", disable=not progress)
    with bar:
        for lo in range(0, len(rows), step):
            r = rows[lo : lo + step]
            s, i = scored(r)
            sims[lo : lo + len(r)], pick = s.topk(k, dim=1)
            best[lo : lo + len(r)] = i.gather(1, pick).to(best.dtype)
            bar.update(len(r))
            del s, i, pick  # before the next block is scored: one block in memory at a time
    return sims, best
