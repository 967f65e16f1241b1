"""Approximate cosine nearest neighbours with faiss, with their recall measured on every run.

Past a few tens of thousands of rows the exact search (:mod:`.search`) costs N^2 x D: 111-349 s
for 100,000 x 1280 rows on 2 cores. Here an inverted-file index (faiss ``IVF{nlist},SQ8``:
a k-means coarse quantiser of ``nlist`` cells, the rows stored as one byte per dimension, half
the memory of the float16 rows beside it) searches each row's ``nprobe`` nearest cells only.
The candidates it returns are re-scored exactly in float32 (:func:`.search.rescored`), so
every similarity reported is exact; only a neighbour the index missed is missing.

Every run checks itself before it searches: the exact neighbours of RECALL_QUERIES seeded rows
against all rows, and the share of them the index finds (recall@k, ties counted as found).
Below the floor it probes twice the cells and checks again, until the floor is met or every
cell is probed; then it searches every row at that setting. An audit of a cache grown since
adds the new rows to the earlier audit's index and searches only them against all (:func:`grown`,
:mod:`.reuse`).

Measured on rows made from grocery81's EfficientNet-Lite0 features with noise, 2 cores, k 30
(benchmarks/results/audit_index_cpu.md): 100,000 rows in 65.9 s against 113.9 s for the exact
search, recall@30 0.991 on the sample and 0.992 over every row; 1,000,000 rows in 650.7 s at
recall@30 0.9999, where exact search would take about 100 x 114 s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import EmbedcacheError
from .search import MARGIN, rescored

RECALL_QUERIES = 1000  # rows whose exact neighbours check each approximate search
FIRST_NPROBE = 8
TRAIN_PER_CELL = 64  # k-means training rows per cell (faiss warns below 39)
ADD_ROWS = 65536  # rows converted to float32 and added, or searched, at a time


@dataclass
class SearchRecord:
    """How an approximate search went, for summary.json."""

    index: str
    rows: int
    nprobe: list[int] = field(default_factory=list)  # each try's cells probed
    recall: list[float] = field(default_factory=list)  # each try's recall@k on the sample
    queries: int = 0
    k: int = 0
    floor: float = 0.95

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "rows": self.rows,
            "recall_at_k": self.recall[-1] if self.recall else None,
            "k": self.k,
            "recall_queries": self.queries,
            "floor": self.floor,
            "tries": [
                {"nprobe": p, "recall_at_k": round(r, 4)}
                for p, r in zip(self.nprobe, self.recall, strict=True)
            ],
        }

    def describe(self) -> str:
        """'faiss IVF1024,SQ8, 8 of 1024 cells probed: recall@10 0.999 on 1,000 rows'."""
        raised = (
            f" (raised from {self.nprobe[0]}: recall {self.recall[0]:.3f} under {self.floor})"
            if len(self.nprobe) > 1
            else ""
        )
        return (
            f"approximate: faiss {self.index}, {self.nprobe[-1]} cells probed{raised}; "
            f"recall@{self.k} {self.recall[-1]:.3f} against exact search on "
            f"{self.queries:,} rows"
        )


def faiss_module():
    """faiss, or a one-line error saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise EmbedcacheError(
            "--index approx needs faiss: pip install 'embedcache[index]' (faiss-cpu), or pass "
            "--index exact"
        ) from None
    return faiss


def cells_for(rows: int) -> int:
    """The coarse quantiser's cells: about 4 x sqrt(rows), a power of two, 16 to 65536.

    Training costs cells^2 x 64 x D per k-means iteration; a search compares each row with
    rows / cells x nprobe others. On 1,000,000 rows 4096 cells took 658 s in all; 1024 cells
    (trained on 40 rows a cell, 10 iterations) ran past 13 minutes before it was stopped: the
    search, four times the rows per probe, cost more than the k-means saved."""
    return int(2 ** np.clip(round(np.log2(4 * np.sqrt(max(rows, 1)))), 4, 16))


