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
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import Backbone, build_backbone
from .config import CompareConfig
from .data import ImageSet, load_rgb, scan
from .errors import EmbedcacheError
from .exclusion import excluded
from .heads import make_head
from .outputs import work_folder, write_file, write_text
from .report import figure
from .runtime import resolve_device, tune_allocator

SWEEP_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
SWEEP_WDS = (0.0, 1e-4, 1e-3, 1e-2)
TUTORIAL_LR, TUTORIAL_BATCH, TUTORIAL_PATIENCE = 1e-3, 32, 5  # the courses' Adam settings
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
# The tutorial recipe


class _TutorialImages(torch.utils.data.Dataset):
    """(image, label) pairs through torchvision's PIL transforms, as the courses build them."""

    def __init__(self, files: list[Path], labels: np.ndarray, bb: Backbone):
        from torchvision import transforms

        t = bb.transform
        self.files, self.labels = files, labels
        self.tf = transforms.Compose(
            [
                transforms.Resize(
                    t.resize, interpolation=transforms.InterpolationMode(t.interpolation)
                ),
                transforms.CenterCrop(t.crop),
                transforms.ToTensor(),
                transforms.Normalize(t.mean, t.std),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.tf(load_rgb(self.files[i])), int(self.labels[i])


class EarlyStopper:
    """The tutorials' early stopper: stop when validation loss has not improved for
    ``patience`` epochs."""

    def __init__(self, patience: int = 5, min_delta: float = 0.0):
        self.patience, self.min_delta, self.counter, self.best = patience, min_delta, 0, math.inf

    def should_stop(self, loss: float) -> bool:
        if loss < self.best - self.min_delta:
            self.best, self.counter = loss, 0
            return False
        self.counter += 1
        return self.counter >= self.patience


def _tutorial_loaders(images: ImageSet, bb: Backbone, batch_size: int, seed: int) -> dict:
    """ImageFolder-style PIL transforms, DataLoader with no workers, fp32: as the courses build
    them."""
    g = torch.Generator().manual_seed(seed)
    loaders = {}
    for s in ("train", "val"):
        files = [images.root / x.path for x in images.splits[s]]
        labels = np.array([x.label for x in images.splits[s]], dtype=np.int64)
        dataset = _TutorialImages(files, labels, bb)
        loaders[s] = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=(s == "train"),
            num_workers=0,
            generator=g if s == "train" else None,
        )
    return loaders


def _tutorial_epoch(net, classifier, loader, optimizer, device) -> tuple[float, float]:
    """One pass of the recipe: (mean loss, accuracy); trains when ``optimizer`` is given."""
    classifier.train(optimizer is not None)
    loss_sum = correct = n = 0
    with torch.inference_mode(optimizer is None):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = classifier(net(x))  # the backbone forward, again, every epoch
            loss = torch.nn.functional.cross_entropy(logits, y)
            if optimizer is not None:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    return loss_sum / n, correct / n


def tutorial_recipe(
    images: ImageSet,
    bb: Backbone,
    *,
    epochs: int = CompareConfig.tutorial_epochs,
    seed: int = 0,
    device: torch.device,
    progress: bool = False,
) -> tuple[dict, torch.nn.Module]:
    """Train a fresh linear classifier on a frozen backbone that is forwarded every epoch.

    Adam lr 1e-3, batch 32, early stopping with patience 5 on validation loss.
    The backbone stays in eval mode (frozen BatchNorm statistics too, which the
    courses' ``model.train()`` forgets); data goes through ImageFolder-style
    PIL transforms and a DataLoader with no workers, in fp32 NCHW.

    Returns (metrics with per-epoch history and times, the classifier).
    """
    loaders = _tutorial_loaders(images, bb, TUTORIAL_BATCH, seed)
    net = bb.net.to(device).eval().to(memory_format=torch.contiguous_format)
    for p in net.parameters():
        p.requires_grad_(False)
    classifier = make_head("linear", bb.feature_dim, len(images.classes))
    bound = 1 / bb.feature_dim**0.5  # torch's default init, from a seeded generator
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        classifier.weight.uniform_(-bound, bound, generator=g)
        classifier.bias.uniform_(-bound, bound, generator=g)
    classifier = classifier.to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=TUTORIAL_LR)
    stopper = EarlyStopper(TUTORIAL_PATIENCE)
    history = {k: [] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "seconds")}
    for _ in tqdm(
        range(epochs),
        desc="tutorial recipe",
        unit="epoch",
        disable=not progress,
        dynamic_ncols=True,
    ):
        t0 = time.perf_counter()
        tl, ta = _tutorial_epoch(net, classifier, loaders["train"], optimizer, device)
        vl, va = _tutorial_epoch(net, classifier, loaders["val"], None, device)
        for k, v in zip(history, (tl, ta, vl, va, time.perf_counter() - t0), strict=True):
            history[k].append(v)
        if stopper.should_stop(vl):
            break
    metrics = {
        "history": history,
        "epochs_run": len(history["val_acc"]),
        "best_val_acc": max(history["val_acc"]),
    }
    return metrics, classifier


