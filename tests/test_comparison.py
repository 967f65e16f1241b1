from __future__ import annotations

import json
import re
from types import SimpleNamespace

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
    lines: list[str] = []
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
        log=lines.append,
    )
    assert lines[0] == (
        "plan: 9 rows in 8 steps on 12 train and 12 val images: the tutorial recipe (up to 3 "
        "epochs); extract once and two heads on the cache; extract --views 2 and a linear head on "
        "them (plain and TTA); finetune --unfreeze 1 and 2 from the cached head and from a fresh "
        "one (up to 2 epochs each)"
    )
    assert lines[1].startswith("estimate: about ") and lines[2].startswith("1/8 tutorial recipe")
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
        assert row["curve"][-1][1] == pytest.approx(row["best_val_acc"])  # what the row keeps
        if row["balanced_val_acc"] == 1:  # every class all right: so is every image
            assert row["best_val_acc"] == 1, row["name"]
    assert rows[1]["extract_s"] == rows[2]["extract_s"] > 0  # one cache serves both heads
    assert rows[3]["extract_s"] == rows[4]["extract_s"] > 0  # the views' own extract is charged
    assert rows[3]["train_s"] == rows[4]["train_s"]  # the same head, scored with its mirrors
    views = torch.load(tmp_path / "w" / "head_views.pt", weights_only=True)["metrics"]
    assert views["views"] == {"stored": 2, "used": 2}
    assert (
        rows[4]["best_val_acc"] == views["val_acc_tta"]
        and rows[3]["best_val_acc"] == views["val_acc"]
    )
    assert rows[4]["balanced_val_acc"] == views["val_balanced_acc_tta"]
    ratios = [line.split(" | ")[4] for line in table.splitlines() if line.startswith("| ")][2:]
    assert ratios[0] == "1.00x" and all(re.fullmatch(r"\d+(\.\d+)?x", x) for x in ratios), ratios
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


