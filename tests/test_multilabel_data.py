"""Multi-label data in: CSV ``labels`` columns and repeated rows, WebDataset JSON lists, Parquet
list columns; the label matrix a cache stores, its digest, resume and growth, and what info and
export-features say of it."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SIZE, make_image
from PIL import Image

from embedcache import export_features, extract, open_cache, write_cache
from embedcache.cache import PartialCache
from embedcache.cache.schema import contents_digest, seal
from embedcache.cli import main
from embedcache.config import ExtractConfig
from embedcache.data import scan
from embedcache.errors import EmbedcacheError
from embedcache.sources import list_tar
from embedcache.sources import scan as scan_source

OLD = Path(__file__).parent / "fixtures" / "main_3e1f287" / "cache.h5"
FAST = [
    *("-b", "resnet18", "-w", "none", "--image-size", str(SIZE), "--batch-size", "4"),
    *("--num-workers", "0", "--device", "cpu", "--precision", "fp32", "-q"),
]


def photos(root: Path, n: int) -> Path:
    for i in range(n):
        make_image(root / f"im{i}.png", i, i)
    return root


def manifest(root: Path, *lines: str) -> Path:
    path = root / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def bits(cache: Path, split: str) -> list[list[int]]:
    with open_cache(cache) as c:
        return c.label_matrix(split).astype(int).tolist()


def by_path(images) -> dict[str, tuple]:
    return {s.path: (s.label, s.labels) for v in images.splits.values() for s in v}


def png(seed: int) -> bytes:
    """The bytes of a small PNG whose colour ``seed`` sets (a shard member)."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), (40 * seed % 255, 90, 160)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_labels_column_gives_each_image_every_label_listed_and_its_first_as_label(
    tmp_path, extract_kw
):
    data = photos(tmp_path / "d", 6)
    m = manifest(
        data,
        "path,labels,split",
        "im0.png,sunset|beach,train",
        "im1.png,beach,train",
        "im2.png,,train",  # labelled, with no label: not unlabelled
        "im3.png,beach|dog| beach ,train",  # dog is nobody's first label
        "im4.png,sunset,val",
        "im5.png,beach|sunset,val",
    )
    images = scan(m)
    assert images.multi_label and images.classes == ["beach", "dog", "sunset"]
    assert by_path(images) == {
        "im0.png": (2, (2, 0)),  # the first listed, not the first class
        "im1.png": (0, (0,)),
        "im2.png": (-1, ()),
        "im3.png": (0, (0, 1)),  # a label repeated counts once
        "im4.png": (2, (2,)),
        "im5.png": (0, (0, 2)),
    }
    assert images.splits["train"][2].labelled
    r = extract(m, out=tmp_path / "c.h5", **extract_kw)
    assert r.empty_classes == []  # dog counts although no image lists it first
    with open_cache(r.path) as c:
        assert c.multi_label and c.attrs["format_version"] == 5
        assert c.labels("train").tolist() == [2, 0, -1, 0]
        m_train = c.label_matrix("train")
        assert m_train.dtype == bool and m_train.shape == (4, 3)
        assert c.class_counts("train").tolist() == [3, 1, 1]
    assert bits(r.path, "train") == [[1, 0, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]]
    assert bits(r.path, "val") == [[0, 0, 1], [1, 0, 1]]
    with h5py.File(r.path) as f:  # bit c % 8 of byte c // 8: np.packbits(bitorder="little")
        assert f["train/label_matrix"].dtype == np.uint8
        assert f["train/label_matrix"][:, 0].tolist() == [0b101, 0b001, 0, 0b011]


def test_a_path_on_several_rows_is_refused_unless_multi_label_then_its_rows_labels_merge(
    tmp_path,
):
    data = photos(tmp_path / "d", 3)
    rows = ["path,label,split", "im0.png,beach,train", "./im0.png,sunset,train", "im1.png,dog,"]
    m = manifest(data, *rows)
    with pytest.raises(
        EmbedcacheError,
        match=r"m\.csv lists \./im0\.png twice \(lines 2 and 3\); list each file once, with one "
        r"label, or pass --multi-label if an image has several labels$",
    ):
        scan(m)
    images = scan(m, multi_label=True)
    assert images.multi_label and images.classes == ["beach", "dog", "sunset"]
    assert by_path(images)["im0.png"] == (0, (0, 2))
    assert by_path(images)["im1.png"] == (1, (1,))
    cfg = ExtractConfig(multi_label=True)  # what extract's --multi-label passes down
    assert by_path(scan_source(m, cfg)) == by_path(images)
    manifest(data, *rows, "im0.png,dog,val")
    with pytest.raises(
        EmbedcacheError,
        match=r"m\.csv lists im0\.png in train \(line 2\) and in val \(line 5\); an image "
        r"belongs to one split: give its rows the same split$",
    ):
        scan(m, multi_label=True)
    manifest(data, "im0.png,beach|sunset", "im1.png,dog", "im1.png,beach")  # no header
    assert by_path(scan(m, multi_label=True))["im1.png"] == (1, (1, 0))
    manifest(data, "path,labels", "im0.png,a", "im0.png,b|a")  # a labels column needs no flag
    assert by_path(scan(m))["im0.png"] == (0, (0, 1))
    manifest(data, "path,label,labels", "im0.png,a,b")
    with pytest.raises(EmbedcacheError, match=r"has both a label and a labels column; keep one"):
        scan(m)
    manifest(data, "path,label", "im0.png,a|b")  # single-label: | is part of a name
    assert scan(m).classes == ["a|b"] and not scan(m).multi_label