def _float32(unit: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return np.ascontiguousarray(unit[lo:hi], dtype=np.float32)


def build(unit: np.ndarray, *, seed: int = 0, progress: bool = False):
    """An IVF index of ``unit`` (n, d) unit rows (float16 or float32), trained on a seeded
    sample of them."""
    faiss = faiss_module()
    n, d = unit.shape
    nlist = min(cells_for(n), max(1, n // TRAIN_PER_CELL))
    quantiser = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFScalarQuantizer(
        quantiser, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, TRAIN_PER_CELL * nlist), replace=False))
    index.train(np.ascontiguousarray(unit[sample], dtype=np.float32))
    bar = tqdm(total=n, desc="index", unit="row", disable=not progress, dynamic_ncols=True)
    with bar:
        for lo in range(0, n, ADD_ROWS):
            index.add(_float32(unit, lo, min(n, lo + ADD_ROWS)))
            bar.update(min(n, lo + ADD_ROWS) - lo)
    return index


def _search(index, unit, rows, kept: int, progress: bool, *, ids=None, params=None):
    """The ``kept`` candidates (index) of each row of ``rows`` (default: all), self removed;
    ``ids`` maps the index's ids to rows (default: the same), ``params`` faiss's search
    parameters (a selector of ids)."""
    n = len(unit)
    rows = np.arange(n) if rows is None else rows
    out = np.empty((len(rows), kept), np.int64)
    bar = tqdm(total=len(rows), desc="neighbours", unit="row", disable=not progress)
    with bar:
        for lo in range(0, len(rows), ADD_ROWS):
            r = rows[lo : lo + ADD_ROWS]
            q = np.ascontiguousarray(unit[r], dtype=np.float32)
            _, found = index.search(q, kept + 1, params=params)
            if ids is not None:
                found = np.where(found >= 0, ids[found], -1)
            out[lo : lo + len(r)] = _without_self(found, r, kept)
            bar.update(len(r))
    return out


def _without_self(found: np.ndarray, rows: np.ndarray, kept: int) -> np.ndarray:
    """Each row's ``kept`` first candidates other than itself; a slot faiss left empty (-1,
    fewer rows in the probed cells) points at the row itself, re-scored last."""
    own = found == rows[:, None]
    # drop the row itself where found, else the last candidate
    drop = np.where(own.any(1), own.argmax(1), found.shape[1] - 1)
    keep = np.ones_like(found, dtype=bool)
    keep[np.arange(len(found)), drop] = False
    out = found[keep].reshape(len(found), kept)
    return np.where(out < 0, rows[:, None], out)


def exact_sample(x: torch.Tensor, rows: np.ndarray, k: int) -> torch.Tensor:
    """The exact ``k`` best similarities of ``rows`` against every other row of ``x``
    (float32, in key blocks): what recall is measured against."""
    q = x[torch.from_numpy(rows)].float()
    best = torch.full((len(rows), k), -float("inf"))
    for k0 in range(0, len(x), ADD_ROWS):
        s = q @ x[k0 : k0 + ADD_ROWS].float().T
        own = (rows >= k0) & (rows < k0 + ADD_ROWS)
        s[torch.from_numpy(np.flatnonzero(own)), torch.from_numpy(rows[own] - k0)] = -2.0
        best = torch.cat([best, s], 1).topk(k, dim=1).values
    return best


def recall_at_k(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Share of the exact k best similarities matched by the found ones (sorted, row by row):
    a tie between copies counts as found whichever copy was returned."""
    k = exact.shape[1]
    hit = found[:, :k] >= exact[:, k - 1 : k] - 1e-6
    return float(hit.float().sum(1).clamp(max=k).mean() / k)


def approximate(
    unit: np.ndarray,
    *,
    k: int,
    floor: float = 0.95,
    seed: int = 0,
    progress: bool = False,
    index=None,
) -> tuple[np.ndarray, np.ndarray, SearchRecord]:
    """The ``k`` most similar other rows of every row, through an IVF index (``index``, default:
    :func:`build` of ``unit``), re-scored exactly; the cells probed doubled until recall@k on a
    seeded sample reaches ``floor``.

    Returns (index, similarity) as :func:`.search.nearest` does, and the search's record.
    """
    n = len(unit)
    k = max(0, min(k, n - 1))
    index = build(unit, seed=seed, progress=progress) if index is None else index
    record = SearchRecord(f"IVF{index.nlist},SQ8", n, k=k, floor=floor)
    x = torch.from_numpy(unit)
    kept = min(n - 1, k + MARGIN)

    def found(rows, progress):
        cand = torch.from_numpy(_search(index, unit, rows, kept, progress))
        return rescored(x if rows is None else x[torch.from_numpy(rows)], cand, k=k, keys=x)

    _tuned(index, x, record, seed, found)
    sims, best = found(None, progress)
    return best.numpy(), sims.numpy(), record


def _tuned(index, x: torch.Tensor, record: SearchRecord, seed: int, found) -> None:
    """Set ``index.nprobe``: doubled from FIRST_NPROBE until the recall@k of RECALL_QUERIES
    seeded rows reaches the record's floor or every cell is probed; each try in ``record``.

    found : (rows, progress) -> (similarity, index) of those rows' k best at the index's nprobe
    """
    n, k = len(x), record.k
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, RECALL_QUERIES), replace=False))
    exact = exact_sample(x, sample, k)
    record.queries = len(sample)
    nprobe = min(FIRST_NPROBE, index.nlist)
    while True:
        index.nprobe = nprobe
        sims, _ = found(sample, False)
        record.nprobe.append(nprobe)
        record.recall.append(recall_at_k(sims, exact))
        if record.recall[-1] >= record.floor or nprobe >= index.nlist:
            return
        nprobe = min(index.nlist, nprobe * 2)


def grown(
    index, unit: np.ndarray, ids: np.ndarray, stored, *, k: int, floor=0.95, seed=0, progress=False
):
    """:func:`approximate` through an index filled earlier (no k-means): the rows of ``unit``
    it lacks are added under the ids that follow, and searched against all.

    index : a faiss IVF of :func:`build` whose ids 0.. are the rows ``ids`` (int64) of ``unit``
    stored : (n, s) int64, the old rows' earlier neighbours (rows; -1 on the new rows), merged
        with the new rows found for them; None: the old rows searched again like the new
    Returns (index, similarity, record) as :func:`approximate` does, the rows of every id, and
    whether the stored neighbours were kept (not where they held recall under the floor).
    """
    faiss = faiss_module()
    n, old = len(unit), index.ntotal
    k, new = max(0, min(k, n - 1)), np.setdiff1d(np.arange(n), ids)
    for lo in range(0, len(new), ADD_ROWS):
        index.add(_float32(unit[new[lo : lo + ADD_ROWS]], 0, ADD_ROWS))
    ids = np.concatenate([ids, new]).astype(np.int64)
    again = np.ones(n, bool) if stored is None else np.isin(np.arange(n), new)
    record = SearchRecord(f"IVF{index.nlist},SQ8", n, k=k, floor=floor)
    x, kept = torch.from_numpy(unit), min(n - 1, k + MARGIN)
    newer = faiss.IDSelectorRange(old, index.ntotal)  # kept alive while params points at it
    only_new = faiss.SearchParametersIVF(sel=newer)

    def found(rows, progress):
        rows = np.arange(n) if rows is None else rows
        fresh, width = again[rows], kept + (0 if stored is None else stored.shape[1])
        cand = np.full((len(rows), width), -1, np.int64)
        cand[fresh, :kept] = _search(index, unit, rows[fresh], kept, progress, ids=ids)
        if stored is not None and not fresh.all():
            only_new.nprobe = index.nprobe
            rest = rows[~fresh]
            cand[~fresh, :kept] = _search(index, unit, rest, kept, False, ids=ids, params=only_new)
            cand[~fresh, kept:] = stored[rest]
        return _best(x, rows, cand, k)

    _tuned(index, x, record, seed, found)
    if stored is not None and record.recall[-1] < record.floor:
        # the old rows' stored neighbours are only as good as the earlier search: search them too
        stored, again = None, np.ones(n, bool)
        record.nprobe.clear(), record.recall.clear()
        _tuned(index, x, record, seed, found)
    sims, best = found(None, progress)
    return best.numpy(), sims.numpy(), record, ids, stored is not None


def _best(x: torch.Tensor, rows: np.ndarray, cand: np.ndarray, k: int):
    """The ``k`` best of each row's candidates (rows, c) by float32 similarity, a candidate
    of -1 or the row itself left out: (similarity, index) float32 and int64 (rows, k)."""
    sims = torch.empty((len(rows), k))
    best = torch.empty((len(rows), k), dtype=torch.int64)
    for lo in range(0, len(rows), ADD_ROWS):
        r, c = rows[lo : lo + ADD_ROWS], cand[lo : lo + ADD_ROWS]
        c = torch.from_numpy(np.where(c < 0, r[:, None], c))
        s, i = rescored(x[torch.from_numpy(r)], c, k=c.shape[1], keys=x)
        s = s.masked_fill(i == torch.from_numpy(r)[:, None], -float("inf"))
        sims[lo : lo + len(r)], pick = s.topk(k, dim=1)
        best[lo : lo + len(r)] = i.gather(1, pick)
    return sims, best
