"""cache: what open_cache refuses, what write_cache stores, what a damaged cache reports."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import blobs

from embedcache import open_cache
from embedcache.cache import FORMAT_VERSION, partial_path, write_cache
from embedcache.errors import EmbedcacheError
from embedcache.identity import FeatureIdentity

TRANSFORM = '{"crop": 64}'


def _write(path, splits=None, **kw):
    if splits is None:
        x, y = blobs(4, dim=8)
        splits = {"train": (x, y, [f"{i}.png" for i in range(len(y))])}
    args = {"classes": ["a", "b", "c"], "backbone": "resnet18", "weights": "none"}
    return write_cache(path, splits, **{**args, "transform": TRANSFORM, **kw})


def _refused(path, match: str) -> None:
    with pytest.raises(EmbedcacheError, match=match) as e:
        open_cache(path)
    assert "\n" not in str(e.value)


def test_an_hdf5_file_that_is_not_a_cache_is_refused(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("x", data=np.arange(3))
    _refused(
        path,
        r"other\.h5 is an HDF5 file but not an embedcache cache \(no format_version attribute\)$",
    )
    with h5py.File(path, "w"):  # refusing closed the file: it can be truncated again
        pass


def test_a_cache_of_a_newer_format_asks_to_upgrade(tmp_path):
    path = _write(tmp_path / "c.h5")
    with h5py.File(path, "r+") as h5:
        h5.attrs["format_version"] = FORMAT_VERSION + 1
    _refused(
        path,
        rf"c\.h5 has format {FORMAT_VERSION + 1}, newer than this embedcache reads "
        rf"\({FORMAT_VERSION}\); upgrade embedcache$",
    )


def test_a_file_that_is_not_hdf5_is_refused(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("just some text\n")
    _refused(path, r"^.*notes\.h5 is not a readable HDF5 file \(.+\)$")


def test_a_directory_is_refused(tmp_path):
    _refused(tmp_path, r"is a directory; pass the \.h5 file written by `embedcache extract`$")


def test_a_missing_cache_is_refused_with_a_hint_to_extract(tmp_path):
    path = tmp_path / "missing.h5"
    _refused(
        path,
        r"^cache .*missing\.h5 does not exist; create it with "
        r"`embedcache extract DATA --out .*missing\.h5`$",
    )


def test_incomplete_cache_is_refused_with_a_hint_to_resume(tree, tmp_path):
    from embedcache.cache import PartialCache
    from embedcache.data import scan

    out = tmp_path / "c.h5"
    PartialCache.create(
        partial_path(out),
        attrs={
            "format_version": 1,
            "backbone": "resnet18",
            "weights": "none",
            "transform": "{}",
            "dtype": "float16",
        },
        images=scan(tree),
        feature_dim=8,
        dtype="float16",
    ).close()
    with pytest.raises(
        EmbedcacheError,
        match=r"cache .*c\.h5 is incomplete; "
        r"re-run the same `embedcache extract` command to resume",
    ):
        open_cache(out)
    with pytest.raises(EmbedcacheError, match=r"incomplete \(0 of 24 images done\)"):
        open_cache(partial_path(out))


def test_a_cache_missing_attributes_it_needs_is_refused_in_one_line(tmp_path):
    path = _write(tmp_path / "c.h5")
    with h5py.File(path, "r+") as h5:
        del h5.attrs["weights"]
    with pytest.raises(
        EmbedcacheError,
        match=r"c\.h5 is not a complete embedcache cache \(attributes missing: weights\)",
    ):
        open_cache(path)


def test_write_cache_round_trips_through_open_cache(tmp_path):
    x, y = blobs(5, dim=8, seed=0)
    xv, yv = blobs(2, dim=8, seed=1)
    yv[0] = -1  # unlabelled rows keep their -1
    paths, vpaths = [f"train/{i}.png" for i in range(len(y))], ["val/é.png"] * len(yv)
    path = write_cache(
        tmp_path / "c.h5",
        {"val": (xv, yv, vpaths), "train": (x, y, paths)},  # stored in the usual order
        classes=["a", "b", "c"],
        backbone="timm:test_efficientnet",
        weights="weights-id",
        transform=TRANSFORM,
        source="somewhere",
    )
    with open_cache(path) as c:
        assert c.splits == ["train", "val"] and c.classes == ["a", "b", "c"]
        assert c.feature_dim == 8 and c.num_images("val") == len(yv)
        assert np.array_equal(c.labels("train"), y) and c.labels("val").tolist() == yv.tolist()
        assert c.paths("train") == paths and c.paths("val") == vpaths
        train = c.split("train")
        assert train.features.dtype == np.float16 and np.array_equal(train.features, x)
        assert np.array_equal(train.labels, y) and train.paths == paths
        assert c.features_identity == FeatureIdentity(
            "timm:test_efficientnet", "weights-id", TRANSFORM
        )
        assert type(c.features_identity) is FeatureIdentity
        assert c.identity.dtype == "float16" and c.weights_arg == "weights-id"
        assert c.skipped == []
        with pytest.raises(EmbedcacheError, match=r"has no split 'test'; it has train, val$"):
            c.split("test")
    assert [p.name for p in tmp_path.iterdir()] == ["c.h5"]


@pytest.mark.parametrize(
    "val_dim, dtypes, got",
    [
        (4, (np.float16, np.float16), r"got dims \{(8, 4|4, 8)\}, dtypes \{'float16'\}$"),
        (
            8,
            (np.float16, np.float32),
            r"got dims \{8\}, dtypes \{'float(16|32)', 'float(16|32)'\}$",
        ),
        (8, (np.float64, np.float64), r"got dims \{8\}, dtypes \{'float64'\}$"),
    ],
    ids=["dims", "dtypes", "float64"],
)
def test_write_cache_refuses_mixed_or_unsupported_features(tmp_path, val_dim, dtypes, got):
    x, y = blobs(2, dim=8, dtype=dtypes[0])
    xv, yv = blobs(2, dim=val_dim, dtype=dtypes[1])
    splits = {"train": (x, y, ["p"] * len(y)), "val": (xv, yv, ["q"] * len(yv))}
    with pytest.raises(
        EmbedcacheError,
        match=r"every split needs \(N, D\) features of one D and a dtype in "
        r"\('float16', 'float32'\); " + got,
    ):
        _write(tmp_path / "c.h5", splits)
    assert list(tmp_path.iterdir()) == []


def _cache_with_blocks(tmp_path, rows=3000, dim=512):
    """A finished cache of several checksummed chunks (features computed elsewhere)."""
    from embedcache import write_cache
    from embedcache.backbones import EvalTransform

    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, dim)).astype(np.float16)
    y = (x[:, 0] > 0).astype(np.int64)
    splits = {s: (x, y, [f"{s}/{i}.jpg" for i in range(rows)]) for s in ("train", "val")}
    return write_cache(
        tmp_path / "c.h5",
        splits,
        classes=["a", "b"],
        backbone="b",
        weights="w",
        transform=EvalTransform(resize=40, crop=32).to_json(),
    )


def test_a_damaged_block_is_an_error_naming_the_rows_never_wrong_numbers(tmp_path):
    from click.testing import CliRunner

    from embedcache import train_head
    from embedcache.cli import main

    path = _cache_with_blocks(tmp_path)
    with h5py.File(path) as h5:
        info = h5["val"]["features"].id.get_chunk_info(1)  # the second block of val
        rows_per_chunk = h5["val"]["features"].chunks[0]
    with open(path, "r+b") as f:  # bit rot: 200 bytes in the middle of that block
        f.seek(info.byte_offset + info.size // 2)
        f.write(bytes(200))
    lo, hi = rows_per_chunk, 2 * rows_per_chunk - 1
    with pytest.raises(
        EmbedcacheError, match=r"is damaged: split val, rows \d+-\d+ fail their checksum"
    ):
        train_head(path, out=tmp_path / "h.pt", epochs=2, progress=False)
    with open_cache(path) as c:
        with pytest.raises(
            EmbedcacheError, match=rf"split val, rows {lo}-{hi} fail their checksum"
        ):
            c.features("val")[lo : hi + 1]
        assert c.features("val")[:lo].shape == (lo, 512)  # the blocks around it still read
    r = CliRunner().invoke(main, ["info", str(path), "--verify"])
    assert r.exit_code == 1 and "verify     1 problem(s)" in r.output
    assert "checksums  Fletcher-32 on every block" in r.output


def test_non_finite_features_are_refused_naming_the_rows_and_images(tmp_path):
    from embedcache import train_head

    path = _cache_with_blocks(tmp_path)
    with h5py.File(path, "r+") as h5:
        h5["train"]["features"][7, 3] = np.nan  # written through HDF5: the checksum is right
        h5["train"]["features"][9, 0] = np.inf
    with pytest.raises(
        EmbedcacheError,
        match=r"non-finite features in split train: 2 row\(s\), "
        r"7 \(train/7.jpg\), 9 \(train/9.jpg\); re-extract",
    ):
        train_head(path, out=tmp_path / "h.pt", epochs=2, progress=False)
    with pytest.raises(EmbedcacheError, match=r"non-finite features in split train: 2 row\(s\)"):
        train_head(
            path, out=tmp_path / "h.pt", epochs=2, progress=False, max_memory=1 << 20
        )  # streamed
    assert not (tmp_path / "h.pt").exists()
