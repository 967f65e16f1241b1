from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import SIZE, SMALL_BACKBONES, make_image, make_tree, tree_digest

from embedcache import extract, open_cache
from embedcache.cache import partial_path
from embedcache.errors import EmbedcacheError


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "embedcache.cli", *args]


def _same_splits(a: Path, b: Path, exact: bool = True) -> None:
    with open_cache(a) as ca, open_cache(b) as cb:
        assert ca.splits == cb.splits and ca.classes == cb.classes
        for s in ca.splits:
            x, y = ca.split(s), cb.split(s)
            assert x.paths == y.paths
            assert np.array_equal(x.labels, y.labels)
            vx, vy = ca.views(s), cb.views(s)
            assert (vx is None) == (vy is None), s
            if exact:
                assert np.array_equal(x.features, y.features), s
                assert vx is None or np.array_equal(vx[:], vy[:]), s
            else:
                np.testing.assert_allclose(
                    x.features.astype(np.float32),
                    y.features.astype(np.float32),
                    atol=2e-2,
                    rtol=1e-2,
                )


@pytest.mark.parametrize("backbone", SMALL_BACKBONES)
def test_cache_schema(tree, tmp_path, extract_kw, backbone):
    out = tmp_path / "c.h5"
    r = extract(tree, out=out, **{**extract_kw, "backbone": backbone})
    assert (r.images, r.extracted, r.skipped, r.reused) == (24, 24, 0, 0)
    with h5py.File(out, "r") as h5:
        a = h5.attrs
        assert a["format_version"] == 4 and bool(a["complete"]) is True
        assert a["backbone"] == backbone and a["weights"] == "none"
        assert json.loads(a["classes"]) == ["cat", "dog"]
        assert json.loads(a["transform"])["crop"] == SIZE
        assert len(a["source_fingerprint"]) == 64
        dim = int(a["feature_dim"])
        for split in ("train", "val"):
            g = h5[split]
            assert g["features"].shape == (12, dim) and g["features"].dtype == np.float16
            assert g["features"].chunks is not None
            assert g["features"].fletcher32 and g["labels"].fletcher32  # checksummed (format 2)
            assert g["labels"][:].tolist() == [0] * 6 + [1] * 6
            assert g["paths"].asstr()[0] == f"{split}/cat/cat_000.png"
            assert g["hashes"].shape == (12, 16) and g["hashes"].fletcher32  # format 3
        assert h5["skipped"]["path"].shape == (0,)
    assert not partial_path(out).exists()


def test_features_match_a_direct_forward_pass(tree, tmp_path, extract_kw):
    import torch

    from embedcache.backbones import Normalise, build_backbone
    from embedcache.data import preprocess

    out = tmp_path / "c.h5"
    extract(tree, out=out, dtype="float32", **extract_kw)
    bb = build_backbone("resnet18", weights="none", image_size=SIZE)
    with open_cache(out) as c:
        val = c.split("val")
    x = torch.stack([torch.from_numpy(preprocess(tree / p, bb.transform)) for p in val.paths[:3]])
    with torch.no_grad():
        expected = bb.net(Normalise(bb.transform)(x)).numpy()
    np.testing.assert_allclose(val.features[:3], expected, rtol=1e-4, atol=1e-4)


