from __future__ import annotations

import pytest
from conftest import make_image, make_tree

from embedcache import evaluate, extract, predict, train_head
from embedcache.errors import EmbedcacheError


@pytest.fixture
def trained(tmp_path, extract_kw):
    data = make_tree(tmp_path / "d", splits=("train", "val", "test"), per_class=5)
    extract(data, out=tmp_path / "c.h5", **extract_kw)
    train_head(tmp_path / "c.h5", out=tmp_path / "h.pt", epochs=20, device="cpu", progress=False)
    return data, tmp_path / "h.pt"


def test_evaluate_on_a_folder_with_other_classes_is_refused(trained, tmp_path):
    _, head = trained
    other = make_tree(tmp_path / "o", splits=("test",), classes=("cat", "horse"), per_class=1)
    with pytest.raises(
        EmbedcacheError,
        match=r"has classes the model does not know \(horse\); the model knows cat, dog",
    ):
        evaluate(head, other, split="test", device="cpu", num_workers=0, progress=False)


def test_evaluate_on_a_subset_of_classes_maps_them_by_name(trained, tmp_path):
    _, head = trained
    only_dogs = make_tree(
        tmp_path / "o", splits=("test",), classes=("dog",), per_class=4, start_seed=500
    )
    r = evaluate(head, only_dogs, split="test", device="cpu", num_workers=0, progress=False)
    assert r["per_class"]["dog"]["support"] == 4 and r["per_class"]["cat"]["support"] == 0


def test_predict_reports_unreadable_files_and_keeps_order(trained, tmp_path):
    data, head = trained
    (tmp_path / "broken.jpg").write_bytes(b"")
    good = make_image(tmp_path / "x" / "cat.png", 0, 1000)
    rows = predict(
        head,
        [good, tmp_path / "broken.jpg", data / "test" / "dog" / "dog_000.png"],
        top_k=2,
        device="cpu",
        num_workers=0,
    )
    assert [r["path"] for r in rows] == [
        str(good),
        str(tmp_path / "broken.jpg"),
        str(data / "test" / "dog" / "dog_000.png"),
    ]
    assert rows[1] == {"path": str(tmp_path / "broken.jpg"), "error": "empty file (0 bytes)"}
    assert len(rows[0]["predictions"]) == 2
    assert sum(p["probability"] for p in rows[0]["predictions"]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(EmbedcacheError, match="image nope.png does not exist"):
        predict(head, ["nope.png"], device="cpu")
