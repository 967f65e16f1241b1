"""--exclude FILE.csv: read once, matched by path, applied by train-head, evaluate and finetune."""

from __future__ import annotations

import os
import re

import pytest

from embedcache import evaluate, scan, train_head
from embedcache.errors import EmbedcacheError
from embedcache.exclusion import excluded, read_exclude


def test_reads_the_path_column_of_an_audit_csv_or_one_path_per_line(tmp_path):
    audit_csv = tmp_path / "leaks.csv"
    audit_csv.write_text("kind,path_a,path_b,path\nexact,train/0.png,val/0.png,train/0.png\n")
    assert read_exclude(audit_csv).paths == {"train/0.png"}
    plain = tmp_path / "plain.csv"
    plain.write_text("train/1.png\n\nval/2.png\n")
    assert read_exclude(plain).paths == {"train/1.png", "val/2.png"}
    (tmp_path / "empty.csv").write_text("")
    assert read_exclude(tmp_path / "empty.csv").paths == frozenset()
    assert read_exclude(None) is None


def test_a_csv_without_a_path_column_is_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.png,cat\n")
    with pytest.raises(EmbedcacheError, match="has no path column"):
        read_exclude(bad)
    with pytest.raises(EmbedcacheError, match="cannot read --exclude"):
        read_exclude(tmp_path / "missing.csv")


def test_train_head_and_evaluate_leave_the_listed_images_out(blob_cache, tmp_path):
    drop = tmp_path / "drop.csv"
    drop.write_text("path\ntrain/0.png\ntrain/5.png\nval/1.png\n")
    r = train_head(
        blob_cache, out=tmp_path / "h.pt", exclude=drop, device="cpu", epochs=3, progress=False
    )
    assert (r.metrics["train_images"], r.metrics["val_images"]) == (118, 44)
    m = evaluate(tmp_path / "h.pt", blob_cache, split="val", exclude=drop, progress=False)
    assert m["images"] == 44


def test_a_file_that_matches_no_image_is_an_error(blob_cache, tmp_path):
    drop = tmp_path / "drop.csv"
    drop.write_text("path\n/elsewhere/train/0.png\n")
    with pytest.raises(EmbedcacheError, match="none of the 1 paths in --exclude"):
        train_head(blob_cache, out=tmp_path / "h.pt", exclude=drop, device="cpu", progress=False)


def test_finetune_and_compare_drop_the_samples_of_an_image_set(tree, tmp_path):
    drop = tmp_path / "drop.csv"
    drop.write_text("path\ntrain/cat/cat_000.png\nval/dog/dog_001.png\n")
    images, note = excluded(scan(tree), drop, str(tree))
    paths = {s.path for v in images.splits.values() for s in v}
    assert note.endswith("drop.csv: left out 2 images (train, val)")
    assert len(paths) == 22 and "train/cat/cat_000.png" not in paths
    assert "val/dog/dog_001.png" not in paths


@pytest.mark.parametrize("verb", ["finetune", "compare"])
def test_finetune_and_compare_read_the_exclusion_file(verb, tree, tmp_path):
    import embedcache

    drop = tmp_path / "drop.csv"
    drop.write_text("path\nsomewhere/else.png\n")
    kw = {"backbone": "resnet18", "weights": "none", "device": "cpu", "progress": False}
    where = {"finetune": {"out": tmp_path / "m.pt"}, "compare": {"workdir": tmp_path / "w"}}[verb]
    with pytest.raises(EmbedcacheError, match="none of the 1 paths in --exclude"):
        getattr(embedcache, verb)(tree, exclude=drop, **kw, **where)


# ---------------------------------------------------------------------------
# Issue 32: paths written otherwise, what was left out, files that cannot be used


def _cli(*args):
    from click.testing import CliRunner

    from embedcache.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, pattern: str) -> str:
    """The CLI's error: one line, no traceback, matching ``pattern``."""
    import re

    text = result.output
    assert result.exit_code == 1 and "Traceback" not in text, text
    assert len(text.strip().splitlines()) == 1 and re.search(pattern, text), text
    return text