# ---------------------------------------------------------------------------
# All approaches


def _curve(start_s: float, seconds: list[float], accs: list[float]) -> list[tuple[float, float]]:
    return [
        (round(start_s + float(t), 3), float(a))
        for t, a in zip(np.cumsum(seconds), accs, strict=True)
    ]


def _timed(fn):
    """(result, seconds, peak MB) of ``fn()``."""
    ok = _reset_peak()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, _peak_mb(ok)


@dataclass
class _Bench:
    """What every approach shares: the data, its splits, the settings, the work folder."""

    data: Path
    images: ImageSet
    cfg: CompareConfig
    workdir: Path
    progress: bool
    say: Callable[[str], None]
    extract_s: float = (
        0.0  # filled by the cached-head approach, charged to those that use the cache
    )
    extract_peak: float | None = None
    linear_s: float = 0.0

    @property
    def n_train(self) -> int:
        return len(self.images.splits["train"])


def _tutorial(b: _Bench) -> Approach:
    cfg = b.cfg
    dev = resolve_device(cfg.device)
    bb = build_backbone(cfg.backbone, weights=cfg.weights, image_size=cfg.image_size, device=dev)
    (tut, _), seconds, peak = _timed(
        lambda: tutorial_recipe(
            b.images, bb, epochs=cfg.tutorial_epochs, seed=cfg.seed, device=dev, progress=b.progress
        )
    )
    h = tut["history"]
    return Approach(
        name=TUTORIAL_ROW,
        extract_s=0.0,
        train_s=seconds,
        best_val_acc=tut["best_val_acc"],
        epochs=tut["epochs_run"],
        train_images=b.n_train,
        peak_mb=peak,
        curve=_curve(0.0, h["seconds"], h["val_acc"]),
    )


