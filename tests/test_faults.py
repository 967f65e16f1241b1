"""Fault injection: bad input, kills at random points, damaged caches, failing writes.

Small data and a tiny random-init backbone; every case asserts what the user would see.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from embedcache import extract, open_cache
from embedcache.data import scan

KW = {
    "backbone": "resnet18",
    "weights": "none",
    "image_size": 32,
    "batch_size": 1,
    "num_workers": 0,
    "device": "cpu",
    "progress": False,
}
# Where the backbone is incidental (dozens of runs, a paused run): a tiny random-init one.
TINY = {**KW, "backbone": "timm:test_efficientnet"}


def _png_with_bad_crc() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    idat = data.index(b"IDAT")
    data[idat + 8] ^= 0xFF  # a byte of the compressed data: the chunk's CRC no longer matches
    return bytes(data)


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels and carries one byte of image data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"x") + chunk(b"IEND", b"")


def _bad(folder: Path) -> dict[str, str]:
    """Write the unreadable kinds into ``folder``; returns {file name: the reason expected}."""
    good = make_image(folder.parent / "tmp_good.jpg", 0, 5, size=(64, 48), fmt="JPEG").read_bytes()
    png = io.BytesIO()
    Image.new("RGB", (30, 30)).save(png, "PNG")
    files = {
        "zero.jpg": b"",
        "cut.jpg": good[: len(good) // 2],
        "cut.png": png.getvalue()[:60],
        "text.jpg": b"just some words\n",
        "badcrc.png": _png_with_bad_crc(),
        "hugeheader.png": _png_header_only(60000, 60000),
        "tinybody.png": _png_header_only(300, 300),
        "header.jpg": good[:20],
        "random.webp": os.urandom(500),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "loop.jpg").symlink_to("loop.jpg")
    (folder / "dangling.jpg").symlink_to("nowhere.jpg")
    os.mkfifo(folder / "fifo.jpg")
    (folder / "dir.jpg").mkdir()
    bomb = folder / "bomb.png"  # 13,000 x 13,000: above PIL's limit, a few kB on disk
    Image.new("1", (13000, 13000)).save(bomb)
    reasons = {
        "zero.jpg": "empty file (0 bytes)",
        "cut.jpg": "truncated image",
        "cut.png": None,
        "text.jpg": "not an image (unrecognised format)",
        "badcrc.png": None,
        "hugeheader.png": None,
        "tinybody.png": None,
        "header.jpg": None,
        "random.webp": "not an image (unrecognised format)",
        "loop.jpg": "symlink loop",
        "dangling.jpg": "file not found",
        "fifo.jpg": "not a regular file",
        "dir.jpg": "not a regular file",
        "bomb.png": "image too large (decompression bomb guard)",
    }
    return reasons  # None: any reason will do, as long as the file is listed


def _odd_but_valid(folder: Path) -> list[str]:
    """Images that are unusual but readable: they must be extracted, not skipped."""
    rgb = np.random.default_rng(3).integers(0, 255, (40, 50, 3), np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(40 * 50).reshape(40, 50) * 30).astype(np.uint16)).save(
        folder / "sixteen.png"
    )
    pal = Image.fromarray(rgb).convert("P")
    pal.info["transparency"] = 0
    pal.save(folder / "palette.png", transparency=0)
    Image.fromarray(rgb).convert("LA").save(folder / "la.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "one.png")
    frames = [Image.new("RGB", (30, 30), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(rgb).save(folder / "ünïcødé 猫.png")
    Image.fromarray(rgb).save(folder / "new\nline.png")
    (folder / "trailing.jpg").write_bytes(
        make_image(folder / "trailing.jpg", 1, 8, fmt="JPEG").read_bytes() + b"garbage"
    )
    return [
        "cmyk.jpg",
        "sixteen.png",
        "palette.png",
        "la.png",
        "one.png",
        "anim.gif",
        "rotated.jpg",
        "ünïcødé 猫.png",
        "new\nline.png",
        "trailing.jpg",
    ]


def _good(folder: Path) -> None:
    for i in range(3):
        make_image(
            folder / f"g{i}.png",
            0 if "cat" in folder.name else 1,
            i + (10 if "cat" in folder.name else 20),
        )


def test_a_corpus_of_bad_files_is_skipped_with_reasons_and_leaves_the_good_features_alone(
    tmp_path, monkeypatch
):
    mixed, clean = tmp_path / "mixed", tmp_path / "clean"
    for root in (mixed, clean):
        for cls in ("cat", "dog"):
            (root / cls).mkdir(parents=True)
            _good(root / cls)
        _odd_but_valid(root / "dog")
    expected = _bad(mixed / "cat")
    (mixed / "dog" / "gone.png").write_bytes((mixed / "dog" / "g0.png").read_bytes())
    real_scan = scan

    def scan_then_delete(*args, **kwargs):  # a file removed between the scan and the read
        images = real_scan(*args, **kwargs)
        (mixed / "dog" / "gone.png").unlink(missing_ok=True)
        return images

    monkeypatch.setattr("embedcache.sources.listing.scan_files", scan_then_delete)
    r = extract(mixed, out=tmp_path / "mixed.h5", **KW)
    monkeypatch.setattr("embedcache.sources.listing.scan_files", real_scan)
    extract(clean, out=tmp_path / "clean.h5", **KW)
    with open_cache(tmp_path / "mixed.h5") as c:
        skipped = {Path(s.path).name: s.reason for s in c.skipped}
        mixed_rows = {
            p: f for s in c.splits for p, f in zip(c.paths(s), c.features(s)[:], strict=True)
        }
    assert set(skipped) == {*expected, "gone.png"} and r.skipped == len(expected) + 1
    assert len(expected) + 1 >= 15  # kinds of unreadable input (and 10 odd but valid ones below)
    for name, reason in expected.items():
        assert reason is None or skipped[name] == reason, name
        assert skipped[name], name
    assert skipped["gone.png"] == "file not found"
    with open_cache(tmp_path / "clean.h5") as c:
        clean_rows = {
            p: f for s in c.splits for p, f in zip(c.paths(s), c.features(s)[:], strict=True)
        }
    assert len(clean_rows) == 6 + 10 and mixed_rows.keys() == clean_rows.keys()
    for path, f in clean_rows.items():
        assert np.array_equal(mixed_rows[path], f), path  # the bad files changed nothing


def _killed_at(point: int, run) -> int:
    """``run()`` in a forked child that SIGKILLs itself at the ``point``-th HDF5 flush or file
    rename (anywhere in the write path: between a batch's features and its status, inside the
    final write, just before the rename). Returns the child's wait status."""
    import signal

    import h5py
    import torch

    pid = os.fork()
    if pid:
        return os.waitpid(pid, 0)[1]
    try:  # the child: one thread (no thread pool survives a fork), then die at the point
        torch.set_num_threads(1)
        count, flush, replace = [0], h5py.File.flush, os.replace

        def tick() -> None:
            count[0] += 1
            if count[0] >= point:
                os.kill(os.getpid(), signal.SIGKILL)

        h5py.File.flush = lambda self: (flush(self), tick())[0]
        os.replace = lambda *a, **k: (tick(), replace(*a, **k))[1]
        run()
        os._exit(0)
    except BaseException:
        os._exit(3)


