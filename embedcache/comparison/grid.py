"""Which backbone, which approach, at what data size: compare over backbones x fractions.

Each fraction is a seeded, stratified, nested subset of the training images
(:func:`embedcache.data.nested_fractions`: every class keeps an image, 1% within 10% within
100%), the same for every backbone and approach; validation and test never shrink. Each
backbone is extracted once over all the images, and every fraction's head trains on a subset
of the cache's rows (the other training images passed as ``--exclude``). For each (backbone,
fraction) the default head and ``finetune --unfreeze N`` from it are scored on the same held-out
images (test, else validation), with a 95% Wilson interval, so that fine-tuning's gain over the
head can be told from noise by a paired test on those images (exact McNemar).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import CompareConfig
from ..data import ImageSet, nested_fractions
from ..exclusion import read_exclude
from ..outputs import write_file, write_text
from ..report import better_p_value, figure, wilson_interval

SIGNIFICANT_P = 0.05  # fine-tuning is worth its time only where its gain is this unlikely by chance


@dataclass
class Cell:
    """One (backbone, fraction, approach) of the grid, scored on the held-out images."""

    backbone: str
    fraction: float
    approach: str  # "default head" or "finetune --unfreeze N"
    train_images: int
    extract_s: float  # the backbone's one pass over every image, shared by its cells
    train_s: float  # this approach's training (a finetune's includes its head's)
    val_acc: float  # what it was chosen on
    accuracy: float  # on the scored split
    interval: tuple[float, float]
    balanced: float
    right: list[bool] = field(default_factory=list, repr=False)  # per scored image

    @property
    def total_s(self) -> float:
        return self.extract_s + self.train_s


@dataclass
class Grid:
    """What :func:`compare_grid` ran, found and wrote."""

    cells: list[Cell]
    split: str  # the split scored: test, or val where there is none
    verdicts: list[str]
    markdown: str
    files: dict[str, Path]


def pct(f: float) -> str:
    """0.01 -> '1%', 0.125 -> '12.5%'."""
    return f"{100 * f:g}%"


def subset_excludes(
    images: ImageSet, cfg: CompareConfig, folder: Path
) -> dict[float, tuple[Path | None, int]]:
    """Per fraction, (the --exclude file that leaves only that share of train, plus what the
    user's own --exclude leaves out, or None for all of train and no file of the user's; the
    training images left)."""
    train = images.splits["train"]
    paths, labels = [s.path for s in train], np.array([s.label for s in train])
    subsets = nested_fractions(paths, labels, fractions=cfg.fractions, seed=cfg.seed)
    own = read_exclude(cfg.exclude)
    out: dict[float, tuple[Path | None, int]] = {}
    for f, rows in subsets.items():
        kept = set(rows.tolist())
        drop = {paths[i] for i in range(len(paths)) if i not in kept}
        drop = sorted(drop | set(own.paths if own else ()))
        if not drop:
            out[f] = None, len(rows)
            continue
        file = folder / f"exclude_train_{pct(f).rstrip('%')}pct.csv"
        write_file(file, lambda tmp, drop=drop: _write_paths(tmp, drop))
        out[f] = file, len(rows)
    return out


def _write_paths(path: Path, paths: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path"])
        w.writerows([p] for p in paths)


def scored_cell(evaluation: dict, order: list[str]) -> tuple[float, tuple, float, list[bool]]:
    """(accuracy, 95% interval, balanced accuracy, right per image in ``order``) of one
    :func:`embedcache.evaluate` result; ``order`` is the first cell's image order."""
    s = evaluation["scored"]
    hits = (t == p for t, p in zip(s["true"], s["predicted"], strict=True))
    right = dict(zip(s["paths"], hits, strict=True))
    flags = [bool(right.get(path, False)) for path in order]
    n = len(flags)
    return sum(flags) / n, wilson_interval(sum(flags), n), evaluation["balanced_accuracy"], flags


def verdict(cells: list[Cell], fraction: float) -> str:
    """One line for one fraction: the best cell, and whether fine-tuning's gain over the best
    head is significant on the same images, against what it costs."""
    here = [c for c in cells if c.fraction == fraction]
    heads = [c for c in here if c.approach == "default head"]
    tuned = [c for c in here if c.approach != "default head"]
    if not heads:
        return ""
    head = max(heads, key=lambda c: (c.accuracy, -c.total_s))
    n = here[0].train_images
    line = f"{pct(fraction)} of train ({n} images): best head {head.backbone} {_acc(head)}"
    if not tuned:
        return line
    ft = max(tuned, key=lambda c: (c.accuracy, -c.total_s))
    gain = round(100 * (ft.accuracy - head.accuracy), 1) + 0.0  # + 0.0: never "-0.0 points"
    p = better_p_value(np.array(ft.right), np.array(head.right))
    ratio = ft.total_s / head.total_s if head.total_s else float("inf")
    if gain > 0 and p < SIGNIFICANT_P:
        advice, why = f"fine-tune ({ft.backbone}, {ft.approach})", f"significant, p={p:.2g}"
    else:
        advice, why = "use the head", f"not significant, p={p:.2g}" if gain > 0 else "no gain"
    return f"{line}; fine-tuning {gain:+.1f} points ({why}) at {ratio:.1f}x the time: {advice}"


