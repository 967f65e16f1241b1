"""Feature extraction or fine-tuning? The approaches side by side on the same data and splits.

1. The tutorial recipe: frozen backbone, fresh linear classifier, Adam lr 1e-3,
   batch 32, up to ``CompareConfig.tutorial_epochs`` epochs with early stopping
   (patience 5 on validation loss), the whole backbone forwarded over every image
   on every epoch.
2. extract + train-head: the backbone runs once, a linear head (and a sweep)
   trains on the cache; then with ``extract --views K`` (K augmented views per
   training image cached, their forward passes charged) and the same head
   trained on them, without and with test-time averaging (image and mirror).
3. finetune --unfreeze N: from the head trained on the cache (linear probe,
   then fine-tune) and from a fresh head.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..backbones import Backbone, build_backbone
from ..config import CompareConfig
from ..data import ImageSet, scan
from ..errors import EmbedcacheError
from ..exclusion import excluded
from ..outputs import work_folder, write_file, write_text
from ..report import figure
from ..runtime import Overall, resolve_device, tune_allocator
from . import plan
from .grid import Grid, extract_options, finetune_options
from .tutorial import EarlyStopper, tutorial_recipe

__all__ = [
    "Approach",
    "Comparison",
    "EarlyStopper",
    "Grid",
    "compare",
    "markdown",
    "plot",
    "tutorial_recipe",
]

SWEEP_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
SWEEP_WDS = (0.0, 1e-4, 1e-3, 1e-2)
TUTORIAL_ROW = "tutorial recipe (backbone every epoch)"


@dataclass
class Approach:
    """One row of the comparison."""

    name: str
    extract_s: float  # one-off backbone passes: extract, or building the prefix cache
    train_s: float  # epochs (and, for LP-FT, the head on the cache)
    best_val_acc: float
    epochs: int
    train_images: int
    peak_mb: float | None
    curve: list[tuple[float, float]] = field(
        default_factory=list
    )  # (cumulative seconds, val accuracy)
    balanced_val_acc: float | None = None  # mean per-class recall (None: not measured)
    val_top5: float | None = None  # with more than 5 classes

    @property
    def total_s(self) -> float:
        return self.extract_s + self.train_s

    @property
    def images_per_s(self) -> float:
        """Training images seen per second of wall time (train images x epochs / total)."""
        return self.train_images * self.epochs / self.total_s if self.total_s else 0.0


@dataclass
class Comparison:
    rows: list[Approach]
    markdown: str
    files: dict[str, Path]


# ---------------------------------------------------------------------------
# Peak memory per approach


def _reset_peak() -> bool:
    """Reset this process's peak resident memory (Linux clear_refs); False where unsupported."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb(reset_ok: bool) -> float | None:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e6
    if not reset_ok:
        return None
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


# ---------------------------------------------------------------------------
# All approaches


def _curve(
    start_s: float, seconds: list[float], accs: list[float], keeps: list[bool]
) -> list[tuple[float, float]]:
    """(cumulative seconds, validation accuracy) after each epoch, of the weights the run keeps
    then (``keeps[i]``: epoch i replaced them), not of the epoch's own: a run delivers its best
    epoch, and a sweep's kept head that wanders after its best (0.97, 0.67, 0.86) delivers 0.97."""
    kept, curve = None, []
    for t, acc, keep in zip(np.cumsum(seconds), accs, keeps, strict=True):
        kept = acc if keep or kept is None else kept
        curve.append((round(start_s + float(t), 3), float(kept)))
    return curve


def _lowest(losses: list[float]) -> list[bool]:
    """Which epochs a head keeps: each with a lower validation loss than all before (as
    train-head chooses; a NaN loss is never kept)."""
    best, keeps = math.inf, []
    for loss in losses:
        keeps.append(loss < best)
        best = loss if loss < best else best
    return keeps


def _most_accurate(accs: list[float], losses: list[float]) -> list[bool]:
    """Which epochs a run keeps by validation accuracy, ties to the lower loss (as finetune)."""
    best, keeps = (-1.0, math.inf), []
    for acc, loss in zip(accs, losses, strict=True):
        keeps.append(acc > best[0] or (acc == best[0] and loss < best[1]))
        best = (acc, loss) if keeps[-1] else best
    return keeps


def _timed(fn):
    """(result, seconds, peak MB) of ``fn()``."""
    ok = _reset_peak()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, _peak_mb(ok)