def test_sigkill_at_ten_random_points_then_resume_gives_the_uninterrupted_cache(tmp_path):
    """Ten runs, each SIGKILLed at a seeded random point of the write path and each resuming the
    one before; then a run to the end gives the features of an uninterrupted run, bit for bit."""
    import torch
    from conftest import make_tree

    from embedcache.backbones import build_backbone

    data = make_tree(tmp_path / "d", per_class=4)  # 16 images, 8 batches of 2
    out = tmp_path / "c.h5"
    kw = {**KW, "batch_size": 2, "model": build_backbone("resnet18", weights="none", image_size=32)}
    points = np.random.default_rng(12).integers(1, 5, size=10).tolist()
    for point in points:
        status = _killed_at(point, lambda: extract(data, out=out, **kw))
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9, (point, status)
        if out.exists():  # a file with the output's name is always a complete cache
            with open_cache(out) as c:
                assert sum(c.num_images(s) for s in c.splits) == 16
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the children ran: bit-identical features
    try:
        extract(data, out=out, **kw)
        extract(data, out=tmp_path / "ref.h5", **kw)
    finally:
        torch.set_num_threads(threads)
    with open_cache(out) as a, open_cache(tmp_path / "ref.h5") as b:
        for s in ("train", "val"):
            assert a.paths(s) == b.paths(s) and np.array_equal(
                a.features(s)[:], b.features(s)[:]
            ), s
    assert not list(tmp_path.glob("c.h5.*"))  # no partial, shard, lock or temporary file left


def test_fifty_random_corruptions_of_a_cache_read_back_identical_or_fail_clearly(tmp_path):
    import shutil

    from embedcache import train_head, write_cache
    from embedcache.backbones import EvalTransform
    from embedcache.errors import EmbedcacheError

    rng = np.random.default_rng(7)
    x = rng.standard_normal((3000, 256)).astype(np.float16)
    y = (x[:, 0] > 0).astype(np.int64)
    splits = {s: (x, y, [f"{s}/{i}.jpg" for i in range(3000)]) for s in ("train", "val")}
    good = write_cache(
        tmp_path / "good.h5",
        splits,
        classes=["a", "b"],
        backbone="b",
        weights="w",
        transform=EvalTransform(resize=40, crop=32).to_json(),
    )
    size = good.stat().st_size
    outcomes = {"identical": 0, "refused": 0}
    trained_on_damaged = 0
    for i in range(50):
        bad = tmp_path / f"bad{i}.h5"
        shutil.copyfile(good, bad)
        start, length = int(rng.integers(0, size - 1)), int(rng.integers(1, 2000))
        with open(bad, "r+b") as f:
            f.seek(start)
            f.write(rng.integers(0, 256, min(length, size - start), np.uint8).tobytes())
        try:
            with open_cache(bad) as c:
                for s in ("train", "val"):
                    assert np.array_equal(c.features(s)[:], x) and np.array_equal(c.labels(s), y)
            outcomes["identical"] += 1
        except EmbedcacheError:
            outcomes["refused"] += 1
            if trained_on_damaged < 5:  # train-head goes through the same reads: it refuses too
                trained_on_damaged += 1
                with pytest.raises(EmbedcacheError):
                    train_head(bad, out=tmp_path / f"h{i}.pt", epochs=1, progress=False)
        bad.unlink()
    assert sum(outcomes.values()) == 50 and outcomes["refused"] >= 25, (
        outcomes
    )  # most bytes are features


class _FailAt:
    """Patch callables so that the k-th call among them raises OSError(err) instead of writing."""

    def __init__(self, monkeypatch, targets: list[tuple[object, str]]):
        self.calls, self.fail_at, self.err = 0, None, None
        for owner, name in targets:
            original = getattr(owner, name)

            def wrapped(*args, _original=original, **kwargs):
                self.calls += 1
                if self.calls == self.fail_at:
                    raise OSError(self.err, os.strerror(self.err))
                return _original(*args, **kwargs)

            monkeypatch.setattr(owner, name, wrapped)

    def arm(self, k: int | None, err: int | None = None) -> None:
        self.calls, self.fail_at, self.err = 0, k, err


@dataclass
class _Output:
    """One kind of output, as the ENOSPC/EIO test writes it."""

    targets: list[tuple[object, str]]  # the calls that write it: any one of them may fail
    run: Callable[[Path], object]  # write it to this path (resuming where a run left a state)
    message: Callable[[Path], str]  # the one-line error when writing to this path fails
    check: Callable[[Path], None]  # what the resumed run wrote is right
    errors: Callable[[int], tuple[int, ...]]  # the errors tried at the k-th write
    suffix: str
    min_writes: int
    failed_leaves_nothing: bool  # a failed run leaves no file at the path


def _cache_output(tmp_path: Path) -> _Output:
    import h5py
    from conftest import make_tree

    from embedcache.backbones import build_backbone

    data = make_tree(tmp_path / "d", per_class=1)
    kw = {
        **TINY,
        "batch_size": 2,
        "model": build_backbone(TINY["backbone"], weights="none", image_size=32),
    }
    ref = extract(data, out=tmp_path / "ref.h5", **kw).path

    def same_features(out: Path) -> None:
        with open_cache(out) as a, open_cache(ref) as b:
            for s in ("train", "val"):
                assert np.array_equal(a.features(s)[:], b.features(s)[:]), out

    return _Output(
        targets=[
            (h5py.Dataset, "__setitem__"),
            (h5py.Group, "create_dataset"),
            (h5py.AttributeManager, "modify"),
        ],
        run=lambda out: extract(data, out=out, **kw),  # the same command resumes
        message=lambda out: (
            r"(no space left on the device while writing|cannot write) "
            r".*re-run the same command to resume"
        ),
        check=same_features,
        errors=lambda k: (errno.ENOSPC, errno.EIO),
        suffix=".h5",
        min_writes=20,
        failed_leaves_nothing=True,  # nothing half-written looks finished
    )


def _is_file(out: Path) -> None:
    assert out.is_file(), out


