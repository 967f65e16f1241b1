"""locks.py: one writer per output, released by the kernel when the holder dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import make_tree

from embedcache import extract, finetune
from embedcache.errors import EmbedcacheError
from embedcache.locks import exclusive, lock_path

HOLD = """
import sys, time
from embedcache.locks import exclusive
with exclusive(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_in_another_process(out, verb) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out), verb], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_fails_at_once_naming_the_first_and_a_killed_holder_leaves_nothing_stale(
    tmp_path, extract_kw
):
    from click.testing import CliRunner

    from embedcache.cli import main

    data, out = make_tree(tmp_path / "d", per_class=2), tmp_path / "c.h5"
    holder = hold_in_another_process(out, "extract")
    try:
        r = CliRunner().invoke(
            main,
            [
                "extract",
                str(data),
                "--out",
                str(out),
                "-b",
                "resnet18",
                "-w",
                "none",
                "--image-size",
                "32",
                "--device",
                "cpu",
            ],
        )
        assert r.exit_code != 0
        assert r.output.strip().splitlines()[-1] == (
            f"Error: another `embedcache extract` (pid {holder.pid}) is writing {out}; "
            "wait for it to finish, or choose another --out"
        )
        assert (
            not out.exists() and not (tmp_path / "c.h5.partial").exists()
        )  # failed before any work
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert lock_path(out).exists()  # SIGKILL: the file stays, the lock went with the process
    r = extract(data, out=out, **extract_kw)
    assert r.extracted == 8 and not lock_path(out).exists()  # a clean exit removes the file


def test_finetune_takes_the_lock_on_its_output(tmp_path, extract_kw):
    data = make_tree(tmp_path / "d", per_class=2)
    held = rf"another `embedcache finetune` \(pid {os.getpid()}\) is writing {tmp_path / 'm.pt'}"
    with exclusive(tmp_path / "m.pt", "finetune"), pytest.raises(EmbedcacheError, match=held):
        finetune(
            data,
            out=tmp_path / "m.pt",
            epochs=1,
            **{k: v for k, v in extract_kw.items() if k != "batch_size"},
        )
    assert not (tmp_path / "m.pt").exists()


def test_the_lock_is_refused_in_an_unwritable_place(tmp_path):
    (tmp_path / "file").write_text("x")
    refused = (
        r"^cannot write next to --out .*file/c.h5 \(File exists\); choose a writable location$"
    )
    with (
        pytest.raises(EmbedcacheError, match=refused),
        exclusive(tmp_path / "file" / "c.h5", "extract"),
    ):
        pass