def test_paths_written_with_dot_slash_double_slash_or_backslash_match(blob_cache, tmp_path):
    """D9: ./train/0.png, train//5.png and val\\1.png matched nothing: the images stayed in."""
    drop = tmp_path / "drop.csv"
    drop.write_text("path\n./train/0.png\ntrain//5.png\nval\\1.png\nnope.png\n")
    r = train_head(
        blob_cache, out=tmp_path / "h.pt", exclude=drop, device="cpu", epochs=2, progress=False
    )
    assert (r.metrics["train_images"], r.metrics["val_images"]) == (118, 44)
    assert {k: r.metrics["exclude"][k] for k in ("file", "left_out", "unmatched")} == {
        "file": str(drop),
        "left_out": 3,
        "unmatched": 1,
    }
    assert r.metrics["exclude"]["note"] == (
        f"--exclude {drop}: left out 3 images (train, val); "
        "1 of its 4 paths matched no image (e.g. 'nope.png')"
    )
    m = evaluate(tmp_path / "h.pt", blob_cache, split="val", exclude=drop, progress=False)
    assert m["images"] == 44 and m["exclude"]["left_out"] == 1


def test_train_head_and_evaluate_print_what_was_left_out(blob_cache, tmp_path):
    """D9: the line is shown by train-head and evaluate, and kept in the head's metrics."""
    import json

    drop = tmp_path / "drop.csv"
    drop.write_text("path\n./train/0.png\nval/1.png\nelsewhere/2.png\n")
    head = tmp_path / "h.pt"
    fast = ("-q", "--head", "linear", "--epochs", "2", "--device", "cpu")
    r = _cli("train-head", blob_cache, "--out", head, *fast, "--exclude", drop)
    note = f"--exclude {drop}: left out 2 images (train, val); 1 of its 3 paths matched no image"
    assert r.exit_code == 0 and note in r.output, r.output
    metrics = json.loads((tmp_path / "h.metrics.json").read_text())
    assert metrics["exclude"]["left_out"] == 2 and metrics["exclude"]["unmatched"] == 1
    r = _cli("evaluate", head, blob_cache, "--split", "val", "--exclude", drop)
    assert r.exit_code == 0, r.output
    assert f"--exclude {drop}: left out 1 image (val); 1 of its 3 paths matched" in r.output


def test_paths_of_another_split_are_not_refused_by_evaluate(blob_cache, tmp_path):
    """The file train-head was given (it lists train images) is refused by evaluate --split val:
    every path is in the data, just not in the split scored."""
    drop = tmp_path / "drop.csv"
    drop.write_text("path\ntrain/0.png\n")
    m = evaluate(
        train_head(blob_cache, out=tmp_path / "h.pt", device="cpu", epochs=1, progress=False).path,
        blob_cache,
        split="val",
        exclude=drop,
        progress=False,
    )
    assert m["images"] == 45 and m["exclude"]["left_out"] == 0 and m["exclude"]["unmatched"] == 0


def test_finetune_and_compare_say_what_was_left_out(tree, tmp_path, monkeypatch):
    """D9: finetune and compare show the line through their log."""
    import embedcache
    import embedcache.comparison as comparison

    drop = tmp_path / "drop.csv"
    drop.write_text("path\n./train/cat/cat_000.png\nval/dog/none.png\n")
    note = f"--exclude {drop}: left out 1 image (train, val); 1 of its 2 paths matched no image"
    lines: list[str] = []
    kw = {"backbone": "resnet18", "weights": "none", "device": "cpu", "progress": False}
    embedcache.finetune(
        tree,
        out=tmp_path / "m.pt",
        exclude=drop,
        image_size=32,
        epochs=1,
        unfreeze=0,
        log=lines.append,
        **kw,
    )
    assert any(line.startswith(note) for line in lines), lines

    class Stop(Exception):
        pass

    monkeypatch.setattr(comparison, "_workdir", lambda cfg: (_ for _ in ()).throw(Stop()))
    lines.clear()
    with pytest.raises(Stop):
        embedcache.compare(tree, exclude=drop, workdir=tmp_path / "w", log=lines.append, **kw)
    assert any(line.startswith(note) for line in lines), lines


def _listing(paths) -> str:
    return "path\n" + "".join(f"{p}\n" for p in paths)


EVERY_ROW = _listing(f"{s}/{i}.png" for s, n in (("train", 120), ("val", 45)) for i in range(n))