def _head_output(tmp_path: Path) -> _Output:
    import torch
    from conftest import make_tree

    from embedcache import train_head

    cache = extract(make_tree(tmp_path / "d", per_class=3), out=tmp_path / "c.h5", **TINY).path
    return _Output(
        targets=[(torch, "save")],
        run=lambda out: train_head(cache, out=out, epochs=3, progress=False),
        message=lambda out: rf"cannot write .*{out.stem}",
        check=_is_file,
        errors=lambda k: (errno.ENOSPC, errno.EIO),
        suffix=".pt",
        min_writes=1,
        failed_leaves_nothing=True,
    )


def _model_output(tmp_path: Path) -> _Output:
    import torch
    from conftest import make_tree

    from embedcache import finetune

    data = make_tree(tmp_path / "d", per_class=3)
    ft = {k: v for k, v in TINY.items() if k != "batch_size"} | {
        "epochs": 1,
        "augment": "none",
        "batch_size": 4,
    }
    return _Output(
        targets=[(torch, "save")],
        run=lambda out: finetune(
            data, out=out, resume=out.with_suffix(".last.pt").exists(), **ft
        ),  # resume where a failed run kept a state
        message=lambda out: rf"cannot write .*{out.stem}",
        check=_is_file,
        # finetune runs cost a second each: each write gets one of the two errors
        errors=lambda k: ((errno.ENOSPC, errno.EIO)[k % 2],),
        suffix=".pt",
        min_writes=4,  # best and last, per epoch
        failed_leaves_nothing=False,  # a best model saved before the failed write stays
    )


@pytest.mark.parametrize(
    "make_output", [_cache_output, _head_output, _model_output], ids=["cache", "head", "model"]
)
def test_enospc_and_eio_at_each_write_fail_cleanly_and_resume(make_output, tmp_path, monkeypatch):
    """Every write of a cache, a head and a fine-tuned model, failed in turn with ENOSPC and
    EIO: one clear error, no temporary file left, and the same command then finishes it."""
    from embedcache.errors import EmbedcacheError

    output = make_output(tmp_path)
    fail = _FailAt(monkeypatch, output.targets)
    fail.arm(None)
    output.run(tmp_path / f"count{output.suffix}")
    writes = fail.calls
    assert writes >= output.min_writes, writes
    for k in range(1, writes + 1):
        for err in output.errors(k):
            out = tmp_path / f"out{k}-{err}{output.suffix}"
            fail.arm(k, err)
            with pytest.raises(EmbedcacheError, match=output.message(out)):
                output.run(out)
            if output.failed_leaves_nothing:
                assert not out.exists(), (k, err)
            fail.arm(None)
            output.run(out)
            output.check(out)
            assert not list(tmp_path.glob("*.tmp")), (k, err)  # no temporary file left behind


def test_a_checkpoint_with_a_flipped_byte_is_refused_or_reads_back_the_same(tmp_path):
    """Twenty seeded single-byte flips of a head checkpoint: each one is refused with one
    clear line (a damaged zip, or contents that no longer match their SHA-256), or loads
    exactly what was saved (a flip in bytes torch never reads)."""
    import torch
    from conftest import make_tree

    from embedcache import load_head, train_head
    from embedcache.errors import EmbedcacheError

    data = make_tree(tmp_path / "d", per_class=3)
    extract(data, out=tmp_path / "c.h5", **KW)
    train_head(tmp_path / "c.h5", out=tmp_path / "h.pt", epochs=2, progress=False)
    good = (tmp_path / "h.pt").read_bytes()
    ref = load_head(tmp_path / "h.pt")[0].state_dict()
    rng = np.random.default_rng(3)
    refused = 0
    for i in range(20):
        flipped = bytearray(good)
        at = int(rng.integers(0, len(good)))
        flipped[at] ^= 1 << int(rng.integers(0, 8))
        (tmp_path / f"f{i}.pt").write_bytes(bytes(flipped))
        try:
            state = load_head(tmp_path / f"f{i}.pt")[0].state_dict()
        except EmbedcacheError as e:
            assert "\n" not in str(e) and f"f{i}.pt" in str(e)
            refused += 1
            continue
        assert all(torch.equal(state[k], ref[k]) for k in ref), at  # never altered weights
    data_bytes = sum(v.numel() * v.element_size() for v in ref.values())
    assert refused >= 20 * data_bytes / len(good) / 2  # flips in the weights' bytes are caught


ENTRY = Path(__file__).with_name("dist_entry.py")


