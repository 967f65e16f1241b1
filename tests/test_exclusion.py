"""--exclude FILE.csv: read once, matched by path, applied by train-head, evaluate and finetune."""

from __future__ import annotations

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
    images = excluded(scan(tree), drop, str(tree))
    paths = {s.path for v in images.splits.values() for s in v}
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