@dataclass
class _Bench:
    """What every approach shares: the data, its splits, the settings, the work folder, the
    backbone (built once: the probe, the tutorial), the run's one bar."""

    data: Path
    images: ImageSet
    cfg: CompareConfig
    workdir: Path
    progress: bool
    say: Callable[[str], None]
    bb: Backbone
    bar: Overall | None = None
    cache: Path | None = None  # the plain cache, once extracted
    extract_s: float = (
        0.0  # filled by the cached-head approach, charged to those that use the cache
    )
    extract_peak: float | None = None
    linear_s: float = 0.0

    @property
    def n_train(self) -> int:
        return len(self.images.splits["train"])


def _tutorial(b: _Bench) -> list[Approach]:
    cfg, dev = b.cfg, resolve_device(b.cfg.device)
    (tut, _), seconds, peak = _timed(
        lambda: tutorial_recipe(
            b.images, b.bb, epochs=cfg.tutorial_epochs, seed=cfg.seed, device=dev, progress=b.bar
        )
    )
    h = tut["history"]
    keeps = _most_accurate(h["val_acc"], h["val_loss"])  # its best_val_acc is the best epoch's
    row = Approach(
        name=TUTORIAL_ROW,
        extract_s=0.0,
        train_s=seconds,
        best_val_acc=tut["best_val_acc"],
        epochs=tut["epochs_run"],
        train_images=b.n_train,
        peak_mb=peak,
        curve=_curve(0.0, h["seconds"], h["val_acc"], keeps),
    )
    return [row]


def _extract(b: _Bench, views: int = 0) -> tuple[Path, float, float | None]:
    """(cache, seconds, peak MB) of extracting the data (with ``views`` per training image)."""
    from ..extraction import extract

    cfg, cache = b.cfg, b.workdir / (f"views{views}.h5" if views else "cache.h5")
    _, seconds, peak = _timed(
        lambda: extract(
            b.data,
            out=cache,
            backbone=cfg.backbone,
            **extract_options(cfg),
            overwrite=True,
            progress=b.progress,
            views=views,
        )
    )
    return cache, seconds, peak


def _views(b: _Bench) -> list[Approach]:
    """The linear head on a cache with views: the extra forward passes charged to it, its
    validation accuracy without and with test-time averaging (image and mirror)."""
    cache, seconds, peak = _extract(b, b.cfg.views)
    saved = b.extract_s, b.extract_peak
    b.extract_s, b.extract_peak = seconds, peak
    try:
        name = f"extract --views {b.cfg.views} + train-head linear"
        row, m = _head(b, cache, name, "head_views.pt", head="linear")
    finally:
        b.extract_s, b.extract_peak = saved
    tta = m.get("val_acc_tta")
    if tta is None:
        return [row]
    # The head was chosen epoch by epoch on the validation images and their mirrors: its history
    # is the TTA row's; the plain row is the one point of that head scored without them.
    point = (round(row.total_s, 3), row.best_val_acc)
    with_tta = dataclasses.replace(
        row,
        name=f"{row.name} + TTA",
        best_val_acc=tta,
        balanced_val_acc=m.get("val_balanced_acc_tta"),
        val_top5=m.get("val_top5_tta"),
        curve=row.curve if "history" in m else [(point[0], tta)],
    )
    return [dataclasses.replace(row, curve=[point]), with_tta]


def _head(b: _Bench, cache: Path, name: str, out: str, **options) -> tuple[Approach, dict]:
    """The row of a head trained on ``cache`` (its extraction charged: ``b.extract_s``), and its
    metrics. ``epochs`` are passes over the training features: epochs of a torch head, L-BFGS
    iterations of a probe."""
    from ..train import train_head

    cfg = b.cfg
    r, seconds, peak = _timed(
        lambda: train_head(
            cache,
            out=b.workdir / out,
            device=cfg.device,
            seed=cfg.seed,
            val_fraction=cfg.val_fraction,
            exclude=cfg.exclude,
            progress=False,
            **options,
        )
    )
    if not options:
        b.linear_s = seconds
    m = r.metrics
    if "history" in m:
        h, passes = m["history"], m["epochs_run"]
        curve = _curve(b.extract_s, m["epoch_seconds"], h["val_acc"], _lowest(h["val_loss"]))
    else:  # a probe: one point, when it is chosen
        passes = sum(row.get("iterations", 0) for row in m["sweep"]) or 1
        curve = [(round(b.extract_s + seconds, 3), m["val_acc"])]
    return Approach(
        name=name,
        extract_s=b.extract_s,
        train_s=seconds,
        best_val_acc=m["val_acc"],
        epochs=passes,
        train_images=b.n_train,
        peak_mb=max(filter(None, (peak, b.extract_peak)), default=None),
        curve=curve,
        balanced_val_acc=m.get("val_balanced_acc"),
        val_top5=m.get("val_top5"),
    ), m


