"""Calibrated probabilities: one temperature fitted on validation, the ECE, a reliability diagram.

Temperature scaling (Guo et al., 2017) divides a head's logits by one scalar T > 0 before the
softmax. T is fitted by maximum likelihood on held-out images; it changes how confident the
probabilities are and never which class is predicted (argmax is invariant under a positive
scale). The expected calibration error (ECE) is the standard top-label one: the images binned
by the confidence of their predicted class into equal-width bins, the mean gap between each
bin's accuracy and its mean confidence, weighted by the bin's share of images.

With several labels per image (labels of shape (N, C), 0 or 1) the head's probabilities are
sigmoids: T minimises their mean binary cross-entropy, and the ECE bins every (image, class)
probability against the share of those pairs that carry the label.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import EmbedcacheError

# A fitted T outside this range says more about the data than about calibration (a handful of
# validation images, a model that is always wrong); it is clipped. Guo et al. report T of 1 to
# 3 for overconfident networks; blends, strong L2 and label smoothing give T below 1.
TEMPERATURE_RANGE = (0.05, 20.0)
ECE_BINS = 15
FIT_ITERATIONS = 100  # L-BFGS steps on one scalar: it converges in about 10


def _numpy(a, dtype=None) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    return a if dtype is None else a.astype(dtype, copy=False)


def _as_arrays(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    """``logits`` (N, C) as float64, and ``labels``: (N,) class indices as int64, or (N, C)
    with several labels per image as float64 0/1; their shapes checked."""
    z, y = _numpy(logits, np.float64), _numpy(labels)
    y = y.astype(np.float64 if y.ndim == 2 else np.int64, copy=False)
    if z.ndim != 2 or y.shape not in ((len(z),), z.shape):
        raise EmbedcacheError(
            f"calibration needs logits of shape (N, C) and labels of shape (N,) or (N, C), got "
            f"{z.shape} and {y.shape}"
        )
    if y.ndim == 1 and len(y) and (y.min() < 0 or y.max() >= max(z.shape[1], 1)):
        raise EmbedcacheError(
            f"labels must be class indices in 0..{z.shape[1] - 1}, got {y.min()}..{y.max()}"
        )
    return z, y


def probabilities(logits, temperature: float = 1.0, *, multi_label: bool = False) -> np.ndarray:
    """Probabilities (N, C) float64 of ``logits`` (N, C) divided by ``temperature``: their
    softmax, or with ``multi_label`` their sigmoid."""
    z = _numpy(logits, np.float64) / temperature
    if multi_label:
        return 1 / (1 + np.exp(-z))
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Probabilities (N, C) float64 of ``logits`` (N, C) divided by ``temperature``."""
    return probabilities(logits, temperature)


def _nll(z: torch.Tensor, y: torch.Tensor, log_t: torch.Tensor) -> torch.Tensor:
    if y.ndim == 2:
        return torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), y)
    return torch.nn.functional.cross_entropy(z / log_t.exp(), y)