def test_an_interrupted_compare_leaves_the_rows_it_finished(tmp_path, monkeypatch, capsys):
    """Issue 33: compare wrote nothing in 861 s. Each row is written as it ends; one bar with an
    ETA runs over all of them."""
    import embedcache.comparison as comparison

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(comparison, "_finetune", interrupted)
    data = make_tree(tmp_path / "d", per_class=4)
    kw = {"backbone": TINY, "weights": "none", "image_size": 32, "device": "cpu", "views": 0}
    with pytest.raises(KeyboardInterrupt):
        compare(data, workdir=tmp_path / "w", tutorial_epochs=1, unfreeze=(1,), **kw)
    names = [
        "tutorial recipe (backbone every epoch)",
        "extract + train-head (default head)",
        "extract + train-head linear 4x4 sweep",
    ]
    rows = json.loads((tmp_path / "w" / "compare.json").read_text())["rows"]
    assert [row["name"] for row in rows] == names
    table = (tmp_path / "w" / "compare.md").read_text()
    assert all(f"| {name} |" in table for name in names)
    assert (tmp_path / "w" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    err = capsys.readouterr().err.replace("\r", "\n")
    shown = [line for line in err.splitlines() if line.startswith("compare ")]
    assert shown and "3/5 linear 4x4 sweep" in err and "<" in shown[-1]  # elapsed<remaining


def _row(name: str, total_s: float, **kw):
    """A row that took ``total_s`` seconds (all of it training)."""
    from embedcache.comparison import Approach

    return Approach(name, 0.0, total_s, 1.0, 1, 10, None, **kw)


def test_time_against_the_tutorial_is_one_notation():
    """Issue 33: the column read 1/4, 1/1 and 1.0x side by side."""
    from embedcache.comparison import TUTORIAL_ROW, markdown

    meta = dict.fromkeys(("backbone", "weights", "image_size", "train_images"), "x")
    meta |= {"val_images": 1, "device": "cpu", "finetune_augment": "none"}
    times = (100.0, 5.3, 50.0, 100.0, 320.0, 1240.0)
    rows = [_row(TUTORIAL_ROW, times[0])] + [_row(f"r{i}", t) for i, t in enumerate(times[1:])]
    table = markdown(rows, meta)
    ratios = [line.split(" | ")[4] for line in table.splitlines() if line.startswith("| ")][2:]
    assert ratios == ["1.00x", "0.053x", "0.50x", "1.00x", "3.20x", "12x"]


def test_the_tta_row_has_balanced_accuracy_and_top5_with_tta_too(tmp_path, monkeypatch):
    """Issue 33: a row read '97.22% | balanced 100.00%': the TTA row took its top-1 from the
    mirrored scores and its balanced accuracy and top-5 from the plain ones."""
    import embedcache.comparison as comparison

    m = {"val_acc": 1.0, "val_balanced_acc": 1.0, "val_top5": 1.0, "history": {}}
    m |= {"val_acc_tta": 35 / 36, "val_balanced_acc_tta": 0.975, "val_top5_tta": 0.99}
    curve = [(1.5, 0.9), (2.0, 35 / 36)]  # the head was chosen on the mirrored images

    def head(b, cache, name, out, **options):
        return _row(name, 2.0, curve=curve, balanced_val_acc=1.0, val_top5=1.0), m

    monkeypatch.setattr(comparison, "_extract", lambda b, views=0: (tmp_path / "v.h5", 1.0, None))
    monkeypatch.setattr(comparison, "_head", head)
    b = SimpleNamespace(cfg=SimpleNamespace(views=2), extract_s=0.0, extract_peak=None)
    plain, tta = comparison._views(b)
    assert (tta.best_val_acc, tta.balanced_val_acc, tta.val_top5) == (35 / 36, 0.975, 0.99)
    assert (plain.best_val_acc, plain.balanced_val_acc, plain.val_top5) == (1.0, 1.0, 1.0)
    assert tta.curve == curve and plain.curve == [(2.0, 1.0)]


def test_a_heads_curve_follows_the_weights_it_keeps_not_a_head_that_wandered(tmp_path, monkeypatch):
    """Issue 33: the sweep row's curve read 0.97, 0.67, 0.86: the kept configuration trained on
    past its best epoch (the other heads still improving), but what it delivers is that epoch."""
    import embedcache.comparison as comparison
    import embedcache.train

    history = {"val_acc": [0.97, 0.67, 0.86, 0.9], "val_loss": [0.1, 0.9, 0.5, 0.08]}
    m = {"history": history, "epochs_run": 4, "epoch_seconds": [1.0] * 4, "val_acc": 0.9}
    monkeypatch.setattr(embedcache.train, "train_head", lambda *a, **k: SimpleNamespace(metrics=m))
    cfg = SimpleNamespace(device="cpu", seed=0, val_fraction=0.2, exclude=None)
    b = SimpleNamespace(cfg=cfg, workdir=tmp_path, extract_s=2.0, extract_peak=None, n_train=9)
    row, _ = comparison._head(b, tmp_path / "c.h5", "sweep", "s.pt", head="linear")
    assert [acc for _, acc in row.curve] == [0.97, 0.97, 0.97, 0.9]
    assert [t for t, _ in row.curve] == [3.0, 4.0, 5.0, 6.0]


def test_a_part_moves_the_overall_bar_through_its_share_and_fills_it_when_done():
    from embedcache.runtime import Overall

    outer = Overall("compare", enabled=False)
    outer.expect(10.0)
    with outer.part(4.0, "a finetune"):
        inner = Overall.of(outer, "finetune")
        inner.expect(100.0)
        inner.advance(50.0)
        assert outer.done == pytest.approx(2.0)
        inner.advance(500.0)  # an overrun stays within the part's share
        assert outer.done == pytest.approx(4.0)
    with outer.part(3.0, "extract"):  # no bar of its own: filled when it ends
        assert outer.done == pytest.approx(4.0)
    assert outer.done == pytest.approx(7.0) and not inner.enabled


# ---------------------------------------------------------------------------
# The grid: backbones x shares of train (issue 34)


def _counting_forward(monkeypatch) -> dict[str, int]:
    """Images each backbone forwards inside extract, by backbone name."""
    import embedcache.extraction as extraction

    seen: dict[str, int] = {}
    real = extraction.build_backbone

    def build(name, **kw):
        bb = real(name, **kw)
        forward = bb.net.forward

        def counted(x, *a, **k):
            seen[name] = seen.get(name, 0) + len(x)
            return forward(x, *a, **k)

        bb.net.forward = counted
        return bb

    monkeypatch.setattr(extraction, "build_backbone", build)
    return seen


def test_a_grid_forwards_each_backbone_once_and_scores_every_cell_on_the_same_images(
    tmp_path, monkeypatch
):
    data = make_tree(tmp_path / "d", splits=("train", "val", "test"), classes=("a", "b", "c"))
    seen = _counting_forward(monkeypatch)
    lines: list[str] = []
    g = compare(
        data,
        backbones=(f"{TINY},{TINY}",),  # named twice: one backbone, one pass
        fractions=(1.0, 0.25),
        weights="none",
        image_size=32,
        unfreeze=("1",),
        finetune_epochs=1,
        augment="none",
        workdir=tmp_path / "w",
        log_dir=tmp_path / "tb",
        device="cpu",
        progress=False,
        log=lines.append,
    )
    # every image once for two shares (and the BatchNorm fold's check: 2 more)
    assert seen == {TINY: 54 + 2}
    assert lines[0].startswith("plan: 1 backbone(s) x 2 share(s) of 18 train images")
    assert [(c.backbone, c.fraction, c.approach, c.train_images) for c in g.cells][:4] == [
        (TINY, 0.25, "default head", 6),  # round(6 x 0.25) = 2 of the 6 per class
        (TINY, 0.25, "finetune --unfreeze 1", 6),
        (TINY, 1.0, "default head", 18),
        (TINY, 1.0, "finetune --unfreeze 1", 18),
    ]
    assert len(g.cells) == 4 and g.split == "test"
    assert {len(c.right) for c in g.cells} == {18}  # the same 18 test images, every cell
    for c in g.cells:
        assert c.interval[0] <= c.accuracy <= c.interval[1]
    saved = json.loads((tmp_path / "w" / "grid.json").read_text())
    assert len(saved["cells"]) == 4 and saved["verdicts"] == g.verdicts
    assert [v.split(" of train")[0] for v in g.verdicts] == ["25%", "100%"]
    for name in ("grid.md", "grid_fractions.png", "grid_time.png"):
        assert (tmp_path / "w" / name).is_file()
    cells = sorted(p.name for p in (tmp_path / "tb").iterdir())  # TensorBoard: a folder a cell
    assert len(cells) == 2, cells
    for cell in (tmp_path / "tb").iterdir():  # the default head's two candidates, the finetune
        runs = sorted(p.name for p in cell.iterdir() if any(p.glob("events.out.tfevents.*")))
        assert len(runs) == 3 and any("unfreeze1" in r for r in runs), runs


def test_the_verdict_fine_tunes_only_on_a_significant_gain_and_says_the_cost():
    from embedcache.comparison.grid import Cell, verdict

    def cell(approach, right, seconds):
        acc = sum(right) / len(right)
        return Cell("lite0", 0.1, approach, 50, 10.0, seconds, acc, acc, (0, 1), acc, right)

    head = cell("default head", [True] * 150 + [False] * 50, 2.0)
    big = cell("finetune --unfreeze 2", [True] * 180 + [False] * 20, 290.0)
    small = cell("finetune --unfreeze 2", [True] * 151 + [False] * 49, 290.0)
    worse = cell("finetune --unfreeze 2", [True] * 140 + [False] * 60, 290.0)
    said = verdict([head, big], 0.1)
    assert said.startswith("10% of train (50 images): best head lite0 75.0% [")
    assert re.search(
        r"fine-tuning \+15\.0 points \(significant, p=[\d.e-]+\) at 25\.0x the time: "
        r"fine-tune \(lite0, finetune --unfreeze 2\)$",
        said,
    ), said
    said = verdict([head, small], 0.1)
    assert said.endswith(
        "fine-tuning +0.5 points (not significant, p=0.5) at 25.0x the time: use the head"
    ), said
    assert verdict([head, worse], 0.1).endswith(
        "-5.0 points (no gain) at 25.0x the time: use the head"
    )


def test_wilson_intervals():
    from embedcache.report import wilson_interval

    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)


