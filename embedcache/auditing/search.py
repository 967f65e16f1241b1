"""Exact cosine k-nearest-neighbour search over cached features, in blocks of bounded memory.

Every row is compared with every other (no index, no approximation): a query block of
``QUERY_ROWS`` rows against key blocks of ``KEY_ROWS`` rows, one matmul each, the best ``k``
kept per row as the key blocks go by. Memory: the unit-length features in their stored dtype
(N x D x 2 bytes for float16) plus one float32 similarity block (QUERY_ROWS x KEY_ROWS x 4 =
256 MiB) and the float32 copies of the two blocks. Time: N^2 x D multiply-adds
(benchmarks/results/audit_scale_cpu.md).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

QUERY_ROWS = 2048
KEY_ROWS = 32768
NORM_ROWS = 65536  # rows normalised at a time


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
    unit: np.ndarray, *, k: int, device: torch.device, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar other rows of every row, by cosine similarity, exactly.

    unit : ndarray of shape (n, d), float16 or float32, rows of unit length (:func:`unit_rows`)
    Returns (index, similarity): int64 and float32 ndarrays of shape (n, min(k, n - 1)), each
    row's neighbours by decreasing similarity.
    """
    n = len(unit)
    k = max(0, min(k, n - 1))
    index = np.zeros((n, k), np.int64)
    sims = np.zeros((n, k), np.float32)
    if k == 0:
        return index, sims
    x = torch.from_numpy(unit).to(device)
    bar = tqdm(total=n, desc="neighbours", unit="row", disable=not progress, dynamic_ncols=True)
    with torch.inference_mode(), bar:
        for q0 in range(0, n, QUERY_ROWS):
            q1 = min(n, q0 + QUERY_ROWS)
            s, i = _query_block(x, q0, q1, k)
            sims[q0:q1], index[q0:q1] = s.cpu().numpy(), i.cpu().numpy()
            bar.update(q1 - q0)
    return index, sims


def _query_block(x: torch.Tensor, q0: int, q1: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` (similarity, index) of rows q0..q1 against every other row of ``x``."""
    q = x[q0:q1].float()
    rows = torch.arange(q0, q1, device=x.device)
    best_s = torch.full((q1 - q0, k), -float("inf"), device=x.device)
    best_i = torch.zeros((q1 - q0, k), dtype=torch.int64, device=x.device)
    for k0 in range(0, len(x), KEY_ROWS):
        keys = x[k0 : k0 + KEY_ROWS].float()
        s = q @ keys.T
        if k0 < q1 and q0 < k0 + len(keys):  # the block holds the queries themselves
            mine = (rows >= k0) & (rows < k0 + len(keys))
            s[mine.nonzero().squeeze(1), rows[mine] - k0] = -float("inf")
        top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
        merged_s = torch.cat([best_s, top_s], dim=1)
        merged_i = torch.cat([best_i, top_i + k0], dim=1)
        best_s, pick = merged_s.topk(k, dim=1)
        best_i = merged_i.gather(1, pick)
    return best_s, best_i