def _right(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which predictions are right: each image's top class, or each (image, class) decision
    at probability 0.5 with several labels per image."""
    return (z > 0) == (y > 0.5) if y.ndim == 2 else z.argmax(1) == y


def fit_temperature(logits, labels) -> float:
    """The temperature T > 0 that minimises the mean cross-entropy of ``logits / T``.

    logits : array or tensor of shape (N, C), float; labels : shape (N,), int in 0..C-1, or
    (N, C), 0 or 1, for several labels per image (then the binary cross-entropy of sigmoids).
    Fitted by L-BFGS on log T from T = 1, clipped to TEMPERATURE_RANGE. Returns 1.0 where
    nothing can be fitted: no image, fewer than two classes (or only positives or only
    negatives), a non-finite logit or logits that never differ within a row, and where the fit
    does not beat T = 1. With no prediction wrong the likelihood has no minimum (it keeps
    rising as T falls); see :func:`_no_error`.
    """
    z, y = _as_arrays(logits, labels)
    degenerate = len(y) == 0 or z.shape[1] < 2 or len(np.unique(y)) < 2
    if degenerate or not np.isfinite(z).all() or not (y.ndim == 2 or np.ptp(z, 1).any()):
        return 1.0
    if _right(z, y).all():
        return _no_error(z, y.ndim == 2)
    zt, yt = torch.from_numpy(z), torch.from_numpy(y)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=FIT_ITERATIONS, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _nll(zt, yt, log_t)
        loss.backward()
        return loss

    opt.step(closure)
    lo, hi = TEMPERATURE_RANGE
    t = float(np.clip(np.exp(log_t.item()), lo, hi)) if np.isfinite(log_t.item()) else 1.0
    with torch.no_grad():
        better = _nll(zt, yt, torch.tensor(np.log(t))) <= _nll(zt, yt, torch.tensor(0.0))
    return t if better else 1.0


def _confidence(z: np.ndarray, t: float, multi_label: bool) -> float:
    """The mean probability of what is predicted: each image's top class, or each (image,
    class) decision with several labels per image."""
    p = probabilities(z, t, multi_label=multi_label)
    return float(np.maximum(p, 1 - p).mean() if multi_label else p.max(1).mean())


def _no_error(z: np.ndarray, multi_label: bool) -> float:
    """The temperature of logits (N, C) whose every prediction is right: 1.0 where the mean
    probability of what is predicted already reaches (n + 1) / (n + 2), Laplace's estimate of
    an accuracy seen n times in n (n: images, or image-class pairs with several labels per
    image); below it, the T < 1 at which it does (found by bisection on log T: that mean falls
    as T rises).

    The likelihood alone would send T to the bottom of TEMPERATURE_RANGE and every probability
    to 100% on a handful of images, and T = 1 for all such sets kept a fine-tuned model that was
    right on its 16 validation images at a mean confidence of 50% (tests/test_finetuning.py).
    Without an error there is no evidence to soften a confident model.
    """
    n = z.size if multi_label else len(z)
    target = (n + 1) / (n + 2)
    if _confidence(z, 1.0, multi_label) >= target:
        return 1.0
    lo, hi = np.log(TEMPERATURE_RANGE[0]), 0.0
    for _ in range(50):  # the range is 3 e-folds wide: 50 halvings leave 3e-15 of it
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _confidence(z, np.exp(mid), multi_label) > target else (lo, mid)
    return float(np.exp((lo + hi) / 2))


def reliability(probs, labels, bins: int = ECE_BINS) -> dict:
    """Per equal-width confidence bin: ``count`` (bins,) int, ``confidence`` and ``accuracy``
    (bins,) float (NaN in an empty bin), and ``edges`` (bins + 1,). A confidence c falls in
    bin ceil(c * bins) - 1 (bins are (lo, hi], the first one [0, hi]). Single-label: each
    image's top-label probability, right or wrong. Several labels per image (``labels`` (N, C)):
    each (image, class) probability, and whether the image carries that label."""
    p, y = _as_arrays(probs, labels)
    if bins < 1:
        raise EmbedcacheError(f"bins must be at least 1, got {bins}")
    if y.ndim == 2:
        conf, right = p.ravel(), (y.ravel() > 0.5).astype(np.float64)
    else:
        conf, right = p.max(1), (p.argmax(1) == y).astype(np.float64)
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(which, conf, bins) / count
        accuracy = np.bincount(which, right, bins) / count
    return {
        "count": count,
        "confidence": confidence,
        "accuracy": accuracy,
        "edges": np.linspace(0, 1, bins + 1),
    }


def expected_calibration_error(probs, labels, bins: int = ECE_BINS) -> float:
    """The ECE of ``probs`` (N, C) against ``labels`` (N,) (top-label) or (N, C) (every label)
    over ``bins`` equal-width confidence bins: sum over bins of (share of the predictions in
    it) x |accuracy - mean confidence|, in [0, 1]. 0.0 for no image."""
    r = reliability(probs, labels, bins)
    n = r["count"].sum()
    if not n:
        return 0.0
    used = r["count"] > 0
    gaps = np.abs(r["accuracy"][used] - r["confidence"][used])
    return float((r["count"][used] * gaps).sum() / n)


def calibration_record(logits, labels, temperature: float, *, prefix: str = "", **more) -> dict:
    """What metrics files hold of a calibration: ``temperature``, and the ECE before (T = 1)
    and after (T) on these logits (N, C) and labels (N,) or (N, C), as ``PREFIXece_before``
    and ``PREFIXece_after`` (train-head's prefix is ``val_``). ``more`` is added as it is."""
    multi = _numpy(labels).ndim == 2
    before, after = (
        expected_calibration_error(probabilities(logits, t, multi_label=multi), labels)
        for t in (1.0, temperature)
    )
    record = {f"{prefix}ece_before": before, f"{prefix}ece_after": after}
    return {"temperature": float(temperature), **record, **more}


def calibrate(logits, labels, *, prefix: str = "", skip: str | None = None):
    """(temperature, its record for the metrics) of held-out ``logits`` (N, C) and ``labels``
    (N,) or (N, C): :func:`fit_temperature` and :func:`calibration_record`; with ``skip`` (the
    reason), T = 1 and the record says why in ``note``."""
    t = 1.0 if skip else fit_temperature(logits, labels)
    more = {"note": skip} if skip else {}
    return t, calibration_record(logits, labels, t, prefix=prefix, **more)


def reliability_diagram(
    logits, labels, *, temperature: float, path: str | Path, title: str, bins: int = ECE_BINS
) -> Path:
    """Write a reliability diagram of ``logits`` (N, C) against ``labels`` (N,) or (N, C) to
    ``path`` as PNG: accuracy against mean confidence per bin, before (T = 1) and after
    ``temperature``, the diagonal of perfect calibration, each ECE in the legend, and below it
    how many predictions each bin holds. Returns the path."""
    from .report import figure, save_figure

    multi = _numpy(labels).ndim == 2
    fig = figure(figsize=(6.4, 6.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="perfectly calibrated")
    width = 1 / bins
    for i, (t, name) in enumerate(
        ((1.0, "before"), (temperature, f"after, T = {temperature:.3g}"))
    ):
        probs = probabilities(logits, t, multi_label=multi)
        r = reliability(probs, labels, bins)
        ece = expected_calibration_error(probs, labels, bins)
        used = r["count"] > 0
        top.plot(
            r["confidence"][used],
            r["accuracy"][used],
            marker="o",
            ms=4,
            color=f"C{i}",
            label=f"{name}: ECE {100 * ece:.1f}%",
        )
        centres = r["edges"][:-1] + width * (0.25 + 0.5 * i)
        bottom.bar(centres, r["count"], width=width / 2, color=f"C{i}")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_ylabel("share carrying the label" if multi else "accuracy")
    top.legend(loc="upper left", frameon=False)
    what = f"{len(labels)} images" + (f" x {np.shape(logits)[1]} labels" if multi else "")
    top.set_title(f"{title}\n{what}, {bins} confidence bins", fontsize=10)
    x = "probability of each label" if multi else "confidence (probability of the predicted class)"
    bottom.set_xlabel(x)
    bottom.set_ylabel("image-label pairs" if multi else "images")
    return save_figure(fig, Path(path))
