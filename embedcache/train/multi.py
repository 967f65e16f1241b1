"""Train-head with several labels per image: what it refuses, how it validates, chooses and
thresholds sigmoid heads (see :mod:`embedcache.multilabel` for the scores)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import check_finite
from ..config import HeadConfig
from ..errors import EmbedcacheError
from ..heads import Blend
from .features import Data, val_logits


def check(cfg: HeadConfig) -> None:
    """Refuse, on a cache with several labels per image, what only one label can do."""
    if cfg.head == "knn":
        raise EmbedcacheError(
            "knn votes for one class per image; on a multi-label cache use the default head, "
            "logreg, linear or mlp"
        )
    if cfg.class_weight == "balanced" or cfg.sampler == "balanced":
        raise EmbedcacheError(
            "--class-weight balanced and --sampler balanced weigh one label per image; on a "
            "multi-label cache leave them out"
        )


def validate(module: torch.nn.Module, data: Data, metrics: dict) -> np.ndarray:
    """Validation loss (summed binary cross-entropy per image) and mAP into ``metrics``;
    returns the logits."""
    from ..multilabel import mean_average_precision

    check_finite(module.state_dict(), None, "head")
    logits = val_logits(module, data)
    y = data.val.labels
    loss = F.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(y), reduction="sum"
    ) / max(1, len(y))
    metrics.update(val_map=mean_average_precision(logits, y > 0.5), val_loss=float(loss))
    return logits


def thresholds(calibration, data: Data, cfg: HeadConfig, metrics: dict) -> np.ndarray:
    """Per-class thresholds on the calibrated validation probabilities (F1, or the
    --precision-at target); micro and macro F1 and per-class AP at them into ``metrics``."""
    from ..multilabel import choose_thresholds, scores

    logits, t = calibration
    probs = 1 / (1 + np.exp(-logits / t))
    y = data.val.labels > 0.5
    th = choose_thresholds(probs, y, precision_at=cfg.precision_at)
    m = scores(probs, y, th)
    metrics.update(val_micro_f1=m["micro_f1"], val_macro_f1=m["macro_f1"])
    metrics.update(val_per_class_ap=m["per_class_ap"], val_per_class_f1=m["per_class_f1"])
    metrics["thresholds"] = th.round(6).tolist()
    metrics["threshold_rule"] = (
        f"precision at least {cfg.precision_at:g}" if cfg.precision_at else "best F1"
    )
    return th


def auto_choice(linear, mlp, data: Data) -> dict:
    """The default head's rule with several labels per image: of the probe, the MLP and their
    blend (the mean of their sigmoids), the one with the highest mean average precision on
    validation (the first of equals, in that order)."""
    from ..multilabel import mean_average_precision

    y = data.val.labels > 0.5
    blend = Blend([linear, mlp], multi_label=True)
    maps = {
        k: mean_average_precision(val_logits(m.eval(), data), y)
        for k, m in (("linear", linear), ("mlp", mlp), ("blend", blend))
    }
    chosen = max(maps, key=lambda k: maps[k])
    return {
        "chosen": chosen,
        "rule": "highest val mAP",
        "val_map": maps,
        "linear": {"val_map": maps["linear"]},
        "mlp": {"val_map": maps["mlp"]},
    }
