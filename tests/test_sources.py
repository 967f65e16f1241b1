"""Tar shards (WebDataset) and Parquet files as extract sources: listing, labels, splits,
damaged members and shards, bit-identical features, per-shard incremental runs and torchrun."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import make_tree

from embedcache import extract, open_cache
from embedcache.config import ExtractConfig
from embedcache.errors import EmbedcacheError
from embedcache.sources import expand_braces, list_tar, plan, scan


def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset shard: for each (key, {ext: bytes}) the members KEY.EXT, in order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                add(tf, f"{key}.{ext}", data)
    return path


def tree_samples(tree: Path, split: str) -> list[tuple[str, int, bytes]]:
    """(key, label, image bytes) of make_tree's split, in the folder scan's order."""
    classes = sorted(d.name for d in (tree / split).iterdir())
    return [
        (p.stem, label, p.read_bytes())
        for label, c in enumerate(classes)
        for p in sorted((tree / split / c).iterdir())
    ]


def tree_to_shards(tree: Path, out: Path, per_shard: int) -> Path:
    """make_tree's images as split-prefixed tar shards of ``per_shard`` samples, .cls labels."""
    for split in ("train", "val"):
        samples = tree_samples(tree, split)
        for k in range(0, len(samples), per_shard):
            part = [(key, {"png": img, "cls": str(y).encode()}) for key, y, img in samples[k : k + per_shard]]  # fmt: skip
            write_tar(out / f"{split}-{k // per_shard:03d}.tar", part)
    (out / "classes.txt").write_text("cat\ndog\n")
    return out


def tree_to_parquet(tree: Path, out: Path, row_group: int) -> Path:
    """make_tree's images as one Parquet file per split, the way `datasets` writes them: an
    {bytes, path} image struct and a ClassLabel whose names sit in the file's metadata."""
    pa = pytest.importorskip("pyarrow", reason="Parquet sources need pyarrow")
    import pyarrow.parquet as pq

    meta = {"info": {"features": {"image": {"_type": "Image"}, "label": {"names": ["cat", "dog"], "_type": "ClassLabel"}}}}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        samples = tree_samples(tree, split)
        image = pa.array([{"bytes": img, "path": f"{key}.png"} for key, _, img in samples])
        table = pa.table({"image": image, "label": pa.array([y for _, y, _ in samples], pa.int64())})  # fmt: skip
        table = table.replace_schema_metadata({"huggingface": json.dumps(meta)})
        pq.write_table(table, out / f"{split}-00000-of-00001.parquet", row_group_size=row_group)
    return out


def cache_arrays(path: Path) -> dict:
    with h5py.File(path) as f:
        return {
            s: (f[s]["features"][:], f[s]["labels"][:])
            for s in f
            if isinstance(f[s], h5py.Group) and "features" in f[s]
        }


def test_brace_ranges_keep_their_width_and_lists_expand_in_order():
    assert expand_braces("s-{008..011}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]
    assert expand_braces("{train,val}-{0..1}.tar") == ["train-0.tar", "train-1.tar", "val-0.tar", "val-1.tar"]  # fmt: skip
    with pytest.raises(EmbedcacheError, match="counts down"):
        expand_braces("s-{3..1}.tar")


def test_members_group_by_key_up_to_the_first_dot_and_the_image_is_chosen_by_extension(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [
        ("a/x01", {"seg.png": b"mask", "jpg": b"J", "cls": b"1"}),
        ("a/x02", {"txt": b"caption only"}),
        ("x03", {"webp": b"W", "json": json.dumps({"label": "dog", "split": "val"}).encode()}),
    ])  # fmt: skip
    entries = list_tar(shard, label_key="label")
    assert [e.key for e in entries] == ["a/x01", "x03"]  # a/x02 has no image member
    assert entries[0].member.read_bytes() == b"J" and entries[0].label == 1
    assert entries[1].member.read_bytes() == b"W"
    assert (entries[1].label, entries[1].split) == ("dog", "val")


def test_folder_tar_shards_and_parquet_give_bit_identical_features(tmp_path, extract_kw):
    tree = make_tree(tmp_path / "folder", per_class=6)
    shards = tree_to_shards(tree, tmp_path / "shards", per_shard=4)
    parquet = tree_to_parquet(tree, tmp_path / "parquet", row_group=5)
    kw = {**extract_kw, "dtype": "float32"}
    extract(tree, out=tmp_path / "f.h5", **kw)
    extract(str(shards / "{train,val}-{000..002}.tar"), out=tmp_path / "t.h5", **kw)
    extract(parquet, out=tmp_path / "p.h5", **kw)
    ref = cache_arrays(tmp_path / "f.h5")
    assert set(ref) == {"train", "val"}
    for other in ("t.h5", "p.h5"):
        got = cache_arrays(tmp_path / other)
        assert set(got) == set(ref), other
        for split in ref:
            assert np.array_equal(got[split][0], ref[split][0]), (other, split)
            assert np.array_equal(got[split][1], ref[split][1]), (other, split)
        with open_cache(tmp_path / other) as c:
            assert c.classes == ["cat", "dog"]
    with open_cache(tmp_path / "t.h5") as c:
        assert c.paths("train")[:2] == ["train-000.tar/cat_000", "train-000.tar/cat_001"]