def _extract(b: _Bench, views: int = 0) -> tuple[Path, float, float | None]:
    """(cache, seconds, peak MB) of extracting the data (with ``views`` per training image)."""
    from .extraction import extract

    cfg, cache = b.cfg, b.workdir / (f"views{views}.h5" if views else "cache.h5")
    _, seconds, peak = _timed(
        lambda: extract(
            b.data,
            out=cache,
            backbone=cfg.backbone,
            weights=cfg.weights,
            image_size=cfg.image_size,
            device=cfg.device,
            seed=cfg.seed,
            val_fraction=cfg.val_fraction,
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
    rows = [row]
    if tta is not None:
        point = [(round(row.total_s, 3), tta)]  # the chosen head, scored with its mirrors
        rows.append(
            dataclasses.replace(row, name=f"{row.name} + TTA", best_val_acc=tta, curve=point)
        )
    return rows


def _head(b: _Bench, cache: Path, name: str, out: str, **options) -> tuple[Approach, dict]:
    """The row of a head trained on ``cache`` (its extraction charged: ``b.extract_s``), and its
    metrics. ``epochs`` are passes over the training features: epochs of a torch head, L-BFGS
    iterations of a probe."""
    from .train import train_head

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
        passes, curve = (
            m["epochs_run"],
            _curve(b.extract_s, m["epoch_seconds"], m["history"]["val_acc"]),
        )
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
    from .finetuning import finetune

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
            epochs=cfg.finetune_epochs,
            augment=cfg.augment,
            device=cfg.device,
            seed=cfg.seed,
            val_fraction=cfg.val_fraction,
            exclude=cfg.exclude,
            progress=b.progress,
            **kw,
        )
    )
    fm, h = r.metrics, r.metrics["history"]
    before = b.extract_s + b.linear_s if cached_head else 0.0
    prefix_s = fm["prefix_cache"]["seconds"]
    trained = [
        (s, a) for e, s, a in zip(h["epoch"], h["seconds"], h["val_acc"], strict=True) if e > 0
    ]
    curve = _curve(before + prefix_s, [s for s, _ in trained], [a for _, a in trained])
    if cached_head:
        curve.insert(0, (round(before + prefix_s, 3), float(fm["head_val_acc_before"])))
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
) -> Comparison:
    """Run every approach on ``data`` with the same backbone and splits; write Markdown, JSON
    and a plot.

    ``options`` are the fields of :class:`embedcache.config.CompareConfig` (or pass
    ``config``). ``augment`` is finetune's train-time augmentation (``none``,
    ``light``, ``strong``); the tutorial recipe and the heads train on the eval
    transform. Data without a val split gets the same held-out validation
    images in every approach.

    Returns
    -------
    Comparison : one Approach per row, the Markdown table and the files written
        (``workdir/compare.md``, ``compare.json``, ``compare.png``; the cache, heads
        and models of each approach stay in ``workdir``).
    """
    cfg = CompareConfig.build(config, **options)
    _check_unfreeze(cfg)  # before any work: a bad value used to be refused after 26 s of it
    tune_allocator()
    say = log or (lambda line: None)
    images, _ = scan(data, val_fraction=cfg.val_fraction, seed=cfg.seed).with_val(
        val_fraction=cfg.val_fraction, seed=cfg.seed
    )
    images, note = excluded(images, cfg.exclude, str(data))  # the same images out in every row
    if note:
        say(note)
    if "train" not in images.splits or "val" not in images.splits or not images.classes:
        raise EmbedcacheError(
            f"{data} needs labelled train and val splits to compare approaches "
            "(class folders, or train/ and val/)"
        )
    workdir = _workdir(cfg)
    b = _Bench(Path(data), images, cfg, workdir, progress, say)
    _warm_imports()
    steps = 2 + 2 * len(cfg.unfreeze)
    rows = []
    if cfg.tutorial:
        say(f"1/{steps} tutorial recipe: the frozen backbone forwarded every epoch")
        rows.append(_tutorial(b))
    say(f"2/{steps} extract once, then heads on the cache")
    cache, b.extract_s, b.extract_peak = _extract(b)
    rows.append(_head(b, cache, "extract + train-head (default head)", "head.pt")[0])
    sweep = f"extract + train-head linear {len(SWEEP_LRS)}x{len(SWEEP_WDS)} sweep"
    grid = {"lr": SWEEP_LRS, "weight_decay": SWEEP_WDS}
    rows.append(_head(b, cache, sweep, "head_sweep.pt", head="linear", **grid)[0])
    if cfg.views:
        say(f"2/{steps} extract --views {cfg.views}, the linear head on the views")
        rows += _views(b)
    for i, (n, cached) in enumerate((n, c) for n in cfg.unfreeze for c in (True, False)):
        start = "cached" if cached else "fresh"
        say(f"{3 + i}/{steps} finetune --unfreeze {n} from the {start} head")
        rows.append(_finetune(b, n, cached))
    return _write(b, rows, cache)


def _check_unfreeze(cfg: CompareConfig) -> None:
    """Every --unfreeze value against the backbone's blocks (the architecture alone: no weights)."""
    from .finetuning.setup import parse_unfreeze

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


def _write(b: _Bench, rows: list[Approach], cache: Path) -> Comparison:
    """compare.md, compare.json and compare.png in the work folder."""
    from .cache import open_cache

    with open_cache(cache) as c:
        weights_id, size = c.weights, int(c.attrs["image_size"])
    cfg = b.cfg
    meta = {
        "data": str(b.data),
        "backbone": cfg.backbone,
        "weights": weights_id,
        "image_size": size,
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
        ratio = (
            "n/a (no tutorial row)"
            if tut is None
            else "1"
            if r is tut
            else f"1/{tut.total_s / r.total_s:.0f}"
            if r.total_s < tut.total_s
            else f"{r.total_s / tut.total_s:.1f}x"
        )
        peak = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "n/a"
        head.append(
            f"| {r.name} | {r.extract_s:.1f} | {r.train_s:.1f} | {r.total_s:.1f} | {ratio} "
            f"| {r.images_per_s:.0f} | {peak} | {100 * r.best_val_acc:.2f}% "
            f"| {_pct(r.balanced_val_acc)} | {_pct(r.val_top5)} | {r.epochs} |"
        )
    return "\n".join(head)


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
