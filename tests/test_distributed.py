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
from conftest import make_image, make_tree

from embedcache import open_cache
from embedcache.cache import shard_paths

ENTRY = Path(__file__).with_name("dist_entry.py")
TIMEOUT_S = 120
EXTRACT = ["-b", "resnet18", "-w", "none", "--image-size", "64", "--batch-size", "4",
           "--num-workers", "0", "--device", "cpu", "--json"]  # fmt: skip


def torchrun(nproc: int, args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N tests/dist_entry.py ARGS``, one thread per process
    (torchrun's default for several processes, so one process matches it)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(ENTRY), *args]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "EMBEDCACHE_DIST_TIMEOUT_S": "60", **env}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=TIMEOUT_S)  # fmt: skip


def features(path: Path) -> dict[str, tuple]:
    with h5py.File(path) as f:
        return {
            s: (f[s]["features"][:], list(f[s]["paths"].asstr()[:]), f[s]["labels"][:])
            for s in ("train", "val")
        }


def assert_same_cache(a: Path, b: Path) -> None:
    fa, fb = features(a), features(b)
    for split in fa:
        assert np.array_equal(fa[split][0], fb[split][0]), split  # bit-identical
        assert fa[split][1] == fb[split][1] and np.array_equal(fa[split][2], fb[split][2]), split
    with open_cache(a) as ca, open_cache(b) as cb:
        sa, sb = ca.summary(), cb.summary()
    for s in (sa, sb):
        for k in ("path", "file_bytes", "created"):
            s.pop(k)
    assert sa == sb  # what `embedcache info` shows cannot tell them apart


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = make_tree(tmp_path / "d", per_class=11)
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"not an image")
    return root


def test_two_ranks_write_the_cache_one_process_writes(data, tmp_path):
    one = torchrun(1, ["extract", str(data), "--out", "one.h5", *EXTRACT], tmp_path)
    two = torchrun(2, ["extract", str(data), "--out", "two.h5", *EXTRACT], tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert_same_cache(tmp_path / "one.h5", tmp_path / "two.h5")
    result = json.loads(two.stdout)  # rank 0 alone prints
    assert result["extracted"] == 44 and result["skipped"] == 1 and len(result["ranks"]) == 2
    assert sum(n for n, _ in result["ranks"]) == 44 and all(n > 0 for n, _ in result["ranks"])
    assert not shard_paths(tmp_path / "two.h5")


def test_a_rank_killed_mid_run_resumes_with_one_process_and_forwards_nothing_twice(data, tmp_path):
    ref = torchrun(1, ["extract", str(data), "--out", "ref.h5", *EXTRACT], tmp_path)
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = torchrun(2, ["extract", str(data), "--out", "c.h5", *EXTRACT], tmp_path,
                      EMBEDCACHE_TEST_FAIL_RANK="1", EMBEDCACHE_TEST_FAIL_HOW="kill", EMBEDCACHE_TEST_FAIL_AFTER="2")  # fmt: skip
    assert killed.returncode != 0
    assert not (tmp_path / "c.h5").exists()  # nothing looks finished
    assert shard_paths(tmp_path / "c.h5")  # the killed rank's rows wait in its shard
    resumed = torchrun(1, ["extract", str(data), "--out", "c.h5", *EXTRACT], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    r = json.loads(resumed.stdout)
    assert r["reused"] >= 8  # at least the 2 batches of 4 rank 1 wrote before it died
    assert r["reused"] + r["extracted"] + r["skipped"] == 45  # nothing forwarded twice
    assert_same_cache(tmp_path / "ref.h5", tmp_path / "c.h5")
    assert not shard_paths(tmp_path / "c.h5")


def test_a_rank_that_fails_stops_every_rank_with_one_clear_error(data, tmp_path):
    r = torchrun(2, ["extract", str(data), "--out", "c.h5", *EXTRACT], tmp_path,
                 EMBEDCACHE_TEST_FAIL_RANK="1", EMBEDCACHE_TEST_FAIL_HOW="refuse")  # fmt: skip
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert "Error: weights file only-rank-1.pt does not exist" in errors  # rank 1's own words
    assert "Error: rank 1 of 2 failed: weights file only-rank-1.pt does not exist" in errors
    frames = [line for line in r.stderr.splitlines() if line.strip().startswith('File "')]
    assert not [f for f in frames if "embedcache" in f]  # torchrun's own report may follow


def test_an_unwritable_output_fails_every_rank_not_a_hang(data, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    r = torchrun(2, ["extract", str(data), "--out", "file.txt/c.h5", *EXTRACT], tmp_path)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 2 and all("cannot write next to --out file.txt/c.h5" in e for e in errors)


def test_an_incremental_run_with_two_ranks_extracts_only_new_images(data, tmp_path):
    assert torchrun(2, ["extract", str(data), "--out", "c.h5", *EXTRACT], tmp_path).returncode == 0
    make_image(data / "val" / "dog" / "new.png", 1, seed=999)
    r = torchrun(2, ["extract", str(data), "--out", "c.h5", *EXTRACT], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["extracted"] == 1
    fresh = torchrun(1, ["extract", str(data), "--out", "fresh.h5", *EXTRACT], tmp_path)
    assert fresh.returncode == 0
    assert_same_cache(tmp_path / "fresh.h5", tmp_path / "c.h5")
