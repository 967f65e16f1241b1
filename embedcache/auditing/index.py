"""Approximate cosine nearest neighbours with faiss, with their recall measured on every run.

Past a few tens of thousands of rows the exact search (:mod:`.search`) costs N^2 x D: 111-349 s
for 100,000 x 1280 rows on 2 cores. Here an inverted-file index searches each row's ``nprobe``
nearest cells only: rows wider than PCA_DIMS are projected on their first PCA_DIMS principal
components (faiss ``PCA256,IVF{nlist},SQ8``: a k-means coarse quantiser of ``nlist`` cells over
the projections, stored at one byte per dimension; from HNSW_CELLS cells the nearest cells are
found through an HNSW graph of the centroids and the rows stored as 4-bit PQ codes scanned
with SIMD lookup tables, ``IVF{nlist}_HNSW32,PQ128x4fs``: :func:`_empty`). The candidates it
returns, about twice the neighbours asked for, are re-scored exactly in float32 on the whole
rows (:func:`.search.rescored`), so every similarity reported is exact; only a neighbour the
index missed is missing.

Every run checks itself before it searches: the exact neighbours of RECALL_QUERIES seeded rows
against all rows, and the share of them the index finds (recall@k, ties counted as found, at
the ``checked`` first neighbours; the recall of all of them is recorded beside). Below the
floor it probes twice the cells, re-scores twice the candidates and checks again, until the
floor is met or every cell is probed; then it searches every row at that setting. An audit of
a cache grown since adds the new rows to the earlier audit's index and searches only them
against all (:func:`grown`, :mod:`.reuse`).

Measured in whole audits on 2 cores, rows made from grocery81's EfficientNet-Lite0 features
with noise (benchmarks/results/audit_scale_cpu.md): the search of 100,000 rows took 17.4 s at
recall@10 0.987 (recall@30 0.917), against 89.3 s for the exact search and its findings; of
1,000,000 rows 223.1 s at recall@10 0.985, where exact search would take about 100 x as long.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import EmbedcacheError
from ..runtime import returning_memory
from . import outofcore
from .search import MARGIN, best_of_blocks, rescored

RECALL_QUERIES = 1000  # rows whose exact neighbours check each approximate search
FIRST_NPROBE = 8
TRAIN_PER_CELL = 40  # k-means training rows per cell (faiss warns below 39)
ADD_ROWS = 16384  # rows converted to float32 and added to the index at a time
# rows searched and re-scored at a time: each holds about 10 KB a row (its float32 and projected
# copies, its candidates' similarities), 170 MB of a 1,000,000-row audit's peak at 16,384
SEARCH_ROWS = 4096
# wider rows are indexed by their first PCA_DIMS principal components, and the candidates found
# re-scored on the whole rows: on 1000 grocery81 EfficientNet-Lite0 features (1280-d) 128
# components held 81% of the variance, 256 held 89%, and the exact top 10 of the projection
# re-scored held 99.0% and 99.7% of the whole rows' exact top 10 (83.4% and 87.3% unscored)
PCA_DIMS = 256
PCA_SAMPLE = 65536  # rows the projection is fitted on
MAX_CANDIDATES = 512  # candidates re-scored per row, at most, however far recall is raised
# from HNSW_CELLS cells the coarse quantiser is an HNSW graph of the k-means centroids (each
# HNSW_M links), not a flat scan of all of them: side by side on 16,384 centroids of
# audit_scale's rows the graph at HNSW_EF found the cells 2.52x faster and 99.94% of the flat
# scan's top 16 (benchmarks/results/probe_hnsw_quantiser.md); 10,000,000 rows filled the index
# in 6 min through it, 12 min through the flat scan (two runs: audit_scale_10m_cpu.md). A
# search's cost is the scan of the probed cells, not this lookup.
HNSW_CELLS = 8192
HNSW_M = 32
HNSW_EF = 64  # the graph's search breadth, at least twice the cells probed


@dataclass
class SearchRecord:
    """How an approximate search went, for summary.json."""

    index: str
    rows: int
    nprobe: list[int] = field(default_factory=list)  # each try's cells probed
    candidates: list[int] = field(default_factory=list)  # each try's candidates re-scored per row
    recall: list[float] = field(default_factory=list)  # each try's recall@k on the sample
    queries: int = 0
    k: int = 0  # the neighbours the floor holds: each row's first k (recall@k)
    floor: float = 0.95
    depth: int = 0  # the neighbours searched, k or more
    recall_at_depth: float | None = None  # the last try's recall of all of them

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "rows": self.rows,
            "recall_at_k": self.recall[-1] if self.recall else None,
            "k": self.k,
            "depth": self.depth,
            "recall_at_depth": self.recall_at_depth,
            "recall_queries": self.queries,
            "floor": self.floor,
            "tries": [
                {"nprobe": p, "candidates": c, "recall_at_k": round(r, 4)}
                for p, c, r in zip(self.nprobe, self.candidates, self.recall, strict=True)
            ],
        }

    def describe(self) -> str:
        """'approximate: faiss PCA256,IVF1024,SQ8, 8 cells probed, 60 candidates re-scored;
        recall@30 0.985 against exact search on 1,000 rows'."""
        deeper = (
            f" (recall@{self.depth} {self.recall_at_depth:.3f})"
            if self.depth > self.k and self.recall_at_depth is not None
            else ""
        )
        raised = (
            f" (raised from {self.nprobe[0]} and {self.candidates[0]}: recall "
            f"{self.recall[0]:.3f} under {self.floor})"
            if len(self.nprobe) > 1
            else ""
        )
        return (
            f"approximate: faiss {self.index}, {self.nprobe[-1]} cells probed, "
            f"{self.candidates[-1]} candidates re-scored{raised}; "
            f"recall@{self.k} {self.recall[-1]:.3f}{deeper} against exact search on "
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


def parts(index):
    """(the PCA projection or None, the IVF index) of an index of :func:`build`; an earlier
    audit's index without a projection is the IVF itself."""
    faiss = faiss_module()
    if isinstance(index, faiss.IndexPreTransform):
        pca = faiss.downcast_VectorTransform(index.chain.at(0))
        return pca, faiss.downcast_index(index.index)
    return None, index


def name(index) -> str:
    """'PCA256,IVF4096,SQ8' or 'PCA256,IVF16384_HNSW32,PQ128x4fs': the index in faiss's
    factory words."""
    pca, ivf = parts(index)
    graph = _graph(ivf)
    coarse = f"IVF{ivf.nlist}" + (f"_HNSW{graph.nb_neighbors(1)}" if graph is not None else "")
    fast = isinstance(ivf, faiss_module().IndexIVFPQFastScan)
    codes = f"PQ{ivf.pq.M}x{ivf.pq.nbits}fs" if fast else "SQ8"
    return f"{f'PCA{pca.d_out},' if pca is not None else ''}{coarse},{codes}"


def _graph(ivf):
    """The IVF's coarse quantiser's HNSW graph, or None where the quantiser is flat."""
    faiss = faiss_module()
    quantizer = faiss.downcast_index(ivf.quantizer)
    return quantizer.hnsw if isinstance(quantizer, faiss.IndexHNSW) else None


def probe(ivf, nprobe: int) -> None:
    """Search ``nprobe`` cells of the IVF: its graph, where it has one, searched at least twice
    as broadly (an HNSW search finds fewer good cells than its breadth)."""
    ivf.nprobe = nprobe
    graph = _graph(ivf)
    if graph is not None:
        graph.efSearch = max(HNSW_EF, 2 * nprobe)


def _projected(pca, unit: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``unit[rows]`` in float32, through ``pca`` where there is one, ADD_ROWS at a time."""
    width = unit.shape[1] if pca is None else pca.d_out
    out = np.empty((len(rows), width), np.float32)
    for lo in range(0, len(rows), ADD_ROWS):
        block = np.ascontiguousarray(unit[rows[lo : lo + ADD_ROWS]], dtype=np.float32)
        out[lo : lo + len(block)] = block if pca is None else pca.apply(block)
    return out


def _pca(faiss, unit: np.ndarray, rows: np.ndarray):
    """faiss's PCAMatrix onto the first PCA_DIMS principal components of ``unit[rows]``, its
    covariance summed ADD_ROWS rows at a time (float64): faiss's own training holds the rows in
    float32 twice, 670 MB for 65,536 rows of 1280, the peak of a 1,000,000-row audit."""
    d = unit.shape[1]
    total, outer = np.zeros(d), np.zeros((d, d))
    for lo in range(0, len(rows), ADD_ROWS):
        block = np.ascontiguousarray(unit[rows[lo : lo + ADD_ROWS]], dtype=np.float32)
        total += block.sum(0, dtype=np.float64)
        outer += block.T @ block  # float32 products of one block, summed in float64
    mean = total / len(rows)
    values, vectors = np.linalg.eigh(outer / len(rows) - np.outer(mean, mean))
    pca = faiss.PCAMatrix(d, PCA_DIMS)
    faiss.copy_array_to_vector(mean.astype(np.float32), pca.mean)
    faiss.copy_array_to_vector(values[::-1].astype(np.float32), pca.eigenvalues)
    # PCAMat: the components as rows, the largest first, as faiss's train leaves it
    components = np.ascontiguousarray(vectors[:, ::-1].T, dtype=np.float32)
    faiss.copy_array_to_vector(components.ravel(), pca.PCAMat)
    pca.is_trained = True
    pca.prepare_Ab()
    return pca


def build(unit, *, seed: int = 0, progress: bool = False):
    """An IVF index of ``unit`` (n, d) unit rows (float16 or float32; an ndarray or
    :class:`.rows.DiskRows`), trained on a seeded sample of them; rows wider than PCA_DIMS are
    indexed by their first PCA_DIMS principal components (the projection fitted on PCA_SAMPLE
    of the sample). Rows on disk: the sample is read once, in one pass."""
    faiss = faiss_module()
    n, d = unit.shape
    nlist = min(cells_for(n), max(1, n // TRAIN_PER_CELL))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, TRAIN_PER_CELL * nlist), replace=False))
    source, at = (unit, sample) if isinstance(unit, np.ndarray) else (unit[sample], None)
    at = np.arange(len(sample)) if at is None else at
    pca = None
    if d > PCA_DIMS:
        fit_on = np.sort(rng.choice(len(sample), size=min(len(sample), PCA_SAMPLE), replace=False))
        pca = _pca(faiss, source, at[fit_on])
    dims = d if pca is None else PCA_DIMS
    ivf, assign = _empty(faiss, dims, nlist)  # assign: kept alive while the ivf points at it
    ivf.train(_projected(pca, source, at))
    ivf.clustering_index = None  # the k-means's graph (assign) freed after this function
    del source  # the sample read from disk
    index = ivf if pca is None else faiss.IndexPreTransform(pca, ivf)
    bar = tqdm(total=n, desc="index", unit="row", disable=not progress, dynamic_ncols=True)
    with bar:
        for lo in range(0, n, ADD_ROWS):
            index.add(_float32(unit, lo, min(n, lo + ADD_ROWS)))
            bar.update(min(n, lo + ADD_ROWS) - lo)
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer):  # fast-scan lists grow in blocks
        with returning_memory():  # the old lists' pages back to the kernel
            _compact(faiss, ivf)
    return index


def _empty(faiss, dims: int, nlist: int):
    """An untrained IVF of ``nlist`` cells over ``dims``-d rows, and the index its k-means
    assigns rows through (None: a flat scan of the centroids).

    Below HNSW_CELLS: a flat coarse quantiser, codes of one byte a dimension (SQ8). From it:
    the cells found through an HNSW graph of the centroids (the k-means's assignments too, a
    graph rebuilt each iteration), and the rows stored as 4-bit product-quantised codes of two
    dimensions each, scanned with SIMD lookup tables (``PQ{dims/2}x4fs``: 64 bytes a row of
    256, a quarter of SQ8's)."""
    if nlist < HNSW_CELLS or dims % 2:
        quantizer = faiss.IndexFlatL2(dims)
        sq8 = faiss.ScalarQuantizer.QT_8bit
        return faiss.IndexIVFScalarQuantizer(quantizer, dims, nlist, sq8, faiss.METRIC_L2), None
    quantizer = faiss.IndexHNSWFlat(dims, HNSW_M)
    ivf = faiss.IndexIVFPQFastScan(quantizer, dims, nlist, dims // 2, 4, faiss.METRIC_L2)
    ivf.quantizer_trains_alone = 2  # the k-means alone; its centroids then linked in the graph
    assign = faiss.IndexHNSWFlat(dims, HNSW_M)
    assign.hnsw.efSearch = HNSW_EF
    ivf.clustering_index = assign
    return ivf, assign


def _compact(faiss, ivf) -> None:
    """Each of the IVF's inverted lists copied into one of its exact size: grown a block of
    rows at a time, the lists held 108 MiB past their 252 MiB of codes and ids at 1,000,000
    rows (their capacities double as they grow)."""
    old = ivf.invlists
    new = faiss.ArrayInvertedLists(old.nlist, old.code_size)
    for cell in range(old.nlist):
        size = old.list_size(cell)
        if size:
            new.add_entries(cell, size, old.get_ids(cell), old.get_codes(cell))
    ivf.replace_invlists(new, True)  # the old lists freed
    new.this.disown()  # the index owns the new ones


def _search(index, unit, rows, kept: int, *, ids=None, params=None) -> np.ndarray:
    """The ``kept`` candidates (index) of each of ``rows``, self removed; ``ids`` maps the
    index's ids to rows (default: the same), ``params`` faiss's search parameters (a selector
    of ids)."""
    pca, ivf = parts(index)
    _, found = ivf.search(_projected(pca, unit, rows), kept + 1, params=params)
    if ids is not None:
        found = np.where(found >= 0, ids[found], -1)
    return _without_self(found, rows, kept)


def _search_read(index, q: np.ndarray, rows: np.ndarray, kept: int) -> np.ndarray:
    """:func:`_search` of ``rows`` whose unit rows ``q`` are already read, SEARCH_ROWS at a
    time: (len(rows), kept) int32 (int64 from 2**31 ids)."""
    pca, ivf = parts(index)
    out = np.empty((len(rows), kept), np.int32 if index.ntotal < 2**31 else np.int64)
    for lo in range(0, len(rows), SEARCH_ROWS):
        block = np.ascontiguousarray(q[lo : lo + SEARCH_ROWS], dtype=np.float32)
        _, found = ivf.search(block if pca is None else pca.apply(block), kept + 1)
        out[lo : lo + len(block)] = _without_self(found, rows[lo : lo + len(block)], kept)
    return out


def _without_self(found: np.ndarray, rows: np.ndarray, kept: int) -> np.ndarray:
    """Each row's ``kept`` first candidates other than itself; a slot faiss left empty (-1,
    fewer rows in the probed cells) is -1."""
    own = found == rows[:, None]
    # drop the row itself where found, else the last candidate
    drop = np.where(own.any(1), own.argmax(1), found.shape[1] - 1)
    keep = np.ones_like(found, dtype=bool)
    keep[np.arange(len(found)), drop] = False
    return found[keep].reshape(len(found), kept)


def _best(x: torch.Tensor, rows: np.ndarray, k: int, candidates_of, progress: bool = False):
    """The ``k`` best of each row's candidates by float32 similarity, SEARCH_ROWS rows at a time
    (their candidates never all in memory): (similarity, index) float32 and int32 (int64 from
    2**31 rows) (rows, k).

    candidates_of : (block of rows) -> (len(block), c) int64 rows of ``x``; -1 or the row
        itself is left out (a similarity of -inf where fewer than k remain)
    """

    def scored(r):
        c = candidates_of(r)
        c = torch.from_numpy(np.where(c < 0, r[:, None], c))
        s, i = rescored(x[torch.from_numpy(r)], c, k=c.shape[1], keys=x)
        return s.masked_fill(i == torch.from_numpy(r)[:, None], -float("inf")), i

    return best_of_blocks(rows, k, len(x), SEARCH_ROWS, scored, progress)


def exact_sample(x, rows: np.ndarray, k: int) -> torch.Tensor:
    """The exact ``k`` best similarities of ``rows`` against every other row of ``x`` (a
    tensor, or :class:`.rows.DiskRows`: one pass of the file), float32, in key blocks: what
    recall is measured against."""
    q = torch.as_tensor(x[torch.from_numpy(rows) if torch.is_tensor(x) else rows]).float()
    best = torch.full((len(rows), k), -float("inf"))
    for k0 in range(0, len(x), ADD_ROWS):
        s = q @ torch.as_tensor(x[k0 : k0 + ADD_ROWS]).float().T
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
    checked: int | None = None,
) -> tuple[np.ndarray, np.ndarray, SearchRecord]:
    """The ``k`` most similar other rows of every row, through an IVF index (``index``, default:
    :func:`build` of ``unit``), re-scored exactly; the cells probed and the candidates re-scored
    doubled until recall@checked (default: k) on a seeded sample reaches ``floor``.

    Returns (index, similarity) as :func:`.search.nearest` does (the index int32 under 2**31
    rows), and the search's record.
    """
    n = len(unit)
    k = max(0, min(k, n - 1))
    index = build(unit, seed=seed, progress=progress) if index is None else index
    record = _record(index, n, k, floor, checked)
    if not isinstance(unit, np.ndarray):  # rows on disk: re-scored in passes of the file
        x = unit

        def found(rows, progress):
            kept = record.candidates[-1]
            return outofcore.best(
                unit, rows, k, lambda r, q: _search_read(index, q, r, kept), progress
            )
    else:
        x = torch.from_numpy(unit)

        def found(rows, progress):
            kept = record.candidates[-1]
            return _best(x, rows, k, lambda r: _search(index, unit, r, kept), progress)

    _tuned(index, x, record, seed, found)
    sims, best = found(np.arange(n), progress)
    return best.numpy(), sims.numpy(), record


def _record(index, rows: int, k: int, floor: float, checked: int | None) -> SearchRecord:
    checked = k if checked is None else max(1, min(checked, k))
    return SearchRecord(name(index), rows, k=checked, floor=floor, depth=k)


def _tuned(index, x: torch.Tensor, record: SearchRecord, seed: int, found) -> None:
    """Set the IVF's ``nprobe`` and the record's candidates per row: both doubled from
    FIRST_NPROBE and k + max(MARGIN, k) until the recall@k of RECALL_QUERIES seeded rows reaches
    the record's floor, or every cell is probed; each try in ``record``. (More cells find
    what the coarse quantiser put elsewhere; more candidates, what the PCA projection ranked
    lower than the whole rows do.)

    found : (rows, progress) -> (similarity, index) of those rows' k best at the index's nprobe
        and the record's last candidates
    """
    n, k = len(x), record.depth
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, RECALL_QUERIES), replace=False))
    with returning_memory():  # its blocks' pages back before the neighbours are made
        exact = exact_sample(x, sample, k)  # the floor is held at the first record.k of them
    record.queries = len(sample)
    ivf = parts(index)[1]
    nprobe, kept = min(FIRST_NPROBE, ivf.nlist), min(n - 1, k + max(MARGIN, k))
    while True:
        probe(ivf, nprobe)
        record.nprobe.append(nprobe)
        record.candidates.append(kept)
        sims, _ = found(sample, False)
        record.recall.append(recall_at_k(sims[:, : record.k], exact[:, : record.k]))
        record.recall_at_depth = recall_at_k(sims, exact)
        if record.recall[-1] >= record.floor or nprobe >= ivf.nlist:
            return
        nprobe, kept = min(ivf.nlist, nprobe * 2), min(n - 1, kept * 2, MAX_CANDIDATES)


