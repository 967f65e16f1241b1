"""What the verbs share about models: the fine-tuned model, and a head or model loaded for use.

Finetune builds a :class:`FinetunedModel`; evaluate, predict and export load one (or a head)
back through :func:`load_classifier`. Also the one check that labels can be learnt or scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import Backbone, EvalTransform, FeatureNet, build_backbone
from .checkpoint import HeadCheckpoint, ModelCheckpoint, load_classifier_checkpoint
from .errors import EmbedcacheError
from .heads import Head
from .runtime import resolve_device


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


def load_model(path: str | Path, device: str = "cpu") -> FinetunedModel:
    """A fine-tuned model as a plain nn.Module (eval mode): normalised images -> logits.

    ``model.transform`` is the preprocessing it expects (see embedcache.backbones.Normalise).
    """
    return build_model(ModelCheckpoint.load(path), resolve_device(device))


@dataclass
class Classifier:
    """A head (on cached features) or a fine-tuned model (on images), with what it expects."""

    checkpoint: HeadCheckpoint | ModelCheckpoint
    head: torch.nn.Module  # features (N, D) -> logits (N, C)

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
    def trained_on_views(self) -> bool:
        """A head trained on a cache's views (extract --views): test-time averaging suits it."""
        views = self.checkpoint.metrics.get("views", {}) if self.kind == "head" else {}
        return bool(views.get("used", 0))

    def logits(self, features: np.ndarray, mirror: np.ndarray | None = None) -> torch.Tensor:
        """Logits of features (N, D); with the mirrored images' features, the mean of both."""
        with torch.no_grad():
            z = self.head(torch.from_numpy(features))
            return z if mirror is None else (z + self.head(torch.from_numpy(mirror))) / 2

    def backbone(self, device: torch.device) -> Backbone:
        """The backbone these features come from: rebuilt from what the checkpoint recorded."""
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


def load_classifier(path: str | Path) -> Classifier:
    """Load a head (train-head) or a fine-tuned model (finetune) checkpoint."""
    ckpt = load_classifier_checkpoint(path)
    head = ckpt.module() if isinstance(ckpt, HeadCheckpoint) else ckpt.head_module()
    return Classifier(ckpt, head)
