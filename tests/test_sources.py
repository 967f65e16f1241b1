"""Tar shards (WebDataset) and Parquet files as extract sources: listing, labels, splits,
damaged members and shards, bit-identical features, per-shard incremental runs and torchrun."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import make_tree

from embedcache import extract, open_cache
from embedcache.config import ExtractConfig
from embedcache.errors import EmbedcacheError
from embedcache.sources import expand_braces, list_parquet, list_tar, plan, scan


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
            part = [
                (key, {"png": img, "cls": str(y).encode()})
                for key, y, img in samples[k : k + per_shard]
            ]
            write_tar(out / f"{split}-{k // per_shard:03d}.tar", part)
    (out / "classes.txt").write_text("cat\ndog\n")
    return out


def tree_to_parquet(tree: Path, out: Path, row_group: int) -> Path:
    """make_tree's images as one Parquet file per split, the way `datasets` writes them: an
    {bytes, path} image struct and a ClassLabel whose names sit in the file's metadata."""
    pa = pytest.importorskip("pyarrow", reason="Parquet sources need pyarrow")
    import pyarrow.parquet as pq

    meta = {
        "info": {
            "features": {
                "image": {"_type": "Image"},
                "label": {"names": ["cat", "dog"], "_type": "ClassLabel"},
            }
        }
    }
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        samples = tree_samples(tree, split)
        image = pa.array([{"bytes": img, "path": f"{key}.png"} for key, _, img in samples])
        table = pa.table(
            {"image": image, "label": pa.array([y for _, y, _ in samples], pa.int64())}
        )
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


def by_path(path: Path) -> dict[str, np.ndarray]:
    with open_cache(path) as c:
        return {p: f for s in c.splits for p, f in zip(c.paths(s), c.features(s)[:], strict=True)}


def test_brace_ranges_keep_their_width_and_lists_expand_in_order():
    assert expand_braces("s-{008..011}.tar") == ["s-008.tar", "s-009.tar", "s-010.tar", "s-011.tar"]
    assert expand_braces("{train,val}-{0..1}.tar") == [
        "train-0.tar",
        "train-1.tar",
        "val-0.tar",
        "val-1.tar",
    ]
    assert expand_braces("{train-{0..1},val-0}.tar") == ["train-0.tar", "train-1.tar", "val-0.tar"]
    with pytest.raises(EmbedcacheError, match="counts down"):
        expand_braces("s-{3..1}.tar")


def test_members_group_by_key_up_to_the_first_dot_and_the_image_is_chosen_by_extension(tmp_path):
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("a/x01", {"seg.png": b"mask", "jpg": b"J", "cls": b"1"}),
            ("a/x02", {"txt": b"caption only"}),
            ("x03", {"webp": b"W", "json": json.dumps({"label": "dog", "split": "val"}).encode()}),
        ],
    )
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
        with open_cache(tmp_path / other) as c, open_cache(tmp_path / "f.h5") as f:
            assert c.classes == ["cat", "dog"]
            for split in ref:  # each member's content hash, as the file's (audit finds copies)
                assert np.array_equal(c.hashes(split), f.hashes(split)), (other, split)
                assert c.hashes(split).any(1).all(), (other, split)
    with open_cache(tmp_path / "t.h5") as c:
        assert c.paths("train")[:2] == ["train-000.tar/cat_000", "train-000.tar/cat_001"]


def png(tree: Path) -> bytes:
    return next(tree.rglob("*.png")).read_bytes()