def _finetune(b: _Bench, unfreeze: str, cached_head: bool) -> Approach:
    from ..finetuning import finetune

    cfg = b.cfg
    start = "cached head" if cached_head else "fresh head"
    kw = (
        {"head": b.workdir / "head.pt"}
        if cached_head
        else {"backbone": cfg.backbone, "weights": cfg.weights, "image_size": cfg.image_size}
    )
    out = b.workdir / f"model_u{unfreeze}_{start.split()[0]}.pt"
    r, seconds, peak = _timed(
        lambda: finetune(
            b.data,
            out=out,
            unfreeze=unfreeze,
            **finetune_options(cfg),
            exclude=cfg.exclude,
            progress=b.bar,
            **kw,
        )
    )
    fm, h = r.metrics, r.metrics["history"]
    before = b.extract_s + b.linear_s if cached_head else 0.0
    prefix_s = fm["prefix_cache"]["seconds"]
    keeps = _most_accurate(h["val_acc"], h["val_loss"])
    curve = _curve(before + prefix_s, h["seconds"], h["val_acc"], keeps)  # epoch 0 takes 0 s
    curve = curve if cached_head else curve[1:]  # a fresh head before any step: no result yet
    return Approach(
        name=f"finetune --unfreeze {unfreeze} from the {start}",
        extract_s=(b.extract_s if cached_head else 0.0) + prefix_s,
        train_s=seconds - prefix_s + (b.linear_s if cached_head else 0.0),
        best_val_acc=fm["best_val_acc"],
        epochs=fm["epochs_run"],
        train_images=b.n_train,
        peak_mb=peak,
        curve=curve,
        balanced_val_acc=fm.get("val_balanced_acc"),
        val_top5=fm.get("val_top5"),
    )


def _warm_imports() -> None:
    """Import now the libraries used on first use (scikit-learn and matplotlib for the head
    reports, about 1.4 s here), so that no row is charged for running first."""
    import matplotlib.figure  # noqa: F401
    import sklearn.metrics  # noqa: F401


def compare(
    data: str | Path,
    *,
    config: CompareConfig | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **options,
) -> Comparison | Grid:
    """Run every approach on ``data`` with the same backbone and splits; write Markdown, JSON
    and a plot. With several ``backbones`` or ``fractions`` of train, run the grid of
    :mod:`embedcache.comparison.runs` instead and return its :class:`Grid`.

    ``options`` are the fields of :class:`embedcache.config.CompareConfig` (or pass
    ``config``). ``augment`` is finetune's train-time augmentation (``none``,
    ``light``, ``strong``); the tutorial recipe and the heads train on the eval
    transform. Data without a val split gets the same held-out validation
    images in every approach. ``log`` gets the plan first (the rows, and an
    estimate of their time from one timed batch per way the backbone runs), then
    a line per step; ``progress`` shows one bar with one ETA over every row (with
    the bars of the steps that have their own above it). The files are written
    again as each step ends, so an interrupted run keeps the rows it finished.

    Returns
    -------
    Comparison : one Approach per row, the Markdown table and the files written
        (``workdir/compare.md``, ``compare.json``, ``compare.png``; the cache, heads
        and models of each approach stay in ``workdir``).
    """
    cfg = CompareConfig.build(config, **options)
    say = log or (lambda line: None)
    if cfg.rank_only:
        return _rank(data, cfg, progress, say)
    if cfg.grid:
        return _grid(data, cfg.grid_config(), progress, say)
    _check_unfreeze(cfg)  # before any work: a bad value used to be refused after 26 s of it
    tune_allocator()
    images = _images(data, cfg, say)
    workdir = _workdir(cfg)
    dev = resolve_device(cfg.device)
    bb = build_backbone(cfg.backbone, weights=cfg.weights, image_size=cfg.image_size, device=dev)
    b = _Bench(Path(data), images, cfg, workdir, progress, say, bb)
    _warm_imports()
    estimate = plan.timings(cfg, bb, images)
    stages = _stages(b, estimate)
    for line in plan.lines(cfg, images, estimate, len(stages)):
        say(line)
    b.bar = Overall.of(progress, "compare")
    try:
        b.bar.expect(sum(stage.weight_s for stage in stages))
        b.say = b.bar.writer(say)
        rows: list[Approach] = []
        for i, stage in enumerate(stages, 1):
            b.say(f"{i}/{len(stages)} {stage.says}")
            with b.bar.part(stage.weight_s, f"{i}/{len(stages)} {stage.name}"):
                rows += stage.run()
            result = _write(b, rows)  # each row on disk as it ends: an interrupted run keeps them
        b.bar.finish()
    finally:
        b.bar.close()
    return result


