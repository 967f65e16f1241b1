"""Incremental audit (--reuse): the approximate index saved beside the findings, grown by the
images added since, the findings those of a fresh audit of the grown cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from embedcache import audit, write_cache
from embedcache.auditing import reuse
from embedcache.cli import main
from embedcache.errors import EmbedcacheError

pytest.importorskip("faiss")

KW = {"progress": False, "device": "cpu", "folds": 2, "index": "approx"}
DIM = 32


def _rows(n: int, seed: int) -> np.ndarray:
    """Random features with a near copy of every 50th row in the next."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, DIM)).astype(np.float32)
    x[1::50] = x[0::50][: len(x[1::50])] + rng.normal(0, 0.01, (len(x[1::50]), DIM))
    return x


def _cache(path, splits: dict, backbone="resnet18"):
    """A cache of ``splits``: {split: (features, names)}, labels from the names."""
    arrays = {
        s: (x, np.array([int(n[1:]) % 3 for n in names]), [f"{s}/{n}.png" for n in names])
        for s, (x, names) in splits.items()
    }
    return write_cache(
        path, arrays, classes=list("abc"), backbone=backbone, weights="none", transform="{}"
    )


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """(folder, the cache, the cache grown since, its features by split): new images among the
    old in train (a shuffled listing), val grown, copies of old images among the new."""
    folder = tmp_path_factory.mktemp("grown")
    train, val = _rows(2500, 0), _rows(500, 1)
    train[2400:2405] = train[:5] + 0.01  # new copies of old images, and a new image across
    val[450] = train[2410] + 0.01  # splits from a new one
    names = {"train": [f"t{i}" for i in range(2500)], "val": [f"v{i}" for i in range(500)]}
    before = {
        "train": (train[:2000], names["train"][:2000]),
        "val": (val[:400], names["val"][:400]),
    }
    old = _cache(folder / "old.h5", before)
    order = np.random.default_rng(2).permutation(2500)  # old rows at new positions
    new = _cache(
        folder / "new.h5",
        {
            "train": (train[order], [names["train"][i] for i in order]),
            "val": (val, names["val"]),
        },
    )
    return folder, old, new, {"train": (train, names["train"]), "val": (val, names["val"])}


def _pairs(r, name="near_duplicates") -> set:
    return {frozenset((p["path_a"], p["path_b"])) for p in r.tables[name]}


def test_a_reused_index_finds_what_a_fresh_audit_of_the_grown_cache_finds(grown):
    folder, old, new, _ = grown
    first = audit(old, out=folder / "a1", **KW)
    assert (folder / "a1" / reuse.INDEX).is_file() and (folder / "a1" / reuse.META).is_file()
    meta = json.loads((folder / "a1" / reuse.META).read_text())
    assert meta["rows"] == 2400 and meta["features"]["backbone"] == "resnet18"
    fresh = audit(new, out=folder / "fresh", **KW)
    again = audit(new, out=folder / "a2", reuse=folder / "a1", **KW)
    s = again.summary["search"]
    assert s["reused"] == {
        "from": str(folder / "a1"),
        "old_rows": 2400,
        "new_rows": 600,
        "old_neighbours": "stored ones merged with the new images found for them",
    }
    assert s["recall_at_k"] >= 0.95 and s["rows"] == 3000 and s["recall_queries"] == 1000
    assert {"train/t0.png", "train/t2400.png"} in _pairs(again)  # an old image's new copy
    assert {"train/t2410.png", "val/v450.png"} in _pairs(again, "leaks")  # new across splits
    for name in ("near_duplicates", "leaks", "groups", "exact_duplicates"):
        assert again.tables[name] == fresh.tables[name], name
    outliers = lambda r: {o["path"] for o in r.tables["outliers"]}  # noqa: E731
    assert len(outliers(again) ^ outliers(fresh)) <= 2
    same = np.isclose(again.nearest, fresh.nearest, atol=1e-5).mean()
    assert same >= s["recall_at_k"] - 0.02  # each image's nearest: equal up to the recall
    # the grown index is saved in its own order: reused once more, nothing new, the same
    third = audit(new, out=folder / "a3", reuse=folder / "a2", **KW)
    assert third.summary["search"]["reused"]["new_rows"] == 0
    assert third.tables["near_duplicates"] == again.tables["near_duplicates"]
    assert len(_pairs(first)) < len(_pairs(again))


