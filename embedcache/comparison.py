"""Feature extraction or fine-tuning? The approaches side by side on the same data and splits.

1. The tutorial recipe: frozen backbone, fresh linear classifier, Adam lr 1e-3,
   batch 32, up to 30 epochs with early stopping (patience 5 on validation
   loss), the whole backbone forwarded over every image on every epoch.
2. extract + train-head: the backbone runs once, a linear head (and a sweep)
   trains on the cache.
3. finetune --unfreeze N: from the head trained on the cache (linear probe,
   then fine-tune) and from a fresh head.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import Backbone, build_backbone
from .cache import open_cache
from .data import AUGMENTS, ImageSet, load_rgb, scan
from .errors import EmbedcacheError
from .runtime import resolve_device

SWEEP_LRS = (1e-3, 3e-3, 1e-2, 3e-2)
SWEEP_WDS = (0.0, 1e-4, 1e-3, 1e-2)


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
    """The tutorials' early stopper: stop when validation loss has not improved for ``patience`` epochs."""

    def __init__(self, patience: int = 5, min_delta: float = 0.0):
        self.patience, self.min_delta, self.counter, self.best = patience, min_delta, 0, math.inf

    def should_stop(self, loss: float) -> bool:
        if loss < self.best - self.min_delta:
            self.best, self.counter = loss, 0
            return False
        self.counter += 1
        return self.counter >= self.patience