def test_backbones_and_fractions_make_a_grid_and_split_on_commas():
    from embedcache.config import CompareConfig

    assert not CompareConfig().grid and not CompareConfig(fractions=(1,)).grid
    cfg = CompareConfig(backbones=("a, b", "a", "c"), fractions=(0.1, 1))
    assert cfg.grid and cfg.backbones == ("a", "b", "c") and cfg.fractions == (0.1, 1.0)
    assert CompareConfig(fractions=(0.1,)).grid_config().backbones == ("efficientnet_lite0",)


def test_rank_only_ranks_the_backbones_and_writes_the_ranking(tmp_path):
    from click.testing import CliRunner

    from embedcache.cli import main

    data = make_tree(tmp_path / "d", classes=("a", "b", "c"), per_class=4)
    args = ["compare", str(data), "--rank-only", "--backbones", f"{TINY},resnet18", "-w", "none"]
    args += ["--image-size", "32", "--per-class", "3", "--workdir", str(tmp_path / "w"), "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert re.match(r"\S+ \(none\) ranks first of 2 by 5-fold kNN accuracy on 9 training", lines[0])
    assert {ln.split()[1] for ln in lines[1:3]} == {TINY, "resnet18"}
    assert lines[-1] == f"wrote {tmp_path / 'w' / 'rank.md'} and rank.json"
    ranked = json.loads((tmp_path / "w" / "rank.json").read_text())
    assert len(ranked["rows"]) == 2 and ranked["per_class"] == 3
