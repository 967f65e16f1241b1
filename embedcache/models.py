"""What the verbs share about models: the fine-tuned model, and a head or model loaded for use.

Finetune builds a :class:`FinetunedModel`; evaluate, predict and export load one (or a head)
back through :func:`load_model`, as a :class:`Classifier` that predicts images given as paths,
folders, PIL images, arrays or tensors. Also the one check that labels can be learnt or scored.
"""

from __future__ import annotations

import copy
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import Backbone, EvalTransform, FeatureNet, Normalise, build_backbone
from .checkpoint import HeadCheckpoint, ModelCheckpoint, load_classifier_checkpoint
from .data import IMAGE_EXTENSIONS, UnreadableImage, preprocess
from .errors import EmbedcacheError
from .forward import image_features
from .heads import Head
from .outputs import misplaced, shown
from .runtime import (
    Run,
    default_batch_size,
    default_num_workers,
    resolve_device,
    serving_autocast,
    tune_allocator,
)


def labelled(labels: np.ndarray, *, empty: str, unlabelled: str) -> np.ndarray:
    """``labels`` (class indices, -1 for an unlabelled image) if there are some and none is -1;
    else an EmbedcacheError with the message ``empty`` or ``unlabelled``."""
    if len(labels) == 0:
        raise EmbedcacheError(empty)
    if np.any(labels < 0):
        raise EmbedcacheError(unlabelled)
    return labels