def grown(
    index,
    unit: np.ndarray,
    old: tuple[np.ndarray, np.ndarray | None],
    *,
    k: int,
    floor=0.95,
    seed=0,
    progress=False,
    checked: int | None = None,
):
    """:func:`approximate` through an index filled earlier (no k-means): the rows of ``unit``
    it lacks are added under the ids that follow, and searched against all.

    index : a faiss IVF of :func:`build` whose ids 0.. are the rows ``ids`` (int64) of ``unit``
    old : (ids, stored): those rows, and stored (n, s) int64, the old rows' earlier neighbours
        (rows; -1 on the new rows), merged with the new rows found for them; None: the old
        rows searched again like the new
    Returns (index, similarity, record) as :func:`approximate` does, the rows of every id, and
    whether the stored neighbours were kept (not where they held recall under the floor).
    """
    faiss = faiss_module()
    (ids, stored), n, old = old, len(unit), index.ntotal
    k, new = max(0, min(k, n - 1)), np.setdiff1d(np.arange(n), ids)
    for lo in range(0, len(new), ADD_ROWS):
        index.add(_float32(unit[new[lo : lo + ADD_ROWS]], 0, ADD_ROWS))
    ids = np.concatenate([ids, new]).astype(np.int64)
    again = np.ones(n, bool) if stored is None else np.isin(np.arange(n), new)
    record = _record(index, n, k, floor, checked)
    x = torch.from_numpy(unit)
    newer = faiss.IDSelectorRange(old, index.ntotal)  # kept alive while params points at it
    only_new = faiss.SearchParametersIVF(sel=newer)

    def candidates(rows):
        kept = record.candidates[-1]
        fresh, width = again[rows], kept + (0 if stored is None else stored.shape[1])
        cand = np.full((len(rows), width), -1, np.int64)
        cand[fresh, :kept] = _search(index, unit, rows[fresh], kept, ids=ids)
        if stored is not None and not fresh.all():
            only_new.nprobe = parts(index)[1].nprobe  # and its graph's breadth, set by probe
            rest = rows[~fresh]
            cand[~fresh, :kept] = _search(index, unit, rest, kept, ids=ids, params=only_new)
            cand[~fresh, kept:] = stored[rest]
        return cand

    def found(rows, progress):
        return _best(x, rows, k, candidates, progress)

    _tuned(index, x, record, seed, found)
    if stored is not None and record.recall[-1] < record.floor:
        # the old rows' stored neighbours are only as good as the earlier search: search them too
        stored, again = None, np.ones(n, bool)
        record.nprobe.clear(), record.recall.clear(), record.candidates.clear()
        _tuned(index, x, record, seed, found)
    sims, best = found(np.arange(n), progress)
    return best.numpy(), sims.numpy(), record, ids, stored is not None