def test_a_damaged_member_or_shard_is_skipped_with_its_reason_and_the_rest_extracted(
    tmp_path, extract_kw
):
    img = png(make_tree(tmp_path / "t", per_class=1))
    good = [(f"k{i}", {"png": img, "cls": b"0"}) for i in range(3)]
    src = tmp_path / "s"
    write_tar(
        src / "a.tar",
        [
            *good,
            ("bad", {"png": b"not an image", "cls": b"0"}),
            ("nolabel", {"png": img, "cls": b"x"}),
        ],
    )
    cut = write_tar(src / "b.tar", [(f"m{i}", {"png": img, "cls": b"1"}) for i in range(3)])
    cut.write_bytes(cut.read_bytes()[: 512 * 2 + len(img) // 2])  # ends inside the first image
    (src / "c.tar").write_bytes(b"garbage, not a tar file" * 40)
    r = extract(str(src / "*.tar"), out=tmp_path / "c.h5", val_fraction=0.0, **extract_kw)
    assert r.images == 3 and r.skipped == 5
    with open_cache(tmp_path / "c.h5") as c:
        reasons = {s.path: s.reason for s in c.skipped}
    assert reasons["a.tar/bad"] == "not an image (unrecognised format)"
    assert reasons["a.tar/nolabel"] == "label .cls is not a whole number"
    assert reasons["b.tar/m0"] == "truncated member (the shard ends inside it)"
    assert reasons["b.tar/"] == "damaged shard: damaged after 1 samples (unexpected end of data)"
    assert reasons["c.tar/"].startswith("damaged shard: not a tar file")


def test_a_changed_or_added_shard_is_read_again_and_an_unchanged_one_reused(tmp_path, extract_kw):
    tree = make_tree(tmp_path / "folder", per_class=6)
    shards = tree_to_shards(tree, tmp_path / "shards", per_shard=4)
    pattern = str(shards / "*.tar")
    first = extract(pattern, out=tmp_path / "c.h5", **extract_kw)
    assert first.extracted == 24
    old = by_path(tmp_path / "c.h5")
    samples = tree_samples(tree, "train")
    write_tar(
        shards / "train-001.tar",
        [(k + "x", {"png": img, "cls": str(y).encode()}) for k, y, img in samples[4:7]],
    )
    write_tar(
        shards / "train-009.tar",
        [(k + "y", {"png": img, "cls": str(y).encode()}) for k, y, img in samples[:2]],
    )
    again = extract(pattern, out=tmp_path / "c.h5", **extract_kw)
    assert (again.extracted, again.reused, again.images) == (5, 20, 25)  # 3 + 2 read, 24 - 4 kept
    new = by_path(tmp_path / "c.h5")
    kept = [p for p in old if not p.startswith("train-001.tar/")]
    assert len(kept) == 20 and all(np.array_equal(new[p], old[p]) for p in kept)
    assert sorted(p for p in new if p not in old) == sorted(
        [f"train-001.tar/{k}x" for k, _, _ in samples[4:7]]
        + [f"train-009.tar/{k}y" for k, _, _ in samples[:2]]
    )
    assert extract(pattern, out=tmp_path / "c.h5", **extract_kw).up_to_date


def test_split_shards_and_json_labels_by_name_with_a_split_field(tmp_path, extract_kw):
    img = png(make_tree(tmp_path / "t", per_class=1))

    def sample(i, label, split=None):
        meta = {"name": label, **({"split": split} if split else {})}
        return (f"s{i}", {"png": img, "json": json.dumps(meta).encode()})

    src = tmp_path / "src"
    write_tar(src / "x" / "part-0.tar", [sample(0, "b"), sample(1, "a"), sample(2, "b")])
    write_tar(src / "y" / "part-0.tar", [sample(3, "a"), sample(4, "b", "val")])
    cfg = ExtractConfig(
        split_shards="train=x/*.tar,test=y/{0..0}.tar".replace("{0..0}", "part-{0..0}"),
        label_key="name",
    )
    images = scan(src, cfg)
    assert images.classes == ["a", "b"] and images.layout == "webdataset"
    assert {k: [s.path for s in v] for k, v in images.splits.items()} == {
        "train": ["x/part-0.tar/s0", "x/part-0.tar/s1", "x/part-0.tar/s2"],
        "test": ["y/part-0.tar/s3", "y/part-0.tar/s4"],  # the pattern's split wins over the field
    }
    assert [s.label for s in images.splits["train"]] == [1, 0, 1]
    with pytest.raises(EmbedcacheError, match="--split-shards takes train=PATTERN"):
        scan(src, ExtractConfig(split_shards="train"))
    r = extract(
        src,
        out=tmp_path / "c.h5",
        split_shards="train=x/*.tar,test=y/*.tar",
        label_key="name",
        **extract_kw,
    )
    assert r.splits == {"train": 3, "test": 2}


def test_plan_gives_every_shard_to_one_rank_and_every_row_to_one_batch(tmp_path):
    sizes = [7, 2, 5, 1, 9]
    paths = {"train": [f"s{k}.tar/{i}" for k, n in enumerate(sizes) for i in range(n)]}
    todo = {"train": np.arange(len(paths["train"]))}
    attrs = {"layout": "webdataset", "source": str(tmp_path)}
    seen, owners = [], {}
    for rank in range(3):
        flat, mine, _ = plan(
            attrs, todo, paths, batch_size=4, rank=rank, world=3, cfg=ExtractConfig()
        )
        for batch in mine:
            names = {paths["train"][flat[i][1]].split("/")[0] for i in batch}
            assert len(names) == 1 and len(batch) <= 4  # a batch never straddles a shard
            assert owners.setdefault(names.pop(), rank) == rank  # a shard has one rank
            seen += [flat[i] for i in batch]
    assert sorted(seen) == [("train", r) for r in range(24)]  # every row exactly once
    assert len(set(owners.values())) == 3


def test_two_ranks_on_uneven_shards_write_the_one_process_cache_each_shard_read_by_one_rank(
    tmp_path,
):
    from test_distributed import EXTRACT, LIBRARY, one_thread, torchrun

    tree = make_tree(tmp_path / "folder", per_class=8)
    samples = tree_samples(tree, "train")
    src, start = tmp_path / "shards", 0
    for k, n in enumerate([7, 2, 5, 1]):  # middle rows 3.5, 8, 11.5, 14.5 of 15: rank 0, 1, 1, 1
        part = [
            (key, {"png": img, "cls": str(y).encode()})
            for key, y, img in samples[start : start + n]
        ]
        write_tar(
            src / f"s{k}.tar", part + ([("broken", {"png": b"x", "cls": b"0"})] if k == 2 else [])
        )
        start += n
    pattern = str(src / "s{0..3}.tar")
    one_thread(
        lambda: extract(
            pattern, out=tmp_path / "one.h5", batch_size=4, val_fraction=0.25, **LIBRARY
        )
    )
    two = torchrun(
        2, ["extract", pattern, "--out", "two.h5", "--val-fraction", "0.25", *EXTRACT], tmp_path
    )
    assert two.returncode == 0, two.stderr[-2000:]
    result = json.loads(two.stdout)
    assert [n for n, _ in result["ranks"]] == [7, 8] and result["skipped"] == 1
    one, got = by_path(tmp_path / "one.h5"), by_path(tmp_path / "two.h5")
    assert sorted(got) == sorted(one) and len(got) == 15  # every key once
    assert all(np.array_equal(got[p], one[p]) for p in one)
    with open_cache(tmp_path / "one.h5") as a, open_cache(tmp_path / "two.h5") as b:
        assert a.splits == b.splits and all(a.paths(s) == b.paths(s) for s in a.splits)


def test_parquet_with_named_columns_and_string_labels_is_read_a_row_group_at_a_time(
    tmp_path, extract_kw
):
    pa = pytest.importorskip("pyarrow", reason="Parquet sources need pyarrow")
    import pyarrow.parquet as pq

    from embedcache import sources

    tree = make_tree(tmp_path / "t", per_class=5)
    samples = tree_samples(tree, "train")
    table = pa.table(
        {
            "jpeg": pa.array([img for _, _, img in samples], pa.binary()),
            "species": [["cat", "dog"][y] for _, y, _ in samples],
        }
    )
    data = tmp_path / "pq"
    data.mkdir()
    pq.write_table(table, data / "part-0.parquet", row_group_size=3)  # 4 row groups of 10 rows
    (data / "part-1.parquet").write_bytes(b"PAR1 this is not parquet")
    held, read = [], sources.ParquetImages.read

    def spy(self, group, index):
        out = read(self, group, index)
        held.append(self.held)
        return out

    sources.ParquetImages.read = spy
    try:
        r = extract(
            data, out=tmp_path / "c.h5", image_column="jpeg", label_column="species", **extract_kw
        )
    finally:
        sources.ParquetImages.read = read
    assert r.images == 10 and r.skipped == 1 and held and max(held) <= sources.ROW_GROUPS_HELD
    with open_cache(tmp_path / "c.h5") as c:
        assert c.classes == ["cat", "dog"]
        assert (
            c.skipped[0].path == "part-1.parquet/" and "not a Parquet file" in c.skipped[0].reason
        )
    with pytest.raises(
        EmbedcacheError,
        match=r"has no column 'image' \(columns: jpeg, species\); pass --image-column",
    ):
        extract(data, out=tmp_path / "d.h5", **extract_kw)


def test_an_extract_of_shards_cut_off_mid_run_resumes_to_the_uninterrupted_bits(
    tmp_path, extract_kw, monkeypatch
):
    from test_extraction import _crash_after

    tree = make_tree(tmp_path / "folder", per_class=6)
    pattern = str(tree_to_shards(tree, tmp_path / "shards", per_shard=3) / "*.tar")
    extract(pattern, out=tmp_path / "ref.h5", **extract_kw)
    _crash_after(monkeypatch, 3, lambda: extract(pattern, out=tmp_path / "c.h5", **extract_kw))
    r = extract(pattern, out=tmp_path / "c.h5", **extract_kw)
    assert (r.reused, r.extracted) == (9, 15)  # 3 batches of one 3-sample shard each were done
    got, ref = cache_arrays(tmp_path / "c.h5"), cache_arrays(tmp_path / "ref.h5")
    for split in ref:
        assert np.array_equal(got[split][0], ref[split][0]), split


def header_offsets(path: Path) -> dict[str, int]:
    """Where each member's header starts in a tar, by name."""
    with tarfile.open(path) as tf:
        return {m.name: m.offset for m in tf.getmembers()}


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def set_field(path: Path, offset: int, at: slice, value: bytes) -> None:
    """Set a header field of the header at ``offset`` and give it a valid checksum again."""
    with open(path, "rb") as f:
        f.seek(offset)
        header = bytearray(f.read(512))
    header[at] = value
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    overwrite(path, offset, bytes(header))


def reasons_of(entries) -> dict[str, str]:
    return {e.key: getattr(e.member, "reason", "ok") for e in entries}


def test_a_damaged_tar_header_mid_shard_skips_every_sample_after_it_and_says_where(
    tmp_path, extract_kw
):
    img = png(make_tree(tmp_path / "t", per_class=1))
    src = tmp_path / "s"
    shard = write_tar(src / "a.tar", [(f"k{i}", {"png": img, "cls": b"0"}) for i in range(6)])
    at = header_offsets(shard)["k3.png"]
    overwrite(shard, at, b"\xde\xad" * 256)  # tarfile stops here without a word
    r = extract(str(src / "*.tar"), out=tmp_path / "c.h5", val_fraction=0.0, **extract_kw)
    assert (r.images, r.skipped) == (3, 4)
    with open_cache(tmp_path / "c.h5") as c:
        reasons = {s.path: s.reason for s in c.skipped}
    assert reasons == {
        "a.tar/k3": f"after a damaged tar header at byte {at}",
        "a.tar/k4": f"after a damaged tar header at byte {at}",
        "a.tar/k5": f"after a damaged tar header at byte {at}",
        "a.tar/": f"damaged shard: a damaged tar header at byte {at}",
    }


def test_a_sample_cut_by_damage_members_past_the_end_block_and_a_shard_cut_short_are_reported(
    tmp_path,
):
    samples = [(f"k{i}", {"png": b"P", "cls": b"0"}) for i in range(4)]
    cut = write_tar(tmp_path / "cut.tar", samples)
    at = header_offsets(cut)["k1.cls"]  # k1's image is read, its label is the damaged member
    overwrite(cut, at, b"\xff" * 512)
    assert reasons_of(list_tar(cut)) == {
        "k0": "ok",
        "k1": f"cut by a damaged tar header at byte {at}",
        "k2": f"after a damaged tar header at byte {at}",
        "k3": f"after a damaged tar header at byte {at}",
        "": f"damaged shard: a damaged tar header at byte {at}",
    }
    first = write_tar(tmp_path / "a.tar", samples[:2]).read_bytes()
    second = write_tar(tmp_path / "b.tar", [("m0", {"png": b"P", "cls": b"1"})]).read_bytes()
    (tmp_path / "cat.tar").write_bytes(first + second)  # tar readers stop at the first end block
    end = header_offsets(tmp_path / "a.tar")["k1.cls"] + 1024
    assert reasons_of(list_tar(tmp_path / "cat.tar")) == {
        "k0": "ok",
        "k1": "ok",
        "m0": f"after the end-of-archive block at byte {end}",
        "": f"damaged shard: members after the end-of-archive block at byte {end}",
    }
    whole = write_tar(tmp_path / "w.tar", samples)
    (tmp_path / "short.tar").write_bytes(whole.read_bytes()[: header_offsets(whole)["k2.png"]])
    assert reasons_of(list_tar(tmp_path / "short.tar")) == {
        "k0": "ok",
        "k1": "ok",
        "": "damaged shard: damaged after 2 samples (no end-of-archive block: cut short?)",
    }


def test_the_members_past_damage_are_found_across_scan_chunks_and_false_starts(
    tmp_path, monkeypatch
):
    from embedcache.sources import tarformat

    monkeypatch.setattr(tarformat, "SCAN_CHUNK_BYTES", 1024)  # two blocks: every hit crosses one
    shard = write_tar(tmp_path / "s.tar", [(f"k{i}", {"png": b"P" * 3000}) for i in range(6)])
    at = header_offsets(shard)["k1.png"]
    garbage = bytearray(b"\xaa" * 3584)  # k1's header and data, with the magic where a header's is
    garbage[257:262] = garbage[1024 + 257 : 1024 + 262] = garbage[1000:1005] = b"ustar"
    overwrite(shard, at, bytes(garbage))
    lost = f"after a damaged tar header at byte {at}"
    assert reasons_of(list_tar(shard)) == {
        "k0": "ok",
        **{f"k{i}": lost for i in range(2, 6)},
        "": f"damaged shard: a damaged tar header at byte {at}",
    }


def test_a_damaged_header_of_a_shard_that_tarfile_reads_is_reported_too(tmp_path):
    samples = [(f"kä{i}", {"png": b"P", "cls": b"0"}) for i in range(4)]  # pax: tarfile reads
    shard = write_tar(tmp_path / "s.tar", samples)
    with tarfile.open(shard) as tf:
        png = next(m for m in tf.getmembers() if m.name == "kä1.png")
    overwrite(shard, png.offset_data - 512, b"\x00\xff" * 256)  # the header after its pax one
    lost = f"after a damaged tar header at byte {png.offset}"
    assert reasons_of(list_tar(shard)) == {
        "kä0": "ok",
        **{f"kä{i}": lost for i in range(1, 4)},  # kä1: its .cls is found, its image was damaged
        "": f"damaged shard: a damaged tar header at byte {png.offset}",
    }


def test_a_tar_header_whose_numbers_are_not_octal_or_negative_is_a_damaged_header(tmp_path):
    samples = [(f"k{i}", {"png": b"P", "cls": b"0"}) for i in range(3)]
    for name, at, value in [
        ("checksum.tar", slice(148, 156), None),
        ("size.tar", slice(124, 136), b"9999999999\0\0"),
        ("negative.tar", slice(124, 136), b"\xff" * 12),  # base-256 -1: tarfile would loop
    ]:
        shard = write_tar(tmp_path / name, samples)
        offset = header_offsets(shard)["k1.png"]
        if value is None:
            overwrite(shard, offset + 148, b"99999999")
        else:
            set_field(shard, offset, at, value)
        reasons = reasons_of(list_tar(shard))
        assert reasons[""] == f"damaged shard: a damaged tar header at byte {offset}", name
        assert reasons["k0"] == "ok" and reasons["k2"].startswith("after a damaged"), name


def test_a_member_declaring_more_bytes_than_the_shard_holds_is_never_read(tmp_path, monkeypatch):
    shard = write_tar(tmp_path / "s.tar", [("k0", {"png": b"P" * 600, "cls": b"0"})])
    set_field(shard, header_offsets(shard)["k0.png"], slice(124, 136), b"77777777777\0")
    pread = os.pread

    def bounded(fd, n, offset):
        assert offset + n <= os.fstat(fd).st_size, "asked for 8 GiB of a 10 kB shard"
        return pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", bounded)
    entries = list_tar(shard)
    assert entries[-1].key == "" and "unexpected end of data" in entries[-1].member.reason
    with pytest.raises(Exception, match="truncated member"):
        entries[0].member.read_bytes()


def test_a_key_twice_in_a_shard_is_skipped_not_merged(tmp_path):
    shard = write_tar(
        tmp_path / "s.tar",
        [
            ("a", {"jpg": b"A", "cls": b"0"}),
            ("b", {"jpg": b"B", "cls": b"1"}),
            ("a", {"cls": b"1"}),  # today: a's image with this label
            ("c", {"png": b"C"}),
            ("c", {"png": b"D"}),
        ],
    )
    assert reasons_of(list_tar(shard)) == {
        "a": "key a appears twice in the shard",
        "b": "ok",
        "c": "key c appears twice in the shard",
    }


def test_an_empty_shard_and_a_shard_without_images_are_skipped_with_the_reason(
    tmp_path, extract_kw
):
    img = png(make_tree(tmp_path / "t", per_class=1))
    src = tmp_path / "s"
    write_tar(src / "a.tar", [(f"k{i}", {"png": img, "cls": b"0"}) for i in range(2)])
    (src / "b.tar").write_bytes(b"")
    write_tar(src / "c.tar", [("k0", {"txt": b"a caption without its image"})])
    r = extract(str(src / "*.tar"), out=tmp_path / "c.h5", val_fraction=0.0, **extract_kw)
    assert (r.images, r.skipped) == (2, 2)
    with open_cache(tmp_path / "c.h5") as c:
        assert {s.path: s.reason for s in c.skipped} == {
            "b.tar/": "empty shard (0 bytes)",
            "c.tar/": "no jpg/jpeg/png/webp member in the shard",
        }
    with pytest.raises(EmbedcacheError, match=r"no samples in 2 shards .*b\.tar: empty shard"):
        scan(str(src / "{b,c}.tar"), ExtractConfig())


def test_labels_that_are_no_class_index_or_a_label_key_no_sample_has_are_errors(tmp_path):
    src = tmp_path / "s"
    write_tar(
        src / "s.tar", [("k0", {"png": b"P", "cls": b"3"}), ("k1", {"png": b"P", "cls": b"100000"})]
    )
    with pytest.raises(
        EmbedcacheError,
        match=r"^label 100000 of s\.tar/k1 is not a class index: without class names labels "
        r"must be below 100,000; give the class names in classes\.txt",
    ):
        scan(src / "s.tar", ExtractConfig())  # today: 100,001 names; a .cls of 10^12 never ends
    (src / "classes.txt").write_text("".join(f"c{i}\n" for i in range(100_001)))
    assert len(scan(src / "s.tar", ExtractConfig()).classes) == 100_001  # named: no bound
    big = write_tar(tmp_path / "b.tar", [("k0", {"png": b"P", "cls": b"0" * (1 << 20) + b"1"})])
    assert reasons_of(list_tar(big)) == {"k0": "label .cls is over 1 MiB"}
    json_labels = [("k0", {"png": b"P", "json": b'{"label": "cat"}'})]
    write_tar(tmp_path / "j" / "s.tar", json_labels)
    with pytest.raises(
        EmbedcacheError, match=r"has a label in the .json field 'lable'.*--unlabelled"
    ):
        scan(tmp_path / "j" / "s.tar", ExtractConfig(label_key="lable"))
    images = scan(tmp_path / "j" / "s.tar", ExtractConfig(label_key="lable", unlabelled=True))
    assert images.classes == [] and list(images.splits) == ["all"]


def test_a_brace_pattern_of_too_many_names_is_refused_before_expanding():
    with pytest.raises(
        EmbedcacheError, match=r"would name 1,000,001 files, more than the 1,000,000"
    ):
        expand_braces("x-{0000000..1000000}.tar")
    start = time.perf_counter()
    with pytest.raises(
        EmbedcacheError,
        match=r"^'x-\{0000000000\.\.9999999999\}\.tar' would name 10,000,000,000 files, .*"
        r"name the shards with a glob \(e\.g\. train-\*\.tar\) or give their folder$",
    ):
        expand_braces("x-{0000000000..9999999999}.tar")
    with pytest.raises(EmbedcacheError, match=r"would name 1,099,511,627,776 files"):
        expand_braces("{a,b}" * 40 + ".tar")
    assert time.perf_counter() - start < 1.0
    assert len(expand_braces("{a,b}{0..9}{0..9}{{c,d}{0..9},e}")) == 4200


def test_a_class_list_that_is_not_json_a_list_or_utf8_or_has_blank_or_repeated_names_is_an_error(
    tmp_path,
):
    write_tar(tmp_path / "s.tar", [("k0", {"png": b"P", "cls": b"1"})])
    names = tmp_path / "classes.json"
    for text, match in [
        ("cat, dog", r"classes\.json is not JSON \(.*\); it must hold a list of class names"),
        ('{"0": "cat"}', r"classes\.json must hold a list of class names .*; it holds dict"),
        ('["cat", 1]', r"classes\.json must hold a list of class names .*; it holds list 1$"),
        ('["cat", "", "dog"]', r"class 1 in .*classes\.json is blank"),
    ]:
        names.write_text(text)
        with pytest.raises(EmbedcacheError, match=match):
            scan(tmp_path / "s.tar", ExtractConfig())
    names.unlink()
    names = tmp_path / "classes.txt"
    for data, match in [
        ("chat\nlévrier\n".encode("latin-1"), r"classes\.txt is not UTF-8 text \(byte 6\)"),
        (b"cat\n\ndog\n", r"class 1 in .*classes\.txt is blank"),
        (b"cat\ndog\ncat\n", r"class name 'cat' appears twice in .*classes\.txt"),
    ]:
        names.write_bytes(data)
        with pytest.raises(EmbedcacheError, match=match):
            scan(tmp_path / "s.tar", ExtractConfig())
    names.write_bytes(b"\xef\xbb\xbfcat\ndog\n\n")  # a BOM and a blank last line are fine
    assert scan(tmp_path / "s.tar", ExtractConfig()).classes == ["cat", "dog"]


def parquet_file(path: Path, columns: dict, row_group: int = 3) -> Path:
    pa = pytest.importorskip("pyarrow", reason="Parquet sources need pyarrow")
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group, compression="none")
    return path


def test_parquet_columns_are_checked_when_listing(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="Parquet sources need pyarrow")
    images = pa.array([b"P"] * 4, pa.binary())
    data = tmp_path / "float" / "p.parquet"
    parquet_file(data, {"image": images, "label": pa.array([0.0, 1.0, 0.0, 1.0])})
    with pytest.raises(
        EmbedcacheError,
        match=r"p\.parquet: label column 'label' holds double, not class indices \(integers\) "
        r"or names \(strings\), or lists of them; pass --label-column, or --unlabelled "
        r"\(columns: image, label\)$",
    ):
        scan(data, ExtractConfig())
    with pytest.raises(
        EmbedcacheError,
        match=r"has no label column 'lable' \(columns: image, label\); pass --label-column, "
        "or --unlabelled to extract without labels$",
    ):
        scan(data, ExtractConfig(label_column="lable"))
    unlabelled = scan(data, ExtractConfig(label_column="lable", unlabelled=True))
    assert unlabelled.classes == [] and len(unlabelled.splits["all"]) == 4
    names = tmp_path / "names" / "p.parquet"
    labels = pa.array(["cat", "dog", "cat", None]).dictionary_encode()
    parquet_file(names, {"image": pa.array([b"P"] * 4, pa.large_binary()), "label": labels})
    assert scan(names, ExtractConfig()).classes == ["cat", "dog"]
    strings = tmp_path / "str" / "p.parquet"
    parquet_file(strings, {"image": pa.array(["a.jpg"] * 4), "label": pa.array([0, 1, 0, 1])})
    with pytest.raises(
        EmbedcacheError,
        match=r"column 'image' holds string, not image bytes \(binary, or the \{bytes, path\} "
        r"struct `datasets` writes\); pass --image-column \(columns: image, label\)$",
    ):
        scan(strings, ExtractConfig())
    big = tmp_path / "big" / "p.parquet"
    parquet_file(big, {"image": images, "label": pa.array([0, 10**12, 0, 1])})
    with pytest.raises(EmbedcacheError, match=r"label 1000000000000 of p\.parquet/1 is not"):
        scan(big, ExtractConfig())


def test_parquet_without_rows_or_with_a_damaged_row_group_skips_those_rows_and_reads_the_rest(
    tmp_path,
):
    pa = pytest.importorskip("pyarrow", reason="Parquet sources need pyarrow")
    import pyarrow.parquet as pq

    columns = {"image": pa.array([b"P%d" % i for i in range(9)]), "label": list(range(9))}
    data = parquet_file(tmp_path / "p.parquet", columns)
    chunk = pq.ParquetFile(data).metadata.row_group(1).column(1)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    overwrite(data, start, b"\xff" * chunk.total_compressed_size)  # row group 1's labels
    entries, _ = list_parquet(data)
    reasons = reasons_of(entries)
    assert [e.key for e in entries] == [str(i) for i in range(9)]
    assert [e.label for e in entries] == [0, 1, 2, None, None, None, 6, 7, 8]
    assert all(reasons[str(i)].startswith("row group 1 is damaged (") for i in (3, 4, 5))
    assert entries[8].member.read_bytes() == b"P8"
    empty = parquet_file(tmp_path / "e.parquet", {"image": pa.array([], pa.binary())})
    assert reasons_of(list_parquet(empty, unlabelled=True)[0]) == {"": "no rows in the file"}