class FinetunedModel(nn.Module):
    """Backbone blocks, pooling and head: normalised images (N, 3, H, W) -> logits (N, C).

    ``start`` is the index of the first trainable block. ``train()`` leaves the
    frozen blocks in eval mode, so their BatchNorm statistics never move; with
    ``bn_stats=False`` (the default) the unfrozen blocks' BatchNorm layers keep
    their pretrained statistics too and only their scale and shift learn.
    """

    def __init__(
        self,
        net: FeatureNet,
        head: Head,
        start: int,
        transform: EvalTransform,
        bn_stats: bool = False,
    ):
        super().__init__()
        self.net, self.head, self.start, self.bn_stats = net, head, start, bn_stats
        self.transform = transform  # the preprocessing it expects (see Normalise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))

    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen blocks' output (what the prefix cache stores)."""
        return self.net.prefix(x, self.start)

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from prefix activations: the trainable part only."""
        return self.head(self.net(h, start=self.start))

    def train(self, mode: bool = True) -> FinetunedModel:
        super().train(mode)
        for block in self.net.blocks[: self.start]:
            block.eval()
        if self.start == len(self.net.blocks):  # --unfreeze 0: pooling layers stay frozen too
            self.net.pool.eval()
        if not self.bn_stats:
            # Small fine-tuning batches drag running statistics away from what the cached
            # head was trained on: on hymenoptera, val accuracy fell from 95.4% to 90.8%
            # after one epoch at lr 3e-5 with them updating (Keras' guide advises the same).
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def build_model(ckpt: ModelCheckpoint, device: torch.device) -> FinetunedModel:
    """A FinetunedModel (eval mode) from a fine-tuned model checkpoint."""
    bb = model_backbone(ckpt, device)
    model = FinetunedModel(bb.net, ckpt.head_module(), ckpt.start, bb.transform, ckpt.bn_stats)
    return model.to(device).eval()


def model_backbone(ckpt: ModelCheckpoint, device: torch.device) -> Backbone:
    """The fine-tuned backbone of a checkpoint: the architecture rebuilt, its weights loaded."""
    ident = ckpt.recorded.identity
    bb = build_backbone(ident.backbone, weights="none", image_size=ckpt.recorded.crop, device="cpu")
    bb.net.load_state_dict(ckpt.net_state_dict)
    bb.net.to(device).eval()
    bb.transform = EvalTransform.from_json(ident.transform)
    bb.weights = f"finetuned from {ident.weights}"
    return bb


# ---------------------------------------------------------------------------------------------
# Images given as objects: PIL images, arrays and tensors beside paths

# The modes PNG stores as they are (transparency included); TIFF stores the others (16-bit,
# 32-bit integer and float, CMYK, YCbCr, LAB).
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")
ACCEPTED = (
    "image paths or folders, PIL images, arrays of shape (H, W, 3) or (H, W), uint8, "
    "or tensors of shape (3, H, W), uint8 or float in [0, 1]"
)


class InMemoryImage:
    """An image given as an object, read as a file is: :meth:`read_bytes` gives it losslessly
    encoded (PNG, else TIFF), so that it decodes through the very path a file takes
    (:func:`embedcache.data.load_rgb`: mode to 8-bit RGB, alpha over white), as a tar or
    Parquet member does. Picklable, for the DataLoader workers that decode on a GPU run."""

    def __init__(self, image):
        self.image = image  # a PIL image, EXIF orientation applied

    def read_bytes(self) -> bytes:
        buf = io.BytesIO()
        png = self.image.mode in _PNG_MODES
        try:
            if png:  # level 0: no compression, the bytes are read back at once
                self.image.save(buf, format="PNG", compress_level=0)
            else:
                self.image.save(buf, format="TIFF")
        except (OSError, ValueError, KeyError):
            raise UnreadableImage(
                f"a PIL image of mode {self.image.mode} cannot be read; convert it to RGB"
            ) from None
        return buf.getvalue()


def _array_image(a: np.ndarray, index: int) -> np.ndarray:
    """``a`` if it is an image embedcache takes: (H, W, 3) or (H, W), uint8."""
    if a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        return np.ascontiguousarray(a)
    hint = "pass (H, W, 3) or (H, W)"
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[2] not in (1, 3):
        hint = "this one is channels first: pass a.transpose(1, 2, 0)"
    elif a.dtype != np.uint8 and a.dtype.kind == "f":
        hint = "scale floats in [0, 1] with (a * 255).round().astype(np.uint8)"
    raise EmbedcacheError(
        f"image {index} is an array of shape {a.shape} and dtype {a.dtype}; arrays must be "
        f"(H, W, 3) or (H, W), uint8: {hint}"
    )


def _tensor_image(x: torch.Tensor, index: int) -> np.ndarray:
    """A tensor (3, H, W), uint8 or float in [0, 1], as an (H, W, 3) uint8 array: floats
    scaled by 255 and rounded, so that torchvision's to_tensor(img) gives back img's bytes."""
    x = x.detach().cpu()
    what = f"image {index} is a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if x.ndim != 3 or x.shape[0] != 3:
        hint = "pass one image (3, H, W)"
        if x.ndim == 4:
            hint = "a batch: pass list(batch)"
        elif x.ndim == 3 and x.shape[2] == 3:
            hint = "this one is channels last: pass x.permute(2, 0, 1)"
        raise EmbedcacheError(f"{what}; tensors must be (3, H, W): {hint}")
    if x.dtype == torch.uint8:
        return x.permute(1, 2, 0).numpy()
    if not x.is_floating_point():
        raise EmbedcacheError(f"{what}; tensors must be uint8 or float in [0, 1]")
    x = x.double()
    if x.numel() and not (torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
        raise EmbedcacheError(
            f"{what} and values in [{x.min():.3g}, {x.max():.3g}]; float tensors must be in "
            "[0, 1], not normalised (predict and model.transform normalise them)"
        )
    return (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _pil_image(image, index: int):
    """``image`` (a PIL image, an array or a tensor) as a PIL image, EXIF orientation applied
    as for a file."""
    from PIL import Image, ImageOps

    if isinstance(image, Image.Image):
        return ImageOps.exif_transpose(image)  # a copy, decoded: the file may close now
    if isinstance(image, np.ndarray):
        return Image.fromarray(_array_image(image, index))
    if isinstance(image, torch.Tensor):
        return Image.fromarray(_tensor_image(image, index))
    raise EmbedcacheError(f"image {index} is a {type(image).__name__}; pass {ACCEPTED}")


def _files(path: Path) -> list[Path]:
    """An image file as given, a folder as its images (sorted); a cache, a checkpoint or
    another file embedcache wrote is refused, saying where it goes."""
    if path.is_dir():
        return sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
    if not path.exists():
        raise EmbedcacheError(f"image {path} does not exist")
    advice = {"cache": "pass images, or use evaluate for a cache (embedcache evaluate MODEL DATA)"}
    wrong = misplaced(path, wanted="an image", accept=("image", "plot"), hints=advice)
    if wrong:
        raise EmbedcacheError(wrong)
    return [path]


def image_inputs(images) -> tuple[list, list[dict]]:
    """What :func:`embedcache.forward.image_features` decodes for ``images`` (one input or a
    list; each a path, a folder, a PIL image, an array or a tensor), and each one's row:
    ``{"path": str}`` for a file, ``{"image": i}`` for an object, ``i`` its place in the
    list given (0 for one object given alone)."""
    from PIL import Image

    alone = isinstance(images, str | os.PathLike | np.ndarray | torch.Tensor | Image.Image)
    try:
        given = [images] if alone else list(images)
    except TypeError:  # not a list: one object of a type _pil_image refuses
        given = [images]
    items, rows = [], []
    for i, image in enumerate(given):
        if isinstance(image, str | os.PathLike):
            files = _files(Path(image))
            items += files
            rows += [{"path": str(f)} for f in files]
        else:
            items.append(InMemoryImage(_pil_image(image, i)))
            rows.append({"image": i})
    if not items:
        raise EmbedcacheError(f"no images given; pass {ACCEPTED}")
    return items, rows


class ImageTransform(EvalTransform):
    """The eval recipe of a classifier (an :class:`EvalTransform`: resize the short side,
    centre-crop, normalise), callable on one image: a PIL image, an array (H, W, 3) or (H, W)
    uint8, a tensor (3, H, W) uint8 or float in [0, 1], or a path. Returns the normalised
    float32 tensor of shape (3, crop, crop) that the backbone takes, decoded as predict
    decodes it."""

    def __call__(self, image) -> torch.Tensor:
        is_path = isinstance(image, str | os.PathLike)
        item = Path(image) if is_path else InMemoryImage(_pil_image(image, 0))
        try:
            x = torch.from_numpy(preprocess(item, self))
        except UnreadableImage as e:
            name = shown(image) if is_path else "the image"
            raise EmbedcacheError(f"{name} cannot be read ({e}); pass an image") from None
        return Normalise(self)(x[None])[0].contiguous()


# ---------------------------------------------------------------------------------------------
# A head or a fine-tuned model, loaded for use


@dataclass
class Classifier:
    """A head (on cached features) or a fine-tuned model (on images), with what it expects.

    Load one with :func:`load_model`. ``classes`` are its classes, ``kind`` "head" or
    "model"; ``transform(image)`` gives the normalised tensor its backbone takes;
    ``predict(images, top_k=3)``, or ``classifier(images, top_k=3)``, the top classes of
    images (paths, folders, PIL images, arrays, tensors); ``logits(features)`` scores cached
    features (a head), ``probabilities(logits)`` turns logits into calibrated probabilities
    (softmax of logits / ``temperature``); ``module()`` is a plain nn.Module from normalised
    images to (uncalibrated) logits.
    """

    checkpoint: HeadCheckpoint | ModelCheckpoint
    head: torch.nn.Module  # features (N, D) -> logits (N, C)
    # the backbone rebuilt for each device it ran on, so that predicting image after image
    # does not rebuild it every time
    _backbones: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def kind(self) -> str:
        return "head" if isinstance(self.checkpoint, HeadCheckpoint) else "model"

    @property
    def classes(self) -> list[str]:
        return self.checkpoint.classes

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def transform(self) -> ImageTransform:
        """The preprocessing its backbone expects, as recorded with the weights; call it on an
        image for the normalised tensor (3, crop, crop)."""
        return ImageTransform.from_json(self.checkpoint.recorded.identity.transform)

    @property
    def trained_on_views(self) -> bool:
        """A head trained on a cache's views (extract --views): test-time averaging suits it."""
        views = self.checkpoint.metrics.get("views", {}) if self.kind == "head" else {}
        return bool(views.get("used", 0))

    @property
    def temperature(self) -> float:
        """What the logits are divided by before the softmax, fitted on validation (see
        :mod:`embedcache.calibration`); 1.0 for a checkpoint saved before it was."""
        return self.checkpoint.temperature

    @property
    def multi_label(self) -> bool:
        """Whether the model gives each image several labels (a sigmoid per class)."""
        ckpt = self.checkpoint
        config = ckpt.config if self.kind == "head" else ckpt.head_config
        return bool(config.get("multi_label"))

    @property
    def thresholds(self) -> np.ndarray | None:
        """A multi-label model's per-class probability thresholds, chosen on validation (a class
        is predicted at or above its threshold); None for one label per image."""
        th = getattr(self.checkpoint, "thresholds", None)
        return None if th is None else np.asarray(th, np.float64)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities (N, C) of logits (N, C): softmax(logits / T), or for
        a multi-label model each class's sigmoid(logit / T)."""
        if self.multi_label:
            return torch.sigmoid(logits.float() / self.temperature)
        return torch.softmax(logits.float() / self.temperature, dim=1)

    def logits(self, features: np.ndarray, mirror: np.ndarray | None = None) -> torch.Tensor:
        """Logits of features (N, D); with the mirrored images' features, the mean of both.
        Uncalibrated: :meth:`probabilities` divides them by the temperature."""
        with torch.no_grad():
            z = self.head(torch.from_numpy(features))
            return z if mirror is None else (z + self.head(torch.from_numpy(mirror))) / 2

    def backbone(self, device: torch.device) -> Backbone:
        """The backbone these features come from: rebuilt from what the checkpoint recorded
        (once per device)."""
        if str(device) not in self._backbones:
            self._backbones[str(device)] = self._rebuilt(device)
        return self._backbones[str(device)]

    def _rebuilt(self, device: torch.device) -> Backbone:
        if isinstance(self.checkpoint, ModelCheckpoint):
            return model_backbone(self.checkpoint, device)
        rec = self.checkpoint.recorded
        bb = build_backbone(
            rec.identity.backbone, weights=rec.weights_arg, image_size=rec.crop, device=device
        )
        rec.identity.check(
            bb.identity(),
            subject=f"{self.path} was trained on other features than rebuilding its backbone gives",
            mine="head",
            theirs="rebuilt",
            hint="pass the same weights file or re-train the head",
        )
        return bb

    def module(self, *, device: str = "cpu") -> FinetunedModel:
        """The classifier as one plain nn.Module of its own (eval mode): normalised images
        (N, 3, crop, crop) float32 -> logits (N, C); ``module.transform`` as :attr:`transform`.
        A head comes on its backbone, every block frozen."""
        dev = resolve_device(device)
        if isinstance(self.checkpoint, ModelCheckpoint):
            model = build_model(self.checkpoint, dev)
        else:
            net = self._rebuilt(dev).net
            model = FinetunedModel(net, copy.deepcopy(self.head), len(net.blocks), self.transform)
        model.transform = self.transform
        return model.to(dev).eval()

    def predict(
        self,
        images,
        *,
        top_k: int = 3,
        device: str = "auto",
        batch_size: int | None = None,
        num_workers: int | None = None,
        progress: bool = False,
        tta: bool | None = None,
    ) -> list[dict]:
        """Top-k classes and calibrated probabilities of each image: the softmax of the logits
        divided by the checkpoint's temperature (:attr:`temperature`), which changes how sure
        the probabilities are and never which class comes first.

        Parameters
        ----------
        images : one image or a list of them, each a path, a folder (its images, sorted), a
            PIL image, an ndarray of shape (H, W, 3) (RGB) or (H, W) (grey), uint8, or a
            tensor of shape (3, H, W), uint8 or float in [0, 1] (not normalised).
        top_k : how many classes each row lists, most probable first.
        tta : average the logits of each image and its mirror (None: on for a head trained
            on a cache's views, off otherwise).
        device, batch_size, num_workers, progress : how the images run (None: as the device
            suits).

        An object decodes exactly as the same pixels in a PNG file would (EXIF orientation
        applied, alpha over white), so ``predict(Image.open(p))`` equals ``predict(p)`` for
        a PNG. A large JPEG file is decoded at 1/2, 1/4 or 1/8 scale (never below the resize
        side; see EvalTransform.jpeg_draft), an object fully: their probabilities then differ
        by resampling noise.

        Returns
        -------
        list of dict, one per image in the order given (a folder's in sorted order):
            ``{"path": str}`` for a file or ``{"image": int}`` for an object (its place in
            the list given, 0 for one object alone), with ``"predictions": [{"class": str,
            "probability": float}, ...]``, or ``"error": str`` for one that cannot be decoded.
            A multi-label model adds ``"labels"``: every class at or above its threshold (maybe
            none), most probable first, in the same form.

        Raises
        ------
        EmbedcacheError : no images, an input of another kind (a cache, a checkpoint, a
            channels-first array, a normalised tensor), or no image could be decoded.
        """
        if top_k < 1:
            raise EmbedcacheError(f"--top-k must be at least 1, got {top_k}")
        items, rows = image_inputs(images)
        run = serving_run(self, device, batch_size, num_workers, progress)
        mirror = self.tta(tta)
        bb = self.backbone(run.device)
        features, ok, failed = image_features(bb, items, run, desc="predict", mirror=mirror)
        if not len(ok):
            raise _nothing_read(rows, failed)
        probs = self.probabilities(self.logits(*split_mirrored(features, mirror)))
        top = probs.topk(min(top_k, len(self.classes)), dim=1)
        above = probs.numpy() >= self.thresholds if self.multi_label else None
        for row, i in enumerate(ok):
            pairs = zip(top.values[row], top.indices[row], strict=True)
            rows[i]["predictions"] = [
                {"class": self.classes[int(c)], "probability": float(p)} for p, c in pairs
            ]
            if above is not None:  # every label at or above its threshold, most probable first
                on = sorted(np.flatnonzero(above[row]), key=lambda c: -float(probs[row, c]))
                rows[i]["labels"] = [
                    {"class": self.classes[int(c)], "probability": float(probs[row, c])} for c in on
                ]
        for i, reason in failed.items():
            rows[i]["error"] = reason
        return rows

    __call__ = predict

    def tta(self, tta: bool | None) -> bool:
        """--tta for images: as asked, else on for a head trained on views."""
        return self.trained_on_views if tta is None else tta


