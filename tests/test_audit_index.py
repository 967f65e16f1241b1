"""The audit's approximate neighbour search (faiss): exact similarities, recall measured and
raised to the floor, the same findings as exact search."""

import builtins

import numpy as np
import pytest
import torch

from embedcache import audit
from embedcache.auditing import _approximate
from embedcache.auditing.index import (
    _best,
    _without_self,
    approximate,
    cells_for,
    recall_at_k,
)
from embedcache.auditing.search import nearest, unit_rows
from embedcache.config import APPROX_FROM_ROWS, AuditConfig
from embedcache.errors import EmbedcacheError

faiss = pytest.importorskip("faiss")


def _copies(n_sources=400, copies=5, dim=48, seed=0) -> np.ndarray:
    """Unit rows: each of ``n_sources`` random directions with noisy copies around it."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (n_sources, dim))
    x = np.repeat(base, copies, axis=0) + rng.normal(0, 0.35, (n_sources * copies, dim))
    return unit_rows(x.astype(np.float32))


def _low_rank(n_sources=500, copies=4, dim=48, rank=8, seed=0) -> np.ndarray:
    """Unit rows like features: near copies of sources in a ``rank``-d subspace of ``dim``,
    and a little of every other direction."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(0, 1, (dim, rank)))[0].T
    base = rng.normal(0, 1, (n_sources, rank)) @ basis
    x = np.repeat(base, copies, axis=0) + rng.normal(0, 0.25, (n_sources * copies, rank)) @ basis
    return unit_rows((x + rng.normal(0, 0.05, x.shape)).astype(np.float32))


def test_approximate_search_reports_exact_similarities_and_meets_its_recall_floor():
    unit = _copies()
    index, sims, record = approximate(unit, k=4, floor=0.95)
    exact_i, exact_s = nearest(unit, k=4, device=torch.device("cpu"), dtype=torch.float32)
    assert index.shape == (2000, 4) and (index != np.arange(2000)[:, None]).all()
    dots = np.einsum("nd,nkd->nk", unit, unit[index])
    assert np.allclose(sims, dots, atol=1e-5)  # re-scored exactly, best first
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    assert record.recall[-1] >= 0.95 and record.queries == 1000
    whole = recall_at_k(torch.from_numpy(sims), torch.from_numpy(exact_s))
    assert whole >= 0.95  # the sampled recall speaks for every row
    assert abs(whole - record.recall[-1]) < 0.03
    assert record.to_dict()["recall_at_k"] == record.recall[-1]


def test_below_the_floor_the_search_probes_more_cells_until_it_is_met():
    unit = _copies(n_sources=300, copies=4, dim=64, seed=1)
    _, _, record = approximate(unit, k=10, floor=1.0)  # exact only when every cell is probed
    assert record.nprobe == sorted(record.nprobe) and len(set(record.nprobe)) == len(record.nprobe)
    nlist = int(record.index.removeprefix("IVF").split(",")[0])
    assert record.recall[-1] == 1.0 or record.nprobe[-1] == nlist
    assert len(record.nprobe) > 1 and "raised from" in record.describe()


def test_the_row_itself_is_dropped_wherever_faiss_returns_it():
    found = np.array([[5, 0, 1], [2, 3, 4], [7, -1, -1]])
    rows = np.array([0, 9, 7])
    out = _without_self(found, rows, 2)
    assert out.tolist() == [[5, 1], [2, 3], [-1, -1]]  # empty slots stay empty


def test_rescoring_leaves_out_empty_slots_and_the_row_itself():
    unit = _copies(n_sources=20, copies=2, dim=16)
    rows = np.array([0, 5])
    cand = np.array([[1, -1, 0, 7], [5, 4, -1, 3]])  # -1: faiss found none; 0, 5: the rows
    sims, best = _best(torch.from_numpy(unit), rows, 2, lambda r: cand[np.searchsorted(rows, r)])
    assert sorted(best[0].tolist()) == [1, 7] and sorted(best[1].tolist()) == [3, 4]
    dots = np.einsum("nd,nkd->nk", unit[rows], unit[best.numpy()])
    assert np.allclose(sims.numpy(), dots, atol=1e-5)


