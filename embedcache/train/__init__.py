"""Training heads on cached features: in memory or streamed from HDF5, one head or a whole sweep."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cache import Cache, open_cache
from ..checkpoint import HeadCheckpoint, Recorded, TrainedOn, check_finite
from ..config import HeadConfig
from ..errors import EmbedcacheError
from ..feed import join_rows
from ..heads import Blend, KNNHead
from ..report import better_p_value
from ..runtime import read_ahead, resolve_device
from ..tblog import Runs
from . import multi
from .features import SKEW, Data, read_splits, skew
from .features import rows_logits as _logits
from .features import val_logits as _val_logits
from .probes import (
    AUTO_PATH,
    LOGREG_PATH,
    fit_knn,
    fit_probe,
    require_in_memory,
    sample_rows,
    warm_start,
)
from .sweep import train_last, train_sweep

FULL_BATCH_BYTES = 64 << 20  # train features up to this size (as float32) go in one batch
STREAM_BATCH = 1024  # batch size when the features are larger than that


@dataclass
class HeadResult:
    """What train_head returns: the head (standardisation included) and its metrics."""

    head: torch.nn.Module
    metrics: dict
    path: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# The default head: a linear probe, an MLP, or the blend of both


# One head replaces the blend of both where validation favours it at this one-sided p-value (4:1
# odds). A judgement, disclosed with its evidence: at 0.05 the 64 px digits (MLP 91.29% vs probe
# 89.90% of 288 held-out images, p = 0.17) kept the probe and lost 2.2 points on test (93.04% vs
# 95.26%).
MLP_P_VALUE = 0.2
# The MLP candidate's patience. It matters only on large splits, trained in mini-batches: there
# the best epoch comes early (100,000 rows: epoch 3) and patience 10 doubled the MLP's cost for
# nothing; full-batch splits (under 64 MB) peak late (digits: epoch 82), where half the best
# epoch, not the patience, decides when to stop.
AUTO_MLP_PATIENCE = 4
# ...and, trained in mini-batches, its budget of rows seen: at most max(1, MLP_ROWS // train
# rows) epochs. On 100,000 rows (2 cores) an epoch took 4.6 s and the best came at epoch 3 of 7
# (logreg_grid_cpu.md). Full-batch splits (head_protocol's, every split under 13,000 rows of
# 1280) take one step an epoch and train as before.
MLP_ROWS = 200_000


def auto_choice(linear_right: np.ndarray, mlp_right: np.ndarray) -> tuple[str, float, float]:
    """The default head's rule, on which validation images each candidate got right: the MLP
    where it beats the probe at ``MLP_P_VALUE``, the probe where it beats the MLP so, and
    otherwise their blend (the mean of their probabilities). Returns (choice, p of the MLP
    beating the probe, p of the probe beating the MLP).

    Measured (benchmarks/results/head_protocol_*.md): where neither won on validation, the blend
    scored on test at or above the better of the two on grocery81, flowers12 and hymenoptera,
    even where the MLP alone was 3.7 points below the probe (grocery81).
    """
    p_mlp, p_linear = (
        better_p_value(mlp_right, linear_right),
        better_p_value(linear_right, mlp_right),
    )
    choice = "mlp" if p_mlp < MLP_P_VALUE else "linear" if p_linear < MLP_P_VALUE else "blend"
    return choice, p_mlp, p_linear


def describe_choice(auto: dict) -> str:
    """The default head's choice with the evidence behind it, from its metrics' ``auto``:
    e.g. ``blend (neither better on val: MLP p=0.377, probe p=0.812)``."""
    if "val_map" in auto:  # several labels per image: the highest val mAP
        maps = ", ".join(f"{k} {v:.3f}" for k, v in auto["val_map"].items())
        return f"{auto['chosen']} (highest val mAP: {maps})"
    p = f"MLP p={auto['mlp_p_value']:.3f}, probe p={auto['linear_p_value']:.3f}"
    why = {"mlp": "MLP better on val", "linear": "probe better on val"}
    return f"{auto['chosen']} ({why.get(auto['chosen'], 'neither better on val')}: {p})"


def _auto(
    data: Data, classes, arch: dict, cfg: HeadConfig, batch_size: int, progress: bool, runs: Runs
):
    """The default head (``--head auto``): a linear probe (L-BFGS along AUTO_PATH, the strength
    chosen on validation loss) and an MLP (early stopping on validation loss), then one of them
    or their blend by :func:`auto_choice`.

    Measured (benchmarks/results/head_protocol_*.md): the probe beat the AdamW linear head by
    4.7 points on grocery81 and 0.8 on flowers12; the MLP beat the probe by 1.7 on the 64 px
    digits, whose features are far from linearly separable. With --log-dir the candidates are
    the runs PREFIX-auto-probe and PREFIX-auto-mlp. Returns (module, metrics, None).
    """
    dev = resolve_device(cfg.device)
    linear, lm, weighting = _weighted_probe(data, classes, cfg, dev)
    _log_path(runs.sub("auto"), "probe", lm["sweep"])
    mlp_data = data
    if not data.train.in_memory:  # streamed: the MLP on a seeded sample of its budget of rows
        mlp_data = dataclasses.replace(data, train=sample_rows(data.train, MLP_ROWS))
    n = mlp_data.train.n
    budget = cfg.epochs if batch_size >= n else min(cfg.epochs, max(1, MLP_ROWS // n))
    mcfg = cfg.replace(head="mlp", patience=min(cfg.patience, AUTO_MLP_PATIENCE), epochs=budget)
    mcfg = mcfg.replace(class_weight=weighting["used"])
    data.train.read_ahead = data.val.read_ahead = read_ahead(dev)
    mlp, mm, _ = train_sweep(
        mlp_data,
        classes,
        mcfg,
        batch_size=batch_size,
        device=dev,
        progress=progress,
        runs=runs.sub("auto"),
    )
    y = data.val.labels
    if data.multi_label:
        summary = multi.auto_choice(linear, mlp, data)
        summary["linear"].update(lm["best"])
        summary["mlp"].update(best_epoch=mm["best_epoch"], **mm["best"])
        chosen = summary["chosen"]
    else:
        right = {
            k: _val_logits(m.eval(), data).argmax(1) == y for k, m in (("l", linear), ("m", mlp))
        }
        chosen, p_mlp, p_linear = auto_choice(right["l"], right["m"])
        summary = {
            "chosen": chosen,
            "mlp_p_value": round(p_mlp, 6),
            "linear_p_value": round(p_linear, 6),
            "linear": {"val_acc": float(right["l"].mean()), **lm["best"]},
            "mlp": {
                "val_acc": float(right["m"].mean()),
                "best_epoch": mm["best_epoch"],
                **mm["best"],
            },
        }
    # both candidates' records, whichever is kept: the curves plot shows them side by side
    summary["linear"]["path"], summary["mlp"]["history"] = lm["sweep"], mm["history"]
    arch["kind"] = chosen
    metrics = {**(mm if chosen == "mlp" else lm), "auto": summary, "class_weight": weighting}
    if chosen == "blend":
        return Blend([linear, mlp], multi_label=data.multi_label), metrics, None
    return {"linear": linear, "mlp": mlp}[chosen], metrics, None


def _weighted_probe(data: Data, classes, cfg: HeadConfig, dev):
    """The default head's probe with the class weights --class-weight asks for; on ``auto``
    with skewed classes (largest over SKEW x the smallest) fitted both ways, keeping balanced
    weights where they raise the recall of significantly more validation classes than they
    lower (:func:`weights_help`). Returns (head, metrics, what was weighed and why: ``used``,
    ``skew``, each try's ``val_balanced_acc`` and the ``p_value``)."""
    from ..report import scores

    ratio = 1.0 if data.multi_label else skew(data.train.labels, len(classes))
    record: dict = {"skew": round(ratio, 2)}
    if cfg.class_weight != "auto" or ratio <= SKEW:
        used = "balanced" if cfg.class_weight == "balanced" else "none"
        linear, lm = fit_probe(
            data.train, data.val, classes, dev, path=AUTO_PATH, balanced=used == "balanced"
        )
        return linear, lm, record | {"used": used}
    tried = {}
    for used in ("none", "balanced"):
        linear, lm = fit_probe(
            data.train, data.val, classes, dev, path=AUTO_PATH, balanced=used == "balanced"
        )
        pred = _val_logits(linear.eval(), data).argmax(1)
        tried[used] = (pred, linear, lm)
    y = data.val.labels
    p = weights_help(tried["balanced"][0], tried["none"][0], y)
    used = "balanced" if p < MLP_P_VALUE else "none"
    bal = {
        k: round(scores(np.eye(len(classes))[v[0]], y)["balanced_accuracy"], 6)
        for k, v in tried.items()
    }
    record |= {"used": used, "val_balanced_acc": bal, "p_value": round(p, 6)}
    return tried[used][1], tried[used][2], record


def weights_help(weighted: np.ndarray, plain: np.ndarray, labels: np.ndarray) -> float:
    """One-sided paired sign-flip test of balanced accuracy on the same validation images: the
    chance that predictions ``weighted`` beat ``plain`` by this much or more if neither were
    better. Each image where exactly one is right counts 1 / its class's count (its share of
    balanced accuracy), so a few rare-class images can outweigh many common ones, as balanced
    accuracy itself does; under the null each such image's sign is a coin flip (exact up to
    FLIP_EXACT images, else FLIP_DRAWS seeded draws).

    Measured (benchmarks/results/long_tail.md): choosing the weights on a higher validation
    balanced accuracy alone, on flowers12 cut to 50:1 (its validation held out of the cut
    train: a few dozen images) took them on 2 of 3 seeds, and they lowered test balanced
    accuracy there; on grocery81 cut so they raised it on every seed.
    """
    counts = np.bincount(labels)
    d = ((weighted == labels).astype(float) - (plain == labels)) / counts[labels]
    d = d[d != 0]
    observed = d.sum()
    if len(d) == 0 or observed <= 0:
        return 1.0
    if len(d) <= FLIP_EXACT:
        signs = ((np.arange(2 ** len(d))[:, None] >> np.arange(len(d))) & 1) * 2 - 1
    else:
        signs = np.random.default_rng(0).choice([-1, 1], size=(FLIP_DRAWS, len(d)))
    return float(np.mean(signs @ np.abs(d) >= observed - 1e-12))


FLIP_EXACT, FLIP_DRAWS = 16, 20_000


def _refit(
    data: Data, classes, cfg: HeadConfig, kind: str, metrics: dict, progress: bool, chosen=None
):
    """The chosen configuration of a head of ``kind`` trained again on train + val, as
    Kornblith et al. (2019) do: a probe at its chosen strength, knn at its k with val in its
    bank, a torch head for its chosen number of epochs (no selection: the last epoch is kept),
    a blend both of its heads so. A probe starts from the ``chosen`` head's weights
    (:func:`.probes.warm_start`): on 100,000 rows a cold fit took about 100 L-BFGS steps.
    Returns (head, what was done).
    """
    both, best = join_rows(data.train, data.val), metrics["best"]
    dev = resolve_device(cfg.device)
    weighting = metrics.get("class_weight") or {"used": "none"}
    cfg = cfg.replace(class_weight=weighting["used"])
    if kind == "blend":
        mlp = metrics["auto"]["mlp"]
        of_mlp = {"best": {k: mlp[k] for k in ("lr", "weight_decay")}}
        linear, done = _refit(data, classes, cfg, "linear", {"best": best}, progress, chosen)
        head, more = _refit(data, classes, cfg, "mlp", {**of_mlp, **mlp}, progress)
        return Blend([linear, head]), {**done, "mlp": more}
    if "lam" in best:
        balanced = cfg.class_weight == "balanced"
        start = None if chosen is None else warm_start(chosen)
        module, m = fit_probe(
            both, None, classes, dev, path={}, lam=best["lam"], balanced=balanced, start=start
        )
        return module, {"images": both.n, "config": best, "iterations": m["iterations"]}
    if "k" in best:
        return fit_knn(both, None, classes, k=best["k"])[0], {"images": both.n, "config": best}
    epochs = int(metrics["best_epoch"])
    one = cfg.replace(
        head=kind, lr=(best["lr"],), weight_decay=(best["weight_decay"],), epochs=epochs
    )
    batch_size = _batch_size(cfg, both.n, both.dim)
    head = train_last(both, len(classes), one, dev, batch_size=batch_size, progress=progress)
    return head, {"images": both.n, "epochs": epochs, "config": best, "batch_size": batch_size}


def _batch_size(cfg: HeadConfig, n: int, dim: int) -> int:
    """--batch-size, or the whole set when it is under FULL_BATCH_BYTES as float32."""
    return cfg.batch_size or (n if n * dim * 4 <= FULL_BATCH_BYTES else STREAM_BATCH)


# ---------------------------------------------------------------------------
# Public API


def train_head(
    cache: str | Path,
    *,
    out: str | Path | None = None,
    config: HeadConfig | None = None,
    progress: bool = True,
    **options,
) -> HeadResult:
    """Train a head on a cache's ``train`` split, selected on ``val``.

    ``options`` are the fields of :class:`embedcache.config.HeadConfig` (or pass
    ``config``): ``head``, ``epochs``, ``lr``, ``weight_decay``, ``class_weight``, ...
    The default head (``auto``, see :func:`_auto`) is a linear probe whose L2 strength is
    chosen on validation loss and an MLP, blended unless validation shows one of them
    significantly better (:func:`auto_choice`); on skewed classes it also tries balanced class
    weights. ``lr`` and ``weight_decay`` lists train every combination at once, keeping the
    lowest validation loss. Features are standardised with the training statistics, stored in
    the head, and streamed from the file past ``max_memory`` bytes. Every head but knn gets a
    temperature fitted on validation (:mod:`embedcache.calibration`). On a multi-label cache
    the heads score each class by a sigmoid, are chosen by validation mAP, and keep per-class
    thresholds (:mod:`embedcache.train.multi`).

    With a cache made by ``extract --views`` (and ``views="use"``), each epoch shows one
    picture of every training image (torch heads); ``metrics["val_acc_tta"]`` adds the
    accuracy of the logits averaged over each val image and its mirror. ``refit`` trains the
    chosen configuration again on train + val (see :func:`_refit`) and saves that head; by
    default (None) it does so when validation was held out of train.

    Returns
    -------
    HeadResult : ``head`` maps features (N, D) to logits (N, C); ``metrics``
        holds histories, the sweep table and validation results (``calibration``: _calibrate).
    """
    cfg = HeadConfig.build(config, **options)
    start = time.perf_counter()
    with open_cache(cache) as c:
        _claim(out, cache, c)
        runs = _runs(cfg, cache, out)
        data = read_splits(c, cfg)
        classes = list(c.classes)
        ident = c.identity
        recorded = Recorded(
            c.features_identity, c.weights_arg, c.feature_dim, ident.dtype, ident.precision
        )
        arch = {"kind": cfg.head, "dim": c.feature_dim, "num_classes": len(classes)}
        arch.update(hidden=cfg.hidden, dropout=cfg.dropout)
        _check_head_memory(arch, len(cfg.lr) * len(cfg.weight_decay))
        batch_size = _batch_size(cfg, data.train.n, c.feature_dim)
        resume = _resume_state(out, recorded, arch, cfg, data.views) if cfg.resume else None
        module, metrics, state = _fit(data, classes, arch, cfg, batch_size, progress, resume, runs)
        val_logits, calibration, thresholds = _validation(module, data, cfg, arch, classes, metrics)
        refit = data.carved if cfg.refit is None else cfg.refit
        selected = module
        if refit:
            kind = arch["kind"]
            module, metrics["refit"] = _refit(data, classes, cfg, kind, metrics, progress, module)
        trained = _trained_on(cfg, data, refit)
    metrics.update(_summary(cache, c, cfg, data, arch, batch_size, time.perf_counter() - start))
    result = HeadResult(module, metrics)
    if out is not None:
        resumable = state and not refit  # a refit head continues nothing
        ckpt = HeadCheckpoint(arch, module.state_dict(), classes, recorded, _plain(metrics))
        ckpt.train_state = _train_state(state, cfg, data) if resumable else None
        ckpt.trained, ckpt.selected = trained, selected.state_dict() if refit else None
        ckpt.temperature = calibration[1]
        ckpt.thresholds = None if thresholds is None else thresholds.tolist()
        result.path = ckpt.save(out)
        preds = val_logits.argmax(1) if thresholds is None else None
        result.files = _reports(Path(out), metrics, data.val.labels, preds, classes, calibration)
    return result


def _validation(module, data: Data, cfg: HeadConfig, arch: dict, classes, metrics: dict):
    """The chosen head on validation, into ``metrics``: its scores, class weighting, per-class
    recall (one label per image) or thresholds (several), and its temperature. Returns
    (validation logits, (those logits, temperature), thresholds or None)."""
    C = arch["num_classes"]
    ratio = 1.0 if data.multi_label else round(skew(data.train.labels, C), 2)
    used = "balanced" if cfg.class_weight == "balanced" else "none"
    metrics.setdefault("class_weight", {"skew": ratio, "used": used})
    if data.multi_label:
        arch["multi_label"] = True
        val_logits = multi.validate(module.eval(), data, metrics)
        calibration = _calibrate(module, data, val_logits, metrics)
        return val_logits, calibration, multi.thresholds(calibration, data, cfg, metrics)
    val_logits = _validate(module.eval(), data, metrics)
    calibration = _calibrate(module, data, val_logits, metrics)
    metrics["val_recall"] = _recall(val_logits.argmax(1), data.val.labels, classes)
    trained = np.unique(data.train.labels)
    metrics["val_missing_classes"] = [
        classes[c] for c in np.setdiff1d(trained, data.val.labels)
    ]  # its choice and calibration say nothing of them
    return val_logits, calibration, None


def _summary(cache, c: Cache, cfg: HeadConfig, data: Data, arch: dict, batch_size, seconds):
    """What train_head adds to a head's metrics besides its training results."""
    config = {**arch, "epochs": cfg.epochs, "lr": list(cfg.lr)}
    config.update(weight_decay=list(cfg.weight_decay), label_smoothing=cfg.label_smoothing)
    config.update(patience=cfg.patience, seed=cfg.seed)
    config.update(class_weight=cfg.class_weight, sampler=cfg.sampler)
    return {
        "head": cfg.head,
        "cache": str(cache),
        "classes": list(c.classes),
        "train_images": data.train.n,
        "val_images": data.val.n,
        "val_source": data.val_source,
        "streamed": not data.train.in_memory,
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "views": {"stored": c.num_views, "used": data.views},
        "config": config,
    } | ({"exclude": data.exclude} if data.exclude else {})


def _train_state(state: dict, cfg: HeadConfig, data: Data) -> dict:
    """What --resume checks and continues from."""
    lrs, wds = list(cfg.lr), list(cfg.weight_decay)
    return {"state": state, "lrs": lrs, "wds": wds, "seed": cfg.seed, "views": data.views}


def _trained_on(cfg: HeadConfig, data: Data, refit: bool) -> TrainedOn:
    """Which images the saved head has seen (what later verbs must not score it on)."""
    seen = ["train", "val"] if refit and not data.carved else ["train"]
    holdout = {"fraction": cfg.val_fraction, "seed": cfg.seed} if data.carved else None
    return TrainedOn({k: data.digests[k] for k in seen}, holdout, refit)


def _validate(module: torch.nn.Module, data: Data, metrics: dict) -> np.ndarray:
    """Validation loss and accuracy into ``metrics`` (and with test-time averaging over each
    image and its mirror, ``*_tta``, when the cache stores mirrors); returns the plain logits."""
    check_finite(module.state_dict(), None, "head")  # a diverged head is never a result
    logits = _logits(module, data.val)
    metrics.update(_val_metrics(logits, data.val.labels))
    if data.val_mirror is not None:
        tta = (logits + _logits(module, data.val_mirror)) / 2
        metrics.update({f"{k}_tta": v for k, v in _val_metrics(tta, data.val.labels).items()})
    return logits


def _calibrate(module: torch.nn.Module, data: Data, logits: np.ndarray, metrics: dict):
    """The temperature of the head chosen, fitted on validation before any refit (a refit head
    has seen those images), on the logits evaluate and predict will compute (averaged with the
    mirror when the cache stores it), into ``metrics["calibration"]`` with the ECE before and
    after. Returns (those logits (N, C), the temperature).

    knn keeps T = 1 (its "logits" are log vote shares, clamped at 1e-6): the images whose class
    got no vote dominate the likelihood, so the fitted T flattens every vote. Measured on
    overlapping blobs (tests/test_calibration.py's noisy_cache, k = 21): T 1.16 raised the val
    ECE from 14.7% to 17.3%, where the probe's T 0.86 lowered it from 7.4% to 4.7%.
    """
    from ..calibration import calibrate

    if data.val_mirror is not None:
        logits = _val_logits(module, data)
    knn = isinstance(getattr(module, "classifier", None), KNNHead)
    skip = "not applicable to knn (vote shares): T = 1" if knn else None
    t, metrics["calibration"] = calibrate(logits, data.val.labels, prefix="val_", skip=skip)
    return logits, t


def _fit(
    data: Data, classes, arch: dict, cfg: HeadConfig, batch_size, progress, resume, runs: Runs
):
    """The head of ``cfg.head`` trained on ``data.train``: (module, metrics, state for --resume
    or None). Probes and knn choose their strength and k on the plain validation features."""
    dev = resolve_device(cfg.device)
    if data.multi_label:
        multi.check(cfg)
    if cfg.head == "knn" and cfg.class_weight == "balanced":
        raise EmbedcacheError(
            "--class-weight balanced weighs a loss, and knn has none; use it with the "
            "default head, logreg, linear or mlp"
        )
    if cfg.head == "auto":
        return _auto(data, classes, arch, cfg, batch_size, progress, runs)
    if cfg.head in ("linear", "mlp"):
        arch["kind"] = "mlp" if cfg.head == "mlp" else "linear"
        data.train.read_ahead = data.val.read_ahead = read_ahead(dev)
        run = cfg.replace(head=arch["kind"])
        return train_sweep(
            data,
            classes,
            run,
            batch_size=batch_size,
            device=dev,
            progress=progress,
            state=resume,
            runs=runs,
        )
    require_in_memory(cfg.head, data.train)
    if cfg.head == "logreg":
        balanced = cfg.class_weight == "balanced"
        module, metrics = fit_probe(
            data.train, data.val, classes, dev, path=LOGREG_PATH, balanced=balanced
        )
        _log_path(runs, "logreg", metrics["sweep"])
        return module, metrics, None
    module, metrics = fit_knn(data.train, data.val, classes)
    _log_path(runs, "knn", metrics["sweep"])
    arch.update(metrics["best"])  # k for knn: part of the architecture
    return module, metrics, None


def _runs(cfg: HeadConfig, cache, out) -> Runs:
    """Where --log-dir puts this call's runs: LOG_DIR/STEM-KIND, STEM the --out file's (or
    ``head``), each run with these settings."""
    settings = {"verb": "train-head", "cache": str(cache), "out": None if out is None else str(out)}
    settings |= {k: v for k, v in dataclasses.asdict(cfg).items() if k != "log_dir"}
    return Runs.of(cfg.log_dir, Path(out).stem if out is not None else "head", settings)


# settings of the heads trained in epochs, left out of the probes' and knn's runs (None: unset)
_NOT_TRAINED_IN_EPOCHS = dict.fromkeys(
    [
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "hidden",
        "dropout",
        "label_smoothing",
        "patience",
    ]
)


def _log_path(runs: Runs, name: str, rows: list[dict]) -> None:
    """A probe's validation results along its path (step: the strength's index in the order
    they were fitted, strongest first) or knn's (step: k), as the run PREFIX-NAME."""
    if "lam" in (rows[0] if rows else {}):
        rows = sorted(rows, key=lambda r: -r["lam"])
    with runs.open(name, head=name, **_NOT_TRAINED_IN_EPOCHS) as log:
        for i, row in enumerate(rows):
            score = "val_map" if "val_map" in row else "val_acc"
            values = {"val_loss": row.get("val_loss"), score: row[score]}
            log.scalars(row.get("k", i), values | {"l2_strength": row.get("lam")})


def _recall(pred: np.ndarray, labels: np.ndarray, classes) -> dict:
    """Each class's recall and support on validation (classes it lacks left out)."""
    out = {}
    for c in np.unique(labels):
        right = pred[labels == c] == c
        out[classes[c]] = {"recall": float(right.mean()), "support": int(len(right))}
    return out


def _val_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """val_acc, val_balanced_acc, val_top5 (more than 5 classes) and val_loss of some logits."""
    from ..report import scores

    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    named = {"accuracy": "val_acc", "balanced_accuracy": "val_balanced_acc", "top5": "val_top5"}
    return {**{named[k]: v for k, v in scores(logits, labels).items()}, "val_loss": float(loss)}


TRAIN_COPIES = 6  # parameters, gradients, AdamW's two moments, the best epoch's, the refit's


def _check_head_memory(arch: dict, heads: int) -> None:
    """Refuse an MLP too wide to train in the memory available now, before any work
    (--hidden 1000000000 asked for a 2 TB allocation deep inside torch)."""
    from ..feed import available_memory_bytes

    if arch["kind"] not in ("mlp", "auto"):
        return
    h, dim, c = arch["hidden"], arch["dim"], arch["num_classes"]
    params = h * (dim + 1) + (h + 1) * c
    need, free = 4 * params * TRAIN_COPIES * max(1, heads), available_memory_bytes()
    if need > free:
        raise EmbedcacheError(
            f"--hidden {h} makes an MLP of {params / 1e6:,.0f} M parameters, about "
            f"{need / 1e9:,.1f} GB to train, and {free / 1e9:.1f} GB of memory is available; "
            "lower --hidden (the default is 512)"
        )


def _claim(out, cache, c: Cache) -> None:
    """Refuse an --out that is the cache, another kind of file, or puts plots among the images."""
    from ..outputs import claim
    from ..report import side_files

    if out is not None:
        root = c.attrs.get("source") if c.attrs.get("layout") not in ("csv", "arrays") else None
        sides = side_files(Path(out))
        claim(
            out,
            kind="head",
            verb="train-head",
            inputs=[("the cache", cache)],
            beside=sides,
            data_root=root or None,
        )


def _reports(out: Path, metrics: dict, y_true, y_pred, classes, calibration) -> dict[str, Path]:
    """write_reports' files, and OUT.reliability.png of ``calibration`` (logits, temperature)."""
    from ..calibration import reliability_diagram
    from ..report import write_reports

    title = f"{metrics['head']} head"
    files = write_reports(out, metrics, y_true, y_pred, classes, title=title)
    (logits, t), where = calibration, out.with_name(out.stem + ".reliability.png")
    title += ": validation probabilities before and after the temperature"
    files["reliability"] = reliability_diagram(
        logits, y_true, temperature=t, path=where, title=title
    )
    return files


def _plain(obj):
    """Metrics as JSON-like plain values (for the checkpoint)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _resume_state(out, recorded: Recorded, arch: dict, cfg: HeadConfig, views: int) -> dict:
    if out is None or not Path(out).exists():
        raise EmbedcacheError(
            f"--resume needs an existing head checkpoint at --out, {out} does not exist"
        )
    ckpt = HeadCheckpoint.load(out)
    ts = ckpt.train_state
    if not ts or not ts.get("state"):
        raise EmbedcacheError(
            f"{out} holds no training state to resume (logreg and knn heads do not train in epochs)"
        )
    same = (
        ckpt.recorded.to_dict() == recorded.to_dict()
        and ckpt.config == arch
        and ts["lrs"] == list(cfg.lr)
        and ts["wds"] == list(cfg.weight_decay)
        and ts["seed"] == cfg.seed
        and ts.get("views", 0) == views
    )
    if not same:
        raise EmbedcacheError(
            f"{out} was trained with another cache or configuration; resume with the same "
            "cache, --head, --lr, --weight-decay, --hidden, --dropout, --seed and --views"
        )
    return ts["state"]


def load_head(path: str | Path) -> tuple[torch.nn.Module, HeadCheckpoint]:
    """Rebuild a head saved by train_head; returns (module in eval mode, its checkpoint)."""
    ckpt = HeadCheckpoint.load(path)
    return ckpt.module(), ckpt