def _images(data, cfg: CompareConfig, say: Callable[[str], None]) -> ImageSet:
    """The images with train and val splits, the same in every row (--exclude applied)."""
    from ..ranking import one_label_only

    listed = one_label_only(scan(data, val_fraction=cfg.val_fraction, seed=cfg.seed), data)
    images, _ = listed.with_val(val_fraction=cfg.val_fraction, seed=cfg.seed)
    images, note = excluded(images, cfg.exclude, str(data))  # the same images out in every row
    if note:
        say(note)
    if "train" not in images.splits or "val" not in images.splits or not images.classes:
        raise EmbedcacheError(
            f"{data} needs labelled train and val splits to compare approaches "
            "(class folders, or train/ and val/)"
        )
    return images


class _Stage(NamedTuple):
    name: str  # on the bar
    says: str  # in the log
    weight_s: float  # its estimated seconds
    run: Callable[[], list[Approach]]  # its rows


def _cached_heads(b: _Bench) -> list[Approach]:
    b.cache, b.extract_s, b.extract_peak = _extract(b)
    return [_head(b, b.cache, "extract + train-head (default head)", "head.pt")[0]]


def _sweep(b: _Bench) -> list[Approach]:
    name = f"extract + train-head linear {len(SWEEP_LRS)}x{len(SWEEP_WDS)} sweep"
    grid = {"lr": SWEEP_LRS, "weight_decay": SWEEP_WDS}
    return [_head(b, b.cache, name, "head_sweep.pt", head="linear", **grid)[0]]


def _stages(b: _Bench, estimate: dict[str, float]) -> list[_Stage]:
    """What compare runs, in order, each with its rows."""
    cfg, sweep = b.cfg, f"linear {len(SWEEP_LRS)}x{len(SWEEP_WDS)} sweep"
    stages = [
        _Stage(
            "tutorial recipe",
            "tutorial recipe: the frozen backbone forwarded every epoch",
            estimate["tutorial"],
            lambda: _tutorial(b),
        ),
        _Stage(
            "extract + default head",
            "extract once, then the default head on the cache",
            estimate["extract"],
            lambda: _cached_heads(b),
        ),
        _Stage(sweep, f"the {sweep} on the cache", 0.0, lambda: _sweep(b)),
        _Stage(
            f"extract --views {cfg.views}",
            f"extract --views {cfg.views}, the linear head on the views",
            estimate["views"],
            lambda: _views(b),
        ),
    ][0 if cfg.tutorial else 1 : 4 if cfg.views else 3]
    for n, start in ((n, start) for n in cfg.unfreeze for start in ("cached", "fresh")):
        name = f"finetune --unfreeze {n} ({start} head)"
        says = f"finetune --unfreeze {n} from the {start} head"
        run = functools.partial(lambda n, cached: [_finetune(b, n, cached)], n, start == "cached")
        stages.append(_Stage(name, says, estimate[n], run))
    return stages


def _rank(data, cfg: CompareConfig, progress: bool, say: Callable[[str], None]):
    """--rank-only: :func:`embedcache.ranking.rank_backbones` in WORKDIR/rank, its ranking
    written as rank.md and rank.json there."""
    from ..ranking import rank_backbones

    workdir = _workdir(cfg)
    r = rank_backbones(
        data,
        workdir=workdir / "rank",
        backbones=cfg.backbones or (cfg.backbone,),
        weights=cfg.weights,
        per_class=cfg.per_class,
        seed=cfg.seed,
        image_size=cfg.image_size,
        device=cfg.device,
        val_fraction=cfg.val_fraction,
        progress=progress,
        log=say,
    )
    r.files.update(markdown=workdir / "rank.md", json=workdir / "rank.json")
    write_text(r.files["markdown"], r.markdown() + "\n")
    write_text(r.files["json"], json.dumps(r.as_dict(), indent=1, default=str) + "\n")
    return r


