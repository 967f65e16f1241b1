"""Audit findings counted as images and groups, not pairs (issue 36): a photo with 40 byte
copies is one group of 40, a chain of near pairs one group, groups.csv keeps one image each."""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_image

from embedcache import audit, open_cache, write_cache
from embedcache.auditing.groups import components
from embedcache.cli import main
from embedcache.exclusion import read_exclude, row_filter

COPIES = 40  # byte copies of one photo, all in train
PHOTOS = [f"train/photo_{i:02d}.png" for i in range(COPIES)]
CHAIN = ["train/a.png", "train/b.png", "train/c.png"]  # a~b, b~c near; a, c not
SPANNING = ["train/x.png", "val/x.png", "val/x_small.png"]  # a byte copy and a near copy in val
FILLERS = {"train": 20, "val": 10}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _features(rng, dim: int = 64) -> dict[str, np.ndarray]:
    """Each image's feature: random directions (cosine about 0 between them), except the copies."""
    photo, x = rng.normal(size=(2, dim))
    e1, e2 = np.linalg.qr(rng.normal(size=(dim, 2)))[0].T
    deg = np.pi / 180  # a, b, c at 0, 30 and 60 degrees: cos 0.87 twice, 0.5 from a to c
    chain = [np.cos(t * deg) * e1 + np.sin(t * deg) * e2 for t in (0, 30, 60)]
    small = x + rng.normal(0, 0.05, dim)  # a resized copy: cosine about 0.99
    return {
        **dict.fromkeys(PHOTOS, photo),
        **dict(zip(CHAIN, chain, strict=True)),
        **dict(zip(SPANNING, (x, x, small), strict=True)),
    }


def _write(path: Path, root: Path) -> Path:
    """A cache from arrays, its images drawn under ``root``, with content hashes set by hand:
    one per photo, the byte copies sharing theirs."""
    rng = np.random.default_rng(0)
    named = _features(rng)
    labels = {**dict.fromkeys(PHOTOS, 0), "train/a.png": 1, "train/b.png": 1, "train/c.png": 2}
    labels |= dict.fromkeys(SPANNING, 1)
    splits, hashes = {}, {}
    for split, n in FILLERS.items():
        paths = [p for p in named if p.startswith(split)]
        paths += [f"{split}/filler_{i:02d}.png" for i in range(n)]
        x = np.stack([named.get(p, rng.normal(size=64)) for p in paths]).astype(np.float32)
        y = np.array([labels.get(p, i % 3) for i, p in enumerate(paths)], np.int64)
        splits[split] = (x, y, paths)
        hashes[split] = rng.integers(1, 256, (len(paths), 16), dtype=np.uint8)
    one = rng.integers(1, 256, 16, dtype=np.uint8)
    hashes["train"][: len(PHOTOS)] = one  # the photos are the first rows of train
    hashes["val"][splits["val"][2].index("val/x.png")] = hashes["train"][
        splits["train"][2].index("train/x.png")
    ]
    for _, y, paths in splits.values():  # the copies drawn alike, for the report
        for p, label in zip(paths, y, strict=True):
            seed = 0 if p in PHOTOS else 1 if p in SPANNING else zlib.crc32(p.encode())
            make_image(root / p, int(label), seed, size=(12, 10) if "small" in p else (24, 20))
    meta = {"backbone": "resnet18", "weights": "none", "transform": '{"crop": 64}'}
    write_cache(path, splits, classes=["k0", "k1", "k2"], source=str(root), **meta)
    with h5py.File(path, "r+") as h5:  # hashes as extract records them
        for split, h in hashes.items():
            h5[split].create_dataset("hashes", data=h)
    return path


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("groups")
    cache = _write(tmp / "c.h5", tmp / "data")
    out = tmp / "audit"
    r = audit(cache, out=out, progress=False, device="cpu", near_threshold=0.85, report_rows=2)
    return cache, out, r


def test_union_find_matches_scipy_on_random_graphs_and_a_shuffled_chain():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(3)
    chain = rng.permutation(5000)
    graphs = [(5000, chain[:-1], chain[1:])]
    graphs += [(n, *rng.integers(0, n, (2, e))) for n, e in ((1000, 300), (1000, 900), (50, 0))]
    for n, a, b in graphs:
        root = components(n, a, b)
        count, label = connected_components(
            coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n)), directed=False
        )
        assert len(np.unique(root)) == count
        assert len(np.unique(np.stack([root, label]), axis=1).T) == count  # the same partition
        assert np.all(root <= np.arange(n)) and np.all(root[root] == root)  # smallest member


def test_forty_byte_copies_are_one_group_of_forty(audited):
    _, out, r = audited
    groups = _rows(out / "groups.csv")
    first = [g for g in groups if g["group"] == "1"]
    assert sorted(g["image"] for g in first) == PHOTOS and {g["size"] for g in first} == {"40"}
    assert [g["keep"] for g in first] == ["true"] + ["false"] * 39  # the first row kept
    assert first[0]["image"] == PHOTOS[0] and first[0]["path"] == ""
    exact = [e for e in _rows(out / "exact_duplicates.csv") if e["group"] == "1"]
    assert len(exact) == COPIES - 1 and {e["path"] for e in exact} == set(PHOTOS[1:])
    # the copies are exact duplicates only: no near pair between two of them
    assert not [n for n in r.tables["near_duplicates"] if n["path_a"] in PHOTOS]
    assert r.summary["near_duplicates"]["count"] == 4


