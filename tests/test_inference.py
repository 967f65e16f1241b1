from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SIZE, make_image, make_tree
from PIL import Image

from embedcache import evaluate, extract, load_model, predict, train_head
from embedcache.cli import main
from embedcache.errors import EmbedcacheError

CPU = {"device": "cpu", "num_workers": 0}


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


def test_tta_averages_image_and_mirror_alike_from_a_cache_and_from_images(tmp_path, extract_kw):
    import numpy as np
    import torch

    from embedcache import open_cache
    from embedcache.models import load_classifier

    data = make_tree(tmp_path / "d", per_class=5)
    cache, head = tmp_path / "v.h5", tmp_path / "h.pt"
    extract(data, out=cache, views=2, dtype="float32", **extract_kw)
    train_head(cache, out=head, epochs=10, device="cpu", progress=False)
    run = {"device": "cpu", "num_workers": 0, "progress": False}
    cached = evaluate(head, cache, split="val", **run)  # the cache stores the mirrors: on
    from_images = evaluate(head, data, split="val", **run)  # a head trained on views: on
    assert (
        cached["tta"]
        and from_images["tta"]
        and not evaluate(head, cache, split="val", tta=False, **run)["tta"]
    )
    assert from_images["confusion"] == cached["confusion"]
    with open_cache(cache) as c:
        x, mirror, paths = c.features("val")[:1], c.views("val")[:1, 0], c.paths("val")[:1]
    clf = load_classifier(head)
    with torch.no_grad():
        plain, flipped = clf.head(torch.from_numpy(x)), clf.head(torch.from_numpy(mirror))
    for tta, z in ((None, (plain + flipped) / 2), (False, plain)):
        row = predict(head, [data / paths[0]], top_k=1, tta=tta, device="cpu", num_workers=0)[0]
        top = torch.softmax(z / clf.temperature, 1).max().item()  # calibrated
        assert row["predictions"][0]["probability"] == pytest.approx(top, abs=1e-4)
    assert not np.allclose(plain.numpy(), flipped.numpy())  # the two views do differ
    extract(data, out=tmp_path / "plain.h5", **extract_kw)
    with pytest.raises(
        EmbedcacheError, match="--tta needs the mirrored images, and cache .* has none"
    ):
        evaluate(head, tmp_path / "plain.h5", split="val", tta=True, **run)


@pytest.mark.parametrize("mirror", [False, True], ids=["plain", "mirrored"])
def test_images_through_a_frozen_graph_give_eagers_features(tmp_path, mirror, frozen_graphs):
    import numpy as np
    import torch

    from embedcache.backbones import build_backbone
    from embedcache.forward import image_features
    from embedcache.runtime import Run

    files = sorted(make_tree(tmp_path / "d", per_class=3).rglob("*.png"))
    assert len(files) == 12
    bb = build_backbone("resnet18", weights="none", image_size=32)
    runs = {c: Run(torch.device("cpu"), 4, 0, compile=c) for c in ("on", "off")}
    out = {c: image_features(bb, files, run, mirror=mirror) for c, run in runs.items()}
    assert (
        len(frozen_graphs) == 1 and frozen_graphs[0].graphs and frozen_graphs[0].eager_shapes == []
    )
    np.testing.assert_allclose(out["on"][0], out["off"][0], rtol=1e-4, atol=1e-5)
    assert np.array_equal(out["on"][1], out["off"][1])


def test_evaluate_refuses_images_the_head_was_trained_or_refit_on(trained, tmp_path):
    data, head = trained
    cache = tmp_path / "c.h5"
    for split in ("val", "test"):  # chosen on val, never trained on it: both may be scored
        assert evaluate(head, cache, split=split, progress=False)["images"] == 10
    with pytest.raises(EmbedcacheError, match="was trained on these images \\(the train split"):
        evaluate(head, cache, split="train", progress=False)
    with pytest.raises(EmbedcacheError, match="was trained on these images"):  # as images too
        evaluate(head, data, split="train", device="cpu", num_workers=0, progress=False)
    train_head(cache, out=tmp_path / "r.pt", refit=True, epochs=5, device="cpu", progress=False)
    with pytest.raises(EmbedcacheError, match="was refit on these images \\(the val split"):
        evaluate(tmp_path / "r.pt", cache, split="val", progress=False)
    assert evaluate(tmp_path / "r.pt", cache, split="test", progress=False)["images"] == 10


