"""export-features: per-split .npy + Parquet (clip-retrieval's layout), row for row with the
cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import blobs

from embedcache import export_features, open_cache
from embedcache.cli import main
from embedcache.errors import EmbedcacheError

pq = pytest.importorskip("pyarrow.parquet", reason="export-features writes Parquet with pyarrow")


def test_the_export_loads_with_numpy_and_pandas_and_matches_the_cache_row_for_row(
    make_cache, tmp_path
):
    pd = pytest.importorskip("pandas", reason="the Parquet tables are checked through pandas")
    x, y = blobs(8, classes=3)
    y[2] = -1  # an unlabelled row has no class name
    cache = make_cache(train=(x, y), val=blobs(3, seed=1))
    r = export_features(cache, out=tmp_path / "out", chunk_rows=10, progress=False)
    assert r.splits == {"train": 24, "val": 9} and r.dtype == "float16"
    with open_cache(cache) as c:
        for split in c.splits:
            files = sorted((tmp_path / "out" / split / "img_emb").glob("*.npy"))
            k = -(-c.num_images(split) // 10)  # chunks of 10 rows: 3 for train, 1 for val
            assert sorted(f.name for f in files) == sorted(f"img_emb_{i}.npy" for i in range(k))
            emb = np.concatenate(
                [
                    np.load(tmp_path / "out" / split / "img_emb" / f"img_emb_{i}.npy")
                    for i in range(k)
                ]
            )
            meta = pd.concat(
                [
                    pd.read_parquet(tmp_path / "out" / split / "metadata" / f"metadata_{i}.parquet")
                    for i in range(k)
                ]
            )
            assert np.array_equal(emb, c.features(split)[:])
            assert list(meta["image_path"]) == c.paths(split)
            assert list(meta["label"]) == list(c.labels(split)) and set(meta["split"]) == {split}
            names = [c.classes[v] if v >= 0 else None for v in c.labels(split)]
            assert [None if pd.isna(v) else v for v in meta["class_name"]] == names
            assert list(meta["key"]) == [p.rsplit(".", 1)[0] for p in c.paths(split)]
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    assert manifest["splits"] == {"train": 24, "val": 9} and len(manifest["files"]) == 2 * (3 + 1)


def test_export_refuses_a_folder_it_did_not_write_and_replaces_its_own(make_cache, tmp_path):
    cache = make_cache(train=blobs(4), val=blobs(2, seed=1))
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_bytes(b"x")
    with pytest.raises(
        EmbedcacheError,
        match=r"holds keep\.jpg, which export-features did not write; pass a new or empty folder",
    ):
        export_features(cache, out=other, progress=False)
    assert (other / "keep.jpg").read_bytes() == b"x"
    export_features(cache, out=tmp_path / "out", progress=False)
    r = export_features(cache, out=tmp_path / "out", split="val", dtype="float32", progress=False)
    assert r.splits == {"val": 6} and not (tmp_path / "out" / "train").exists()
    assert np.load(tmp_path / "out" / "val" / "img_emb" / "img_emb_0.npy").dtype == np.float32
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    with pytest.raises(
        EmbedcacheError, match=r"--split must name splits of the cache \(train, val\), got 'test'"
    ):
        export_features(cache, out=tmp_path / "out", split="test", progress=False)


def test_the_cli_exports_and_keys_of_tar_shards_are_their_webdataset_keys(tmp_path, extract_kw):
    from conftest import make_tree
    from test_sources import tree_to_shards

    from embedcache import extract

    shards = tree_to_shards(make_tree(tmp_path / "t", per_class=2), tmp_path / "s", per_shard=2)
    extract(str(shards / "*.tar"), out=tmp_path / "c.h5", **extract_kw)
    r = CliRunner().invoke(
        main, ["export-features", str(tmp_path / "c.h5"), "--out", str(tmp_path / "o"), "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["splits"] == {"train": 4, "val": 4}
    meta = pq.read_table(tmp_path / "o" / "train" / "metadata" / "metadata_0.parquet").to_pylist()
    assert meta[0]["image_path"] == "train-000.tar/cat_000" and meta[0]["key"] == "cat_000"
    assert meta[0]["class_name"] == "cat"