def _acc(c: Cell) -> str:
    lo, hi = c.interval
    return f"{100 * c.accuracy:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown(grid_cells: list[Cell], split: str, verdicts: list[str], title: str) -> str:
    head = [
        f"{title}: accuracy on the {split} images, 95% Wilson interval in brackets; time is "
        "the backbone's one pass plus the approach's training, in seconds.",
        "",
        *[f"- {v}" for v in verdicts],
        "",
        f"| backbone | train fraction | train images | approach | {split} accuracy [95%] "
        "| balanced | val accuracy | time (s) |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for c in grid_cells:
        head.append(
            f"| {c.backbone} | {pct(c.fraction)} | {c.train_images} | {c.approach} | {_acc(c)} "
            f"| {100 * c.balanced:.1f}% | {100 * c.val_acc:.1f}% | {c.total_s:.1f} |"
        )
    return "\n".join(head)


def _lines(cells: list[Cell]) -> dict[tuple[str, str], list[Cell]]:
    lines: dict[tuple[str, str], list[Cell]] = {}
    for c in cells:
        lines.setdefault((c.backbone, c.approach), []).append(c)
    return lines


def _colour(cells: list[Cell], backbone: str) -> str:
    """One colour per backbone, its head and its fine-tuning told apart by line and marker."""
    order = list(dict.fromkeys(c.backbone for c in cells))
    return f"C{order.index(backbone) % 10}"


def plot_fractions(cells: list[Cell], path: Path, title: str, split: str) -> Path:
    """Accuracy against the training fraction, a line per (backbone, approach), intervals
    shaded."""
    fig = figure(figsize=(8, 5.5))
    ax = fig.subplots()
    for (backbone, approach), line in _lines(cells).items():
        line = sorted(line, key=lambda c: c.fraction)
        x = [c.fraction for c in line]
        y = [c.accuracy for c in line]
        head = approach == "default head"
        colour = _colour(cells, backbone)
        ax.plot(
            x,
            y,
            "-" if head else "--",
            marker="o" if head else "s",
            color=colour,
            label=f"{backbone}, {approach}",
        )
        lo, hi = zip(*(c.interval for c in line), strict=True)
        ax.fill_between(x, lo, hi, color=colour, alpha=0.12 if head else 0.06, linewidth=0)
    fractions = sorted({c.fraction for c in cells})
    ax.set_xscale("log")
    ax.set_xticks(fractions, [pct(f) for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("share of the training images")
    ax.set_ylabel(f"{split} accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, ax, path)


def plot_time(cells: list[Cell], path: Path, title: str, split: str) -> Path:
    """Accuracy against wall time, a marker per cell, labelled with its fraction."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig = figure(figsize=(8, 5.5))
    ax = fig.subplots()
    for (backbone, approach), line in _lines(cells).items():
        line = sorted(line, key=lambda c: c.fraction)
        marker = "o" if approach == "default head" else "s"
        drawn = ax.scatter(
            [c.total_s for c in line],
            [c.accuracy for c in line],
            marker=marker,
            color=_colour(cells, backbone),
        )
        drawn.set_label(f"{backbone}, {approach}")
        for c in line:
            ax.annotate(
                pct(c.fraction),
                (c.total_s, c.accuracy),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 10, 20, 50, 100, ...
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 20, not 2 x 10^1
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("wall time: the backbone's pass plus training (s, log scale)")
    ax.set_ylabel(f"{split} accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, ax, path)


def _save(fig, ax, path: Path) -> Path:
    fig.legend(
        *ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False
    )
    rows = (len(ax.get_legend_handles_labels()[0]) + 1) // 2
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    return write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def write(cells: list[Cell], split: str, folder: Path, meta: dict) -> Grid:
    """grid.md, grid.json and the two plots in ``folder``, rewritten after every cell."""
    fractions = sorted({c.fraction for c in cells})
    verdicts = [v for v in (verdict(cells, f) for f in fractions) if v]
    title = meta["title"]
    md = markdown(cells, split, verdicts, title)
    files = {k: folder / f"grid.{ext}" for k, ext in (("markdown", "md"), ("json", "json"))}
    files |= {"fractions": folder / "grid_fractions.png", "time": folder / "grid_time.png"}
    write_text(files["markdown"], md + "\n")
    table = [{**asdict(c), "total_s": c.total_s} for c in cells]
    body = {"meta": meta, "split": split, "verdicts": verdicts, "cells": table}
    write_text(files["json"], json.dumps(body, indent=1) + "\n")
    plot_fractions(cells, files["fractions"], title, split)
    plot_time(cells, files["time"], title, split)
    return Grid(cells, split, verdicts, md, files)


def extract_options(cfg: CompareConfig) -> dict:
    """What every extract of a compare run takes from its settings (all but the backbone)."""
    return {
        "weights": cfg.weights,
        "image_size": cfg.image_size,
        "device": cfg.device,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
    }


def finetune_options(cfg: CompareConfig) -> dict:
    """What every finetune of a compare run takes from its settings."""
    return {
        "epochs": cfg.finetune_epochs,
        "augment": cfg.augment,
        "device": cfg.device,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
    }


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t
