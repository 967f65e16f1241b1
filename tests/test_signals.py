"""SIGTERM and SIGHUP (a scheduler's preemption) stop a verb like Ctrl-C: partial work kept,
a one-line hint on how to resume for that verb, exit 128 + the signal number."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tree

from embedcache import extract, open_cache
from embedcache.cache import partial_path

ENTRY = Path(__file__).with_name("dist_entry.py")
EXTRACT = [
    "-b",
    "resnet18",
    "-w",
    "none",
    "--image-size",
    "32",
    "--batch-size",
    "4",
    "--num-workers",
    "0",
    "--device",
    "cpu",
]


def cli(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    """The CLI in a subprocess, with a signal injected by tests/dist_entry.py."""
    full = {**os.environ, "RANK": "0", "EMBEDCACHE_TEST_FAIL_RANK": "0", **env}
    return subprocess.run(
        [sys.executable, str(ENTRY), *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("sig", ["SIGTERM"])
def test_a_signal_during_extract_keeps_the_partial_work_and_says_how_to_resume(tmp_path, sig):
    data = make_tree(tmp_path / "d", per_class=5)
    r = cli(
        ["extract", str(data), "--out", "c.h5", *EXTRACT],
        tmp_path,
        EMBEDCACHE_TEST_FAIL_HOW="kill-partial",
        EMBEDCACHE_TEST_FAIL_AFTER="2",
        EMBEDCACHE_TEST_FAIL_SIGNAL=sig,
    )
    assert r.returncode == 128 + getattr(signal, sig)
    assert (
        r.stderr.strip().splitlines()[-1] == f"stopped by {sig}; re-run the same command to resume"
    )
    assert "Traceback" not in r.stderr
    assert partial_path(tmp_path / "c.h5").exists() and not (tmp_path / "c.h5").exists()
    again = cli(
        ["extract", str(data), "--out", "c.h5", *EXTRACT, "--json"],
        tmp_path,
        EMBEDCACHE_TEST_FAIL_HOW="none",
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert '"reused": 8' in again.stdout  # the 2 batches written before the signal
    kw = {
        "backbone": "resnet18",
        "weights": "none",
        "image_size": 32,
        "batch_size": 4,
        "num_workers": 0,
        "device": "cpu",
        "progress": False,
    }
    extract(data, out=tmp_path / "ref.h5", **kw)
    with open_cache(tmp_path / "c.h5") as a, open_cache(tmp_path / "ref.h5") as b:
        for s in ("train", "val"):
            assert np.array_equal(a.features(s)[:], b.features(s)[:])


# A signal during finetune (exit 128 + 15, the hint to resume with --resume, the state kept, and the
# resumed run finishing) is checked in tests/test_finetuning.py: there the same subprocess runs
# also prove that the resumed run ends with the metrics of an uninterrupted one.


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_while_a_verb_runs_both_signals_unwind_like_ctrl_c_and_the_old_handler_comes_back(sig):
    from embedcache.cli import Terminated, _stop_signals

    before = signal.getsignal(sig)
    with pytest.raises(Terminated) as stopped, _stop_signals():
        os.kill(os.getpid(), sig)
        for _ in range(1000):  # the handler runs between two bytecodes
            pass
    assert stopped.value.signum == sig and isinstance(stopped.value, KeyboardInterrupt)
    assert signal.getsignal(sig) is before