@pytest.mark.parametrize("verb", ["extract", "finetune"])
def test_two_runs_on_one_output_one_runs_the_other_fails_fast(tmp_path, verb):
    """The first run is paused mid-way (after a batch, after an epoch) holding its output; a
    second run with the same --out fails at once naming it; once the first is gone, it runs."""
    import signal
    import subprocess
    import sys

    from conftest import make_tree

    from embedcache import finetune
    from embedcache.errors import EmbedcacheError

    data = make_tree(tmp_path / "d", per_class=3)
    out = tmp_path / ("c.h5" if verb == "extract" else "m.pt")
    args = [
        verb,
        str(data),
        "--out",
        str(out),
        "-b",
        TINY["backbone"],
        "-w",
        "none",
        "--image-size",
        "32",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--batch-size",
        "2",
    ]
    how = "pause" if verb == "extract" else "pause-after-epoch"
    env = {
        **os.environ,
        "RANK": "0",
        "EMBEDCACHE_TEST_FAIL_RANK": "0",
        "EMBEDCACHE_TEST_FAIL_HOW": how,
    }
    first = subprocess.Popen(
        [
            sys.executable,
            str(ENTRY),
            *args,
            *(["--epochs", "3", "--augment", "none"] if verb == "finetune" else []),
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while (line := first.stderr.readline()) and "paused" not in line:  # after any progress bar
            pass
        assert first.poll() is None, "the first run ended before it paused"
        kw = {k: v for k, v in TINY.items() if k != "progress"} | {
            "batch_size": 2,
            "progress": False,
        }
        second = (
            (lambda: extract(data, out=out, **kw))
            if verb == "extract"
            else (lambda: finetune(data, out=out, epochs=1, augment="none", **kw))
        )
        with pytest.raises(
            EmbedcacheError, match=rf"another `embedcache {verb}` \(pid {first.pid}\) is writing"
        ):
            second()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    second()  # the holder is gone: nothing stale is left to stop this one
    assert out.exists()


# ---------------------------------------------------------------------------
# Probes of a hostile but realistic user (issue 19): each ends in one line or a correct result


def _cli(*args: str):
    from click.testing import CliRunner

    from embedcache.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, *patterns: str) -> str:
    """The CLI's error, checked to be one line with no traceback, matching every pattern."""
    import re

    text = result.output
    assert result.exit_code == 1, text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
    for p in patterns:
        assert re.search(p, text), (p, text)
    return text


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """Two classes of six tiny JPEGs, their cache and a head: the issue's reproducer setup,
    shared by the probes below (those that change a file work on a copy)."""
    from conftest import make_tree

    from embedcache import train_head

    tmp_path = tmp_path_factory.mktemp("probe")
    data = make_tree(tmp_path / "d", splits=(), classes=("a", "b"), per_class=6, ext=".jpg")
    extract(data, out=tmp_path / "c.h5", **TINY)
    train_head(tmp_path / "c.h5", out=tmp_path / "h.pt", epochs=2, progress=False)
    return tmp_path


def test_no_output_replaces_an_input_or_a_file_of_another_kind(probe):
    """#2: every verb's --out may replace only its own kind of file, never an input."""
    from conftest import tree_digest

    d, c, h = probe / "d", probe / "c.h5", probe / "h.pt"
    before = {**tree_digest(d), "c": c.read_bytes(), "h": h.read_bytes()}
    tiny = ["-b", TINY["backbone"], "-w", "none", "--image-size", "32", "-q"]
    (probe / "m.csv").write_text("path,label\nd/a/a_000.jpg,a\nd/b/b_000.jpg,b\n")
    cases = {
        (
            "extract",
            d,
            *tiny,
            "--overwrite",
            "--out",
            d / "a" / "a_000.jpg",
        ): r"is an image; extract replaces only an embedcache cache: pass another --out",
        (
            "extract",
            probe / "m.csv",
            *tiny,
            "--out",
            probe / "m.csv",
        ): r"would overwrite .*m\.csv \(the data extract reads\); pass another --out",
        (
            "extract",
            d,
            *tiny,
            "--overwrite",
            "--out",
            h,
        ): r"is a head checkpoint; extract replaces only",
        (
            "train-head",
            c,
            "--out",
            c,
            "-q",
        ): r"would overwrite .*c\.h5 \(the cache train-head reads\)",
        (
            "train-head",
            c,
            "--out",
            d / "b" / "b_001.jpg",
            "-q",
        ): r"is an image; train-head replaces only a head",
        (
            "train-head",
            c,
            "--out",
            probe / "new.png",
            "-q",
        ): r"is named like an image; pass a name such as .*new\.pt",
        (
            "finetune",
            d,
            "--head",
            h,
            "--out",
            c,
            "--epochs",
            "1",
            "-q",
        ): r"is an embedcache cache; finetune replaces only a fine-tuned model",
        (
            "finetune",
            d,
            "--head",
            h,
            "--out",
            h,
            "--epochs",
            "1",
            "-q",
        ): r"would overwrite .*h\.pt \(the head finetune reads\)",
        (
            "export",
            h,
            "--out",
            h,
        ): r"would overwrite .*h\.pt \(the model export reads\); pass another --out .*h\.onnx",
        (
            "export",
            h,
            "--format",
            "torchscript",
            "--out",
            c,
        ): r"is an embedcache cache; export replaces only an exported model",
        (
            "evaluate",
            h,
            c,
            "--split",
            "val",
            "--plot",
            d / "a" / "a_002.jpg",
        ): r"--plot .* is an image; evaluate replaces only a plot",
    }
    for args, pattern in cases.items():
        _one_line_error(_cli(*args), pattern)
    assert {**tree_digest(d), "c": c.read_bytes(), "h": h.read_bytes()} == before
    # its own kind it replaces: a head over a head, a cache over a cache
    assert _cli("train-head", c, "--out", h, "-q", "--epochs", "1").exit_code == 0
    assert _cli("extract", d, *tiny, "--overwrite", "--out", c).exit_code == 0


def test_plots_never_go_inside_the_image_folder(probe):
    """#13: head.confusion.png next to --out inside the data would be extracted next time."""
    r = _cli("train-head", probe / "c.h5", "--out", probe / "d" / "a" / "head.pt", "-q")
    _one_line_error(
        r,
        r"would put the plot head\.confusion\.png inside the image folder .*; "
        r"pass an --out outside",
    )
    assert sorted(p.name for p in (probe / "d" / "a").iterdir()) == [
        f"a_{i:03d}.jpg" for i in range(6)
    ]


@pytest.mark.parametrize("layout", ["class-folders", "split-folders", "unlabelled"])
def test_a_file_name_that_is_not_utf8_is_extracted_and_shown_escaped(tmp_path, layout):
    """#1: one latin-1 byte in a file name (and a folder name) aborted the whole extract."""
    from conftest import make_tree

    splits = ("train", "val") if layout == "split-folders" else ()
    data = make_tree(tmp_path / "d", splits=splits, classes=("a", "b"), per_class=3)
    folder = data / ("train/a" if splits else "a")
    raw = os.fsdecode(b"caf\xe9")
    make_image(folder / f"{raw}.png", 0, 99)
    make_image(data / ("train" if splits else "") / "b" / raw / "x.png", 1, 98)
    kw = {**TINY, "unlabelled": layout == "unlabelled"}
    extract(data, out=tmp_path / "c.h5", **kw)
    with open_cache(tmp_path / "c.h5") as c:
        paths = [p for s in c.splits for p in c.paths(s)]
    assert len(paths) == (2 * 3 * len(splits or "x") + 2) and any(raw in p for p in paths)
    assert extract(data, out=tmp_path / "c.h5", **kw).up_to_date  # the names read back the same
    shown = _cli("info", tmp_path / "c.h5", "--verify")
    assert shown.exit_code == 0 and "intact" in shown.output, shown.output
    if layout == "class-folders":
        from embedcache import train_head

        train_head(tmp_path / "c.h5", out=tmp_path / "h.pt", epochs=1, progress=False)
        r = _cli("predict", tmp_path / "h.pt", folder, "-q", "--device", "cpu")
        assert r.exit_code == 0 and "caf\\xe9.png: " in r.output, r.output


def test_a_diverged_head_stops_with_a_clear_error_and_is_never_written(blob_cache, tmp_path):
    """#8: --lr 1e308 went to NaN weights, saved as a success; predict printed nan."""
    import torch

    from embedcache import load_head, train_head
    from embedcache.checkpoint import HEAD_FORMAT, save_checkpoint
    from embedcache.errors import EmbedcacheError

    out = tmp_path / "hn.pt"
    with pytest.raises(
        EmbedcacheError,
        match=r"training diverged at epoch \d+: the loss is not finite \(--lr 1e\+308\); "
        r"lower --lr",
    ):
        train_head(blob_cache, out=out, head="linear", lr=1e308, progress=False)
    assert not list(tmp_path.glob("hn*"))
    r = train_head(
        blob_cache, out=out, head="linear", lr=[1e308, 1e-2], progress=False
    )  # a sweep keeps a finite head
    assert r.metrics["best"]["lr"] == 1e-2 and r.metrics["val_acc"] > 0.9
    ckpt = load_head(out)[1]
    ckpt.state_dict = {k: torch.full_like(v, float("nan")) for k, v in ckpt.state_dict.items()}
    with pytest.raises(
        EmbedcacheError, match=r"the head has non-finite weights .*training diverged"
    ):
        ckpt.save(tmp_path / "nan.pt")
    body = {
        "format": HEAD_FORMAT,
        "format_version": 1,
        "config": ckpt.config,
        "classes": ckpt.classes,
        "state_dict": ckpt.state_dict,
        "identity": ckpt.recorded.to_dict(),
        "metrics": {},
    }
    save_checkpoint(body, tmp_path / "old-nan.pt")  # as versions before this check wrote it
    for args in (
        ("predict", tmp_path / "old-nan.pt", tmp_path / "x.png"),
        ("export", tmp_path / "old-nan.pt", "--out", tmp_path / "e.onnx"),
    ):
        make_image(tmp_path / "x.png", 0, 1)
        _one_line_error(_cli(*args), r"old-nan\.pt: the head has non-finite weights")


def _damaged_caches(good: Path) -> dict[str, Path]:
    """Copies of ``good`` damaged the ways a disk or a hand edit damages them (#3, #4, #5)."""
    import shutil

    import h5py

    def flipped(name: str, at: int, bit: int = 4) -> Path:
        data = bytearray(good.read_bytes())
        data[at] ^= bit
        (good.parent / name).write_bytes(bytes(data))
        return good.parent / name

    raw = good.read_bytes()
    with h5py.File(good) as f:
        labels_at = f["train/labels"].id.get_chunk_info(0).byte_offset
    out = {
        "a byte of a path": flipped("path.h5", raw.find(b"train/1.png")),
        "the string heap": flipped("heap.h5", raw.find(b"GCOL") + 16, 0x55),  # an object index
        "the labels chunk": flipped("labels.h5", labels_at, 1),
    }
    edits = {
        "a label past the classes": lambda f: f["train/labels"].__setitem__(0, 7),
        "classes not JSON": lambda f: f.attrs.__setitem__("classes", "not json"),
        "another backbone": lambda f: f.attrs.__setitem__("backbone", "resnet50"),
        "a missing dataset": lambda f: f["val"].__delitem__("labels"),
        "one val label for two rows": lambda f: (
            f["val"].__delitem__("labels"),
            f["val"].create_dataset("labels", data=np.zeros(1, np.int64)),
        ),
    }
    for i, (what, edit) in enumerate(edits.items()):
        out[what] = shutil.copy(good, good.parent / f"edit{i}.h5")
        with h5py.File(out[what], "r+") as f:
            edit(f)
    return out


def test_info_verify_and_every_reader_call_each_damaged_cache_damaged(tmp_path):
    """#3, #4, #5: paths outside the checksums passed verify; heap, attribute and labels damage
    gave tracebacks; labels past the classes, broken classes and uneven rows went unchecked."""
    from embedcache import EvalTransform, evaluate, train_head, write_cache
    from embedcache.errors import EmbedcacheError

    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float16)
    y = np.arange(40) % 2
    splits = {
        s: (
            x[:20] if s == "val" else x,
            y[:20] if s == "val" else y,
            [f"{s}/{i}.png" for i in range(20 if s == "val" else 40)],
        )
        for s in ("train", "val")
    }
    t = EvalTransform(resize=40, crop=32).to_json()
    good = write_cache(
        tmp_path / "good.h5", splits, classes=["a", "b"], backbone="b", weights="w", transform=t
    )
    assert _cli("info", "--verify", good).exit_code == 0
    head = train_head(good, out=tmp_path / "h.pt", epochs=1, progress=False).path
    for what, bad in _damaged_caches(good).items():
        r = _cli("info", "--verify", bad)
        assert r.exit_code == 1 and f"cache {bad} is damaged" in r.output, (what, r.output)
        assert "Traceback" not in r.output, what
        with pytest.raises(
            EmbedcacheError, match=rf"cache {bad} is damaged: .*re-run extract with --overwrite"
        ):
            train_head(bad, out=tmp_path / "h2.pt", epochs=1, progress=False)
        with pytest.raises(EmbedcacheError, match=r"is damaged"):
            evaluate(head, bad, split="train", progress=False)


