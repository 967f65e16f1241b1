"""Export a head (with its backbone) or a fine-tuned model to ONNX or TorchScript.

The exported network takes what most image pipelines already make: float32 RGB
images of shape (N, 3, crop, crop) with values in [0, 1], resized so the short
side is ``resize`` and centre-cropped to ``crop`` (as ``torchvision``'s
``Resize(resize)``, ``CenterCrop(crop)``, ``ToTensor()``). The mean/std
normalisation of the backbone's weights is inside it. It returns logits
(N, classes), already divided by the checkpoint's temperature, so that their
softmax gives the calibrated probabilities predict shows; the batch size is free.
A multi-label model (several labels per image) returns ``scores`` instead: each
class's calibrated probability sigmoid(logit / temperature), a class applying where
its score reaches its threshold. A JSON file next to it says all of this, with the
class names, the temperature and any thresholds.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .backbones import EvalTransform
from .config import EXPORT_FORMATS as FORMATS
from .errors import EmbedcacheError
from .models import load_classifier
from .outputs import claim, write_file, write_text

INSTALL = "pip install 'embedcache[export]'"


class Exported(nn.Module):
    """[0, 1] RGB images (N, 3, crop, crop) -> logits divided by ``temperature``:
    normalisation, backbone, head, calibration; with ``multi_label`` their sigmoids."""

    def __init__(
        self,
        net: nn.Module,
        head: nn.Module,
        t: EvalTransform,
        temperature: float,
        multi_label: bool = False,
    ):
        super().__init__()
        self.net, self.head, self.multi_label = net, head, multi_label
        self.register_buffer("mean", torch.tensor(t.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(t.std).view(1, 3, 1, 1))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.head(self.net((images - self.mean) / self.std)) / self.temperature
        return torch.sigmoid(z) if self.multi_label else z


def export(model: str | Path, *, out: str | Path, format: str = "onnx") -> dict:
    """Write ``model`` (a train-head or finetune checkpoint) as ONNX or TorchScript to ``out``,
    and ``OUT.json`` describing its input. Returns that description (with ``path``)."""
    if format not in FORMATS:
        raise EmbedcacheError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    out = claim(
        out,
        kind="export",
        verb="export",
        inputs=[("the model", model)],
        beside=[Path(f"{out}.json")],
    )
    clf = load_classifier(model)
    bb = clf.backbone(torch.device("cpu"))
    multi = clf.multi_label
    net = Exported(bb.net.eval(), clf.head.eval(), bb.transform, clf.temperature, multi).eval()
    crop = bb.transform.crop
    example = torch.rand(2, 3, crop, crop)
    output = "scores" if multi else "logits"
    if format == "onnx":
        write_file(out, lambda tmp: _onnx(net, example, tmp, output))
    else:
        write_file(out, lambda tmp: _torchscript(net, example, tmp))
    info = _describe(bb.transform, clf.classes, clf.kind, format, output) | {
        "temperature": clf.temperature,
        "probabilities": "softmax(logits): the logits are divided by the temperature inside",
    }
    if multi:
        info |= {
            "multi_label": True,
            "probabilities": "the scores themselves: each class's sigmoid(logit / temperature)",
            "thresholds": clf.thresholds.tolist(),
            "labels": "every class whose score is at least its threshold (chosen on validation)",
        }
    write_text(f"{out}.json", json.dumps(info, indent=2) + "\n")
    return {"path": str(out), **info}


def _torchscript(net: nn.Module, example: torch.Tensor, out: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 marks TorchScript deprecated
        buffer = io.BytesIO()  # torch.jit.save to a file aborts the process when the disk fills
        torch.jit.save(torch.jit.trace(net, example), buffer)
    out.write_bytes(buffer.getvalue())


def _onnx(net: nn.Module, example: torch.Tensor, out: Path, output: str = "logits") -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs it; onnxruntime runs the result)
    except ImportError:
        raise EmbedcacheError(f"ONNX export needs the onnx package: {INSTALL}") from None
    batch = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its successor
        buffer = io.BytesIO()  # as for TorchScript: a full disk must be a Python error
        torch.onnx.export(
            net,
            (example,),
            buffer,
            input_names=["images"],
            output_names=[output],
            dynamic_axes={"images": batch, output: batch},
            opset_version=17,
            dynamo=False,
        )
    out.write_bytes(buffer.getvalue())


def _describe(t: EvalTransform, classes: list[str], kind: str, format: str, output: str) -> dict:
    return {
        "format": format,
        "exported_from": kind,
        "input": "images",
        "input_shape": ["batch", 3, t.crop, t.crop],
        "input_dtype": "float32",
        "input_range": [0.0, 1.0],
        "channels": "RGB",
        "preprocess": (
            f"resize the short side to {t.resize} ({t.interpolation}), "
            f"centre-crop {t.crop}, scale to [0, 1]"
        ),
        "normalisation": {"mean": list(t.mean), "std": list(t.std), "applied": "inside the model"},
        "output": output,
        "classes": classes,
    }
