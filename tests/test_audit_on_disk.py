"""The audit past --max-memory: rows read from the file (DiskRows), the label check in one scoring
pass, the index's candidates re-scored in passes of the file; the same numbers as in memory."""

import numpy as np
import pytest

from embedcache import audit
from embedcache.auditing import outofcore
from embedcache.auditing.labels import out_of_fold_logits
from embedcache.auditing.rows import DiskRows
from embedcache.auditing.search import unit_rows
from embedcache.cache import write_cache
from embedcache.errors import EmbedcacheError


class Chunked(np.ndarray):
    """An array that says it is stored in chunks of 7 rows, as an h5py dataset would."""

    chunks = (7, 1)


def _sources(seed=0, sizes=(150, 40, 61), dim=24):
    rng = np.random.default_rng(seed)
    parts = [rng.normal(0, 1, (n, dim)).astype(np.float16) for n in sizes]
    return [p.view(Chunked) for p in parts], unit_rows(np.concatenate(parts))


def test_disk_rows_read_spans_and_scattered_rows_across_splits_as_unit_rows():
    sources, unit = _sources()
    rows = DiskRows(sources)
    assert rows.shape == unit.shape and len(rows) == 251
    assert np.array_equal(rows[140:200], unit[140:200])  # a span across three splits
    scattered = np.array([250, 3, 3, 189, 150, 149, 0, 77])  # any order, repeats
    assert np.array_equal(rows[scattered], unit[scattered])
    sub = rows.subset(np.arange(1, 251, 4))
    assert np.array_equal(sub[10:14], unit[np.arange(1, 251, 4)[10:14]])
    assert np.array_equal(sub[np.array([5, 0])], unit[[21, 1]])
    assert np.allclose(np.linalg.norm(rows[:].astype(np.float32), axis=1), 1, atol=2e-3)


def test_the_scratch_copy_holds_the_unit_rows_and_reads_them_plain(tmp_path):
    sources, unit = _sources(5)
    copied = DiskRows(sources).scratch(tmp_path)
    assert (tmp_path / "unit_rows.bin").stat().st_size == unit.nbytes
    assert np.array_equal(copied[3:240], unit[3:240])
    assert np.array_equal(copied[np.array([250, 0, 7, 7])], unit[[250, 0, 7, 7]])
    assert np.array_equal(copied.subset(np.arange(100, 200))[5:9], unit[105:109])
    copied.close()


def test_out_of_core_rescoring_is_the_float32_dot_of_each_pair(monkeypatch):
    monkeypatch.setattr(outofcore, "KEY_ROWS", 32)  # several blocks of keys
    monkeypatch.setattr(outofcore, "PAIRS", 5)  # and of pairs within each
    sources, unit = _sources(1)
    rng = np.random.default_rng(1)
    q_rows = np.array([4, 100, 250])
    cand = rng.integers(0, 251, (3, 9))
    cand[1, 2] = -1  # an empty slot
    got = outofcore.rescored(DiskRows(sources), unit[q_rows], cand)
    want = np.einsum("qd,qcd->qc", unit[q_rows].astype(np.float32), unit[cand].astype(np.float32))
    want[1, 2] = -np.inf
    assert np.allclose(got, want, atol=1e-6) and got[1, 2] == -np.inf


def test_neighbours_on_disk_are_the_in_memory_search(monkeypatch):
    pytest.importorskip("faiss")
    from embedcache.auditing.index import approximate

    # three chunks of queries, each re-scored in passes of blocks of keys
    monkeypatch.setattr(outofcore, "CHUNK_ROWS", 700)
    monkeypatch.setattr(outofcore, "KEY_ROWS", 512)
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, (200, 32))
    x = (base[rng.integers(0, 200, 2000)] + rng.normal(0, 0.6, (2000, 32))).astype(np.float16)
    unit = unit_rows(x)
    in_memory = approximate(unit, k=6, floor=0.95)
    on_disk = approximate(DiskRows([x[:1500].view(Chunked), x[1500:].view(Chunked)]), k=6)
    assert np.allclose(in_memory[1], on_disk[1], atol=1e-6)  # the same similarities
    assert (in_memory[0] == on_disk[0]).mean() > 0.999  # the same rows, but for exact ties
    assert in_memory[2].to_dict() == on_disk[2].to_dict()  # the same recall, measured the same


def test_out_of_fold_logits_from_disk_are_those_from_memory():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 900)
    x = (rng.normal(0, 1, (900, 16)) + 3 * np.eye(16)[y]).astype(np.float16)
    unit = unit_rows(x)
    want = out_of_fold_logits(unit, y, folds=3, seed=0)
    got = out_of_fold_logits(DiskRows([x[:400].view(Chunked), x[400:].view(Chunked)]), y, folds=3)
    assert np.allclose(got, want, atol=1e-4)
    assert (got.argmax(1) == y).mean() > 0.8  # and they are out-of-fold predictions


def _cache(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (1500, 32)).astype(np.float32)
    y = rng.integers(0, 3, 1500)
    x[1400:1404] = x[10:14] + rng.normal(0, 0.01, (4, 32))  # four near copies
    splits = {
        "train": (x[:1200], y[:1200], [f"train/{i}.png" for i in range(1200)]),
        "test": (x[1200:], y[1200:], [f"test/{i}.png" for i in range(1200, 1500)]),
    }
    meta = {"classes": ["a", "b", "c"], "backbone": "resnet18", "weights": "none"}
    return write_cache(tmp_path / "c.h5", splits, transform='{"crop": 64}', **meta)


def test_an_audit_past_max_memory_reads_the_file_and_finds_what_memory_finds(tmp_path):
    pytest.importorskip("faiss")
    cache = _cache(tmp_path)
    kw = {"progress": False, "device": "cpu", "folds": 2, "index": "approx"}
    lines = []
    loaded = audit(cache, out=tmp_path / "memory", **kw)
    read = audit(cache, out=tmp_path / "disk", max_memory=1000, log=lines.append, **kw)
    assert any(line.startswith("features: ") and "read from the file" in line for line in lines)
    assert any("scaled to unit length once" in line for line in lines)
    assert not list(tmp_path.glob(".audit-rows-*"))  # the scratch copy is gone
    for name in ("near_duplicates", "leaks", "outliers", "label_errors"):
        assert read.tables[name] == loaded.tables[name], name
    assert len(read.tables["near_duplicates"]) == 4
    assert read.summary["search"]["recall_at_k"] == loaded.summary["search"]["recall_at_k"]
    assert np.allclose(read.nearest, loaded.nearest, atol=1e-6)


def test_exact_search_past_max_memory_is_a_one_line_error(tmp_path):
    cache = _cache(tmp_path)
    with pytest.raises(EmbedcacheError, match=r"--index exact needs the features in memory"):
        audit(cache, out=tmp_path / "out", index="exact", max_memory=1000, progress=False)
    assert not (tmp_path / "out" / "summary.json").exists()


def test_an_audit_that_fails_leaves_no_scratch_copy(tmp_path, monkeypatch):
    import embedcache.auditing as auditing

    cache = _cache(tmp_path)

    def broken(*args, **kwargs):
        assert list(tmp_path.glob(".audit-rows-*/unit_rows.bin"))  # it was there
        raise RuntimeError("stopped")

    monkeypatch.setattr(auditing, "_findings", broken)
    with pytest.raises(RuntimeError, match="stopped"):
        audit(cache, out=tmp_path / "out", index="approx", max_memory=1000, progress=False)
    assert not list(tmp_path.glob(".audit-rows-*"))