@pytest.mark.parametrize("err", ["ENOSPC", "EROFS", "EACCES"])
def test_a_failed_write_of_any_output_is_one_line_and_leaves_no_temporary_file(
    probe, tmp_path, monkeypatch, err
):
    """#6, #7: disk full while torch.save wrote (a RuntimeError from inline_container.cc), a
    report or a plot, or a read-only folder: tracebacks, and OUT.PID.tmp left behind."""
    import errno

    import torch
    from matplotlib.figure import Figure

    from embedcache import finetune, train_head
    from embedcache.errors import EmbedcacheError

    code = getattr(errno, err)
    real_save = torch.save

    def torch_fails(obj, f, *a, **k):  # what torch 2.14 raises when the disk fills mid-write
        f.write(b"part of a checkpoint")
        try:
            raise OSError(code, os.strerror(code))
        except OSError:  # its cleanup fails next, and that error is the one raised
            raise RuntimeError(  # noqa: B904
                "[enforce fail at inline_container.cc:672] . unexpected pos 1577024 vs 1576920"
            )

    def os_fails(*a, **k):
        raise OSError(code, os.strerror(code))

    c = probe / "c.h5"
    runs = {
        "checkpoint": (
            torch,
            "save",
            torch_fails,
            lambda out: train_head(c, out=out, epochs=1, progress=False),
        ),
        "report": (
            Path,
            "write_text",
            os_fails,
            lambda out: train_head(c, out=out, epochs=1, progress=False),
        ),
        "plot": (
            Figure,
            "savefig",
            os_fails,
            lambda out: train_head(c, out=out, epochs=1, progress=False),
        ),
        "model": (
            torch,
            "save",
            torch_fails,
            lambda out: finetune(
                probe / "d",
                out=out,
                head=probe / "h.pt",
                epochs=1,
                augment="none",
                **{k: v for k, v in TINY.items() if k not in ("backbone", "weights")},
            ),
        ),
    }
    reason = {
        "ENOSPC": "no space left on the device",
        "EROFS": "read-only file system",
        "EACCES": "permission denied",
    }[err]
    for what, (owner, name, fake, run) in runs.items():
        out = tmp_path / what / "out.pt"
        with monkeypatch.context() as m:
            m.setattr(owner, name, fake)
            with pytest.raises(
                EmbedcacheError,
                match=rf"^cannot write {tmp_path}/{what}/out\.\S+ \({reason}\); "
                r"free some space or choose a writable location$",
            ):
                run(out)
        assert not list((tmp_path / what).glob("*.tmp")), what
    assert real_save is torch.save