def test_the_cli_says_it_reused_the_index(grown):
    folder, old, new, _ = grown
    audit(old, out=folder / "c1", **KW)
    args = ["audit", str(new), "--out", str(folder / "c2"), "-q", "--device", "cpu"]
    r = CliRunner().invoke(main, [*args, "--folds", "2", "--reuse", str(folder / "c1")])
    assert r.exit_code == 0, r.output
    expected = f"  neighbours: reused the index of {folder / 'c1'} (2400 old images), added 600"
    assert expected in r.output.splitlines()


def test_other_features_or_changed_images_are_refused_in_one_line(grown):
    folder, old, _, features = grown
    audit(old, out=folder / "m1", **KW)
    (train, tn), (val, vn) = features["train"], features["val"]
    other = _cache(folder / "other.h5", {"train": (train, tn), "val": (val, vn)}, "resnet34")
    args = ["audit", str(other), "--out", str(folder / "m2"), "--reuse", str(folder / "m1")]
    r = CliRunner().invoke(main, [*args, "-q", "--device", "cpu", "--index", "approx"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "indexes other features than this cache (backbone resnet18 vs resnet34)" in r.output
    assert "run a fresh audit (without --reuse)" in r.output
    changed = train.copy()
    changed[7] = -changed[7]
    path = _cache(folder / "changed.h5", {"train": (changed, tn), "val": (val, vn)})
    with pytest.raises(EmbedcacheError, match=r"1 of its images have other features .*t7\.png"):
        audit(path, out=folder / "m3", reuse=folder / "m1", **KW)
    with pytest.raises(EmbedcacheError, match="--index exact uses none"):
        audit(path, out=folder / "m4", reuse=folder / "m1", **{**KW, "index": "exact"})
    with pytest.raises(EmbedcacheError, match=r"holds no index\.faiss"):
        audit(path, out=folder / "m5", reuse=folder / "nothing", **KW)


def test_a_shrunk_cache_gets_a_fresh_index_and_says_why(grown):
    folder, old, _, features = grown
    audit(old, out=folder / "s1", **KW)
    (train, tn) = features["train"]
    shrunk = _cache(folder / "shrunk.h5", {"train": (train[:1500], tn[:1500])})
    lines = []
    r = audit(shrunk, out=folder / "s2", reuse=folder / "s1", log=lines.append, **KW)
    skipped = r.summary["search"]["reuse_skipped"]
    assert skipped["why"].startswith("900 of its 2400 images are not in this cache's splits")
    assert "reused" not in r.summary["search"] and any("not reusing" in x for x in lines)
    assert json.loads((folder / "s2" / reuse.META).read_text())["rows"] == 1500


def test_an_approximate_audit_writes_its_index_and_an_exact_one_none(grown):
    folder, old, _, _ = grown
    out = folder / "e"
    r = audit(old, out=out, **KW)
    assert r.files["index"] == out / reuse.INDEX
    assert {reuse.INDEX, reuse.META, reuse.ROWS} <= {p.name for p in out.iterdir()}
    audit(old, out=out, **{**KW, "index": "exact"})  # the same folder, replaced
    assert not {reuse.INDEX, reuse.META, reuse.ROWS} & {p.name for p in out.iterdir()}


def test_old_images_are_searched_again_where_their_stored_neighbours_cannot_serve(grown):
    folder, old, new, _ = grown
    audit(old, out=folder / "f1", **KW)
    from embedcache.auditing import NEAR_CANDIDATES  # stored: that many, and more asked

    more = audit(new, out=folder / "f2", reuse=folder / "f1", neighbours=NEAR_CANDIDATES + 1, **KW)
    said = more.summary["search"]["reused"]["old_neighbours"]
    assert said == "searched again (fewer than --neighbours stored)"
    strict = audit(new, out=folder / "f3", reuse=folder / "f1", recall_floor=0.999, **KW)
    search = strict.summary["search"]
    assert search["reused"]["old_neighbours"] == "searched again (recall under floor)"
    assert search["recall_at_k"] >= 0.999 or search["tries"][-1]["nprobe"] == 37  # every cell