def test_cells_grow_with_the_square_root_of_the_rows():
    assert cells_for(100_000) == 1024 and cells_for(1_000_000) == 4096 and cells_for(10) == 16


def test_auto_is_exact_below_the_threshold_and_approx_needs_faiss(monkeypatch, tmp_path):
    assert not _approximate(AuditConfig(), APPROX_FROM_ROWS - 1)
    assert _approximate(AuditConfig(), APPROX_FROM_ROWS)
    assert _approximate(AuditConfig(index="approx"), 10)
    assert not _approximate(AuditConfig(index="exact"), 10**8)
    real = builtins.__import__

    def no_faiss(name, *a, **k):
        if name == "faiss":
            raise ImportError("no faiss")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(EmbedcacheError, match=r"pip install 'embedcache\[index\]'"):
        approximate(_copies(50, 3), k=3)


def test_an_approximate_audit_finds_what_the_exact_one_finds(tmp_path):
    from embedcache.cache import write_cache

    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (3000, 32)).astype(np.float32)
    y = rng.integers(0, 3, 3000)
    x[2900:2905] = x[10:15] + rng.normal(0, 0.01, (5, 32))  # five near copies
    paths = [f"train/{i}.png" for i in range(3000)]
    cache = write_cache(
        tmp_path / "c.h5",
        {"train": (x, y, paths)},
        classes=["a", "b", "c"],
        backbone="resnet18",
        weights="none",
        transform='{"crop": 64}',
    )
    kw = {"progress": False, "device": "cpu", "folds": 2}
    exact = audit(cache, out=tmp_path / "exact", index="exact", **kw)
    approx = audit(cache, out=tmp_path / "approx", index="approx", **kw)
    pairs = lambda r: {(p["path_a"], p["path_b"]) for p in r.tables["near_duplicates"]}  # noqa: E731
    assert pairs(exact) == pairs(approx) and len(pairs(exact)) == 5
    assert exact.summary["search"] == {"index": "exact", "rows": 3000}
    s = approx.summary["search"]
    assert s["index"].startswith("IVF") and s["recall_at_k"] >= 0.95 and s["recall_queries"] == 1000
    # the floor holds at the outlier score's 10 neighbours; all 30 searched are recorded beside
    assert s["k"] == 10 and s["depth"] == 30 and 0 < s["recall_at_depth"] <= 1


def test_wide_rows_are_indexed_by_principal_components_and_rescored_whole(monkeypatch):
    from embedcache.auditing import index as ix

    monkeypatch.setattr(ix, "PCA_DIMS", 12)  # 48-d rows: wider than the projection
    unit = _low_rank(seed=2)
    built = ix.build(unit)
    assert ix.name(built).startswith("PCA12,IVF") and built.ntotal == 2000
    index, sims, record = approximate(unit, k=5, floor=0.97, index=built)
    dots = np.einsum("nd,nkd->nk", unit, unit[index])
    assert np.allclose(sims, dots, atol=1e-5)  # the similarities are the whole rows'
    _, exact_s = nearest(unit, k=5, device=torch.device("cpu"), dtype=torch.float32)
    whole = recall_at_k(torch.from_numpy(sims), torch.from_numpy(exact_s))
    assert record.recall[-1] >= 0.97 and whole >= 0.95
    assert record.candidates[0] == 5 + 16 and record.to_dict()["tries"][0]["candidates"] == 21
    # an index grown by new rows searches them through the same projection
    more = _low_rank(n_sources=100, copies=2, seed=3)
    both = np.concatenate([unit, more])
    got, got_s, grown_record, ids, _ = ix.grown(built, both, (np.arange(2000), None), k=5)
    _, exact_both = nearest(both, k=5, device=torch.device("cpu"), dtype=torch.float32)
    assert recall_at_k(torch.from_numpy(got_s), torch.from_numpy(exact_both)) >= 0.95
    assert grown_record.index.startswith("PCA12,") and len(ids) == 2200