def test_evaluate_with_a_model_in_a_read_only_folder_prints_its_result(probe, monkeypatch):
    """#7: the default plot next to a read-only model was a traceback and no result."""
    monkeypatch.setattr("embedcache.outputs.writable", lambda folder: False)
    r = _cli("evaluate", probe / "h.pt", probe / "c.h5", "--split", "val")
    assert r.exit_code == 0 and "val: accuracy" in r.output, r.output
    assert "no confusion plot" in r.output and not list(probe.glob("h.val.confusion.png"))


def test_nan_backbone_weights_are_refused_before_any_feature_is_written(probe, tmp_path):
    """#14: NaN in conv1.weight made a cache that was 100% NaN, reported as a success."""
    import torch
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "wn.pt")
    r = _cli(
        "extract",
        probe / "d",
        "-b",
        "resnet18",
        "-w",
        tmp_path / "wn.pt",
        "--image-size",
        "32",
        "-q",
        "--out",
        tmp_path / "wn.h5",
    )
    _one_line_error(
        r, r"weights file .*wn\.pt holds non-finite values \(NaN or infinity\) in conv1\.weight"
    )
    assert not list(tmp_path.glob("wn.h5*"))


def test_a_backbone_that_overflows_stops_extract_with_a_clear_error(probe, tmp_path):
    """#14: features past float16's range became inf in the cache; now extract stops, saying why."""
    import torch

    from embedcache.backbones import build_backbone
    from embedcache.errors import EmbedcacheError

    bb = build_backbone(TINY["backbone"], weights="none", image_size=32)
    with torch.no_grad():
        for p in bb.net.parameters():
            p.mul_(1e6)
    with pytest.raises(EmbedcacheError, match=r"gave non-finite features .* or --dtype float32"):
        extract(probe / "d", out=tmp_path / "big.h5", model=bb, **TINY)
    assert not (tmp_path / "big.h5").exists()


def test_misleading_messages_now_say_what_is_wrong(make_cache, tmp_path):
    """#18: --weights DIR said 'does not exist', --val-fraction 0 without a val split 'too few
    training images', --lr inf 'must be at least 0.0'."""
    from conftest import blobs

    cache = make_cache(train=blobs(10))
    (tmp_path / "wdir").mkdir()
    cases = {
        (
            "extract",
            tmp_path,
            "-b",
            "resnet18",
            "-w",
            tmp_path / "wdir",
            "--out",
            tmp_path / "x.h5",
        ): r"--weights .*wdir is a folder; pass the state-dict file in it",
        (
            "train-head",
            cache,
            "--val-fraction",
            "0",
            "--out",
            tmp_path / "h.pt",
        ): r"has no val split and --val-fraction is 0: nothing to validate on; "
        r"pass a --val-fraction above 0",
        (
            "train-head",
            cache,
            "--lr",
            "inf",
            "--out",
            tmp_path / "h.pt",
        ): r"--lr must be a finite number, got inf",
    }
    for args, pattern in cases.items():
        _one_line_error(_cli(*args), pattern)


def test_image_and_batch_sizes_past_the_memory_are_refused_before_any_work(probe, tmp_path):
    """#9: --image-size 100000 grew to 23.6 GB until the kernel killed it."""
    from embedcache.errors import EmbedcacheError

    kw = {k: v for k, v in TINY.items() if k not in ("image_size", "batch_size")}
    huge = {"image_size": 100000}, {"image_size": 32, "batch_size": 10**9}
    for size in huge:
        with pytest.raises(
            EmbedcacheError,
            match=r"^a batch of \d+ images of \d+ x \d+ pixels needs about [\d.]+ GB and "
            r"[\d.]+ GB of memory is available; lower --image-size or --batch-size$",
        ):
            extract(probe / "d", out=tmp_path / "big.h5", **kw, **size)
    assert not list(tmp_path.iterdir())  # refused before any file was written
    r = _cli(
        "finetune",
        probe / "d",
        "-b",
        TINY["backbone"],
        "-w",
        "none",
        "--image-size",
        "100000",
        "--out",
        tmp_path / "m.pt",
    )
    _one_line_error(r, r"needs about .* GB of memory is available; lower --image-size")
    r = _cli("predict", probe / "h.pt", probe / "d", "--batch-size", str(10**9))
    assert r.exit_code == 0, r.output  # the batch holds the 12 images there are: it fits


def test_every_file_not_extracted_is_accounted_for(tmp_path, monkeypatch):
    """#11, #16: an unreadable class folder or a class of unreadable files was dropped without a
    word; .heic and other extensions were ignored silently (the ignored list never shown)."""
    from conftest import make_tree

    from embedcache.errors import EmbedcacheError

    data = make_tree(tmp_path / "d", splits=(), classes=("a", "b", "c"), per_class=3)
    (data / "a" / "photo.heic").write_bytes(b"ftypheic")
    real_scandir = os.scandir

    def scandir(path="."):  # what a folder without read permission gives a user who is not root
        if Path(path).name == "c":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    with monkeypatch.context() as m:
        m.setattr(os, "scandir", scandir)
        with pytest.raises(
            EmbedcacheError,
            match=r"class 'c' has no readable image \(folder c: permission denied\); "
            r"fix its files, or pass --allow-empty-class",
        ):
            extract(data, out=tmp_path / "c.h5", **TINY)
        assert not list(tmp_path.glob("c.h5*"))  # refused before any work
        r = extract(data, out=tmp_path / "c.h5", allow_empty_class=True, **TINY)
    assert r.empty_classes == ["c"] and "warning: class 'c' has no image" in r.summary()
    assert "2 ignored (1 .heic, 1 folder" in r.summary()
    with open_cache(tmp_path / "c.h5") as c:
        assert {i["path"]: i["reason"] for i in c.ignored} == {
            "a/photo.heic": "not an image file (.heic)",
            "c": "folder not readable: permission denied",
        }
    shown = _cli("info", tmp_path / "c.h5").output
    assert "ignored    2" in shown and "a/photo.heic: not an image file (.heic)" in shown
    for f in (data / "c").iterdir():  # now readable, but every file is damaged
        f.write_bytes(b"not an image")
    with pytest.raises(
        EmbedcacheError,
        match=r"class 'c' has no readable image \(all 3 of its files were skipped: not an image",
    ):
        extract(data, out=tmp_path / "d.h5", **TINY)
    assert not (tmp_path / "d.h5").exists()


