"""Several labels per image, end to end: a manifest of 1-2 labels of 3 per image through
extract, train-head, evaluate (cache and images), predict, export, finetune and the model's
evaluate; what audit and compare do with it; and the CLI path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_image
from PIL import Image

from embedcache import (
    audit,
    compare,
    evaluate,
    export,
    extract,
    finetune,
    open_cache,
    predict,
    train_head,
)
from embedcache.calibration import fit_temperature
from embedcache.checkpoint import HeadCheckpoint, ModelCheckpoint
from embedcache.cli import main
from embedcache.data import preprocess
from embedcache.errors import EmbedcacheError
from embedcache.forward import image_features
from embedcache.models import load_classifier
from embedcache.multilabel import choose_thresholds
from embedcache.runtime import Run

CLASSES = ["a", "b", "c"]
SETS = [(0,), (1,), (2,), (0, 1), (1, 2), (0, 2)]  # every class on half the images
SPLITS = {"train": 24, "val": 12, "test": 12}
KW = {
    "backbone": "resnet18",
    "weights": "none",
    "image_size": 32,
    "num_workers": 0,
    "device": "cpu",
    "progress": False,
}
FAST = [
    *("-b", "resnet18", "-w", "none", "--image-size", "32", "--num-workers", "0"),
    *("--device", "cpu", "-q"),
]
CPU = torch.device("cpu")


def picture(path: Path, labels: tuple[int, ...], seed: int, parts: Path) -> Path:
    """make_image's noisy colour of each label side by side: one vertical band per label."""
    width = 48 // len(labels)
    bands = [
        Image.open(make_image(parts / f"{path.stem}_{k}.png", c, seed + 997 * k, (width, 40)))
        for k, c in enumerate(labels)
    ]
    out = Image.new("RGB", (width * len(bands), 40))
    for k, band in enumerate(bands):
        out.paste(band, (k * width, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return path


def make_data(root: Path) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """root/SPLIT/i.png showing the labels of SETS in turn; returns each split's (path, labels
    listed). Every fifth image is listed with the next set's labels: no head is right on every
    image, so the temperature and the thresholds have something to fit."""
    listed, seed = {}, 0
    for split, n in SPLITS.items():
        listed[split] = []
        for i in range(n):
            shown = SETS[i % len(SETS)]
            picture(root / split / f"{i:02d}.png", shown, seed, root.parent / "parts")
            labels = SETS[(i + 1) % len(SETS)] if i % 5 == 4 else shown
            listed[split].append((f"{split}/{i:02d}.png", labels))
            seed += 1
    return listed


def write_manifest(path: Path, listed: dict, *, rows: bool = False) -> Path:
    """A ``path,labels,split`` manifest (``a|b``), or with ``rows`` one ``path,label,split``
    row per label (extract/finetune --multi-label)."""
    lines = ["path,label,split" if rows else "path,labels,split"]
    for split, items in listed.items():
        for p, labels in items:
            names = [CLASSES[c] for c in labels]
            if rows:
                lines += [f"{p},{n},{split}" for n in names]
            else:
                lines.append(f"{p},{'|'.join(names)},{split}")
    path.write_text("\n".join(lines) + "\n")
    return path


def targets(listed: dict, split: str) -> np.ndarray:
    y = np.zeros((len(listed[split]), len(CLASSES)), bool)
    for i, (_, labels) in enumerate(listed[split]):
        y[i, list(labels)] = True
    return y


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """The data, its manifest, its cache and the default head trained on it."""
    root = tmp_path_factory.mktemp("multilabel")
    listed = make_data(root / "d")
    m = write_manifest(root / "d" / "m.csv", listed)
    extract(m, out=root / "c.h5", batch_size=8, precision="fp32", **KW)
    head = train_head(root / "c.h5", out=root / "head.pt", progress=False)
    return root, m, listed, head


@pytest.fixture(scope="module")
def tuned(flow):
    """finetune --unfreeze 1 from the head, 2 epochs, the frozen prefix cached."""
    root, m, _, _ = flow
    return finetune(
        m, out=root / "model.pt", head=root / "head.pt", unfreeze=1, epochs=2, augment="none", **KW
    )


def _scores(model: Path, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(the uncalibrated logits of images as embedcache computes them, the images as an exported
    network takes them: float32 (N, 3, crop, crop) in [0, 1])."""
    clf = load_classifier(model)
    bb = clf.backbone(CPU)
    feats, ok, _ = image_features(bb, files, Run(CPU, 8, 0))
    assert len(ok) == len(files)
    logits = clf.logits(feats).numpy().astype(np.float64)
    images = np.stack([preprocess(f, bb.transform) for f in files]).transpose(0, 3, 1, 2)
    return logits, images.astype(np.float32) / 255.0


def test_extract_and_train_head_give_each_image_its_label_set_and_a_threshold_per_class(flow):
    root, _, listed, head = flow
    with open_cache(root / "c.h5") as c:
        assert c.multi_label and c.classes == CLASSES
        assert (c.label_matrix("train") == targets(listed, "train")).all()
    ckpt = HeadCheckpoint.load(root / "head.pt")
    assert ckpt.multi_label and len(ckpt.thresholds) == 3
    assert all(0 < t < 1 for t in ckpt.thresholds)
    # half the images carry each class: scores that ignore the image give an mAP near 0.5
    assert head.metrics["val_map"] > 0.9


def test_evaluate_scores_a_head_alike_on_its_cache_and_on_the_images(flow):
    root, m, _, head = flow
    on_cache = evaluate(root / "head.pt", root / "c.h5", split="test", progress=False)
    on_images = evaluate(root / "head.pt", m, split="test", progress=False, device="cpu")
    for r in (on_cache, on_images):
        assert r["multi_label"] and r["images"] == SPLITS["test"]
        assert r["map"] > 0.85 and r["micro_f1"] > 0.7
    # the cache holds float16 features, the images give float32: the same ranking
    assert on_images["map"] == pytest.approx(on_cache["map"], abs=0.01)
    assert on_images["scored"]["true"] == on_cache["scored"]["true"]


def test_predict_lists_every_class_whose_calibrated_sigmoid_reaches_its_threshold(flow):
    root, _, listed, _ = flow
    files = [root / "d" / p for p, _ in listed["test"]]
    rows = predict(root / "head.pt", files, top_k=3, device="cpu")
    ckpt = HeadCheckpoint.load(root / "head.pt")
    logits, _ = _scores(root / "head.pt", files)
    probs = sigmoid(logits / ckpt.temperature)  # not a softmax: the rows need not sum to 1
    assert not np.allclose(probs.sum(1), 1.0)
    for row, p in zip(rows, probs, strict=True):
        got = {d["class"]: d["probability"] for d in row["predictions"]}
        assert got == pytest.approx({c: p[i] for i, c in enumerate(CLASSES)}, abs=1e-4)
        want = [CLASSES[c] for c in np.argsort(-p) if p[c] >= ckpt.thresholds[c]]
        assert [d["class"] for d in row["labels"]] == want
    hits = [{d["class"] for d in r["labels"]} for r in rows]
    truth = [{CLASSES[c] for c in labels} for _, labels in listed["test"]]
    assert np.mean([h == t for h, t in zip(hits, truth, strict=True)]) >= 0.5


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["head", "model"])
def test_export_gives_the_calibrated_sigmoid_scores_and_the_thresholds(flow, tuned, tmp_path, kind):
    import onnxruntime as ort

    root, _, listed, _ = flow
    model = root / f"{kind}.pt"
    clf = load_classifier(model)
    files = [root / "d" / p for p, _ in listed["test"]]
    logits, images = _scores(model, files)
    want = sigmoid(logits / clf.temperature)
    info = export(model, out=tmp_path / "m.onnx", format="onnx")
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert info["output"] == side["output"] == "scores" and side["multi_label"] is True
    assert side["thresholds"] == pytest.approx(clf.thresholds.tolist())
    assert side["temperature"] == clf.temperature
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    assert [o.name for o in session.get_outputs()] == ["scores"]
    got = session.run(None, {"images": images})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    export(model, out=tmp_path / "m.ts", format="torchscript")
    with torch.no_grad():
        scripted = torch.jit.load(str(tmp_path / "m.ts"))(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(scripted, want, atol=1e-4)


def test_finetune_keeps_the_lowest_val_loss_and_chooses_thresholds_on_calibrated_val(flow, tuned):
    root, _, listed, _ = flow
    ckpt = ModelCheckpoint.load(root / "model.pt")
    m, h = tuned.metrics, tuned.metrics["history"]
    assert ckpt.multi_label and ckpt.head_config["multi_label"] is True
    assert h["epoch"] == [0, 1, 2] and len(h["val_map"]) == 3
    assert m["best_epoch"] == h["epoch"][int(np.argmin(h["val_loss"]))]
    # a temperature never changes a ranking: the kept epoch's mAP is the calibrated one
    assert m["val_map"] == pytest.approx(h["val_map"][h["epoch"].index(m["best_epoch"])])
    assert ckpt.thresholds == m["thresholds"] and len(ckpt.thresholds) == 3
    # refitted here on the kept model's full-precision validation logits (finetune's came
    # through a float16 prefix cache)
    files = [root / "d" / p for p, _ in listed["val"]]
    logits, _ = _scores(root / "model.pt", files)
    y = targets(listed, "val")
    assert fit_temperature(logits, y) == pytest.approx(ckpt.temperature, rel=0.02)
    chosen = choose_thresholds(sigmoid(logits / ckpt.temperature), y)
    np.testing.assert_allclose(ckpt.thresholds, chosen, atol=0.005)
    assert m["calibration"]["temperature"] == ckpt.temperature
    report = (root / "model.report.txt").read_text()
    assert "threshold" in report and "mAP" in report


@pytest.mark.parametrize(("multi_label", "kept"), [(True, 0), (False, 1)])
def test_finetune_keeps_the_epoch_of_lowest_val_loss_only_with_several_labels(multi_label, kept):
    from types import SimpleNamespace

    from embedcache.finetuning.loop import _record

    setup = SimpleNamespace(multi_label=multi_label, group=SimpleNamespace(is_main=False))
    fit = SimpleNamespace(history={"epoch": [], "val_loss": [], "val_acc": []}, best_val=None)
    fit.best = {"acc": -1.0, "loss": float("inf"), "epoch": -1}
    for epoch, loss, acc in ((0, 1.0, 0.8), (1, 1.1, 0.9)):  # one-label's rule: the accuracy
        _record(setup, fit, {"epoch": epoch, "val_loss": loss, "val_acc": acc}, (epoch,))
    assert fit.best["epoch"] == kept and fit.best_val == (kept,)


def test_finetune_without_the_prefix_cache_trains_the_same(flow, tuned, tmp_path):
    _, m, _, _ = flow
    r = finetune(
        m,
        out=tmp_path / "off.pt",
        head=flow[0] / "head.pt",
        unfreeze=1,
        epochs=2,
        augment="none",
        prefix_cache="off",
        **KW,
    )
    assert r.metrics["prefix_cache"]["where"] == "off"
    assert tuned.metrics["prefix_cache"]["where"] == "memory"
    for key in ("train_loss", "val_loss", "val_map"):
        a, b = tuned.metrics["history"][key], r.metrics["history"][key]
        assert b[1:] == pytest.approx(a[1:], rel=0.02), key


def test_the_finetuned_model_evaluates_on_images_with_its_own_thresholds(flow, tuned):
    root, m, _, _ = flow
    r = evaluate(root / "model.pt", m, split="test", progress=False, device="cpu")
    assert r["multi_label"] and r["images"] == SPLITS["test"] and r["map"] > 0.85
    thresholds = ModelCheckpoint.load(root / "model.pt").thresholds
    assert load_classifier(root / "model.pt").thresholds.tolist() == thresholds


def test_a_head_of_the_other_kind_is_refused_in_one_line(flow, tmp_path):
    root, m, listed, _ = flow
    one = HeadCheckpoint.load(root / "head.pt")  # the same head, saved as one-label softmax
    one.config = {k: v for k, v in one.config.items() if k != "multi_label"}
    one.thresholds = None
    one.save(tmp_path / "one.pt")
    kw = {"unfreeze": 1, "epochs": 1, "augment": "none", **KW}
    with pytest.raises(EmbedcacheError, match="one-label head but the data is multi-label"):
        finetune(m, out=tmp_path / "x.pt", head=tmp_path / "one.pt", **kw)
    single = tmp_path / "single.csv"  # each image's first label alone
    rows = [f"{root / 'd' / p},{CLASSES[ls[0]]},{s}" for s, v in listed.items() for p, ls in v]
    single.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    with pytest.raises(EmbedcacheError, match="multi-label head but the data has one label"):
        finetune(single, out=tmp_path / "x.pt", head=root / "head.pt", **kw)
    args = ["finetune", str(m), "--head", str(tmp_path / "one.pt"), "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(main, [*args, *FAST])
    assert result.exit_code == 1 and not (tmp_path / "x.pt").exists()
    assert result.output.count("\n") == 1 and "one-label head" in result.output


def test_audit_skips_the_label_error_check_and_runs_the_others(flow, tmp_path):
    root, *_ = flow
    r = audit(root / "c.h5", out=tmp_path / "audit", progress=False, device="cpu")
    skipped = r.summary["label_errors"]
    assert skipped["count"] is None and "needs one label per image" in skipped["skipped"]
    assert skipped["how"] == skipped["skipped"] and r.tables["label_errors"] == []
    for name in ("exact_duplicates", "near_duplicates", "leaks", "outliers"):
        assert isinstance(r.summary[name]["count"], int), name
    result = CliRunner().invoke(
        main, ["audit", str(root / "c.h5"), "--out", str(tmp_path / "a2"), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "likely label errors not checked" in result.stdout
    assert "needs one label per image" in result.stderr


@pytest.mark.parametrize("rank_only", [False, True])
def test_compare_refuses_multi_label_data_in_one_line(flow, tmp_path, rank_only):
    _, m, _, _ = flow
    with pytest.raises(EmbedcacheError, match="compares one-label classifiers for now"):
        compare(
            m,
            workdir=tmp_path / "w",
            rank_only=rank_only,
            backbone="resnet18",
            weights="none",
            device="cpu",
            progress=False,
        )
    args = ["compare", str(m), "--workdir", str(tmp_path / "w2"), "-b", "resnet18", "-q"]
    result = CliRunner().invoke(main, args + ["--rank-only"] * rank_only)
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "one-label classifiers" in result.output


def test_the_cli_reads_repeated_rows_as_one_image_with_every_label(flow, tmp_path):
    root, _, listed, _ = flow
    rows = write_manifest(root / "d" / "rows.csv", listed, rows=True)
    runner, cache, head = CliRunner(), tmp_path / "c.h5", tmp_path / "head.pt"
    result = runner.invoke(main, ["extract", str(rows), "--out", str(cache), *FAST])
    assert result.exit_code == 1 and result.output.count("\n") == 1  # a file listed twice
    result = runner.invoke(
        main, ["extract", str(rows), "--out", str(cache), "--multi-label", *FAST]
    )
    assert result.exit_code == 0, result.output
    with open_cache(cache) as c:
        assert (c.label_matrix("val") == targets(listed, "val")).all()
    result = runner.invoke(main, ["train-head", str(cache), "--out", str(head), "--head", "linear"])
    assert result.exit_code == 0, result.output
    assert "val mAP" in result.stdout.splitlines()[0]
    files = [str(root / "d" / p) for p, _ in listed["test"][:4]]
    result = runner.invoke(main, ["predict", str(head), *files, "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    api = predict(head, files, device="cpu")
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    for line, row in zip(lines, api, strict=True):
        named = [d["class"] for d in row["labels"]]
        shown = line.split(": ", 1)[1]
        assert [part.split(" ")[0] for part in shown.split(", ")] == named or (
            not named and shown == "no label above its threshold"
        )
    result = runner.invoke(main, ["export", str(head), "--out", str(tmp_path / "h.onnx")])
    assert result.exit_code == 0, result.output
    assert "output scores over 3 classes: a, b, c" in result.stdout
    assert "each class's sigmoid(logit / " in result.stdout
    model = tmp_path / "model.pt"  # a fresh head: sigmoids too
    args = ["finetune", str(rows), "--multi-label", "--out", str(model), "--augment", "none"]
    result = runner.invoke(main, [*args, "--unfreeze", "0", "--epochs", "1", *FAST])
    assert result.exit_code == 0, result.output
    assert "val mAP" in result.stdout.splitlines()[0]
    ckpt = ModelCheckpoint.load(model)
    assert ckpt.config["multi_label"] is True and ckpt.head_config["multi_label"] is True
    assert len(ckpt.thresholds) == 3 and ckpt.metrics["val_map"] > 0.5