def test_the_projection_summed_in_blocks_is_faiss_own(monkeypatch):
    from embedcache.auditing import index as ix

    monkeypatch.setattr(ix, "ADD_ROWS", 300)  # 2,000 rows: seven blocks summed
    monkeypatch.setattr(ix, "PCA_DIMS", 6)
    rng = np.random.default_rng(5)
    unit = unit_rows(rng.normal(0, 1, (2000, 24)) @ rng.normal(0, 1, (24, 24))).astype(np.float32)
    rows = np.arange(0, 2000, 2)
    reference = faiss.PCAMatrix(24, 6)
    reference.train(unit[rows])
    ours, theirs = ix._pca(faiss, unit, rows).apply(unit[:50]), reference.apply(unit[:50])
    # the same components, each up to its sign
    assert np.allclose(np.abs(ours), np.abs(theirs), atol=1e-4)
    assert not np.allclose(ours[:, 0], 0)


def test_compacted_lists_find_what_the_grown_ones_do_and_still_grow(monkeypatch):
    from embedcache.auditing import index as ix

    unit = _copies(n_sources=300, copies=4, seed=6)
    built = ix.build(unit)
    monkeypatch.setattr(ix, "_compact", lambda faiss, ivf: None)
    grown = ix.build(unit)
    for index in (built, grown):
        ix.parts(index)[1].nprobe = 4
    (da, la), (db, lb) = (ix.parts(i)[1].search(unit[:200], 8) for i in (built, grown))
    assert np.array_equal(la, lb) and np.allclose(da, db)
    built.add(unit[:10])  # a compacted list takes more rows (--reuse grows it)
    assert built.ntotal == len(unit) + 10


def test_when_the_projection_limits_recall_more_candidates_are_rescored(monkeypatch):
    from embedcache.auditing import index as ix

    monkeypatch.setattr(ix, "PCA_DIMS", 3)  # too few components to rank 8-d neighbours
    unit = _low_rank(n_sources=300, seed=4)
    _, _, record = approximate(unit, k=5, floor=0.99)
    assert record.candidates == sorted(record.candidates) and len(record.candidates) > 1
    assert record.candidates[1] == 2 * record.candidates[0]
    assert record.recall[-1] > record.recall[0]


def test_past_hnsw_cells_cells_are_found_through_a_graph_and_rows_scanned_as_4_bit_codes(
    monkeypatch,
):
    from embedcache.auditing import index as ix

    unit = _copies(n_sources=300, copies=4, seed=7)
    flat = ix.parts(ix.build(unit))[1]
    assert ix.name(flat) == f"IVF{flat.nlist},SQ8"  # below the threshold: as before
    monkeypatch.setattr(ix, "HNSW_CELLS", 16)  # this small set's cells past it
    graphed = ix.build(unit)
    ivf = ix.parts(graphed)[1]
    assert isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW)
    assert ix.name(graphed) == f"IVF{ivf.nlist}_HNSW{ix.HNSW_M},PQ24x4fs"
    assert ivf.code_size == 48 // 2 // 2  # two dimensions a code of 4 bits
    assert ivf.clustering_index is None  # the k-means's own graph let go after training
    assert ivf.ntotal == len(unit) and ivf.quantizer.ntotal == ivf.nlist
    # the graph searched at least twice as broadly as the cells probed, read back from disk
    back = faiss.deserialize_index(faiss.serialize_index(graphed))
    _, sims, record = approximate(unit, k=4, floor=0.95, index=back)
    assert record.index == ix.name(graphed) and record.recall[-1] >= 0.95
    assert ix._graph(ix.parts(back)[1]).efSearch >= 2 * record.nprobe[-1]
    _, exact_s = nearest(unit, k=4, device=torch.device("cpu"), dtype=torch.float32)
    assert recall_at_k(torch.from_numpy(sims), torch.from_numpy(exact_s)) >= 0.95
    # grown by new rows, searched against all (the old rows through a selector of the new ids)
    early = ix.build(unit[:1000])
    stored = approximate(unit[:1000], k=4, index=early)[0].astype(np.int64)
    _, sims, record, ids, kept = ix.grown(early, unit, (np.arange(1000), stored), k=4)
    assert kept and len(ids) == len(unit) and record.recall[-1] >= 0.95
    assert recall_at_k(torch.from_numpy(sims), torch.from_numpy(exact_s)) >= 0.95
