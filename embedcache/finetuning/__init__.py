"""Fine-tuning: reattach a head, unfreeze the last N blocks, cache the frozen prefix.

Everything before the first unfrozen block is frozen and in eval mode, so for a
given input it always computes the same activations. With no augmentation (or
a fixed number of augmented views per image) those activations are computed
once, stored in float16, and every epoch trains only the unfrozen tail.

``finetune`` runs four phases, each a module of this package but the last:
``setup.prepare`` (data, backbone, head, what trains), ``prefix.plan_prefix``
and ``build_prefix_cache`` (the prefix cache), ``loop.fit`` (the epochs), and
``_summarise`` here (the best checkpoint, metrics and plots). Before the heavy
work ``estimate`` times one batch and says what the run will do and how long
that should take.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import ModelCheckpoint
from ..config import FinetuneConfig
from ..distributed import process_group
from ..locks import exclusive
from ..models import FinetunedModel, build_model
from ..runtime import Overall, tune_allocator
from ..tblog import check_log_dir
from .estimate import Meter, for_setup, plan_lines
from .loop import Batches, Fit, epochs_left, fit, last_path, start
from .prefix import PrefixCache, PrefixPlan, build_prefix_cache, plan_prefix
from .setup import Setup, describe, prepare


@dataclass
class FinetuneResult:
    """What finetune returns: the best model (in eval mode), its metrics and files."""

    model: FinetunedModel
    metrics: dict
    path: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    plan: list[str] = field(default_factory=list)  # what the run was to do, as said before it


# ---------------------------------------------------------------------------
# Phase 4: summarise


def _speedup(
    prefix: PrefixCache | None, epoch_times: list[float], n_train: int, n_val: int
) -> float | None:
    """Per-epoch speed-up of the prefix cache: (frozen prefix over train + val, + a cached
    epoch) / a cached epoch.

    The frozen part's cost per epoch is read off the cache build, which ran it
    once over every train view and val image.
    """
    if prefix is None or not epoch_times:
        return None
    per_epoch_prefix = prefix.seconds * (n_train + n_val) / (n_train * len(prefix.views) + n_val)
    epoch = float(np.mean(epoch_times))
    return round((per_epoch_prefix + epoch) / epoch, 1)


def _metrics(
    setup: Setup, fit: Fit, plan: PrefixPlan, prefix: PrefixCache | None, record: dict
) -> dict:
    h, best = fit.history, fit.best
    trained = [
        (s, a) for e, s, a in zip(h["epoch"], h["seconds"], h["val_acc"], strict=True) if e > 0
    ]
    epoch_times = [s for s, _ in trained]
    return {
        "history": h,
        "best_epoch": best["epoch"],
        "best_val_acc": best["acc"],
        "best_val_loss": best["loss"],
        "val_acc": best["acc"],
        "epochs_run": h["epoch"][-1],
        "trainable": setup.table,
        "unfreeze": setup.unfreeze,
        "classes": setup.classes,
        "val_source": setup.val_source,
        "prefix_cache": {
            "where": plan.where,
            "bytes": prefix.bytes if prefix else 0,
            "seconds": round(prefix.seconds, 3) if prefix else 0.0,
            "shape": list(plan.shape),
            "views": plan.views,
        },
        "plan": record,
        "seconds_per_epoch": float(np.mean(epoch_times)) if epoch_times else 0.0,
        "config": setup.config_record(),
        "estimated_speedup": _speedup(prefix, epoch_times, len(setup.train[0]), len(setup.val[0])),
        "head_val_acc_before": h["val_acc"][0] if h["epoch"] and h["epoch"][0] == 0 else None,
        "best_trained_val_acc": max((a for _, a in trained), default=None),
        **_kept_scores(fit.best_val),
    }


def _kept_scores(best_val: tuple | None) -> dict:
    """Balanced accuracy and top-5 (more than 5 classes) of the kept epoch on validation
    (nothing with several labels per image: see :func:`_thresholds`)."""
    if best_val is None or not len(best_val[0]) or best_val[0].ndim == 2:
        return {}
    y, pred, *hit5 = best_val
    right = pred == y
    out = {"val_balanced_acc": float(np.mean([right[y == c].mean() for c in np.unique(y)]))}
    if hit5 and len(hit5[0]):
        out["val_top5"] = float(hit5[0].mean())
    return out


def _calibrate(best_val: tuple | None) -> tuple[float, dict]:
    """(temperature, its record for the metrics) fitted on the kept epoch's validation logits,
    after training as for a head (see :mod:`embedcache.calibration`); 1.0 where there are
    none (no validation image, or resumed from a state saved before the logits were kept)."""
    from ..calibration import calibrate

    if best_val is None or len(best_val) < 4 or not len(best_val[0]):
        return 1.0, {"temperature": 1.0, "note": "not fitted: no validation logits"}
    return calibrate(best_val[3], best_val[0], prefix="val_")


def _thresholds(best_val: tuple | None, temperature: float, metrics: dict) -> list[float]:
    """Several labels per image: each class's threshold, chosen for the best F1 on the kept
    epoch's calibrated validation probabilities (as train-head chooses a head's), with the mAP,
    micro and macro F1 and per-class AP and F1 there put into ``metrics``."""
    from ..multilabel import DEFAULT_THRESHOLD, choose_thresholds, scores

    if best_val is None or len(best_val) < 4 or not len(best_val[0]):
        metrics["threshold_rule"] = f"not chosen: no validation logits ({DEFAULT_THRESHOLD})"
        return [DEFAULT_THRESHOLD] * len(metrics["classes"])
    y, z = best_val[0] > 0.5, best_val[3].astype(np.float64)
    probs = 1 / (1 + np.exp(-z / temperature))
    th = choose_thresholds(probs, y)
    m = scores(probs, y, th)
    metrics.update(val_map=m["map"], val_micro_f1=m["micro_f1"], val_macro_f1=m["macro_f1"])
    metrics.update(val_per_class_ap=m["per_class_ap"], val_per_class_f1=m["per_class_f1"])
    metrics.update(thresholds=th.round(6).tolist(), threshold_rule="best F1")
    return metrics["thresholds"]


def _summarise(
    setup: Setup, fit: Fit, plan: PrefixPlan, prefix: PrefixCache | None, record: dict
) -> dict:
    """Rank 0: store the final metrics in the best checkpoint and write the reports next to it."""
    from ..report import write_reports

    ckpt = ModelCheckpoint.load(setup.out)
    ckpt.metrics = _metrics(setup, fit, plan, prefix, record)
    ckpt.temperature, ckpt.metrics["calibration"] = _calibrate(fit.best_val)
    if setup.multi_label:
        ckpt.thresholds = _thresholds(fit.best_val, ckpt.temperature, ckpt.metrics)
    ckpt.save(setup.out)
    files = {"model": setup.out, "last": last_path(setup.out)}
    if fit.best_val is not None:
        y, pred = fit.best_val[0], None if setup.multi_label else fit.best_val[1]
        title = f"finetune --unfreeze {setup.unfreeze} (best epoch {fit.best['epoch']})"
        files.update(
            write_reports(setup.out, dict(ckpt.metrics), y, pred, setup.classes, title=title)
        )
    return files


def _claim(out: Path, data, cfg: FinetuneConfig) -> None:
    """Refuse an --out that is an input (the head, the data), another kind of file, or puts the
    plots among the images; and a --log-dir that cannot hold event files."""
    from ..outputs import claim
    from ..report import side_files

    inputs = [("the head", cfg.head), ("the data", data)]
    root = Path(data) if Path(data).is_dir() else None
    claim(out, kind="model", verb="finetune", inputs=inputs, beside=side_files(out), data_root=root)
    claim(last_path(out), kind="state", verb="finetune", inputs=inputs)
    check_log_dir(cfg.log_dir)


# ---------------------------------------------------------------------------
# Public API


def finetune(
    data: str | Path,
    *,
    out: str | Path,
    config: FinetuneConfig | None = None,
    progress: bool | Overall = True,
    log: Callable[[str], None] | None = None,
    **options,
) -> FinetuneResult:
    """Fine-tune the last ``unfreeze`` blocks of a backbone together with a head.

    ``options`` are the fields of :class:`embedcache.config.FinetuneConfig` (or
    pass ``config``). The main ones: ``head``, a head from train_head to
    reattach (its backbone, weights and transform are checked, and default
    ``backbone``/``weights``; None for a fresh linear head); ``unfreeze``, the
    blocks trained, counted from the end as `embedcache backbones` lists them
    (0 trains the head only, 'all' everything); ``augment`` and ``views``;
    ``prefix_cache`` (auto caches the frozen prefix's output whenever it is
    deterministic). Without a val split, validation is held out of train exactly
    as train-head holds it out. ``log`` is called with one line per event, the
    plan of the run first (its passes and an estimate of their time from one timed
    batch). ``progress`` shows one bar with one ETA over the whole run (prefix
    cache and epochs); given a larger run's :class:`embedcache.runtime.Overall`
    (compare's), that bar moves too.

    On multi-label data (a ``labels`` column, or ``multi_label`` for repeated rows; a
    multi-label ``head``) the head is a sigmoid per class trained by binary cross-entropy; the
    kept epoch is the one of lowest validation loss, the temperature is fitted on its
    validation logits and each class's threshold chosen there for the best F1.

    Under torchrun it trains with DistributedDataParallel: each rank caches the
    prefix of its part of the data, ``batch_size`` stays the global batch,
    validation is gathered from every rank, and rank 0 writes the files.

    Returns
    -------
    FinetuneResult : ``model`` (the best epoch, eval mode) maps normalised images
        (N, 3, H, W) to logits; metrics per epoch; ``path`` of the checkpoint;
        ``files``: OUT.last.pt, OUT.metrics.json, OUT.curves.png,
        OUT.confusion.png and OUT.report.txt.
    """
    cfg = FinetuneConfig.build(config, **options)
    tune_allocator()
    out = Path(out)
    with process_group(cfg.device) as group, contextlib.ExitStack() as held:
        group.on_main(lambda: _claim(out, data, cfg))
        group.on_main(
            lambda: held.enter_context(exclusive(out, "finetune"))
        )  # one writer per --out
        say = (log or (lambda line: None)) if group.is_main else (lambda line: None)
        enabled = progress.enabled if isinstance(progress, Overall) else bool(progress)
        setup = group.each(lambda: prepare(data, cfg, out, enabled, group))
        say(describe(setup))
        if setup.val_source != "val split":
            say(setup.val_source)
        if setup.excluded:
            say(setup.excluded)
        plan = plan_prefix(setup)
        state = start(setup)
        estimate = for_setup(setup, plan, state.epoch, epochs_left(setup, state))
        lines = plan_lines(setup, plan, estimate, state.epoch)
        for line in lines:
            say(line)
        bar = Overall.of(progress if group.is_main else False, "finetune")
        held.callback(bar.close)
        bar.expect(estimate.total_s)
        meter = Meter(bar, estimate)
        fitted, prefix = _run(setup, plan, state, meter, bar.writer(say))
        bar.finish()
        record = {"lines": lines, "estimated_s": round(estimate.total_s, 3)}
        files = group.on_main(lambda: _summarise(setup, fitted, plan, prefix, record))
    ckpt = ModelCheckpoint.load(out)
    return FinetuneResult(build_model(ckpt, torch.device("cpu")), ckpt.metrics, out, files, lines)


def _run(
    setup: Setup, plan: PrefixPlan, state: Fit, meter: Meter, say
) -> tuple[Fit, PrefixCache | None]:
    """Phases 2 and 3: the prefix cache (removed after), then the epochs."""
    prefix = None
    try:
        if meter.estimate.cached:  # not for a resumed run with nothing left to train
            last = setup.bb.block_names[setup.model.start - 1]
            say(
                f"prefix cache ({plan.where}): blocks up to {last}, "
                f"{plan.need_bytes / 1e6:.1f} MB of float16 activations"
            )
            prefix = build_prefix_cache(setup, plan, meter)
        return fit(setup, state, Batches(setup, prefix, meter), say), prefix
    finally:
        if prefix is not None:
            prefix.close()