@pytest.mark.parametrize(
    "write, message",
    [
        (
            lambda f: f.write_bytes("path\ntrain/0.png\ncaf\xe9.png\n".encode("latin-1")),
            r"--exclude \S+bad\.csv is not UTF-8 \(byte 0xe9 on line 3\); save it as UTF-8",
        ),
        (
            lambda f: f.write_text("path\ntrain/0.png\n" + "x" * 200_000 + "\n"),
            r"--exclude \S+bad\.csv line 3 cannot be read as CSV \(field larger than field limit",
        ),
        (
            lambda f: f.write_text(EVERY_ROW),
            r"--exclude \S+bad\.csv leaves no images in train \(all 120 listed\); leave at least "
            r"one of them out of bad\.csv",
        ),
        (
            lambda f: f.write_text(_listing(f"val/{i}.png" for i in range(45))),
            r"--exclude \S+bad\.csv leaves no images in val \(all 45 listed\)",
        ),
        (
            lambda f: f.write_text(_listing(f"train/{i}.png" for i in range(80))),
            r"--exclude \S+bad\.csv leaves a single class in train \(c\); a classifier needs at "
            r"least two",
        ),
        (lambda f: f.mkdir(), r"--exclude \S+bad\.csv is a folder; pass a CSV file"),
        (
            lambda f: os.mkfifo(f),
            r"--exclude \S+bad\.csv is not a regular file \(a pipe or a device\)",
        ),
    ],
    ids=["latin-1", "field-over-128kB", "every-row", "every-val-row", "one-class", "dir", "fifo"],
)
def test_an_exclusion_file_that_cannot_be_used_is_one_line(blob_cache, tmp_path, write, message):
    """D10: each was a traceback (UnicodeDecodeError, _csv.Error, TypeError, ZeroDivisionError)
    or, for a FIFO, a hang."""
    bad = tmp_path / "bad.csv"
    write(bad)
    args = ("--exclude", bad, "--device", "cpu", "--epochs", "1", "-q")
    _one_line_error(_cli("train-head", blob_cache, "--out", tmp_path / "h.pt", *args), message)


@pytest.mark.parametrize("on", ["cache", "folder"])
def test_evaluate_refuses_an_exclusion_that_leaves_no_image_in_the_split(on, tree, tmp_path):
    """D10: evaluate said 'no readable images' of a split that --exclude had emptied."""
    from embedcache import extract

    kw = {"backbone": "resnet18", "weights": "none", "image_size": 32, "device": "cpu"}
    cache = extract(tree, out=tmp_path / "c.h5", num_workers=0, progress=False, **kw).path
    head = train_head(cache, out=tmp_path / "h.pt", device="cpu", epochs=1, progress=False).path
    drop = tmp_path / "drop.csv"
    drop.write_text(_listing(s.path for s in scan(tree).splits["val"]))
    with pytest.raises(
        EmbedcacheError, match=r"drop\.csv leaves no images in val \(all 12 listed\)"
    ):
        evaluate(head, cache if on == "cache" else tree, split="val", exclude=drop, progress=False)


def test_an_empty_exclusion_file_leaves_everything_in_and_says_so(blob_cache, tmp_path):
    (tmp_path / "none.csv").write_bytes(b"")
    kw = {"device": "cpu", "epochs": 1, "progress": False}
    r = train_head(blob_cache, out=tmp_path / "h.pt", exclude=tmp_path / "none.csv", **kw)
    assert r.metrics["train_images"] == 120 and r.metrics["exclude"]["left_out"] == 0


@pytest.mark.parametrize("verb", ["finetune", "compare"])
def test_finetune_and_compare_refuse_an_exclusion_that_empties_val_or_a_class(verb, tree, tmp_path):
    """Probed: finetune trained a one-class model without a word, and an empty val split
    failed further on."""
    import embedcache

    kw = {"backbone": "resnet18", "weights": "none", "device": "cpu", "progress": False}
    where = {"finetune": {"out": tmp_path / "m.pt"}, "compare": {"workdir": tmp_path / "w"}}[verb]
    images = scan(tree)
    cats = tmp_path / "cats.csv"
    cats.write_text(_listing(s.path for s in images.splits["train"] if s.label == 0))
    with pytest.raises(EmbedcacheError, match=r"cats\.csv leaves a single class in train \(dog\)"):
        getattr(embedcache, verb)(tree, exclude=cats, **kw, **where)
    val = tmp_path / "val.csv"
    val.write_text(_listing(s.path for s in images.splits["val"]))
    with pytest.raises(EmbedcacheError, match=r"val\.csv leaves no images in val \(all 12 listed"):
        getattr(embedcache, verb)(tree, exclude=val, **kw, **where)


def test_the_holdout_note_counts_the_images_exclude_left(make_cache, tmp_path):
    """Issue 33: 'held out 4 of 20 train images' counted the images --exclude had taken out."""
    from conftest import blobs

    cache = make_cache(train=blobs(20, seed=0))  # 60 train images, no val split
    drop = tmp_path / "drop.csv"
    drop.write_text("path\n" + "".join(f"train/{i}.png\n" for i in range(10)))
    r = train_head(cache, out=tmp_path / "h.pt", head="linear", epochs=1, exclude=drop)
    source = r.metrics["val_source"]
    assert re.match(r"no val split: held out \d+ of 50 train images", source), source
    assert source.endswith("; --exclude left 50 of the 60 train images"), source
