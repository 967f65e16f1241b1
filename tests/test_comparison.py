from __future__ import annotations

import json

import pytest
import torch
from conftest import SIZE, make_tree

from embedcache import compare
from embedcache.backbones import build_backbone
from embedcache.comparison import EarlyStopper, tutorial_recipe
from embedcache.data import scan

# A tiny random-init backbone: what is tested is the bookkeeping, not the backbone.
TINY = "timm:test_efficientnet"


def test_compare_writes_one_row_per_approach_as_markdown_json_and_png(tmp_path):
    data = make_tree(tmp_path / "d", per_class=6)
    r = compare(
        data,
        backbone=TINY,
        weights="none",
        image_size=32,
        unfreeze=(1, 2),
        workdir=tmp_path / "w",
        tutorial_epochs=3,
        finetune_epochs=2,
        augment="none",
        device="cpu",
        progress=False,
        views=2,
    )
    names = [row.name for row in r.rows]
    assert names == [
        "tutorial recipe (backbone every epoch)",
        "extract + train-head (default head)",
        "extract + train-head linear 4x4 sweep",
        "extract --views 2 + train-head linear",
        "extract --views 2 + train-head linear + TTA",
        "finetune --unfreeze 1 from the cached head",
        "finetune --unfreeze 1 from the fresh head",
        "finetune --unfreeze 2 from the cached head",
        "finetune --unfreeze 2 from the fresh head",
    ]
    table = r.files["markdown"].read_text()
    assert (
        table.count("\n| ") == len(names) + 2
        and "| tutorial recipe (backbone every epoch) | 0.0 |" in table
    )
    rows = json.loads(r.files["json"].read_text())["rows"]
    assert [row["name"] for row in rows] == names
    for row in rows:
        assert (
            0 <= row["best_val_acc"] <= 1
            and row["total_s"] > 0
            and row["epochs"] >= 1
            and row["curve"]
        )
        assert row["total_s"] == pytest.approx(row["extract_s"] + row["train_s"])
    assert rows[1]["extract_s"] == rows[2]["extract_s"] > 0  # one cache serves both heads
    assert rows[3]["extract_s"] == rows[4]["extract_s"] > 0  # the views' own extract is charged
    assert rows[3]["train_s"] == rows[4]["train_s"]  # the same head, scored with its mirrors
    views = torch.load(tmp_path / "w" / "head_views.pt", weights_only=True)["metrics"]
    assert views["views"] == {"stored": 2, "used": 2}
    assert (
        rows[4]["best_val_acc"] == views["val_acc_tta"]
        and rows[3]["best_val_acc"] == views["val_acc"]
    )
    assert r.files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "w" / "cache.h5").exists() and (tmp_path / "w" / "head.pt").exists()
    model = torch.load(tmp_path / "w" / "model_u2_fresh.pt", weights_only=True)
    assert model["metrics"]["config"]["augment"] == "none"  # passed through to finetune
    assert "finetune augmentation: none" in table
    alone = compare(
        data,
        backbone=TINY,
        weights="none",
        image_size=32,
        unfreeze=(),
        workdir=tmp_path / "w2",
        tutorial=False,
        views=0,
        device="cpu",
        progress=False,
    )
    assert [row.name for row in alone.rows] == names[1:3]  # no tutorial, no views rows
    assert "| n/a (no tutorial row) |" in alone.markdown


def test_tutorial_recipe_keeps_the_backbone_frozen_and_trains_the_classifier(tmp_path):
    data = make_tree(tmp_path / "d", per_class=4)
    bb = build_backbone(TINY, weights="none", image_size=SIZE)
    before = {k: v.clone() for k, v in bb.net.state_dict().items()}
    metrics, classifier = tutorial_recipe(scan(data), bb, epochs=3, device=torch.device("cpu"))
    after = bb.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), (
        "parameters or BatchNorm statistics moved"
    )
    assert metrics["epochs_run"] == 3 and len(metrics["history"]["seconds"]) == 3
    torch.manual_seed(0)
    fresh = torch.nn.Linear(bb.feature_dim, 2)
    assert not torch.equal(classifier.weight, fresh.weight)


def test_early_stopper_counts_epochs_without_a_lower_validation_loss():
    stopper = EarlyStopper(patience=2)
    assert [stopper.should_stop(v) for v in (1.0, 0.9, 0.95, 0.91, 0.8, 0.85, 0.85)] == [
        False,
        False,
        False,
        True,
        False,
        False,
        True,
    ]


def test_compare_needs_labelled_splits(tmp_path):
    from conftest import make_image

    from embedcache.errors import EmbedcacheError

    for i in range(3):
        make_image(tmp_path / "flat" / f"{i}.png", 0, i)
    with pytest.raises(EmbedcacheError, match="needs labelled train and val splits"):
        compare(
            tmp_path / "flat",
            backbone="resnet18",
            weights="none",
            workdir=tmp_path / "w",
            progress=False,
        )


def test_compare_refuses_a_bad_augmentation_before_running_anything(tmp_path):
    from embedcache.errors import EmbedcacheError

    data = make_tree(tmp_path / "d", per_class=2)
    with pytest.raises(
        EmbedcacheError, match="--augment must be one of none, light, strong, got 'heavy'"
    ):
        compare(
            data,
            backbone=TINY,
            weights="none",
            workdir=tmp_path / "w",
            augment="heavy",
            progress=False,
        )
    assert not (tmp_path / "w").exists()