def test_class_separation_with_random_init_is_above_chance(tmp_path, extract_kw):
    data = make_tree(tmp_path / "d", per_class=10)
    extract(data, out=tmp_path / "c.h5", dtype="float32", **extract_kw)
    with open_cache(tmp_path / "c.h5") as c:
        tr, va = c["train"], c["val"]
    centroids = np.stack([tr.features[tr.labels == k].mean(0) for k in (0, 1)])
    pred = ((va.features[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == va.labels).mean() >= 0.9


def test_unreadable_files_are_skipped_recorded_and_never_touched(tmp_path, extract_kw):
    data = make_tree(tmp_path / "d", per_class=3)
    (data / "train" / "cat" / "zero.jpg").write_bytes(b"")
    (data / "train" / "dog" / "fake.png").write_text("<html>not an image</html>")
    good = make_image(tmp_path / "x.jpg", 0, 0, size=(64, 64), fmt="JPEG")
    (data / "val" / "cat" / "cut.jpg").write_bytes(good.read_bytes()[:200])
    before = tree_digest(data)
    r = extract(data, out=tmp_path / "c.h5", **extract_kw)
    assert (r.images, r.skipped) == (12, 3)
    with open_cache(tmp_path / "c.h5") as c:
        reasons = {s.path: s.reason for s in c.skipped}
        assert c.num_images("train") == 6 and c.num_images("val") == 6
    assert reasons == {
        "train/cat/zero.jpg": "empty file (0 bytes)",
        "train/dog/fake.png": "not an image (unrecognised format)",
        "val/cat/cut.jpg": "truncated image",
    }
    assert tree_digest(data) == before
    again = extract(data, out=tmp_path / "c.h5", **extract_kw)
    assert again.up_to_date and again.extracted == 0
    make_image(data / "train" / "cat" / "new.png", 0, 99)
    grown = extract(data, out=tmp_path / "c.h5", **extract_kw)
    # skipped files carry over as skipped, never as reused features
    assert (grown.extracted, grown.reused, grown.skipped, grown.images) == (1, 12, 3, 13)


def test_csv_manifest_and_unlabelled_folder(tmp_path, extract_kw):
    for i in range(4):
        make_image(tmp_path / "imgs" / f"{i}.png", i % 2, i)
    (tmp_path / "m.csv").write_text(
        "path,label,split\n"
        + "".join(f"imgs/{i}.png,{'ab'[i % 2]},{'train' if i < 2 else 'test'}\n" for i in range(4))
    )
    extract(tmp_path / "m.csv", out=tmp_path / "m.h5", **extract_kw)
    with open_cache(tmp_path / "m.h5") as c:
        assert c.splits == ["train", "test"] and c.classes == ["a", "b"]
    extract(tmp_path / "imgs", out=tmp_path / "u.h5", **extract_kw)
    with open_cache(tmp_path / "u.h5") as c:
        assert c.splits == ["all"] and c.classes == [] and c["all"].labels.tolist() == [-1] * 4


def test_float32_dtype(tree, tmp_path, extract_kw):
    extract(tree, out=tmp_path / "c.h5", dtype="float32", **extract_kw)
    with open_cache(tmp_path / "c.h5") as c:
        assert c.features("train").dtype == np.float32


def test_incremental_extracts_only_new_and_changed_and_drops_removed(tmp_path, extract_kw):
    data = make_tree(tmp_path / "d", per_class=5)
    out = tmp_path / "c.h5"
    extract(data, out=out, **extract_kw)
    with open_cache(out) as c:
        old = {p: f for p, f in zip(c["train"].paths, c["train"].features, strict=True)}
    make_image(data / "train" / "cat" / "cat_new.png", 0, 100)
    make_image(data / "val" / "dog" / "dog_new.png", 1, 101)
    (data / "train" / "dog" / "dog_001.png").unlink()
    changed = make_image(data / "train" / "cat" / "cat_002.png", 1, 102)  # same name, new content
    os.utime(changed, ns=(1, 1))
    r = extract(data, out=out, **extract_kw)
    assert (r.extracted, r.reused, r.images) == (3, 19 - 1, 21)
    with open_cache(out) as c:
        train = c["train"]
    assert "train/dog/dog_001.png" not in train.paths and "train/cat/cat_new.png" in train.paths
    for p, f in zip(train.paths, train.features, strict=True):
        if p in old and p != "train/cat/cat_002.png":
            assert np.array_equal(f, old[p])
    assert not np.array_equal(
        train.features[train.paths.index("train/cat/cat_002.png")], old["train/cat/cat_002.png"]
    )
    extract(data, out=tmp_path / "fresh.h5", **extract_kw)
    _same_splits(out, tmp_path / "fresh.h5", exact=False)


def test_existing_cache_with_other_settings_is_an_error_naming_both(tree, tmp_path, extract_kw):
    out = tmp_path / "c.h5"
    extract(tree, out=out, **extract_kw)
    with pytest.raises(
        EmbedcacheError,
        match=r"holds other features \(backbone timm:test_efficientnet vs resnet18; "
        r".*pass --overwrite",
    ):
        extract(tree, out=out, **{**extract_kw, "backbone": "timm:test_efficientnet"})
    with pytest.raises(EmbedcacheError, match=r"transform crop 32 vs 64"):
        extract(tree, out=out, **{**extract_kw, "image_size": 32})
    r = extract(
        tree, out=out, overwrite=True, **{**extract_kw, "backbone": "timm:test_efficientnet"}
    )
    assert r.extracted == 24
    with open_cache(out) as c:
        assert c.backbone == "timm:test_efficientnet"


@pytest.mark.parametrize(
    "make_out, message",
    [
        (lambda tmp: tmp, r"--out .* is a directory"),
        (
            lambda tmp: (tmp / "file.txt").write_text("x") and tmp / "file.txt" / "c.h5",
            r"cannot write next to --out",
        ),
    ],
)
def test_unwritable_output(tree, tmp_path, extract_kw, make_out, message):
    with pytest.raises(EmbedcacheError, match=message):
        extract(tree, out=make_out(tmp_path), **extract_kw)


def test_bad_arguments(tree, tmp_path, extract_kw):
    with pytest.raises(
        EmbedcacheError, match="--dtype must be one of float16, float32, got 'int8'"
    ):
        extract(tree, out=tmp_path / "c.h5", **{**extract_kw, "dtype": "int8"})
    with pytest.raises(EmbedcacheError, match=r"no images found under"):
        (tmp_path / "empty").mkdir()
        extract(tmp_path / "empty", out=tmp_path / "c.h5", **extract_kw)


# ---------------------------------------------------------------------------
# Crashes: SIGKILL and a full disk, in a real subprocess


def _progress(partial: Path) -> tuple[int, int]:
    try:
        with h5py.File(partial, "r", locking=False) as h5:
            splits = [s for s in h5 if "status" in h5[s]]  # not the ignored-files group
            done = sum(int(np.count_nonzero(h5[s]["status"][:])) for s in splits)
            return done, sum(int(h5[s]["status"].shape[0]) for s in splits)
    except (OSError, KeyError):
        return 0, 0


def _extract_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return _cli(
        "extract",
        str(data),
        "--out",
        str(out),
        "-b",
        "resnet18",
        "-w",
        "none",
        "--image-size",
        "96",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "-q",
        *extra,
    )


def _kill_when(
    cmd: list[str], partial: Path, min_done: int, timeout_s: float = 120
) -> tuple[int, int]:
    """Start ``cmd``, SIGKILL it once the partial file shows ``min_done`` rows, return the
    progress seen."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    try:
        while p.poll() is None and time.monotonic() < deadline:
            if partial.exists() and _progress(partial)[0] >= min_done:
                break
            time.sleep(0.01)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    return _progress(partial)


def test_sigkill_then_resume_ends_with_the_same_features(tmp_path):
    data = make_tree(tmp_path / "d", per_class=30)  # 120 images
    ref = tmp_path / "ref.h5"
    subprocess.run(_extract_cmd(data, ref), check=True)
    out = tmp_path / "c.h5"
    cmd = _extract_cmd(data, out)
    first = _kill_when(cmd, partial_path(out), min_done=0)  # as soon as the partial file appears
    second = _kill_when(
        cmd, partial_path(out), min_done=first[0] + 30
    )  # mid-way through a resumed run
    assert not out.exists(), "a killed run must not leave a file that looks complete"
    assert 0 < second[0] < second[1] == 120, (first, second)
    with pytest.raises(EmbedcacheError, match="incomplete"):
        open_cache(out)
    subprocess.run(cmd, check=True)
    assert not partial_path(out).exists()
    _same_splits(out, ref, exact=True)


def _fsize_limit(limit_bytes: int):
    def apply():
        signal.signal(
            signal.SIGXFSZ, signal.SIG_IGN
        )  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def test_too_little_space_is_refused_before_writing(tmp_path):
    data = make_tree(tmp_path / "d", per_class=20)
    out = tmp_path / "c.h5"
    p = subprocess.run(
        _extract_cmd(data, out), capture_output=True, text=True, preexec_fn=_fsize_limit(100_000)
    )
    assert p.returncode == 1, p.stderr
    assert re.fullmatch(
        r"Error: not enough space in .*: "
        r"extraction needs about \d+\.\d MB and 0\.1 MB is free; "
        r"free some space or choose another --out\n",
        p.stderr,
    )
    assert sorted(f.name for f in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize("fail_on_call", [1, 2])
def test_disk_full_mid_run_keeps_progress_and_leaves_nothing_that_looks_complete(
    tmp_path, extract_kw, monkeypatch, fail_on_call
):
    """Space runs out when the partial file (call 1) or the finished file (call 2) is reserved."""
    data = make_tree(tmp_path / "d", per_class=4)
    out = tmp_path / "c.h5"
    calls = []
    real = os.posix_fallocate

    def fallocate(fd, offset, length):
        calls.append(length)
        if len(calls) == fail_on_call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    with pytest.raises(
        EmbedcacheError,
        match=r"^no space left on the device while writing .*c\.h5 "
        r"\(progress is kept in c\.h5\.partial\); "
        r"free some space and re-run the same command to resume$",
    ):
        extract(data, out=out, **extract_kw)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    assert partial_path(out).exists() == (fail_on_call == 2)
    monkeypatch.undo()
    r = extract(data, out=out, **extract_kw)
    assert r.images == 16 and r.extracted == (0 if fail_on_call == 2 else 16)


def test_ranks_share_the_batches_in_even_contiguous_runs():
    from embedcache.extraction import share

    batches = list(range(10))
    parts = [share(batches, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]  # in order, every batch once
    assert [share([7], r, 2) for r in range(2)] == [[], [7]]  # a rank may get none


def test_join_auto_is_virtual_from_the_size_threshold_on(tmp_path, monkeypatch):
    from embedcache import extraction

    shards = [tmp_path / "a", tmp_path / "b"]
    for s in shards:
        s.write_bytes(b"x" * 600)
    monkeypatch.setattr(extraction, "VIRTUAL_JOIN_BYTES", 1200)
    assert extraction.join_kind("auto", shards) == "virtual"
    monkeypatch.setattr(extraction, "VIRTUAL_JOIN_BYTES", 1201)
    assert extraction.join_kind("auto", shards) == "copy"
    assert extraction.join_kind("virtual", shards) == "virtual"
    assert extraction.join_kind("virtual", []) == "copy"  # one process: nothing to map


def test_unused_parts_are_removed_but_not_when_the_cache_cannot_be_read(tmp_path):
    from embedcache.cache import parts_dir, remove_unused_parts

    out = tmp_path / "c.h5"
    parts_dir(out).mkdir()
    stale = parts_dir(out) / "old-shard0.h5"
    stale.write_bytes(b"x")
    out.write_bytes(b"not hdf5")
    remove_unused_parts(out)
    assert stale.exists()  # cannot tell what the cache reads: delete nothing
    out.unlink()
    with h5py.File(out, "w") as h5:
        h5.create_group("train").create_dataset("features", data=np.zeros((2, 3)))
    remove_unused_parts(out)
    assert not stale.exists() and not parts_dir(out).exists()


def test_the_forward_precision_is_part_of_the_cache_identity(tree, tmp_path, extract_kw):
    from click.testing import CliRunner

    from embedcache.cli import main

    out = tmp_path / "c.h5"
    extract_kw = {k: v for k, v in extract_kw.items() if k != "precision"}  # auto, here
    extract(tree, out=out, precision="bf16", **extract_kw)
    extract(tree, out=tmp_path / "fp32.h5", precision="fp32", **extract_kw)
    with open_cache(out) as c, open_cache(tmp_path / "fp32.h5") as d:
        assert c.identity.precision == "bf16" and d.identity.precision == "fp32"
        a, b = c.features("train")[:].astype(np.float32), d.features("train")[:].astype(np.float32)
    assert not np.array_equal(a, b)  # bf16 really ran
    assert np.abs(a - b).max() / np.abs(b).max() < 0.1
    assert "from a bf16 forward pass" in CliRunner().invoke(main, ["info", str(out)]).output
    with pytest.raises(
        EmbedcacheError,
        match=r"holds other features \(precision fp32 vs bf16; asked vs existing\); "
        r"pass --overwrite",
    ):
        extract(tree, out=out, precision="fp32", **extract_kw)  # never mixed into one cache
    for cache in (out, tmp_path / "fp32.h5"):  # auto keeps what a cache was made with
        assert extract(tree, out=cache, **extract_kw).up_to_date
    with h5py.File(tmp_path / "fp32.h5", "r+") as h5:
        del h5.attrs["precision"]  # a cache written before the precision was recorded
        del h5.attrs["identity_digest"]  # (and so before its attributes were sealed)
        del h5.attrs["request"]  # (and before requests were recorded)
    with open_cache(tmp_path / "fp32.h5") as c:
        assert c.identity.precision == "unrecorded"
    with pytest.raises(EmbedcacheError, match=r"precision fp32 vs unrecorded"):
        extract(tree, out=tmp_path / "fp32.h5", precision="fp32", **extract_kw)


def test_auto_precision_with_overwrite_chooses_afresh_instead_of_keeping_the_old_caches(
    tree, tmp_path, extract_kw, monkeypatch
):
    import embedcache.runtime as runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)  # auto: bf16 on any CPU
    extract_kw = {k: v for k, v in extract_kw.items() if k != "precision"}
    extract(tree, out=tmp_path / "c.h5", precision="fp32", **extract_kw)
    assert extract(tree, out=tmp_path / "c.h5", **extract_kw).up_to_date  # kept: never mixed
    extract(tree, out=tmp_path / "c.h5", overwrite=True, **extract_kw)
    with open_cache(tmp_path / "c.h5") as c:
        assert c.identity.precision == "bf16"


def test_a_symlink_loop_a_fifo_and_a_dangling_link_are_skipped_with_reasons(tmp_path, extract_kw):
    data = make_tree(tmp_path / "d", per_class=3)
    (data / "train" / "cat" / "loop.jpg").symlink_to("loop.jpg")
    (data / "train" / "cat" / "dangling.jpg").symlink_to("gone.jpg")
    os.mkfifo(data / "val" / "dog" / "fifo.jpg")
    r = extract(data, out=tmp_path / "c.h5", **extract_kw)
    assert (r.images, r.skipped) == (12, 3)
    with open_cache(tmp_path / "c.h5") as c:
        assert {s.path: s.reason for s in c.skipped} == {
            "train/cat/loop.jpg": "symlink loop",
            "train/cat/dangling.jpg": "file not found",
            "val/dog/fifo.jpg": "not a regular file",
        }


def test_a_small_cpu_run_folds_batchnorm_and_writes_the_features_of_the_net_as_built(
    tree, tmp_path, extract_kw, folds
):
    import torch
    import torchvision

    net, g = torchvision.models.resnet18(), torch.Generator().manual_seed(0)
    with torch.no_grad():  # statistics that fold to something (fresh ones are the identity)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    kw = {**extract_kw, "weights": str(tmp_path / "w.pt"), "dtype": "float32"}
    extract(tree, out=tmp_path / "auto.h5", **kw)  # 24 images, fp32: folded, not traced
    extract(tree, out=tmp_path / "off.h5", compile="off", **kw)
    assert [f.count for f in folds] == [20]  # every BatchNorm of resnet18, in the auto run only
    with open_cache(tmp_path / "auto.h5") as auto, open_cache(tmp_path / "off.h5") as off:
        for split in ("train", "val"):
            a, b = auto.features(split), off.features(split)
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_compile_on_a_cpu_runs_a_frozen_graph_with_eagers_features(
    tree, tmp_path, extract_kw, frozen_graphs
):
    extract(tree, out=tmp_path / "on.h5", compile="on", dtype="float32", **extract_kw)
    extract(tree, out=tmp_path / "auto.h5", dtype="float32", **extract_kw)  # 24 images: eager
    assert (
        len(frozen_graphs) == 1 and frozen_graphs[0].graphs and frozen_graphs[0].eager_shapes == []
    )
    with open_cache(tmp_path / "on.h5") as on, open_cache(tmp_path / "auto.h5") as eager:
        for split in ("train", "val"):
            np.testing.assert_allclose(
                on.features(split), eager.features(split), rtol=1e-4, atol=1e-5
            )


def _crash_after(monkeypatch, batches: int, run) -> None:
    """Run ``run`` with the in-progress file's write failing after ``batches`` batches: the
    file stays, those rows done, the rest to do."""
    from embedcache.cache import PartialCache

    write, calls = PartialCache.write, []

    def power_cut(self, *args):
        if len(calls) == batches:
            raise RuntimeError("power cut")
        calls.append(1)
        return write(self, *args)

    monkeypatch.setattr(PartialCache, "write", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        run()
    monkeypatch.setattr(PartialCache, "write", write)


def test_a_copy_join_removes_each_shard_once_merged_so_shards_and_cache_never_share_the_disk(
    tree, tmp_path, extract_kw, monkeypatch
):
    from embedcache.cache import PartialCache, ShardFile, shard_path, shard_paths
    from embedcache.extraction import _join

    out, ref = tmp_path / "c.h5", tmp_path / "ref.h5"
    extract(tree, out=ref, **extract_kw)
    _crash_after(monkeypatch, 0, lambda: extract(tree, out=out, **extract_kw))
    with open_cache(ref) as c:  # two ranks' shards, holding the reference rows
        feats = {s: c.features(s)[:] for s in c.splits}
    items = [(s, r) for s, f in feats.items() for r in range(len(f))]
    for rank, part in enumerate((items[: len(items) // 2], items[len(items) // 2 :])):
        shard = ShardFile.create(
            shard_path(out, rank),
            list(feats),
            part,
            feature_dim=feats["train"].shape[1],
            dtype="float16",
        )
        for split, row in part:
            shard.write(split, np.array([row]), feats[split][[row]], {})
        shard.close()
    left_at_finalize, finalize = [], PartialCache.finalize
    monkeypatch.setattr(
        PartialCache,
        "finalize",
        lambda self, *a: left_at_finalize.append(shard_paths(out)) or finalize(self, *a),
    )
    _join(out, "copy")
    assert left_at_finalize == [[]]
    _same_splits(out, ref, exact=True)


def test_a_run_resumed_with_few_rows_left_still_runs_the_frozen_graph_and_writes_the_same_bits(
    tree, tmp_path, extract_kw, frozen_graphs, monkeypatch
):
    """auto decides on the whole cache (24 images here, over a threshold of 20), not on the 12
    rows left: the resumed rows are the graph's, as in one uninterrupted run."""
    import embedcache.runtime as runtime

    monkeypatch.setattr(runtime, "FREEZE_FROM_IMAGES", 20)
    kw = {**extract_kw, "dtype": "float32"}
    extract(tree, out=tmp_path / "ref.h5", **kw)
    _crash_after(monkeypatch, 3, lambda: extract(tree, out=tmp_path / "c.h5", **kw))
    r = extract(tree, out=tmp_path / "c.h5", **kw)
    assert (r.extracted, r.reused) == (12, 12) and len(frozen_graphs) == 3
    assert all(f.graphs and not f.eager_shapes for f in frozen_graphs)
    with open_cache(tmp_path / "c.h5") as a, open_cache(tmp_path / "ref.h5") as b:
        for split in ("train", "val"):
            assert np.array_equal(a.features(split)[:], b.features(split)[:]), split


def test_views_are_the_mirror_then_seeded_crops_and_leave_the_plain_rows_alone(
    tree, tmp_path, extract_kw
):
    import torch

    from embedcache.backbones import Normalise, build_backbone
    from embedcache.data import preprocess

    plain, viewed = tmp_path / "p.h5", tmp_path / "v.h5"
    extract(tree, out=plain, dtype="float32", **extract_kw)
    r = extract(tree, out=viewed, dtype="float32", views=3, **extract_kw)
    assert r.views == 3 and "3 augmented views per train image" in r.summary()
    with open_cache(plain) as p, open_cache(viewed) as v:
        assert v.num_views == 3 and v.identity.view_policy.endswith("seed 0")
        assert p.num_views == 0 and p.views("train") is None
        for s in ("train", "val"):
            assert np.array_equal(v.features(s)[:], p.features(s)[:]), s
        train, val, paths = v.views("train")[:], v.views("val")[:], v.paths("val")
        assert v.summary()["splits"]["train"]["views_shape"] == [12, 3, 512]
    assert train.shape == (12, 3, 512) and val.shape == (12, 1, 512)
    bb = build_backbone("resnet18", weights="none", image_size=SIZE)
    mirrored = np.stack([preprocess(tree / q, bb.transform)[:, ::-1] for q in paths[:3]])
    with torch.no_grad():
        expected = bb.net(Normalise(bb.transform)(torch.from_numpy(mirrored.copy()))).numpy()
    np.testing.assert_allclose(val[:3, 0], expected, rtol=1e-4, atol=1e-4)
    for a, b in ((0, 1), (1, 2)):  # each view is another picture of the image
        assert np.abs(train[:, a] - train[:, b]).max(axis=1).min() > 1e-3
    extract(tree, out=tmp_path / "again.h5", dtype="float32", views=3, **extract_kw)
    _same_splits(viewed, tmp_path / "again.h5")  # seeded: the same views on every run
    from click.testing import CliRunner

    from embedcache.cli import main

    shown = CliRunner().invoke(main, ["info", str(viewed)]).output
    assert "views      3 per train image, 1 per other image: flip, then light" in shown
    assert "views (12, 3, 512)" in shown and "views (12, 1, 512)" in shown
    with pytest.raises(EmbedcacheError, match=r"holds other features \(views 2 vs 3;"):
        extract(tree, out=viewed, dtype="float32", views=2, **extract_kw)


def test_views_resume_after_a_crash_and_are_reused_by_an_incremental_run(
    tmp_path, extract_kw, monkeypatch
):
    from embedcache.cache import PartialCache

    data = make_tree(tmp_path / "d", per_class=5)
    ref, out = tmp_path / "ref.h5", tmp_path / "c.h5"
    extract(data, out=ref, views=2, **extract_kw)
    write, calls = PartialCache.write, []

    def crash_after_two(self, *args):
        write(self, *args)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(PartialCache, "write", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract(data, out=out, views=2, **extract_kw)
    monkeypatch.undo()
    r = extract(data, out=out, views=2, **extract_kw)
    assert (r.reused, r.extracted) == (8, 12)  # two batches of 4, views included
    _same_splits(out, ref)
    make_image(data / "train" / "cat" / "cat_new.png", 0, 100)
    r = extract(data, out=out, views=2, **extract_kw)
    assert (r.extracted, r.reused) == (1, 20)
    extract(data, out=tmp_path / "fresh.h5", views=2, **extract_kw)
    _same_splits(out, tmp_path / "fresh.h5")


# a second per batch of 4 in the decoder (per image) or after the forward pass (per batch):
# far more than the tiny forward pass itself, on any machine
@pytest.mark.parametrize(
    "slow, seconds, bound", [("preprocess", 0.25, "decode"), ("_finite", 1.0, "compute")]
)
def test_the_summary_says_whether_decoding_or_the_forward_pass_bound_the_run(
    tree, tmp_path, extract_kw, monkeypatch, slow, seconds, bound
):
    """Measured as the run goes: time blocked on the decoders against time in the forward pass
    and the write. A slow decoder makes it decode-bound, a slow forward pass compute-bound."""
    import time

    import embedcache.extraction as ex

    real = getattr(ex, slow)

    def slowed(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, slow, slowed)
    r = extract(tree, out=tmp_path / "c.h5", **extract_kw)
    assert r.pace.bound == bound
    assert f"{bound}-bound: the backbone waited" in r.summary()


def test_an_up_to_date_cache_answers_without_building_the_backbone(
    tmp_path, extract_kw, monkeypatch
):
    """Issue 33: an up-to-date extract spent 45.8 of 47.4 s building the backbone it did not use.
    Any change the features depend on (an image, an option, the weights file) still rebuilds."""
    import torch
    import torchvision

    import embedcache.extraction as extraction

    data = make_tree(tmp_path / "d", per_class=2)
    weights = tmp_path / "w.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    kw = {**extract_kw, "weights": str(weights)}
    out = tmp_path / "c.h5"
    extract(data, out=out, **kw)
    built = []
    real = extraction.build_backbone
    monkeypatch.setattr(
        extraction, "build_backbone", lambda *a, **k: built.append(a) or real(*a, **k)
    )
    assert extract(data, out=out, **kw).up_to_date and built == []
    os.utime(weights, ns=(1, 1))  # the weights file touched: built to tell, and the same
    assert extract(data, out=out, **kw).up_to_date and len(built) == 1
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), weights)  # other weights: refused
    with pytest.raises(EmbedcacheError, match="holds other features"):
        extract(data, out=out, **kw)
    assert len(built) == 2
    r = extract(data, out=out, **{**kw, "weights": "none", "overwrite": True})
    assert not r.up_to_date and r.extracted == 8 and len(built) == 3
    os.utime(data / "train" / "cat" / "cat_000.png", ns=(1, 1))  # a changed image: extracted
    assert extract(data, out=out, **{**kw, "weights": "none"}).extracted == 1
    assert len(built) == 4
    assert extract(data, out=out, **{**kw, "weights": "none"}).up_to_date and len(built) == 4
    with pytest.raises(EmbedcacheError, match="holds other features"):
        extract(data, out=out, **{**kw, "weights": "none", "image_size": 32})
