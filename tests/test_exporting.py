"""exporting.py: ONNX and TorchScript exports give the logits embedcache gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tree

from embedcache import export, extract, finetune, train_head
from embedcache.data import preprocess
from embedcache.errors import EmbedcacheError
from embedcache.forward import image_features
from embedcache.models import load_classifier
from embedcache.runtime import Run

KW = {
    "backbone": "resnet18",
    "weights": "none",
    "image_size": 32,
    "num_workers": 0,
    "device": "cpu",
    "progress": False,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = make_tree(root / "d", per_class=4)
    extract(data, out=root / "c.h5", **KW)
    r = train_head(root / "c.h5", out=root / "head.pt", epochs=3, progress=False)
    assert r.metrics["auto"]["chosen"] == "blend"  # the default's two heads, exported as one
    finetune(
        data,
        out=root / "model.pt",
        head=root / "head.pt",
        unfreeze=1,
        epochs=1,
        augment="none",
        **KW,
    )
    return root, data


def _reference(model, files) -> tuple[np.ndarray, np.ndarray]:
    """(logits as embedcache computes them, the exported model's input for the same images)."""
    clf = load_classifier(model)
    bb = clf.backbone(torch.device("cpu"))
    feats, ok, _ = image_features(bb, files, Run(torch.device("cpu"), 4, 0))
    with torch.no_grad():  # divided by the temperature, as the exported network divides them
        logits = (clf.head(torch.from_numpy(feats)) / clf.temperature).numpy()
    images = np.stack([preprocess(f, bb.transform) for f in files]).transpose(0, 3, 1, 2)
    return logits, images.astype(np.float32) / 255.0


@pytest.mark.parametrize("kind", ["head", "model"])
def test_onnx_and_torchscript_give_embedcaches_logits_for_any_batch_size(trained, tmp_path, kind):
    import onnxruntime as ort

    root, data = trained
    files = sorted((data / "val").rglob("*.png"))
    logits, images = _reference(root / f"{kind}.pt", files)
    info = export(root / f"{kind}.pt", out=tmp_path / "m.onnx", format="onnx")
    assert info["exported_from"] == kind and info["input_shape"] == ["batch", 3, 32, 32]
    assert info["temperature"] == load_classifier(root / f"{kind}.pt").temperature
    assert json.loads((tmp_path / "m.onnx.json").read_text())["classes"] == ["cat", "dog"]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for n in (1, len(files)):  # the batch size is free
        got = session.run(None, {"images": images[:n]})[0]
        np.testing.assert_allclose(got, logits[:n], rtol=1e-4, atol=1e-4 * np.abs(logits).max())
    export(root / f"{kind}.pt", out=tmp_path / "m.ts", format="torchscript")
    scripted = torch.jit.load(str(tmp_path / "m.ts"))
    with torch.no_grad():
        got = scripted(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(got, logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())
    assert (got.argmax(1) == logits.argmax(1)).all()


def test_the_exported_logits_are_divided_by_the_temperature(trained, tmp_path):
    import onnxruntime as ort

    from embedcache.checkpoint import HeadCheckpoint

    root, data = trained
    ckpt = HeadCheckpoint.load(root / "head.pt")
    ckpt.temperature = 2.0
    ckpt.save(tmp_path / "hot.pt")
    files = sorted((data / "val").rglob("*.png"))
    logits, images = _reference(root / "head.pt", files)
    plain = logits * load_classifier(root / "head.pt").temperature  # undivided
    info = export(tmp_path / "hot.pt", out=tmp_path / "m.onnx", format="onnx")
    assert info["temperature"] == 2.0
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": images})[0]
    np.testing.assert_allclose(got, plain / 2.0, rtol=1e-4, atol=1e-4 * np.abs(plain).max())
    assert (got.argmax(1) == plain.argmax(1)).all()


def test_an_unknown_format_and_a_missing_onnx_are_one_line_each(trained, tmp_path, monkeypatch):
    import builtins

    root, _ = trained
    with pytest.raises(
        EmbedcacheError, match=r"^--format must be one of onnx, torchscript, got 'tflite'$"
    ):
        export(root / "head.pt", out=tmp_path / "m.x", format="tflite")
    real = builtins.__import__
    monkeypatch.setattr(
        builtins,
        "__import__",
        lambda name, *a, **k: (
            (_ for _ in ()).throw(ImportError(name)) if name == "onnx" else real(name, *a, **k)
        ),
    )
    with pytest.raises(
        EmbedcacheError,
        match=r"^ONNX export needs the onnx package: pip install 'embedcache\[export\]'$",
    ):
        export(root / "head.pt", out=tmp_path / "m.onnx", format="onnx")