def test_a_finished_cache_beside_a_stale_partial_file_is_up_to_date(probe, tmp_path):
    """Also seen: a stale OUT.partial next to a finished cache made extract redo its images."""
    import shutil

    out = tmp_path / "c.h5"
    shutil.copy(probe / "c.h5", out)
    (tmp_path / "c.h5.partial").write_bytes(b"left by a run killed long ago")
    r = extract(probe / "d", out=out, **TINY)
    assert r.up_to_date and r.extracted == 0 and not (tmp_path / "c.h5.partial").exists()


def test_a_manifest_that_is_not_utf8_is_read_or_refused_in_one_line(probe, tmp_path):
    """#10: a latin-1 or UTF-16 CSV was a UnicodeDecodeError traceback."""
    from embedcache.data import scan
    from embedcache.errors import EmbedcacheError

    d = probe / "d"
    (tmp_path / "l1.csv").write_bytes(f"path,label\n{d}/a/a_000.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(
        EmbedcacheError, match=r"l1\.csv is not UTF-8 \(byte 0xe9 on line 2\); save it as UTF-8"
    ):
        scan(tmp_path / "l1.csv")
    rows = f"path,label\n{d}/a/a_000.jpg,café\n{d}/b/b_000.jpg,b\n"
    (tmp_path / "u16.csv").write_bytes(rows.encode("utf-16"))  # with its byte-order mark
    assert scan(tmp_path / "u16.csv").classes == ["b", "café"]


def test_one_file_never_gets_two_labels_or_two_splits(probe, tmp_path):
    """#12: duplicate CSV rows (and ./ variants) gave one file two labels; a linked class folder
    put another class's images under a second label, split apart: a train/val leak."""
    import shutil

    from embedcache.data import scan
    from embedcache.errors import EmbedcacheError

    shutil.copytree(probe / "d", tmp_path / "d")
    manifests = {
        "dup.csv": "path,label\nd/a/a_000.jpg,a\nd/b/b_000.jpg,b\nd/a/a_000.jpg,b\n",
        "dot.csv": "path,label\nd/a/a_000.jpg,a\n./d/a/a_000.jpg,a\n",
    }
    for name, text in manifests.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(
            EmbedcacheError,
            match=rf"{name} lists \S+a_000\.jpg twice \(lines 2 and \d\); list each file once",
        ):
            scan(tmp_path / name)
    (tmp_path / "d" / "a" / "linkb").symlink_to("../b")
    with pytest.raises(
        EmbedcacheError,
        match=r"are the same folder through a link: its images would be in two classes or "
        r"splits; remove the link",
    ):
        scan(tmp_path / "d")
    (tmp_path / "d" / "a" / "linkb").unlink()
    (tmp_path / "d" / "a" / "again").symlink_to(".")  # a loop within one class: followed once
    assert len(scan(tmp_path / "d")) == 12


def test_compare_refuses_a_file_as_workdir_and_a_bad_unfreeze_before_any_work(probe, monkeypatch):
    """#15 and also seen: --workdir naming a file was a FileExistsError traceback; --unfreeze 9
    was refused only after 26 s of work."""
    import embedcache.comparison as comparison

    monkeypatch.setattr(comparison, "scan", lambda *a, **k: pytest.fail("work began"))
    base = ("compare", probe / "d", "-b", "resnet18", "-w", "none", "--no-tutorial", "-q")
    _one_line_error(
        _cli(*base, "--unfreeze", "9"),
        r"--unfreeze must be between 0 and 5 for resnet18 \(or all\), got 9",
    )
    monkeypatch.undo()
    _one_line_error(
        _cli(*base, "--unfreeze", "1", "--workdir", probe / "c.h5"),
        r"--workdir .*c\.h5 is a file; pass a folder",
    )


def test_a_large_jpeg_photo_is_decoded_at_a_draft_scale_not_skipped(tmp_path):
    """#17: photos of 89.5 MP or more (11648 x 8736) were skipped as decompression bombs."""
    from embedcache.data import EvalTransform, UnreadableImage, load_rgb, preprocess

    Image.new("RGB", (11648, 8736), (30, 90, 200)).save(tmp_path / "g.jpg", quality=50)
    x = preprocess(tmp_path / "g.jpg", EvalTransform(resize=256, crop=224))
    assert x.shape == (224, 224, 3) and abs(int(x[..., 2].mean()) - 200) < 5
    with pytest.raises(UnreadableImage, match="decompression bomb guard"):
        load_rgb(tmp_path / "g.jpg")  # decoded in full, it is one: the guard still holds


def test_predict_and_info_escape_names_so_none_can_forge_a_line(probe, tmp_path):
    """#19: a file named 'x.jpg: b 0.999\\nfake.jpg' printed a forged result line."""
    forged = tmp_path / "p" / "x.jpg: b 0.999\nfake.jpg"
    make_image(forged, 0, 5, fmt="JPEG")
    r = _cli("predict", probe / "h.pt", tmp_path / "p", "-q")
    assert r.exit_code == 0 and len(r.output.strip().splitlines()) == 1, r.output
    assert "x.jpg: b 0.999\\nfake.jpg: " in r.output


# ---------------------------------------------------------------------------
# Folder outputs under hostile use (issue 32): audit, export-features, compare's work folder


def _folder_verbs(probe: Path) -> dict[str, Callable[[Path], object]]:
    from embedcache import audit, export_features

    c = probe / "c.h5"
    return {
        "export-features": lambda out: export_features(c, out=out, progress=False),
        "audit": lambda out: audit(c, out=out, progress=False),
    }


FINISHED = {"export-features": "export.json", "audit": "summary.json"}


def _user_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("verb", ["export-features", "audit"])
def test_a_folder_output_never_removes_or_replaces_a_file_it_did_not_write(probe, tmp_path, verb):
    """D1, D2, D17, D21: an input, the user's notes, a summary.json of their own in --out."""
    import shutil

    c = probe / "c.h5"
    out = tmp_path / "out"
    assert _cli(verb, c, "--out", out, "-q").exit_code == 0
    (out / "notes.txt").write_text("mine")
    _one_line_error(
        _cli(verb, c, "--out", out, "-q"),
        rf"--out {out} holds notes\.txt, which {verb} did not write; "
        rf"pass a new or empty folder, e.g. {out}-2$",
    )
    sub = next(p for p in out.iterdir() if p.is_dir()) if verb == "export-features" else out
    (out / "notes.txt").rename(sub / "deep.txt")
    before = _user_files(out)
    _one_line_error(_cli(verb, c, "--out", out, "-q"), r"deep\.txt, which .* did not write")
    assert _user_files(out) == before
    (sub / "deep.txt").unlink()
    shutil.copy(c, out / "c.h5")  # D1: the input inside --out
    _one_line_error(
        _cli(verb, out / "c.h5", "--out", out, "-q"),
        rf"--out {out} holds {out}/c\.h5 \(the cache {verb} reads\)",
    )
    assert (out / "c.h5").read_bytes() == c.read_bytes()
    (out / "c.h5").unlink()
    assert _cli(verb, c, "--out", out, "-q").exit_code == 0  # its own output it replaces
    work = tmp_path / "work"  # D2: the user's own files of the names the verb writes
    work.mkdir()
    (work / "summary.json").write_text("{}")
    (work / "report.html").write_text("mine")
    (work / "export.json").write_text('{"tool": "something else"}')
    _one_line_error(_cli(verb, c, "--out", work, "-q"), r"which .* did not write; pass a new")
    assert _user_files(work) == {
        "summary.json": b"{}",
        "report.html": b"mine",
        "export.json": b'{"tool": "something else"}',
    }
    (tmp_path / "real").mkdir()  # D21: a link to a folder stays a link, nothing left beside it
    (tmp_path / "link").symlink_to("real")
    for _ in range(2):
        assert _cli(verb, c, "--out", tmp_path / "link", "-q").exit_code == 0
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / FINISHED[verb]).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "out", "real", "work"]
    _one_line_error(_cli(verb, c, "--out", "", "-q"), r"--out is empty; give a folder")