def _nothing_read(rows: list[dict], failed: dict[int, str]) -> EmbedcacheError:
    """The error when no image of ``rows`` could be decoded: the first reasons."""
    named = [f"{shown(rows[i].get('path', f'image {i}'))}: {why}" for i, why in failed.items()]
    more = f"; {len(named) - 3} more" if len(named) > 3 else ""
    which = "the image could not" if len(rows) == 1 else f"none of the {len(rows)} images could"
    return EmbedcacheError(
        f"nothing was predicted: {which} be read ({'; '.join(named[:3])}{more}); "
        "pass images PIL can decode"
    )


def split_mirrored(features: np.ndarray, mirror: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(plain, mirrored or None) from image_features' output."""
    return (features[:, 0].copy(), features[:, 1].copy()) if mirror else (features, None)


def serving_run(
    clf: Classifier, device: str, batch_size: int | None, num_workers: int | None, progress: bool
) -> Run:
    """How images run through ``clf``'s backbone: the allocator tuned first (see
    tune_allocator), in the precision of the cache a head was trained on where the device has
    it in hardware (see serving_autocast), compiled as --compile auto would for extract (see
    compile_mode)."""
    tune_allocator()
    dev = resolve_device(device)
    workers = default_num_workers(dev) if num_workers is None else num_workers
    amp = serving_autocast(dev, clf.checkpoint.recorded.precision)
    return Run(dev, batch_size or default_batch_size(dev), workers, amp, progress, compile="auto")


def load_model(path: str | Path) -> Classifier:
    """A head (train-head) or a fine-tuned model (finetune) checkpoint, ready to predict.

    ``model.classes`` are its classes, ``model.transform(image)`` the normalised tensor
    (3, crop, crop) float32 its backbone takes, ``model.predict(images, top_k=3)`` (or
    ``model(images)``) the top classes of images given as paths, folders, PIL images,
    arrays or tensors (see :meth:`Classifier.predict`), and ``model.module()`` a plain
    nn.Module from normalised images to logits (what load_model returned before it loaded
    heads too).

    Raises
    ------
    EmbedcacheError : a missing, damaged or foreign file, saying what it is where its bytes
        tell (a cache: pass it as DATA).
    """
    ckpt = load_classifier_checkpoint(path)
    head = ckpt.module() if isinstance(ckpt, HeadCheckpoint) else ckpt.head_module()
    return Classifier(ckpt, head)


load_classifier = load_model  # its name before load_model loaded heads too


def as_classifier(model: str | Path | Classifier) -> Classifier:
    """``model`` as given, or loaded from a path (see :func:`load_model`)."""
    if isinstance(model, Classifier):
        return model
    if not isinstance(model, str | os.PathLike):
        raise EmbedcacheError(
            f"model must be a checkpoint path or what embedcache.load_model returns, "
            f"got a {type(model).__name__}"
        )
    return load_model(model)