def _grid(data, cfg: CompareConfig, progress: bool, say: Callable[[str], None]):
    """--backbones and --fractions: the grid of :mod:`.runs`, checked before any work."""
    from .runs import compare_grid

    for backbone in cfg.backbones:
        _check_unfreeze(cfg.replace(backbone=backbone))
    tune_allocator()
    images = _images(data, cfg, say)
    return compare_grid(data, images, cfg, _workdir(cfg), progress, say)


def _check_unfreeze(cfg: CompareConfig) -> None:
    """Every --unfreeze value against the backbone's blocks (the architecture alone: no weights)."""
    from ..finetuning.setup import parse_unfreeze

    bb = build_backbone(cfg.backbone, weights="none", image_size=cfg.image_size)
    for value in cfg.unfreeze:
        parse_unfreeze(value, len(bb.block_names), bb.name)


def _workdir(cfg: CompareConfig) -> Path:
    """The work folder: new, empty or an earlier compare's (see
    :func:`embedcache.outputs.work_folder`)."""
    return work_folder(cfg.workdir, verb="compare", legacy=_earlier_compare)


def _earlier_compare(workdir: Path) -> set[str] | None:
    """Every file of a work folder that a compare from before folder markers finished."""
    try:
        table = json.loads((workdir / "compare.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(table, dict) or not {"meta", "rows"} <= set(table):
        return None
    return {p.relative_to(workdir).as_posix() for p in workdir.rglob("*") if not p.is_dir()}


def _write(b: _Bench, rows: list[Approach]) -> Comparison:
    """compare.md, compare.json and compare.png in the work folder, of the rows run so far."""
    cfg = b.cfg
    meta = {
        "data": str(b.data),
        "backbone": cfg.backbone,
        "weights": b.bb.weights,  # what a cache of it records
        "image_size": b.bb.transform.crop,
        "train_images": b.n_train,
        "val_images": len(b.images.splits["val"]),
        "finetune_augment": cfg.augment,
        "device": str(resolve_device(cfg.device)),
    }
    md = markdown(rows, meta, title=cfg.title)
    files = {
        k: b.workdir / f"compare.{ext}"
        for k, ext in (("markdown", "md"), ("json", "json"), ("plot", "png"))
    }
    write_text(files["markdown"], md + "\n")
    table = [{**asdict(r), "total_s": r.total_s, "images_per_s": r.images_per_s} for r in rows]
    write_text(files["json"], json.dumps({"meta": meta, "rows": table}, indent=2) + "\n")
    plot(rows, files["plot"], cfg.title or f"{cfg.backbone} on {b.data.name}")
    return Comparison(rows, md, files)


def markdown(rows: list[Approach], meta: dict, *, title: str | None = None) -> str:
    """The comparison as a Markdown table, fastest to slowest as run."""
    tut = rows[0] if rows and rows[0].name == TUTORIAL_ROW else None
    head = [
        f"{title or 'Comparison'}: `{meta['backbone']}` (weights {meta['weights']}, "
        f"{meta['image_size']} px) on {meta['train_images']} train / {meta['val_images']} val "
        f"images, {meta['device']}; finetune augmentation: {meta['finetune_augment']}.",
        "",
        "| approach | one-off backbone pass (s) | training (s) | total (s) | vs tutorial time "
        "| train images/s | peak memory (MB) | best val acc | balanced | top-5 | epochs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = "n/a (no tutorial row)" if tut is None else _times(r.total_s / tut.total_s)
        peak = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "n/a"
        head.append(
            f"| {r.name} | {r.extract_s:.1f} | {r.train_s:.1f} | {r.total_s:.1f} | {ratio} "
            f"| {r.images_per_s:.0f} | {peak} | {100 * r.best_val_acc:.2f}% "
            f"| {_pct(r.balanced_val_acc)} | {_pct(r.val_top5)} | {r.epochs} |"
        )
    return "\n".join(head)


def _times(ratio: float) -> str:
    """A time as a multiple of the tutorial's, in one notation: 0.053x, 0.50x, 1.00x, 3.20x, 12x."""
    if ratio >= 10:
        return f"{ratio:.0f}x"
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}%"


def plot(rows: list[Approach], path: Path, title: str) -> Path:
    """Validation accuracy against wall time, one curve per approach (log time axis)."""
    fig = figure(figsize=(8, 5))
    ax = fig.subplots()
    for r in rows:
        if r.curve:
            t, a = zip(*r.curve, strict=True)
            ax.plot(t, a, marker="o", markersize=3, label=f"{r.name} ({100 * r.best_val_acc:.1f}%)")
    ax.set_xscale("log")
    ax.set_xlabel("wall time (s, log scale)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