def test_extract_multi_label_on_the_command_line_and_info_says_which_kind(tmp_path):
    data = photos(tmp_path / "d", 4)
    m = manifest(
        data,
        "im0.png,cat,train",
        "im0.png,dog,train",
        "im1.png,dog,train",
        "im2.png,cat,val",
        "im3.png,dog,val",
        "im3.png,cat,val",
    )
    runner, out = CliRunner(), tmp_path / "c.h5"
    r = runner.invoke(main, ["extract", str(m), "--out", str(out), *FAST])
    assert r.exit_code == 1 and "pass --multi-label if an image has several labels" in r.output
    r = runner.invoke(main, ["extract", str(m), "--out", str(out), "--multi-label", *FAST])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["info", str(out)])
    assert "labels     multi-label, 1-2 per image (mean 1.5)\n" in r.output
    r = runner.invoke(main, ["info", str(out), "--json"])
    assert json.loads(r.output)["labels"] == {"kind": "multi", "min": 1, "max": 2, "mean": 1.5}
    r = runner.invoke(main, ["info", str(OLD)])
    assert "labels     one per image\n" in r.output


def write_tar(path: Path, samples: list[tuple[str, dict]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def test_a_json_list_label_makes_a_webdataset_source_multi_label(tmp_path, extract_kw):
    def sample(i: int, tags, split: str) -> tuple[str, dict]:
        return f"s{i}", {"png": png(i), "json": json.dumps({"tags": tags, "split": split}).encode()}

    shard = write_tar(
        tmp_path / "src" / "part-0.tar",
        [
            sample(0, ["b", "a"], "train"),
            sample(1, "a", "train"),  # a single label in a multi-label source: a set of one
            sample(2, [], "train"),
            sample(3, ["b"], "val"),
            sample(4, [1.5], "val"),
        ],
    )
    reasons = {e.key: getattr(e.member, "reason", "") for e in list_tar(shard, label_key="tags")}
    assert reasons["s4"] == "label 'tags' is not an int or name, or a list of them"
    images = scan_source(shard, ExtractConfig(label_key="tags"))
    assert images.multi_label and images.classes == ["a", "b"]
    labels = {s.path: (s.label, s.labels) for v in images.splits.values() for s in v}
    assert labels["part-0.tar/s0"] == (1, (1, 0)) and labels["part-0.tar/s1"] == (0, (0,))
    assert labels["part-0.tar/s2"] == (-1, ())
    r = extract(shard, out=tmp_path / "c.h5", label_key="tags", **extract_kw)
    assert r.skipped == 1
    assert bits(r.path, "train") == [[1, 1], [1, 0], [0, 0]]
    assert bits(r.path, "val") == [[0, 1]]


def parquet(path: Path, columns: dict, metadata: dict | None = None) -> Path:
    pa = pytest.importorskip("pyarrow", reason="Parquet sources need pyarrow")
    import pyarrow.parquet as pq

    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata({"huggingface": json.dumps(metadata)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=2)
    return path


def test_a_parquet_list_column_makes_a_multi_label_source(tmp_path, extract_kw):
    pa = pytest.importorskip("pyarrow", reason="Parquet sources need pyarrow")
    images = pa.array([png(i) for i in range(4)], pa.binary())
    names = {"names": ["cat", "dog", "owl"], "_type": "ClassLabel"}
    meta = {"info": {"features": {"label": {"feature": names, "_type": "Sequence"}}}}
    ints = pa.array([[2, 0], [1], None, []], pa.list_(pa.int64()))
    src = parquet(tmp_path / "i" / "train-0.parquet", {"image": images, "label": ints}, meta)
    found = scan_source(src, ExtractConfig())
    assert found.multi_label and found.classes == ["cat", "dog", "owl"]  # the Sequence's names
    assert [(s.label, s.labels) for s in found.splits["train"]] == [
        (2, (2, 0)),
        (1, (1,)),
        (-1, None),  # a null list: unlabelled
        (-1, ()),
    ]
    r = extract(src, out=tmp_path / "c.h5", **extract_kw)
    assert bits(r.path, "train") == [[1, 0, 1], [0, 1, 0], [0, 0, 0], [0, 0, 0]]
    strings = pa.array([["x", "y"], ["y"], ["y", "x"], ["z"]], pa.list_(pa.string()))
    src = parquet(tmp_path / "s" / "p.parquet", {"image": images, "label": strings})
    found = scan_source(src, ExtractConfig(val_fraction=0.0))
    assert found.classes == ["x", "y", "z"]
    assert [s.labels for s in found.splits["train"]] == [(0, 1), (1,), (1, 0), (2,)]


def test_write_cache_takes_a_bool_label_matrix_and_label_matrix_gives_it_back(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.random((6, 10)) < 0.3
    y[1] = False  # an image with no label
    y[2, [3, 7]] = True
    x = rng.normal(size=(6, 8)).astype(np.float16)
    classes = [f"c{i}" for i in range(10)]
    kw = {"classes": classes, "backbone": "resnet18", "weights": "none", "transform": "{}"}
    path = write_cache(tmp_path / "m.h5", {"train": (x, y, [f"{i}.png" for i in range(6)])}, **kw)
    with open_cache(path) as c:
        assert c.multi_label and c.attrs["format_version"] == 5
        assert np.array_equal(c.label_matrix("train"), y)
        assert c.labels("train").tolist() == [
            int(np.flatnonzero(r)[0]) if r.any() else -1 for r in y
        ]
        assert c.class_counts("train").tolist() == y.sum(axis=0).tolist()
        assert np.array_equal(c.label_matrix("train", slice(2, 4)), y[2:4])
    with h5py.File(path) as f:
        assert f["train/label_matrix"].shape == (6, 2)
        assert np.array_equal(f["train/label_matrix"][:], np.packbits(y, 1, bitorder="little"))
    splits = {"train": (x, y, ["a"] * 6), "val": (x, np.zeros(6, int), ["b"] * 6)}
    with pytest.raises(
        EmbedcacheError,
        match=r"^labels must be \(N,\) class indices in every split, or \(N, C\) bool in every "
        r"split \(multi-label\); got train bool \(6, 10\), val int64 \(6,\)$",
    ):
        write_cache(tmp_path / "x.h5", splits, **kw)
    with pytest.raises(EmbedcacheError, match=r"got train int64 \(6, 10\)$"):
        write_cache(tmp_path / "x.h5", {"train": (x, y.astype(int), ["a"] * 6)}, **kw)
    with pytest.raises(
        EmbedcacheError,
        match=r"^the label matrix of split train has 9 columns, not one per class \(10\)",
    ):
        write_cache(tmp_path / "x.h5", {"train": (x, y[:, :9], ["a"] * 6)}, **kw)


def test_a_single_label_cache_keeps_its_layout_and_digest_and_reads_as_one_hot(tmp_path):
    with open_cache(OLD) as old:
        assert not old.multi_label and old.summary()["labels"] == {"kind": "single"}
        assert np.array_equal(
            old.label_matrix("train"), np.eye(3, dtype=bool)[[0] * 4 + [1] * 4 + [2] * 4]
        )
        labels, paths = old.labels("train"), old.paths("train")
    with h5py.File(OLD) as f:
        sealed = f["train"].attrs["contents_digest"]
        assert contents_digest(labels, f["train/paths"][:]) == sealed
    x = np.zeros((12, 4), np.float16)
    kw = {"classes": ["cat", "dog", "owl"], "backbone": "resnet18", "weights": "none"}
    same = write_cache(tmp_path / "same.h5", {"train": (x, labels, paths)}, transform="{}", **kw)
    with h5py.File(same) as f:
        assert f["train"].attrs["contents_digest"] == sealed  # the bytes the fixture holds
        assert "label_matrix" not in f["train"] and "multi_label" not in f.attrs
        assert f.attrs["format_version"] == 4  # earlier versions read it
    labels[5] = -1
    path = write_cache(tmp_path / "s.h5", {"train": (x, labels, paths)}, transform="{}", **kw)
    with open_cache(path) as c:
        m = c.label_matrix("train")
        assert m.shape == (12, 3) and not m[5].any() and m[4, 1] and m.sum() == 11


def multi_cache(path: Path) -> Path:
    y = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]], bool)
    x = np.ones((3, 4), np.float16)
    kw = {"classes": ["a", "b", "c"], "backbone": "resnet18", "weights": "none"}
    return write_cache(path, {"train": (x, y, ["0.png", "1.png", "2.png"])}, transform="{}", **kw)


def test_a_changed_or_missing_label_matrix_or_multi_label_attribute_is_damage(tmp_path):
    path = multi_cache(tmp_path / "m.h5")
    with h5py.File(path, "r+") as f:
        f["train/label_matrix"][1] = np.uint8(0b010)  # re-checksummed by HDF5: the digest tells
    with open_cache(path) as c:
        with pytest.raises(
            EmbedcacheError,
            match=r"is damaged: the labels or paths of split train do not match their SHA-256",
        ):
            c.label_matrix("train")
        assert any("SHA-256" in p for p in c.verify())
    path = multi_cache(tmp_path / "a.h5")
    with h5py.File(path, "r+") as f:
        del f.attrs["multi_label"]
    with pytest.raises(EmbedcacheError, match=r"its attributes .* do not match their SHA-256"):
        open_cache(path)
    path = multi_cache(tmp_path / "g.h5")
    with h5py.File(path, "r+") as f:
        del f["train/label_matrix"]
    with pytest.raises(
        EmbedcacheError, match=r"split train of a multi-label cache has no label_matrix"
    ):
        open_cache(path)
    path = multi_cache(tmp_path / "b.h5")
    with h5py.File(path, "r+") as f:  # what a wrong writer would seal: bits the labels deny
        f["train/label_matrix"][2] = np.uint8(0b1000_0001)
        seal(f)
    with (
        open_cache(path) as c,
        pytest.raises(
            EmbedcacheError,
            match=r"split train row 2: its label_matrix disagrees with its label 1 or sets a "
            r"bit past the 3 classes",
        ),
    ):
        c.labels("train")


def test_an_interrupted_or_grown_multi_label_extract_carries_the_label_matrix(
    tmp_path, extract_kw, monkeypatch
):
    data = photos(tmp_path / "d", 10)
    rows = ["path,labels,split"] + [
        f"im{i}.png,{['a', 'b', 'a|b', ''][i % 4]},{'train' if i < 7 else 'val'}" for i in range(10)
    ]
    m = manifest(data, *rows)
    ref, out = tmp_path / "ref.h5", tmp_path / "c.h5"
    extract(m, out=ref, **extract_kw)
    write, calls = PartialCache.write, []

    def crash_after_one(self, *args):
        write(self, *args)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(PartialCache, "write", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        extract(m, out=out, **extract_kw)
    monkeypatch.undo()
    with h5py.File(f"{out}.partial") as f:
        assert f["train/label_matrix"].shape == (7, 1) and f.attrs["multi_label"]
    r = extract(m, out=out, **extract_kw)
    assert (r.reused, r.extracted) == (4, 6)
    for split in ("train", "val"):
        assert bits(out, split) == bits(ref, split)
        with open_cache(out) as a, open_cache(ref) as b:
            assert np.array_equal(a.features(split)[:], b.features(split)[:])
    make_image(data / "im10.png", 1, 10)
    rows[1] = "im0.png,b|a,train"  # im0 was a: relabelled, not re-extracted
    manifest(data, *rows, "im10.png,b,val")
    r = extract(m, out=out, **extract_kw)
    assert (r.extracted, r.reused) == (1, 10)
    assert bits(out, "train")[0] == [1, 1]
    with open_cache(out) as c:
        assert c.labels("train")[0] == 1  # b, listed first now
    assert bits(out, "val") == [[0, 1], *bits(ref, "val")]  # rows by path: im10 before im7


def test_export_features_of_a_multi_label_cache_lists_every_label_of_each_image(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="export-features writes Parquet")
    path = multi_cache(tmp_path / "m.h5")
    export_features(path, out=tmp_path / "out", progress=False)
    table = pq.read_table(tmp_path / "out" / "train" / "metadata" / "metadata_0.parquet")
    assert table.column("labels").to_pylist() == [[0, 2], [], [1]]
    assert table.column("class_names").to_pylist() == [["a", "c"], [], ["b"]]
    assert table.column("label").to_pylist() == [0, -1, 1]
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    assert manifest["columns"][-2:] == ["labels", "class_names"]
    with open_cache(OLD) as c:
        assert not c.multi_label
    export_features(OLD, out=tmp_path / "single", progress=False)
    single = pq.read_table(tmp_path / "single" / "train" / "metadata" / "metadata_0.parquet")
    assert "labels" not in single.column_names
