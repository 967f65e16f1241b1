"""torchrun on the CPU: 2 processes, gloo, a tiny random-init backbone, small generated images.

Every torchrun call has a timeout (and the process group one of its own), so a hung rank fails
the test instead of the CI run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import make_image, make_tree

from embedcache import extract, finetune, open_cache
from embedcache.cache import shard_paths

ENTRY = Path(__file__).with_name("dist_entry.py")
TIMEOUT_S = 120
EXTRACT = [
    "-b",
    "resnet18",
    "-w",
    "none",
    "--image-size",
    "64",
    "--batch-size",
    "4",
    "--num-workers",
    "0",
    "--device",
    "cpu",
    "--json",
]


def torchrun(nproc: int, args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N tests/dist_entry.py ARGS``, one thread per process
    (torchrun's default for several processes, so one process matches it)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(ENTRY),
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "EMBEDCACHE_DIST_TIMEOUT_S": "60", **env}
    return subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=TIMEOUT_S
    )


def features(path: Path) -> dict[str, tuple]:
    with h5py.File(path) as f:
        return {
            s: (f[s]["features"][:], list(f[s]["paths"].asstr()[:]), f[s]["labels"][:])
            for s in ("train", "val")
        }


def assert_same_cache(a: Path, b: Path, ignore: tuple[str, ...] = ()) -> None:
    fa, fb = features(a), features(b)
    for split in fa:
        assert np.array_equal(fa[split][0], fb[split][0]), split  # bit-identical
        assert fa[split][1] == fb[split][1] and np.array_equal(fa[split][2], fb[split][2]), split
    with open_cache(a) as ca, open_cache(b) as cb:
        sa, sb = ca.summary(), cb.summary()
    for s in (sa, sb):
        for k in ("path", "file_bytes", "created", *ignore):
            s.pop(k)
    assert sa == sb  # what `embedcache info` shows cannot tell them apart


def one_thread(fn):
    """``fn()`` in this process with one thread: what each torchrun rank here uses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