def tutorial_recipe(
    images: ImageSet,
    bb: Backbone,
    *,
    epochs: int = 30,
    patience: int = 5,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device,
    progress: bool = False,
) -> tuple[dict, torch.nn.Module]:
    """Train a fresh linear classifier on a frozen backbone that is forwarded every epoch.

    The backbone stays in eval mode (frozen BatchNorm statistics too, which the
    courses' ``model.train()`` forgets); data goes through ImageFolder-style
    PIL transforms and a DataLoader with no workers, in fp32 NCHW.

    Returns (metrics with per-epoch history and times, the classifier).
    """
    files = {s: [images.root / x.path for x in images.splits[s]] for s in ("train", "val")}
    labels = {
        s: np.array([x.label for x in images.splits[s]], dtype=np.int64) for s in ("train", "val")
    }
    g = torch.Generator().manual_seed(seed)
    loaders = {
        s: torch.utils.data.DataLoader(_TutorialImages(files[s], labels[s], bb), batch_size=batch_size, shuffle=(s == "train"), num_workers=0, generator=g if s == "train" else None)
        for s in ("train", "val")
    }  # fmt: skip
    net = bb.net.to(device).eval().to(memory_format=torch.contiguous_format)
    for p in net.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    classifier = torch.nn.Linear(bb.feature_dim, len(images.classes)).to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    stopper = EarlyStopper(patience)
    history = {k: [] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "seconds")}
    for _ in tqdm(
        range(epochs),
        desc="tutorial recipe",
        unit="epoch",
        disable=not progress,
        dynamic_ncols=True,
    ):
        t0 = time.perf_counter()
        classifier.train()
        tl = tc = n = 0
        for x, y in loaders["train"]:
            x, y = x.to(device), y.to(device)
            logits = classifier(net(x))  # the backbone forward, again, every epoch
            loss = torch.nn.functional.cross_entropy(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            tl, tc, n = (
                tl + loss.item() * len(y),
                tc + int((logits.argmax(1) == y).sum()),
                n + len(y),
            )
        classifier.eval()
        vl = vc = vn = 0
        with torch.inference_mode():
            for x, y in loaders["val"]:
                x, y = x.to(device), y.to(device)
                logits = classifier(net(x))
                vl, vc, vn = (
                    vl + float(torch.nn.functional.cross_entropy(logits, y)) * len(y),
                    vc + int((logits.argmax(1) == y).sum()),
                    vn + len(y),
                )
        for k, v in zip(
            history, (tl / n, tc / n, vl / vn, vc / vn, time.perf_counter() - t0), strict=True
        ):
            history[k].append(v)
        if stopper.should_stop(vl / vn):
            break
    return {
        "history": history,
        "epochs_run": len(history["val_acc"]),
        "best_val_acc": max(history["val_acc"]),
    }, classifier


# ---------------------------------------------------------------------------
# All approaches


def _curve(start_s: float, seconds: list[float], accs: list[float]) -> list[tuple[float, float]]:
    return [
        (round(start_s + float(t), 3), float(a))
        for t, a in zip(np.cumsum(seconds), accs, strict=True)
    ]


def compare(
    data: str | Path,
    *,
    backbone: str = "efficientnet_lite0",
    weights: str = "DEFAULT",
    image_size: int | None = None,
    unfreeze: tuple[int | str, ...] = (2,),
    workdir: str | Path = "runs/compare",
    tutorial_epochs: int = 30,
    finetune_epochs: int = 10,
    augment_kind: str = "light",
    device: str = "auto",
    seed: int = 0,
    val_fraction: float = 0.2,
    title: str | None = None,
    progress: bool = True,
    log=None,
) -> Comparison:
    """Run every approach on ``data`` with the same backbone and splits; write Markdown, JSON and a plot.

    ``augment_kind`` is finetune's train-time augmentation (``none``, ``light``,
    ``strong``); the tutorial recipe and the heads train on the eval transform.

    Returns
    -------
    Comparison : one Approach per row, the Markdown table and the files written
        (``workdir/compare.md``, ``compare.json``, ``compare.png``; the cache, heads
        and models of each approach stay in ``workdir``).
    """
    from .extraction import extract
    from .finetuning import finetune
    from .train import train_head

    if augment_kind not in AUGMENTS:  # checked before the long runs, not after them
        raise EmbedcacheError(
            f"--augment must be one of {', '.join(AUGMENTS)}, got {augment_kind!r}"
        )
    say = log or (lambda line: None)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    images = scan(data, val_fraction=val_fraction, seed=seed)
    if "train" not in images.splits or "val" not in images.splits or not images.classes:
        raise EmbedcacheError(
            f"{data} needs labelled train and val splits to compare approaches (class folders, or train/ and val/)"
        )
    n_train = len(images.splits["train"])
    rows: list[Approach] = []
    steps = 2 + 2 * len(unfreeze)

    # Libraries imported on first use (matplotlib and scikit-learn for the head reports, about
    # 1.4 s here) are imported now, so that no row is charged for running first.
    import matplotlib
    import sklearn.metrics  # noqa: F401

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    def timed(fn):
        ok = _reset_peak()
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0, _peak_mb(ok)

    # 1. The tutorial recipe
    say(f"1/{steps} tutorial recipe: the frozen backbone forwarded every epoch")
    bb = build_backbone(backbone, weights=weights, image_size=image_size, device=dev)
    (tut, _), seconds, peak = timed(
        lambda: tutorial_recipe(
            images, bb, epochs=tutorial_epochs, seed=seed, device=dev, progress=progress
        )
    )
    h = tut["history"]
    rows.append(
        Approach(
            "tutorial recipe (backbone every epoch)",
            0.0,
            seconds,
            tut["best_val_acc"],
            tut["epochs_run"],
            n_train,
            peak,
            _curve(0.0, h["seconds"], h["val_acc"]),
        )
    )

    # 2. extract + train-head
    say(f"2/{steps} extract once, then heads on the cache")
    cache = workdir / "cache.h5"
    _, extract_s, peak_x = timed(
        lambda: extract(
            data,
            out=cache,
            backbone=backbone,
            weights=weights,
            image_size=image_size,
            device=device,
            seed=seed,
            val_fraction=val_fraction,
            overwrite=True,
            progress=progress,
        )
    )
    linear, linear_s, peak = timed(
        lambda: train_head(cache, out=workdir / "head.pt", device=device, seed=seed, progress=False)
    )
    m = linear.metrics
    rows.append(
        Approach(
            "extract + train-head linear",
            extract_s,
            linear_s,
            m["val_acc"],
            m["epochs_run"],
            n_train,
            max(filter(None, (peak, peak_x)), default=None),
            _curve(extract_s, m["epoch_seconds"], m["history"]["val_acc"]),
        )
    )
    sweep, sweep_s, peak = timed(
        lambda: train_head(
            cache,
            out=workdir / "head_sweep.pt",
            lr=list(SWEEP_LRS),
            weight_decay=list(SWEEP_WDS),
            device=device,
            seed=seed,
            progress=False,
        )
    )
    m = sweep.metrics
    rows.append(
        Approach(
            f"extract + train-head {len(SWEEP_LRS)}x{len(SWEEP_WDS)} sweep",
            extract_s,
            sweep_s,
            m["val_acc"],
            m["epochs_run"],
            n_train,
            max(filter(None, (peak, peak_x)), default=None),
            _curve(extract_s, m["epoch_seconds"], m["history"]["val_acc"]),
        )
    )

    # 3. finetune, from the cached head (LP-FT) and from a fresh head
    step = 2
    for n in unfreeze:
        for start in ("cached head", "fresh head"):
            step += 1
            say(f"{step}/{steps} finetune --unfreeze {n} from the {start}")
            kw = (
                {"head": workdir / "head.pt"}
                if start == "cached head"
                else {"backbone": backbone, "weights": weights, "image_size": image_size}
            )
            out = workdir / f"model_u{n}_{start.split()[0]}.pt"
            r, seconds, peak = timed(
                lambda kw=kw, out=out, n=n: finetune(
                    data,
                    out=out,
                    unfreeze=n,
                    epochs=finetune_epochs,
                    augment_kind=augment_kind,
                    device=device,
                    seed=seed,
                    val_fraction=val_fraction,
                    progress=progress,
                    **kw,
                )
            )
            fm = r.metrics
            before = extract_s + linear_s if start == "cached head" else 0.0
            prefix_s = fm["prefix_cache"]["seconds"]
            epochs_s = [
                s
                for e, s in zip(fm["history"]["epoch"], fm["history"]["seconds"], strict=True)
                if e > 0
            ]
            accs = [
                a
                for e, a in zip(fm["history"]["epoch"], fm["history"]["val_acc"], strict=True)
                if e > 0
            ]
            curve = _curve(before + prefix_s, epochs_s, accs)
            if start == "cached head":
                curve.insert(0, (round(before + prefix_s, 3), float(fm["head_val_acc_before"])))
            one_off = (extract_s if start == "cached head" else 0.0) + prefix_s
            train_s = seconds - prefix_s + (linear_s if start == "cached head" else 0.0)
            rows.append(
                Approach(
                    f"finetune --unfreeze {n} from the {start}",
                    one_off,
                    train_s,
                    fm["best_val_acc"],
                    fm["epochs_run"],
                    n_train,
                    peak,
                    curve,
                )
            )

    with open_cache(cache) as c:
        weights_id, size = c.weights, int(c.attrs["image_size"])
    meta = {
        "data": str(data),
        "backbone": backbone,
        "weights": weights_id,
        "image_size": size,
        "train_images": n_train,
        "val_images": len(images.splits["val"]),
        "finetune_augment": augment_kind,
        "device": str(dev),
    }
    md = markdown(rows, meta, title=title)
    files = {
        "markdown": workdir / "compare.md",
        "json": workdir / "compare.json",
        "plot": workdir / "compare.png",
    }
    files["markdown"].write_text(md + "\n")
    files["json"].write_text(
        json.dumps(
            {
                "meta": meta,
                "rows": [
                    {**asdict(r), "total_s": r.total_s, "images_per_s": r.images_per_s}
                    for r in rows
                ],
            },
            indent=2,
        )
        + "\n"
    )
    plot(rows, files["plot"], title or f"{backbone} on {Path(data).name}")
    return Comparison(rows, md, files)


def markdown(rows: list[Approach], meta: dict, *, title: str | None = None) -> str:
    """The comparison as a Markdown table, fastest to slowest as run."""
    tut = rows[0]
    head = [
        f"{title or 'Comparison'}: `{meta['backbone']}` (weights {meta['weights']}, {meta['image_size']} px) on {meta['train_images']} train / {meta['val_images']} val images, {meta['device']}; finetune augmentation: {meta['finetune_augment']}.",
        "",
        "| approach | one-off backbone pass (s) | training (s) | total (s) | vs tutorial time | train images/s | peak memory (MB) | best val acc | epochs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = (
            "1"
            if r is tut
            else f"1/{tut.total_s / r.total_s:.0f}"
            if r.total_s < tut.total_s
            else f"{r.total_s / tut.total_s:.1f}x"
        )
        peak = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "n/a"
        head.append(
            f"| {r.name} | {r.extract_s:.1f} | {r.train_s:.1f} | {r.total_s:.1f} | {ratio} | {r.images_per_s:.0f} | {peak} | {100 * r.best_val_acc:.2f}% | {r.epochs} |"
        )
    return "\n".join(head)


def plot(rows: list[Approach], path: Path, title: str) -> Path:
    """Validation accuracy against wall time, one curve per approach (log time axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