def test_evaluate_on_a_folder_of_class_folders_scores_all_of_it(trained, tmp_path):
    """``evaluate MODEL photos/test`` where test/ holds class folders: all of it, said so; a
    root with split folders still picks the split."""
    data, head = trained
    run = {"device": "cpu", "num_workers": 0, "progress": False}
    whole = evaluate(head, data / "test", split="test", **run)
    assert whole["split"] == "all" and whole["images"] == 10
    picked = evaluate(head, data, split="test", batch_size="auto", **run)
    assert picked["split"] == "test" and picked["confusion"] == whole["confusion"]
    with pytest.raises(EmbedcacheError, match=r"has no 'tset' split \(it has train, val, test\)"):
        evaluate(head, data, split="tset", **run)
    out = CliRunner().invoke(main, ["evaluate", str(head), str(data / "test"), "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert f"all of {data / 'test'} (class folders, no split folders): accuracy" in out.output


def test_images_run_in_the_precision_of_the_cache_the_head_was_trained_on(
    tmp_path, extract_kw, monkeypatch
):
    import numpy as np
    import torch

    import embedcache.runtime as runtime
    from embedcache import open_cache
    from embedcache.forward import image_features
    from embedcache.models import load_classifier
    from embedcache.models import serving_run as _run

    data = make_tree(tmp_path / "d", per_class=4)
    for precision in ("bf16", "fp32"):
        kw = {**extract_kw, "precision": precision, "dtype": "float32"}
        extract(data, out=tmp_path / f"{precision}.h5", **kw)
        train_head(
            tmp_path / f"{precision}.h5",
            out=tmp_path / f"{precision}.pt",
            epochs=2,
            device="cpu",
            progress=False,
        )
    bf16, fp32 = (load_classifier(tmp_path / f"{p}.pt") for p in ("bf16", "fp32"))
    assert bf16.checkpoint.recorded.precision == "bf16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    run = _run(bf16, "cpu", 4, 0, False)
    assert run.autocast == torch.bfloat16 and _run(fp32, "cpu", 4, 0, False).autocast is None
    with open_cache(tmp_path / "bf16.h5") as c:
        cached, paths = c.features("val")[:], c.paths("val")
    feats, ok, _ = image_features(bf16.backbone(run.device), [data / p for p in paths], run)
    assert len(ok) == len(paths) and np.array_equal(feats, cached)  # the head's own features
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)  # emulated: slower
    assert _run(bf16, "cpu", 4, 0, False).autocast is None


# ---------------------------------------------------------------------------------------------
# Images as objects (issue 33): PIL images, arrays and tensors beside paths


def _model_checkpoint(folder: Path) -> Path:
    """A fine-tuned model checkpoint of a random-init resnet18 (the last block trained)."""
    from embedcache.backbones import build_backbone
    from embedcache.checkpoint import ModelCheckpoint, Recorded
    from embedcache.heads import Head, Standardize, init_template

    bb = build_backbone("resnet18", weights="none", image_size=SIZE)
    classifier = init_template("linear", bb.feature_dim, 2, hidden=0, dropout=0.0, seed=0)
    head = Head(Standardize(torch.zeros(bb.feature_dim), torch.ones(bb.feature_dim)), classifier)
    config = {"kind": "linear", "dim": bb.feature_dim, "num_classes": 2, "hidden": 0}
    ckpt = ModelCheckpoint(
        Recorded(bb.identity(), bb.weights_arg, bb.feature_dim),
        bb.net.state_dict(),
        {**config, "dropout": 0.0},
        head.state_dict(),
        ["cat", "dog"],
        len(bb.block_names) - 1,
        {"unfreeze": "1"},
    )
    return ckpt.save(folder / "model.pt")


@pytest.fixture
def checkpoints(trained, tmp_path) -> dict[str, Path]:
    """A head trained on a cache, and a fine-tuned model checkpoint."""
    return {"head": trained[1], "model": _model_checkpoint(tmp_path)}


def _pngs(folder: Path) -> dict[str, Path]:
    """The same photo as RGB, grey and half-transparent RGBA PNGs, larger than the crop and
    not square, so that resizing and cropping both do something."""
    rgb = make_image(folder / "rgb.png", 0, 7, size=(120, 90))
    Image.open(rgb).convert("L").save(folder / "grey.png")
    rgba = Image.open(rgb).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(folder / "rgba.png")
    return {"rgb": rgb, "grey": folder / "grey.png", "rgba": folder / "rgba.png"}


def _predictions(rows: list[dict]) -> list:
    return [r["predictions"] for r in rows]


@pytest.mark.parametrize("kind", ["head", "model"])
def test_an_image_object_predicts_exactly_as_its_png_file(checkpoints, tmp_path, kind):
    model = load_model(checkpoints[kind])
    pngs = _pngs(tmp_path)
    for path in pngs.values():
        (row,) = predict(model, Image.open(path), top_k=2, **CPU)
        assert row == {
            "image": 0,
            "predictions": predict(model, path, top_k=2, **CPU)[0]["predictions"],
        }
    pixels = np.asarray(Image.open(pngs["rgb"]))
    chw = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    objects = [Image.open(pngs["rgb"]), pixels, chw, chw / 255.0]  # uint8 and float in [0, 1]
    rows = model(objects, top_k=2, **CPU)
    assert [r["image"] for r in rows] == [0, 1, 2, 3]
    assert _predictions(rows) == _predictions(predict(model, [pngs["rgb"]] * 4, top_k=2, **CPU))
    grey = np.asarray(Image.open(pngs["grey"]))  # (H, W) uint8
    assert _predictions(model([grey], **CPU)) == _predictions(model(pngs["grey"], **CPU))
    mixed = predict(model, [pngs["rgb"], pixels], **CPU)  # a path and an object: one row each
    assert [set(r) for r in mixed] == [{"path", "predictions"}, {"image", "predictions"}]
    assert mixed[1]["image"] == 1 and mixed[0]["predictions"] == mixed[1]["predictions"]


def test_load_model_gives_classes_a_callable_transform_and_the_module(checkpoints, tmp_path):
    from embedcache.backbones import Normalise
    from embedcache.data import preprocess

    image = make_image(tmp_path / "x.png", 1, 3, size=(120, 90))
    for kind, path in checkpoints.items():
        clf = load_model(path)
        assert clf.kind == kind and clf.classes == ["cat", "dog"]
        t = clf.transform
        x = t(Image.open(image))
        assert x.shape == (3, t.crop, t.crop) and x.dtype == torch.float32
        assert torch.equal(x, Normalise(t)(torch.from_numpy(preprocess(image, t))[None])[0])
        assert torch.equal(t(image), x) and torch.equal(t(np.asarray(Image.open(image))), x)
        net = clf.module()
        assert isinstance(net, torch.nn.Module) and not net.training
        with torch.no_grad():
            top = torch.softmax(net(x[None]) / clf.temperature, 1).max().item()
        row = clf.predict(image, top_k=1, **CPU)[0]
        assert row["predictions"][0]["probability"] == pytest.approx(top, abs=1e-4)


@pytest.mark.parametrize(
    "image, match",
    [
        (
            np.zeros((3, 20, 20), np.uint8),
            r"^image 0 is an array of shape \(3, 20, 20\) and dtype uint8; arrays must be "
            r"\(H, W, 3\) or \(H, W\), uint8: this one is channels first: "
            r"pass a\.transpose\(1, 2, 0\)$",
        ),
        (np.zeros((20, 20, 3)), r"dtype float64; .*\(a \* 255\)\.round\(\)\.astype\(np\.uint8\)$"),
        (torch.zeros(20, 20, 3), r"tensors must be \(3, H, W\): this one is channels last"),
        (torch.zeros(2, 3, 20, 20), r"tensors must be \(3, H, W\): a batch: pass list\(batch\)$"),
        (
            torch.full((3, 20, 20), -1.5),
            r"values in \[-1\.5, -1\.5\]; float tensors must be in \[0, 1\], not normalised",
        ),
        (torch.zeros(3, 20, 20, dtype=torch.int64), r"tensors must be uint8 or float in \[0, 1\]$"),
        ([{"pixels": 1}], r"^image 0 is a dict; pass image paths or folders, PIL images, arrays"),
        (3.5, r"^image 0 is a float; pass image paths"),
    ],
    ids=[
        "channels-first",
        "float-array",
        "hwc-tensor",
        "batch",
        "normalised",
        "int64",
        "dict",
        "number",
    ],
)
def test_an_image_object_of_another_shape_or_type_is_refused_saying_what_fits(
    tmp_path, image, match
):
    with pytest.raises(EmbedcacheError, match=match) as e:
        predict(_model_checkpoint(tmp_path), image, **CPU)
    assert "\n" not in str(e.value)


def test_predict_raises_when_no_image_could_be_read(trained, tmp_path):
    _, head = trained
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(
        EmbedcacheError,
        match=r"^nothing was predicted: the image could not be read "
        r"\(.*empty\.jpg: empty file \(0 bytes\)\); pass images PIL can decode$",
    ):
        predict(head, tmp_path / "empty.jpg", **CPU)
    with pytest.raises(
        EmbedcacheError,
        match=r"none of the 2 images could be read \(.*empty\.jpg: empty file \(0 bytes\); "
        r".*text\.png: not an image \(unrecognised format\)\)",
    ):
        predict(head, [tmp_path / "empty.jpg", tmp_path / "text.png"], **CPU)


def test_files_of_another_kind_are_named_with_the_argument_they_belong_in(trained, tmp_path):
    data, head = trained
    cache = tmp_path / "c.h5"
    cases = [
        (
            lambda: predict(head, cache, **CPU),
            r"c\.h5 is an embedcache cache, not an image: pass images, or use evaluate for a "
            r"cache \(embedcache evaluate MODEL DATA\)$",
        ),
        (
            lambda: predict(head, [data / "test", head], **CPU),
            r"h\.pt is a head checkpoint, not an image: pass it as MODEL \(embedcache evaluate",
        ),
        (
            lambda: evaluate(cache, head, progress=False),
            r"c\.h5 is an embedcache cache, not a head or model checkpoint: pass it as DATA "
            r"\(embedcache evaluate MODEL DATA\)$",
        ),
        (
            lambda: predict(cache, data / "test", **CPU),
            r"c\.h5 is an embedcache cache, not a head or model checkpoint: pass it as DATA",
        ),
        (
            lambda: evaluate(head, head, progress=False),
            r"h\.pt is a head checkpoint, not data to evaluate on \(a cache, an image folder or a "
            r"CSV manifest\): pass it as MODEL",
        ),
        (lambda: predict(torch.nn.Linear(2, 2), data), r"got a Linear$"),
    ]
    for call, match in cases:
        with pytest.raises(EmbedcacheError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
