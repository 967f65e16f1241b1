"""feed.py: rows read in memory or streamed give the same blocks and batches; read-ahead."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import blobs

import embedcache.feed as feed
from embedcache import open_cache
from embedcache.cache import write_cache
from embedcache.feed import Rows, memory_budget


def _write(path, splits):
    args = {"classes": ["a", "b", "c"], "backbone": "resnet18", "weights": "none"}
    return write_cache(path, splits, **args, transform='{"crop": 64}')


@pytest.mark.parametrize("subset", [False, True], ids=["every-row", "rows-with-gaps"])
def test_rows_in_memory_and_streamed_read_and_shuffle_the_same(tmp_path, monkeypatch, subset):
    monkeypatch.setattr(feed, "BLOCK_ROWS", 16)  # many blocks for 150 rows
    monkeypatch.setattr(feed, "SHUFFLE_ROWS", 48)  # and several shuffle buffers
    x, y = blobs(50, dim=8)
    path = _write(tmp_path / "c.h5", {"train": (x, y, ["p"] * len(y))})
    rows = np.sort(np.random.default_rng(0).choice(len(y), 101, replace=False))
    rows = rows if subset else np.arange(len(y))
    with open_cache(path) as c:
        memory = Rows(c.features("train"), c.labels("train"), rows, in_memory=True)
        streamed = Rows(c.features("train"), c.labels("train"), rows, in_memory=False)
        blocks = [list(r.blocks()) for r in (memory, streamed)]
        batches = [list(r.batches(7, np.random.default_rng(3))) for r in (memory, streamed)]
    assert len(blocks[0]) == len(blocks[1]) == -(-len(rows) // 16)
    for (pa, xa), (pb, xb) in zip(*blocks, strict=True):
        assert np.array_equal(pa, pb) and np.array_equal(xa, xb) and xa.dtype == np.float32
    assert np.array_equal(np.concatenate([f for _, f in blocks[1]]), x[rows].astype(np.float32))
    assert len(batches[0]) == len(batches[1]) > 1
    for (xa, ya), (xb, yb) in zip(*batches, strict=True):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    seen = np.concatenate([f for f, _ in batches[1]])
    assert len(seen) == len(rows) and not np.array_equal(seen, x[rows].astype(np.float32))
    assert sorted(map(tuple, seen.tolist())) == sorted(
        map(tuple, x[rows].astype(np.float32).tolist())
    )


def _streamed(c, rows, read_ahead: bool) -> Rows:
    r = Rows(c.features("train"), c.labels("train"), rows, in_memory=False)
    r.read_ahead = read_ahead
    return r


@pytest.mark.parametrize("subset", [False, True], ids=["every-row", "rows-with-gaps"])
def test_reading_ahead_gives_the_same_blocks_and_batches_as_reading_in_turn(
    tmp_path, monkeypatch, subset
):
    monkeypatch.setattr(feed, "BLOCK_ROWS", 16)
    monkeypatch.setattr(feed, "SHUFFLE_ROWS", 32)  # 5 buffers of 2 blocks: both buffers reused
    x, y = blobs(50, dim=8)
    path = _write(tmp_path / "c.h5", {"train": (x, y, ["p"] * len(y))})
    rows = np.sort(np.random.default_rng(0).choice(len(y), 131, replace=False))
    rows = rows if subset else np.arange(len(y))
    with open_cache(path) as c:
        memory = Rows(c.features("train"), c.labels("train"), rows, in_memory=True)
        ahead, in_turn = _streamed(c, rows, True), _streamed(c, rows, False)
        for epoch in range(2):  # the second epoch reuses the first one's buffers
            got = [
                list(r.batches(5, np.random.default_rng(epoch))) for r in (memory, ahead, in_turn)
            ]
            assert len(got[0]) == len(got[1]) == len(got[2]) > 10
            for (xa, ya), (xb, yb), (xc, yc) in zip(*got, strict=True):
                assert np.array_equal(xa, xb) and np.array_equal(xb, xc) and xb.dtype == np.float32
                assert np.array_equal(ya, yb) and np.array_equal(yb, yc)
        blocks = [list(r.blocks()) for r in (ahead, in_turn)]
    for (pa, xa), (pb, xb) in zip(*blocks, strict=True):
        assert np.array_equal(pa, pb) and np.array_equal(xa, xb)
    assert np.array_equal(np.concatenate([b for _, b in blocks[0]]), x[rows].astype(np.float32))


class _FailingRows:
    """Features in an array that fail to read from row ``bad`` on, like a broken disk."""

    def __init__(self, data: np.ndarray, bad: int):
        self.data, self.bad = data, bad
        self.shape, self.dtype = data.shape, data.dtype

    def __getitem__(self, s: slice) -> np.ndarray:
        if s.stop > self.bad:
            raise OSError(f"Can't read data (rows {s.start}-{s.stop})")
        return self.data[s]


def _reader_threads() -> list:
    return [t for t in threading.enumerate() if t.name == "embedcache-read-ahead" and t.is_alive()]


@pytest.mark.parametrize("how", ["blocks", "batches"])
def test_an_error_while_reading_ahead_is_raised_to_the_caller(monkeypatch, how):
    monkeypatch.setattr(feed, "BLOCK_ROWS", 4)
    monkeypatch.setattr(feed, "SHUFFLE_ROWS", 8)
    x = np.arange(40 * 3, dtype=np.float16).reshape(40, 3)
    rows = Rows(_FailingRows(x, bad=30), np.zeros(40, np.int64), np.arange(40), in_memory=False)
    rows.read_ahead = True
    items = rows.blocks() if how == "blocks" else rows.batches(4, np.random.default_rng(0))
    with pytest.raises(OSError, match=r"Can't read data \(rows 28-32\)"):
        list(items)
    assert _reader_threads() == []


@pytest.mark.parametrize("how", ["blocks", "batches"])
def test_leaving_the_iteration_early_stops_the_reader(tmp_path, monkeypatch, how):
    monkeypatch.setattr(feed, "BLOCK_ROWS", 16)
    monkeypatch.setattr(feed, "SHUFFLE_ROWS", 32)
    x, y = blobs(50, dim=8)
    path = _write(tmp_path / "c.h5", {"train": (x, y, ["p"] * len(y))})
    with open_cache(path) as c:
        rows = _streamed(c, np.arange(len(y)), True)
        items = rows.blocks() if how == "blocks" else rows.batches(5, np.random.default_rng(0))
        first = next(items)
        assert len(_reader_threads()) == 1  # reading the next block or buffer
        items.close()
        assert _reader_threads() == []
        for _ in rows.blocks() if how == "blocks" else rows.batches(5, np.random.default_rng(0)):
            break  # a for loop left with break: the generator is dropped and closed
        assert _reader_threads() == []
        again = next(
            rows.blocks() if how == "blocks" else rows.batches(5, np.random.default_rng(0))
        )
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_memory_budget_is_the_given_bytes_or_half_the_available_memory(monkeypatch):
    assert memory_budget(None) > 0
    assert memory_budget(123) == 123
    monkeypatch.setattr(feed, "available_memory_bytes", lambda: 1000)
    assert memory_budget(None) == 500
