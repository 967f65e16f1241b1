"""The runs behind a grid compare: each backbone extracted once, then per training fraction the
default head on a subset of the cache's rows and finetune from it, each scored on the same
held-out images (see :mod:`.grid` for the table, the verdicts and the plots)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import CompareConfig
from ..data import ImageSet
from .grid import (
    Cell,
    Grid,
    extract_options,
    finetune_options,
    pct,
    scored_cell,
    subset_excludes,
    timed,
    write,
)


def _safe(name: str) -> str:
    """A backbone name as a folder name: timm:resnet18 -> timm-resnet18."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in name)


def plan_lines(images: ImageSet, cfg: CompareConfig, split: str) -> list[str]:
    n = len(images.splits["train"])
    tuned = ", ".join(f"--unfreeze {u}" for u in cfg.unfreeze)
    lines = [
        f"plan: {len(cfg.backbones)} backbone(s) x {len(cfg.fractions)} share(s) of {n} train "
        f"images ({', '.join(pct(f) for f in cfg.fractions)}); each backbone's features once; "
        f"per cell the default head, then finetune {tuned} from it (at most "
        f"{cfg.finetune_epochs} epochs); every cell scored on the {len(images.splits[split])} "
        f"{split} images"
    ]
    if split == "val":
        lines.append(
            "no test split: the cells are scored on the validation images, which also chose "
            "each head's settings and each finetune's epoch (optimistic, for every cell alike)"
        )
    return lines


def compare_grid(
    data, images: ImageSet, cfg: CompareConfig, workdir: Path, progress: bool, say: Callable
) -> Grid:
    """Every (backbone, fraction) cell, written to ``workdir`` as each one ends."""
    split = "test" if "test" in images.splits else "val"
    for line in plan_lines(images, cfg, split):
        say(line)
    excludes = subset_excludes(images, cfg, workdir / "subsets")
    meta = {
        "data": str(data),
        "backbones": list(cfg.backbones),
        "fractions": list(cfg.fractions),
        "unfreeze": list(cfg.unfreeze),
        "finetune_epochs": cfg.finetune_epochs,
        "augment": cfg.augment,
        "seed": cfg.seed,
        "title": cfg.title or f"{Path(str(data)).name}: backbones x training-set share",
    }
    cells: list[Cell] = []
    order: list[str] = []
    grid = None
    for backbone in cfg.backbones:
        folder = workdir / _safe(backbone)
        cache, extract_s = _extract(data, folder, backbone, cfg, progress)
        for fraction, (exclude, n) in excludes.items():
            run = _Cell(data, cache, folder, backbone, fraction, exclude, n, extract_s, split, cfg)
            for cell in run.all(say, order):
                cells.append(cell)
                grid = write(cells, split, workdir, meta)  # each cell on disk as it ends
    return grid


def _extract(data, folder: Path, backbone: str, cfg: CompareConfig, progress: bool):
    from ..extraction import extract

    cache = folder / "cache.h5"
    _, seconds = timed(
        lambda: extract(
            data,
            out=cache,
            backbone=backbone,
            progress=progress,
            **extract_options(cfg),
        )
    )
    return cache, seconds


@dataclass
class _Cell:
    """The approaches of one (backbone, fraction): the default head, then finetune from it."""

    data: object
    cache: Path
    folder: Path
    backbone: str
    fraction: float
    exclude: Path | None  # what leaves only this share of train (and the user's --exclude)
    n: int  # train images in this share
    extract_s: float
    split: str
    cfg: CompareConfig

    @property
    def tag(self) -> str:
        return pct(self.fraction).rstrip("%").replace(".", "_") + "pct"

    @property
    def log_dir(self) -> str | None:
        """This cell's TensorBoard folder (its runs show as ``CELL/head-auto-mlp``, ...)."""
        from ..tblog import sub_log_dir

        return sub_log_dir(self.cfg.log_dir, self.backbone, pct(self.fraction))

    def all(self, say: Callable, order: list[str]):
        say(f"{self.backbone}, {pct(self.fraction)} of train ({self.n} images): the default head")
        head, head_s, cell = self._head(order)
        yield cell
        for unfreeze in self.cfg.unfreeze:
            say(f"{self.backbone}, {pct(self.fraction)} of train: finetune --unfreeze {unfreeze}")
            yield self._finetune(head, head_s, unfreeze, order)

    def _cell(self, approach: str, train_s: float, val_acc: float, ev: dict, order: list) -> Cell:
        if not order:
            order += ev["scored"]["paths"]  # the first cell's images: every cell's order
        accuracy, interval, balanced, right = scored_cell(ev, order)
        return Cell(
            self.backbone,
            self.fraction,
            approach,
            self.n,
            self.extract_s,
            train_s,
            val_acc,
            accuracy,
            interval,
            balanced,
            right,
        )

    def _head(self, order: list) -> tuple[Path, float, Cell]:
        from ..inference import evaluate
        from ..train import train_head

        cfg = self.cfg
        r, seconds = timed(
            lambda: train_head(
                self.cache,
                out=self.folder / f"head_{self.tag}.pt",
                exclude=self.exclude,
                # never refit on train + val: that would add the validation images to
                # every share (a 1% head trained on 12 + 144 images), and has seen val
                refit=False,
                log_dir=self.log_dir,
                device=cfg.device,
                seed=cfg.seed,
                val_fraction=cfg.val_fraction,
                progress=False,
            )
        )
        ev = evaluate(r.path, self.cache, split=self.split, exclude=cfg.exclude, progress=False)
        return r.path, seconds, self._cell("default head", seconds, r.metrics["val_acc"], ev, order)

    def _finetune(self, head: Path, head_s: float, unfreeze: str, order: list) -> Cell:
        from ..finetuning import finetune
        from ..inference import evaluate

        cfg = self.cfg
        r, seconds = timed(
            lambda: finetune(
                self.data,
                out=self.folder / f"model_u{unfreeze}_{self.tag}.pt",
                head=head,
                unfreeze=unfreeze,
                exclude=self.exclude,
                log_dir=self.log_dir,
                progress=False,
                **finetune_options(cfg),
            )
        )
        ev = evaluate(
            r.path,
            self.data,
            split=self.split,
            exclude=cfg.exclude,
            device=cfg.device,
            progress=False,
        )
        approach, val_acc = f"finetune --unfreeze {unfreeze}", r.metrics["best_val_acc"]
        return self._cell(approach, head_s + seconds, val_acc, ev, order)