def test_a_chain_of_near_pairs_is_one_group_and_byte_and_near_copies_share_one(audited):
    _, out, r = audited
    near = {(n["path_a"], n["path_b"]): n["group"] for n in _rows(out / "near_duplicates.csv")}
    assert near == {
        ("train/a.png", "train/b.png"): "2",
        ("train/b.png", "train/c.png"): "2",
        ("train/x.png", "val/x_small.png"): "3",
        ("val/x.png", "val/x_small.png"): "3",
    }  # a and c are never paired, yet one group; sizes tie at 3: the earlier first row is 2
    groups = {}
    for g in _rows(out / "groups.csv"):
        groups.setdefault(g["group"], []).append(g["image"])
    assert groups == {"1": PHOTOS, "2": CHAIN, "3": SPANNING}  # each by split, then row
    exact = [(e["path_a"], e["path_b"], e["group"]) for e in _rows(out / "exact_duplicates.csv")]
    assert ("train/x.png", "val/x.png", "3") in exact  # one id space: the byte copy's group


def test_a_group_across_splits_is_a_leak_group(audited):
    _, out, r = audited
    columns = ("kind", "path_a", "path_b", "reason", "group", "path")
    leaks = {tuple(x[c] for c in columns) for x in _rows(out / "leaks.csv")}
    assert leaks == {
        ("exact", "train/x.png", "val/x.png", "cross-split", "3", "train/x.png"),
        ("near", "train/x.png", "val/x_small.png", "cross-split", "3", "train/x.png"),
        ("near", "train/b.png", "train/c.png", "different labels", "2", "train/b.png"),
    }


def test_the_summary_counts_images_and_groups_besides_pairs(audited):
    _, out, r = audited
    s = json.loads((out / "summary.json").read_text())
    assert s == r.summary
    exact, near, leaks = s["exact_duplicates"], s["near_duplicates"], s["leaks"]
    assert (exact["count"], exact["images"], exact["groups"]) == (COPIES, COPIES + 2, 2)
    assert exact["how"] == "identical blake2b-128 content hashes, 2 group(s)"
    assert (near["count"], near["images"], near["groups"]) == (4, 6, 2)
    assert (leaks["count"], leaks["images"], leaks["groups"]) == (3, 5, 2)
    assert leaks["images_to_drop"] == 2  # train/x and train/b: the path column
    assert (leaks["cross_split"], leaks["different_labels"]) == (2, 1)
    groups = {k: v for k, v in s["groups"].items() if k != "how"}
    assert groups == {
        "count": 3,
        "images": COPIES + 6,
        "largest": COPIES,
        "spanning_splits": 1,
        "label_conflicts": 1,
        "csv": "groups.csv",
    }
    assert "--exclude groups.csv" in s["groups"]["how"]
    assert r.files["groups"] == out / "groups.csv"


def test_exclude_groups_csv_leaves_one_image_of_each_group(audited):
    cache, out, _ = audited
    listed = read_exclude(out / "groups.csv").paths
    assert len(listed) == COPIES + 6 - 3
    with open_cache(cache) as c:
        keep, matched = row_filter(c, out / "groups.csv")
        kept = {
            p
            for split in c.splits
            for p in np.asarray(c.paths(split))[keep(split, np.arange(c.num_images(split)))]
        }
        every = {p for split in c.splits for p in c.paths(split)}
    assert every - kept == listed and not matched.unmatched
    for members in (PHOTOS, CHAIN, SPANNING):
        assert kept & set(members) == {members[0]}  # the earliest split, then the first row


def test_cli_line_leads_with_groups_and_images(audited, tmp_path):
    cache, _, _ = audited
    args = ["audit", str(cache), "--out", str(tmp_path / "o"), "-q", "--device", "cpu"]
    r = CliRunner().invoke(main, [*args, "--near-threshold", "0.85"])
    assert r.exit_code == 0, r.output
    line = r.output.splitlines()[0]
    assert line.startswith(
        f"{cache}: 2 exact-duplicate groups (42 images), 2 near-duplicate groups (6 images), "
        "2 images leak across splits or labels, "
    ), line
    assert line.endswith(" among 76 images") and "groups.csv" in r.output
    r = CliRunner().invoke(main, [*args, "--near-threshold", "0.85", "--json"])
    assert json.loads(r.output)["groups"]["count"] == 3


def test_the_report_shows_the_largest_groups_one_row_each(audited):
    _, out, _ = audited
    page = (out / "report.html").read_text()
    assert "Duplicate groups (3)" in page and "3 groups, 46 images" in page
    assert "42 images, 2 groups (40 pairs)" in page  # the counts table: exact duplicates
    groups = page.split('<section id="groups">')[1].split("</section>")[0]
    assert "the first 2 shown, all in groups.csv" in groups  # report_rows groups, not images
    assert groups.count('class="strip"') == 2 and "+32 more" in groups
    assert groups.count("<figure>") == 8 + 3 and groups.count("data:image/jpeg") == 11