def _audit_pool(probe: Path):
    from embedcache.auditing.findings import Pool
    from embedcache.config import AuditConfig

    with open_cache(probe / "c.h5") as c:
        return Pool.read(c), AuditConfig()


@pytest.mark.parametrize("verb", ["export-features", "audit"])
def test_a_folder_output_failing_at_any_write_keeps_the_earlier_one_or_says_it_is_unfinished(
    probe, tmp_path, monkeypatch, verb
):
    """D3, D14, D15: disk full at each write in turn (into the staging folder, or while the
    files move into place): one line, no temporary folder, never a folder that looks finished
    but mixes two runs; the next run finishes it."""
    import pyarrow.parquet as pq

    import embedcache.auditing as auditing
    from embedcache.errors import EmbedcacheError

    found = auditing._findings(*_audit_pool(probe), progress=False, say=print)
    monkeypatch.setattr(auditing, "_findings", lambda *a, **k: found)  # only the writes differ
    run = _folder_verbs(probe)[verb]
    ref = tmp_path / "ref"
    run(ref)
    targets = [(Path, "write_text"), (os, "replace"), (np.lib.format, "write_array_header_1_0")]
    targets += (
        [(pq, "write_table")] if verb == "export-features" else [(csv.DictWriter, "writerows")]
    )
    fail = _FailAt(monkeypatch, targets)
    fail.arm(None)
    run(tmp_path / "count")
    writes = fail.calls
    assert writes >= 5, writes
    for k in range(1, writes + 1):
        out = tmp_path / f"out{k}"
        run(out)
        (out / FINISHED[verb]).write_text((out / FINISHED[verb]).read_text() + " ")  # a mark
        earlier = _user_files(out)
        fail.arm(k, errno.ENOSPC)
        try:
            run(out)
            failed = False  # the marker's last update, once every file was in place
        except EmbedcacheError as e:
            assert re.match(rf"^cannot write {out} \(no space left on the device\)", str(e)), e
            failed = True
        fail.arm(None)
        now = _user_files(out)
        assert not [p for p in out.iterdir() if p.name.startswith(".embedcache-tmp")], k
        if not failed:
            assert sorted(now) == sorted(_user_files(ref)) and now != earlier, k
        else:  # the earlier output whole, or one that does not look finished
            assert now == earlier or FINISHED[verb] not in now, k
        run(out)
        assert sorted(_user_files(out)) == sorted(_user_files(ref)), k


def test_a_folder_output_on_a_full_disk_in_a_real_process_is_one_line(probe, tmp_path):
    """D3 (SIGBUS, a traceback), D14: the kernel refuses a write (RLIMIT_FSIZE, as a full disk
    would): one line, exit 1, nothing left where the output would have gone."""
    import resource
    import signal
    import subprocess
    import sys

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))  # export 12 KB, audit 6 KB

    for verb in ("export-features", "audit"):
        out = tmp_path / verb
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "embedcache",
                verb,
                str(probe / "c.h5"),
                "--out",
                str(out),
                "-q",
            ],
            capture_output=True,
            text=True,
            preexec_fn=small_files,
        )
        assert p.returncode == 1, p.stderr
        assert re.fullmatch(
            rf"Error: cannot write {out} \(file too large\); free some space or choose a "
            r"writable location\n",
            p.stderr,
        ), p.stderr
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb", ["export-features", "audit"])
def test_the_leftovers_of_a_killed_folder_output_are_removed_by_the_next_run(probe, tmp_path, verb):
    """D3, D21: a SIGKILLed run leaves its staging folder (and older versions left .OUT.tmp-PID
    and .OUT.old-PID beside OUT); the next run of the same command removes those of dead runs,
    and leaves a running one's alone."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    _folder_verbs(probe)[verb](out)
    staging = out / f".embedcache-tmp-{dead.pid}"
    (staging / "train").mkdir(parents=True)
    (staging / "train" / "x.npy").write_bytes(b"half")
    old = [tmp_path / f".out.{kind}-{dead.pid}" for kind in ("tmp", "old")]
    for p in old if verb == "export-features" else ():
        p.mkdir()
    with subprocess.Popen(["sleep", "60"]) as running:
        other = out / f".embedcache-tmp-{running.pid}"
        other.mkdir()
        _folder_verbs(probe)[verb](out)
        running.kill()
    assert not staging.exists() and other.is_dir()
    assert not any(p.exists() for p in old)


def test_compare_refuses_a_work_folder_holding_files_it_did_not_write(probe, tmp_path):
    """compare fills --workdir in place: only a new, empty or earlier compare folder."""
    from embedcache import compare
    from embedcache.errors import EmbedcacheError

    work = tmp_path / "work"
    work.mkdir()
    (work / "compare.md").write_text("my notes")
    with pytest.raises(EmbedcacheError, match=r"holds compare\.md, which compare did not write"):
        compare(probe / "d", workdir=work, backbone=TINY["backbone"], weights="none")
    assert (work / "compare.md").read_text() == "my notes"


def test_an_mlp_too_wide_for_the_memory_is_refused_before_any_work(probe, tmp_path):
    """D17: --hidden 1000000000 was a 2 TB allocation and a traceback."""
    _one_line_error(
        _cli("train-head", probe / "c.h5", "--out", tmp_path / "h.pt", "--hidden", "1000000000"),
        r"^Error: --hidden 1000000000 makes an MLP of [\d,]+ M parameters, about [\d,.]+ GB to "
        r"train, and [\d.]+ GB of memory is available; lower --hidden",
    )
    _one_line_error(
        _cli("train-head", probe / "c.h5", "--out", "", "-q"),
        r"--out is empty; give a file name such as head\.pt",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []
