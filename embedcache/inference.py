"""Using a trained head or fine-tuned model: evaluate on a cache or a folder, predict images."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import Backbone, EvalTransform, Normalise, build_backbone
from .cache import open_cache
from .checkpoint import load_checkpoint
from .data import IMAGE_EXTENSIONS, decoded_batches, preprocess, scan
from .errors import EmbedcacheError
from .runtime import default_batch_size, default_num_workers, resolve_device
from .train import HEAD_FORMAT, build_head_module

MODEL_FORMAT = "embedcache.model"


@dataclass
class Classifier:
    """A head (on cached features) or a fine-tuned model (on images), with its identity."""

    kind: str  # "head" or "model"
    head: torch.nn.Module
    classes: list[str]
    identity: dict  # backbone, weights, weights_arg, transform, feature_dim
    path: Path
    checkpoint: dict = field(repr=False, default_factory=dict)

    def backbone(self, device: torch.device) -> Backbone:
        """The backbone these features come from: rebuilt from the recorded identity."""
        ident = self.identity
        if self.kind == "model":
            from .finetuning import model_backbone

            return model_backbone(self.checkpoint, device)
        bb = build_backbone(ident["backbone"], weights=ident["weights_arg"], device=device)
        t = EvalTransform.from_json(ident["transform"])
        if t.crop != bb.transform.crop:
            bb = build_backbone(
                ident["backbone"], weights=ident["weights_arg"], image_size=t.crop, device=device
            )
        if bb.weights != ident["weights"] or bb.transform.to_json() != ident["transform"]:
            raise EmbedcacheError(
                f"{self.path} was trained on {ident['backbone']} features with weights {ident['weights']}, "
                f"but rebuilding it gave weights {bb.weights}; pass the same weights file or re-train the head"
            )
        return bb


def load_classifier(path: str | Path) -> Classifier:
    """Load a head (train-head) or a fine-tuned model (finetune) checkpoint."""
    ckpt = load_checkpoint(path, kind=(HEAD_FORMAT, MODEL_FORMAT))
    if ckpt["format"] == HEAD_FORMAT:
        head = build_head_module(ckpt["config"], ckpt["state_dict"]).eval()
        return Classifier(
            "head", head, list(ckpt["classes"]), dict(ckpt["identity"]), Path(path), ckpt
        )
    head = build_head_module(ckpt["head_config"], ckpt["head_state_dict"]).eval()
    return Classifier(
        "model", head, list(ckpt["classes"]), dict(ckpt["identity"]), Path(path), ckpt
    )


def image_features(
    bb: Backbone,
    files: list[Path],
    *,
    device: torch.device,
    batch_size: int | None = None,
    num_workers: int | None = None,
    progress: bool = False,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Run the backbone over image files.

    Returns
    -------
    features : ndarray of shape (n_ok, D), float32
    ok : ndarray of shape (n_ok,), indices into ``files``
    failed : {index: reason} for files that could not be decoded
    """
    batch_size = batch_size or default_batch_size(device)
    workers = default_num_workers(device) if num_workers is None else num_workers
    batches = [
        list(range(i, min(len(files), i + batch_size))) for i in range(0, len(files), batch_size)
    ]
    net = bb.net.to(device).eval().to(memory_format=torch.channels_last)
    norm = Normalise(bb.transform).to(device)
    feats, ok, failed = [], [], {}
    decode = functools.partial(preprocess, t=bb.transform)
    with (
        torch.inference_mode(),
        tqdm(total=len(files), unit="img", desc=desc, disable=not progress) as bar,
    ):
        for index, images, bad in decoded_batches(
            files, batches, decode, device=device, num_workers=workers
        ):
            if images is not None:
                feats.append(net(norm(images)).float().cpu().numpy())
                ok.append(index)
            failed.update(bad)
            bar.update(len(index) + len(bad))
    dim = bb.feature_dim
    return (
        (np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)),
        (np.concatenate(ok) if ok else np.zeros(0, np.int64)),
        failed,
    )


def _map_labels(data_classes: list[str], model_classes: list[str], source: str) -> np.ndarray:
    """Index map from the data's class order to the model's."""
    unknown = [c for c in data_classes if c not in model_classes]
    if unknown:
        raise EmbedcacheError(
            f"{source} has classes the model does not know ({', '.join(unknown[:5])}); the model knows {', '.join(model_classes[:10])}"
        )
    return np.array([model_classes.index(c) for c in data_classes], dtype=np.int64)


def _is_cache(path: Path) -> bool:
    return path.suffix in (".h5", ".hdf5", ".partial") or (
        path.is_file() and path.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"
    )