LIBRARY = {
    "backbone": "resnet18",
    "weights": "none",
    "image_size": 64,
    "num_workers": 0,
    "device": "cpu",
    "progress": False,
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The data and the one-process cache of it, made once for the extract tests."""
    root = tmp_path_factory.mktemp("dist")
    data = make_tree(root / "d", per_class=11)
    (data / "train" / "cat" / "broken.jpg").write_bytes(b"not an image")
    one_thread(lambda: extract(data, out=root / "one.h5", batch_size=4, **LIBRARY))
    return root


def test_two_ranks_write_the_cache_one_process_writes(shared, tmp_path):
    two = torchrun(2, ["extract", str(shared / "d"), "--out", "two.h5", *EXTRACT], tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    assert_same_cache(shared / "one.h5", tmp_path / "two.h5")
    result = json.loads(two.stdout)  # rank 0 alone prints
    assert result["extracted"] == 44 and result["skipped"] == 1 and len(result["ranks"]) == 2
    assert sum(n for n, _ in result["ranks"]) == 44 and all(n > 0 for n, _ in result["ranks"])
    assert not shard_paths(tmp_path / "two.h5")


def test_a_rank_killed_mid_run_resumes_with_one_process_and_forwards_nothing_twice(
    shared, tmp_path
):
    args = ["extract", str(shared / "d"), "--out", "c.h5", *EXTRACT]
    killed = torchrun(
        2,
        args,
        tmp_path,
        EMBEDCACHE_TEST_FAIL_RANK="1",
        EMBEDCACHE_TEST_FAIL_HOW="kill",
        EMBEDCACHE_TEST_FAIL_AFTER="2",
    )
    assert killed.returncode != 0
    assert not (tmp_path / "c.h5").exists()  # nothing looks finished
    assert shard_paths(tmp_path / "c.h5")  # the killed rank's rows wait in its shard
    resumed = torchrun(1, args, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    r = json.loads(resumed.stdout)
    assert r["reused"] >= 8  # at least the 2 batches of 4 rank 1 wrote before it died
    assert r["reused"] + r["extracted"] == 44 and r["skipped"] == 1  # nothing forwarded twice
    assert_same_cache(shared / "one.h5", tmp_path / "c.h5")
    assert not shard_paths(tmp_path / "c.h5")


def test_a_rank_that_fails_stops_every_rank_with_one_clear_error(shared, tmp_path):
    r = torchrun(
        2,
        ["extract", str(shared / "d"), "--out", "c.h5", *EXTRACT],
        tmp_path,
        EMBEDCACHE_TEST_FAIL_RANK="1",
        EMBEDCACHE_TEST_FAIL_HOW="refuse",
    )
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert "Error: weights file only-rank-1.pt does not exist" in errors  # rank 1's own words
    assert "Error: rank 1 of 2 failed: weights file only-rank-1.pt does not exist" in errors
    frames = [line for line in r.stderr.splitlines() if line.strip().startswith('File "')]
    assert not [f for f in frames if "embedcache" in f]  # torchrun's own report may follow


def test_an_unwritable_output_fails_every_rank_not_a_hang(shared, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    r = torchrun(2, ["extract", str(shared / "d"), "--out", "file.txt/c.h5", *EXTRACT], tmp_path)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 2 and all("cannot write next to --out file.txt/c.h5" in e for e in errors)


def test_an_incremental_run_with_two_ranks_extracts_only_new_images(shared, tmp_path):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(shared / "d", data)
    one_thread(lambda: extract(data, out=tmp_path / "c.h5", batch_size=4, **LIBRARY))
    make_image(data / "val" / "dog" / "new.png", 1, seed=999)
    r = torchrun(2, ["extract", str(data), "--out", "c.h5", *EXTRACT], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["extracted"] == 1
    one_thread(lambda: extract(data, out=tmp_path / "fresh.h5", batch_size=4, **LIBRARY))
    assert_same_cache(tmp_path / "fresh.h5", tmp_path / "c.h5")


def test_a_virtual_join_reads_as_the_same_cache_and_a_later_run_replaces_it(shared, tmp_path):
    import shutil

    from click.testing import CliRunner

    from embedcache import train_head
    from embedcache.cache import parts_dir
    from embedcache.cli import main

    data = tmp_path / "d"
    shutil.copytree(shared / "d", data)
    r = torchrun(
        2, ["extract", str(data), "--out", "v.h5", "--join", "virtual", *EXTRACT], tmp_path
    )
    assert r.returncode == 0, r.stderr[-2000:]
    v, parts = tmp_path / "v.h5", parts_dir(tmp_path / "v.h5")
    with open_cache(v) as c:
        assert c.features("train").is_virtual and len(c.parts) == 2  # one shard file per rank
        assert all(p.parent == parts for p in c.parts)
    assert not shard_paths(v)  # the shard names are gone: their files live on in v.h5.parts/
    assert_same_cache(
        shared / "one.h5", v, ignore=("storage", "parts", "parts_bytes", "source", "checksums")
    )  # data copied
    shown = CliRunner().invoke(main, ["info", str(v)]).output
    assert "storage    virtual: features read from 2 part files" in shown
    heads = [
        train_head(c, out=tmp_path / f"{c.stem}.pt", epochs=3, progress=False)
        for c in (shared / "one.h5", v)
    ]
    assert heads[0].metrics["val_acc"] == heads[1].metrics["val_acc"]
    (tmp_path / "moved").mkdir()
    shutil.copyfile(v, tmp_path / "moved" / "v.h5")  # copied without v.h5.parts/
    with pytest.raises(
        Exception,
        match=r"is virtual and its part file .* is missing \(2 of 2\); "
        r"keep the folder v.h5.parts next to it",
    ):
        open_cache(tmp_path / "moved" / "v.h5")  # never read as zeros
    make_image(data / "val" / "dog" / "new.png", 1, seed=999)  # an incremental run reads it
    grown = one_thread(lambda: extract(data, out=v, batch_size=4, **LIBRARY))
    assert (grown.extracted, grown.reused) == (1, 44)
    assert not parts.exists()  # one process writes one file; the old parts are removed
    with open_cache(v) as c:
        assert not c.features("train").is_virtual and c.summary()["storage"] == "single file"


def test_views_under_torchrun_survive_a_killed_rank_and_join_virtually_as_one_process_writes(
    shared, tmp_path
):
    one = tmp_path / "one.h5"
    one_thread(lambda: extract(shared / "d", out=one, batch_size=4, views=2, **LIBRARY))
    args = ["extract", str(shared / "d"), "--out", "v.h5", *EXTRACT, "--views", "2"]
    killed = torchrun(
        2,
        args,
        tmp_path,
        EMBEDCACHE_TEST_FAIL_RANK="1",
        EMBEDCACHE_TEST_FAIL_HOW="kill",
        EMBEDCACHE_TEST_FAIL_AFTER="2",
    )
    assert killed.returncode != 0 and shard_paths(tmp_path / "v.h5")
    resumed = torchrun(2, [*args, "--join", "virtual"], tmp_path)  # merges the shards, then maps
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    r = json.loads(resumed.stdout)
    assert r["views"] == 2 and r["reused"] >= 8 and r["reused"] + r["extracted"] == 44
    with open_cache(one) as a, open_cache(tmp_path / "v.h5") as b:
        assert b.views("train").is_virtual and b.parts  # base part (merged rows) + shards
        for split in ("train", "val"):  # train keeps 2 views, val its mirror: bit-identical
            assert np.array_equal(a.views(split)[:], b.views(split)[:]), split
        assert b.verify() == []
    assert_same_cache(
        one, tmp_path / "v.h5", ignore=("storage", "parts", "parts_bytes", "checksums")
    )


# A tiny random-init backbone (7 blocks, 99k parameters): DDP's arithmetic is the same for any net
TINY = "timm:test_efficientnet"
FINETUNE = [
    "-b",
    TINY,
    "-w",
    "none",
    "--image-size",
    "64",
    "--num-workers",
    "0",
    "--device",
    "cpu",
    "--unfreeze",
    "2",
    "--batch-size",
    "8",
    "--augment",
    "none",
    "--patience",
    "9",
    "--json",
]
# lr 1e-3: at 1e-2 a random-init net diverges within a few steps and amplifies float noise
FINETUNE_LIBRARY = {
    **LIBRARY,
    "backbone": TINY,
    "unfreeze": 2,
    "batch_size": 8,
    "augment": "none",
    "patience": 9,
    "lr": 1e-3,
}


def weights(path: Path) -> dict:
    state = torch.load(path, weights_only=True)
    return {
        **state["net_state_dict"],
        **{f"head.{k}": v for k, v in state["head_state_dict"].items()},
    }


def test_two_rank_finetune_equals_one_process_and_resumes_after_a_kill(tmp_path):
    """18 train images in global batches of 8, 8 and 2, split across 2 ranks."""
    from embedcache.backbones import build_backbone

    data = make_tree(tmp_path / "d", per_class=9)
    one = one_thread(lambda: finetune(data, out=tmp_path / "one.pt", epochs=2, **FINETUNE_LIBRARY))
    args = ["finetune", str(data), "--epochs", "2", *FINETUNE, "--lr", "1e-3", "--out", "two.pt"]
    killed = torchrun(
        2,
        args,
        tmp_path,
        EMBEDCACHE_TEST_FAIL_RANK="0",
        EMBEDCACHE_TEST_FAIL_HOW="kill-after-epoch",
        EMBEDCACHE_TEST_FAIL_AFTER="1",
    )
    assert (
        killed.returncode != 0
        and torch.load(tmp_path / "two.last.pt", weights_only=True)["epoch"] == 1
    )
    resumed = torchrun(2, [*args, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(tmp_path / "one.last.pt"), weights(tmp_path / "two.last.pt")
    start = build_backbone(TINY, weights="none", image_size=64).net.state_dict()
    last = [k for k in start if k.startswith("blocks.6.") and k.endswith("weight")]
    assert last and all(not torch.equal(a[k], start[k]) for k in last)  # the last block trained
    for k in a:
        # Adam turns float noise in near-zero gradients into steps: 2.3e-6 was the largest seen
        # (with resnet18; 6e-8 with the tiny net)
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    ha, hb = one.metrics["history"], json.loads(resumed.stdout)["history"]
    assert hb["epoch"] == ha["epoch"] == [0, 1, 2]
    assert hb["val_acc"] == ha["val_acc"]  # validation gathered from both ranks: every image once
    for key in ("train_loss", "train_acc", "val_loss"):
        assert hb[key][1:] == pytest.approx(ha[key][1:], rel=1e-4), key
    assert (tmp_path / "two.metrics.json").exists() and (tmp_path / "two.confusion.png").exists()


def test_bn_stats_under_torchrun_on_cpu_is_refused_by_every_rank(tmp_path):
    data = make_tree(tmp_path / "d", per_class=4)
    r = torchrun(2, ["finetune", str(data), "--out", "m.pt", "--bn-stats", *FINETUNE], tmp_path)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 2 and all("--bn-stats under torchrun needs GPUs" in e for e in errors)


def test_two_ranks_at_the_default_settings_write_the_features_one_process_writes(tmp_path):
    """``--compile auto`` freezes the graph from FREEZE_FROM_IMAGES images in the cache (40 here):
    decided on the whole cache, not on each rank's half, so two ranks run what one process runs."""
    from embedcache import runtime

    freeze_from, per_class = 40, 12  # 2 splits x 2 classes: the cache freezes, a half not
    data = make_tree(tmp_path / "d", per_class=per_class)
    net, cpu = torch.nn.Sequential(torch.nn.BatchNorm2d(3)), torch.device("cpu")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(runtime, "FREEZE_FROM_IMAGES", freeze_from)
        assert runtime.compile_mode("auto", cpu, 4 * per_class, net) == "frozen"
        assert runtime.compile_mode("auto", cpu, 2 * per_class, net) == "folded"
    args = ["-b", "resnet18", "-w", "none", "--image-size", "32", "--device", "cpu", "--json"]
    env = {"EMBEDCACHE_TEST_FREEZE_FROM": str(freeze_from)}
    one = torchrun(1, ["extract", str(data), "--out", "one.h5", *args], tmp_path, **env)
    two = torchrun(2, ["extract", str(data), "--out", "two.h5", *args], tmp_path, **env)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-2000:]
    assert_same_cache(tmp_path / "one.h5", tmp_path / "two.h5")