def evaluate(
    model: str | Path | Classifier,
    data: str | Path,
    *,
    split: str = "test",
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    plot: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Accuracy, per-class precision/recall and the confusion matrix of ``model`` on one split.

    ``data`` is a cache (a head uses its features directly, after checking they
    come from the same backbone, weights and transform) or an image folder / CSV
    (the backbone is rebuilt from the identity recorded in the checkpoint).
    """
    from .report import classification_text, confusion, per_class, plot_confusion

    clf = model if isinstance(model, Classifier) else load_classifier(model)
    data = Path(data)
    dev = resolve_device(device)
    skipped: dict[str, str] = {}
    if _is_cache(data):
        if clf.kind == "model":
            raise EmbedcacheError(
                f"{clf.path} is a fine-tuned model, whose features differ from any cache; pass the image folder instead of {data}"
            )
        with open_cache(data) as c:
            for key, label in (
                ("backbone", "backbone"),
                ("weights", "weights"),
                ("transform", "transform"),
            ):
                if str(c.attrs.get(key)) != str(clf.identity[key]):
                    raise EmbedcacheError(
                        f"{clf.path} was trained on other features than {data} holds: {label} {clf.identity[key]} (head) vs {c.attrs.get(key)} (cache)"
                    )
            if split not in c:
                raise EmbedcacheError(
                    f"cache {data} has no {split!r} split (it has {', '.join(c.splits)}); pass --split"
                )
            sd = c.split(split)
            features, labels, classes = sd.features.astype(np.float32), sd.labels, c.classes
    else:
        images = scan(data)
        if split not in images.splits:
            raise EmbedcacheError(
                f"{data} has no {split!r} split (it has {', '.join(images.splits)}); pass --split"
            )
        samples = images.splits[split]
        bb = clf.backbone(dev)
        files = [images.root / s.path for s in samples]
        features, ok, failed = image_features(
            bb,
            files,
            device=dev,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
            desc=f"evaluate {split}",
        )
        labels = np.array([samples[i].label for i in ok], dtype=np.int64)
        classes = images.classes
        skipped = {samples[i].path: reason for i, reason in failed.items()}
    if len(labels) == 0:
        raise EmbedcacheError(f"the {split} split of {data} has no readable images")
    if np.any(labels < 0):
        raise EmbedcacheError(
            f"the {split} split of {data} is unlabelled; evaluate needs labels (use predict)"
        )
    y = _map_labels(classes, clf.classes, str(data))[labels]
    with torch.no_grad():
        logits = clf.head(torch.from_numpy(features)).numpy()
    pred = logits.argmax(1)
    matrix = confusion(y, pred, len(clf.classes))
    result = {
        "model": str(clf.path), "data": str(data), "split": split, "images": int(len(y)),
        "accuracy": float((pred == y).mean()), "classes": clf.classes,
        "per_class": per_class(y, pred, clf.classes), "confusion": matrix.tolist(),
        "report": classification_text(y, pred, clf.classes), "skipped": skipped,
    }  # fmt: skip
    if plot is not None:
        result["plot"] = str(
            plot_confusion(
                matrix,
                clf.classes,
                Path(plot),
                f"{clf.path.name} on {split}: accuracy {result['accuracy']:.3f}",
            )
        )
    return result


def predict(
    model: str | Path | Classifier,
    images: list[str | Path],
    *,
    top_k: int = 3,
    device: str = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    progress: bool = False,
) -> list[dict]:
    """Top-k classes and probabilities for each image (a folder expands to its images).

    Returns one dict per image: ``{"path", "predictions": [{"class", "probability"}, ...]}``
    or ``{"path", "error"}`` for a file that could not be decoded.
    """
    clf = model if isinstance(model, Classifier) else load_classifier(model)
    if top_k < 1:
        raise EmbedcacheError(f"--top-k must be at least 1, got {top_k}")
    files: list[Path] = []
    for item in images:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.exists():
            files.append(p)
        else:
            raise EmbedcacheError(f"image {p} does not exist")
    if not files:
        raise EmbedcacheError("no images given; pass image files or folders")
    dev = resolve_device(device)
    bb = clf.backbone(dev)
    features, ok, failed = image_features(
        bb,
        files,
        device=dev,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
        desc="predict",
    )
    with torch.no_grad():
        probs = torch.softmax(clf.head(torch.from_numpy(features)), dim=1)
    k = min(top_k, len(clf.classes))
    top = probs.topk(k, dim=1) if len(ok) else None
    out: list[dict] = [{} for _ in files]
    for row, i in enumerate(ok):
        out[i] = {
            "path": str(files[i]),
            "predictions": [
                {"class": clf.classes[int(c)], "probability": float(p)}
                for p, c in zip(top.values[row], top.indices[row], strict=True)
            ],
        }
    for i, reason in failed.items():
        out[i] = {"path": str(files[i]), "error": reason}
    return out
