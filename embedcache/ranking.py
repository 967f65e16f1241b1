"""Ranking backbones cheaply: each one extracted on a small stratified subsample of the training
images, scored by cross-validated kNN and linear-probe accuracy on its cached features.

The subsample is K images per class (all of a class with fewer) drawn from the train split, with
validation held out of train the way the data layer holds it out when the data has no val split
(:meth:`embedcache.data.ImageSet.with_val`), so that no image a head would be selected on takes
part. It is written as a CSV manifest in the work folder and every backbone is extracted on it
into a small cache there, which a later call reuses when it is up to date. Both scores use the
same stratified folds (:func:`embedcache.auditing.labels.folds_of`): an image is only ever scored
by a model fitted on the other folds.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .auditing.labels import folds_of, out_of_fold_probabilities
from .cache import open_cache

# RankConfig belongs beside the other configs in config.py (and _Config's helpers with it); it
# sits here while config.py is being edited for compare --rank-only.
from .config import (
    DEFAULT_BACKBONE,
    _Config,
    _device,
    _image_size,
    _seed,
    _val_fraction,
    setting,
)
from .data import ImageSet, Sample, name_bytes, scan
from .errors import EmbedcacheError
from .extraction import extract
from .heads import KNNHead
from .outputs import shown, work_folder, write_text

KNN_NEIGHBOURS = 10  # at most; fewer when the smallest class of a fold's training rows is smaller
KNN_BLOCK_ROWS = 4096  # held-out rows compared with the bank at a time
MANIFEST = "subsample.csv"


@dataclass(frozen=True)
class RankConfig(_Config):
    """Settings of :func:`rank_backbones`."""

    backbones: tuple[str, ...] = setting(
        (DEFAULT_BACKBONE,), "Backbones to rank, comma-separated (see `embedcache backbones`)."
    )
    weights: str | tuple[str, ...] = setting(
        "DEFAULT",
        "Weights of every backbone, or one per backbone, comma-separated: DEFAULT, a "
        "torchvision weights name, none (random init) or a state-dict file.",
    )
    per_class: int = setting(
        20, "Training images per class in the subsample (all of a class with fewer).", low=2
    )
    folds: int = setting(5, "Cross-validation folds of the kNN and linear-probe scores.", low=2)
    image_size: int | None = _image_size()
    device: str = _device()
    seed: int = _seed()  # of the subsample, the held-out split and the folds
    val_fraction: float = _val_fraction()

    def __post_init__(self) -> None:
        backbones = _listed(self.backbones)
        weights = _listed(self.weights)
        if len(weights) == 1:
            weights = weights * len(backbones)
        object.__setattr__(self, "backbones", backbones)
        object.__setattr__(self, "weights", weights)
        super().__post_init__()
        if not backbones:
            raise EmbedcacheError(
                "--backbones is empty; give at least one, e.g. efficientnet_lite0"
            )
        if len(weights) != len(backbones):
            raise EmbedcacheError(
                f"--weights must be one value or one per backbone ({len(backbones)}), "
                f"got {len(weights)}: {', '.join(weights)}"
            )
        pairs = list(zip(backbones, weights, strict=True))
        twice = next((p for i, p in enumerate(pairs) if p in pairs[:i]), None)
        if twice:
            raise EmbedcacheError(
                f"--backbones lists {twice[0]} with weights {twice[1]} twice; list each once"
            )

    def pairs(self) -> list[tuple[str, str]]:
        """(backbone, weights) of every backbone to rank, in the order given."""
        return list(zip(self.backbones, self.weights, strict=True))


def _listed(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``a,b`` or a sequence of names as a tuple of names, blanks dropped."""
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return tuple(v.strip() for v in items if v.strip())


@dataclass(frozen=True)
class RankedBackbone:
    """One backbone's cheap scores: cross-validated accuracies on the subsample and their cost."""

    backbone: str
    weights: str
    knn_acc: float  # k-fold cosine kNN accuracy
    probe_acc: float  # k-fold linear-probe accuracy (out_of_fold_probabilities)
    extract_s: float  # building the backbone and extracting the subsample (or checking its cache)
    score_s: float  # reading the cache and both cross-validations
    feature_dim: int
    images: int  # images scored (the subsample, less unreadable files)
    extracted: int  # images run through the backbone by this call (0: the cache was reused)
    cache: str

    @property
    def seconds(self) -> float:
        return self.extract_s + self.score_s

    @property
    def name(self) -> str:
        """The backbone, with its weights when they are not the default ones."""
        return self.backbone if self.weights == "DEFAULT" else f"{self.backbone} ({self.weights})"


@dataclass(frozen=True)
class Ranking:
    """Backbones ranked by cross-validated kNN accuracy on a subsample, best first."""

    rows: tuple[RankedBackbone, ...]
    per_class: int
    folds: int
    seed: int
    classes: int
    images: int  # in the subsample
    manifest: str
    held_out: str = ""  # how validation was held out of train, if it was
    neighbours: int = KNN_NEIGHBOURS
    files: dict = field(default_factory=dict)  # what a caller wrote of it (compare --rank-only)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.rows)

    def summary_lines(self) -> list[str]:
        """For people: the verdict first, then one line per backbone, best first."""
        if not self.rows:
            return ["no backbone ranked"]
        best = self.rows[0]
        lines = [
            f"{best.name} ranks first of {len(self.rows)} by {self.folds}-fold kNN accuracy on "
            f"{self.images} training images ({self.per_class} per class, {self.classes} "
            f"classes) in {self.seconds:.1f} s"
        ]
        width = max(len(r.name) for r in self.rows)
        for i, r in enumerate(self.rows, 1):
            reused = ", cache reused" if not r.extracted else ""
            lines.append(
                f"{i}. {r.name:<{width}}  kNN {r.knn_acc:.3f}  probe {r.probe_acc:.3f}  "
                f"{r.seconds:6.1f} s  {r.feature_dim}-d{reused}"
            )
        return lines

    def markdown(self) -> str:
        """The ranking as a Markdown table, with how it was measured above it."""
        held = f" ({self.held_out})" if self.held_out else ""
        head = (
            f"{self.images} training images{held}, {self.per_class} per class (all of a class "
            f"with fewer), {self.classes} classes; {self.folds}-fold cross-validation, seed "
            f"{self.seed}; cosine kNN with k up to {self.neighbours}. Ranked by kNN accuracy.\n\n"
            "| rank | backbone | kNN acc | probe acc | seconds | extract s | feature dim | "
            "images |\n|---:|---|---:|---:|---:|---:|---:|---:|\n"
        )
        body = "".join(
            f"| {i} | {r.name} | {r.knn_acc:.3f} | {r.probe_acc:.3f} | {r.seconds:.1f} | "
            f"{r.extract_s:.1f} | {r.feature_dim} | {r.images} |\n"
            for i, r in enumerate(self.rows, 1)
        )
        return head + body

    def as_dict(self) -> dict:
        """Plain values for JSON: the settings and one dict per backbone, best first."""
        out = {k: v for k, v in asdict(self).items() if k not in ("rows", "files")}
        out["seconds"] = self.seconds
        out["rows"] = [{"name": r.name, **asdict(r), "seconds": r.seconds} for r in self.rows]
        return out


def _subsample_key(seed: int, path: str) -> str:
    # Hash order, as the holdout: a larger K keeps the images of a smaller one, and adding
    # images to the data moves few others in or out.
    return hashlib.sha256(name_bytes(f"subsample:{seed}:{path}")).hexdigest()


def stratified_subsample(samples: list[Sample], *, per_class: int, seed: int) -> list[Sample]:
    """``per_class`` labelled samples of each class (all of a class with fewer), sorted by path.

    Per class the samples with the smallest hash of (seed, path) are taken, so the draw is
    seeded, and the subsample of a smaller ``per_class`` lies inside that of a larger one.
    """
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        if s.label >= 0:
            by_class.setdefault(s.label, []).append(s)
    chosen = [
        s
        for members in by_class.values()
        for s in sorted(members, key=lambda s: _subsample_key(seed, s.path))[:per_class]
    ]
    return sorted(chosen, key=lambda s: s.path)


def one_label_only(images: ImageSet, data: str | Path) -> ImageSet:
    """``images``, refused in one line when multi-label: compare and its ranking score
    classifiers of one label per image."""
    if images.multi_label:
        raise EmbedcacheError(
            f"compare compares one-label classifiers for now, and {data} is multi-label "
            "(several labels per image); use extract, train-head and finetune on it"
        )
    return images


def _training_subsample(data: str | Path, cfg: RankConfig) -> tuple[list[list[str]], str]:
    """Manifest rows (absolute path, class name, ``train``) of the subsample of ``data``'s
    training images, and how validation was held out of train ("" if the data has a val
    split)."""
    # Listed whole, then the same holdout as scan's (stratified_split): so that the note says so.
    images = one_label_only(scan(data, val_fraction=0.0, seed=cfg.seed), data)
    images, note = images.with_val(val_fraction=cfg.val_fraction, seed=cfg.seed)
    train = [s for s in images.splits.get("train", []) if s.label >= 0]
    chosen = stratified_subsample(train, per_class=cfg.per_class, seed=cfg.seed)
    classes = {s.label for s in chosen}
    if len(classes) < 2:
        raise EmbedcacheError(
            f"ranking backbones needs labelled training images of at least 2 classes; "
            f"{data} has {len(classes)} (expected root/train/<class>/*, root/<class>/* or a "
            "CSV of path,label)"
        )
    rows = [[str(images.root / s.path), images.classes[s.label], "train"] for s in chosen]
    return rows, "" if note == "val split" else note


def _write_manifest(path: Path, rows: list[list[str]]) -> Path:
    """Write the manifest (path,label,split) unless it already holds exactly these rows."""
    text = io.StringIO(newline="")
    csv.writer(text, lineterminator="\n").writerows([["path", "label", "split"], *rows])
    if not path.is_file() or path.read_text(encoding="utf-8") != text.getvalue():
        write_text(path, text.getvalue())
    return path


def cache_name(backbone: str, weights: str, image_size: int | None) -> str:
    """The file name of a backbone's subsample cache: readable, and one per setting that
    changes the features (a cache made with other settings would be refused, not replaced)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", backbone)
    key = hashlib.sha256(f"{backbone}\0{weights}\0{image_size}".encode()).hexdigest()[:8]
    return f"{readable}-{key}.h5"


def knn_accuracy(
    features: np.ndarray, labels: np.ndarray, fold: np.ndarray, *, neighbours: int = KNN_NEIGHBOURS
) -> float:
    """Accuracy of a cosine kNN vote (:class:`embedcache.heads.KNNHead`) scoring each fold with
    a bank of the other folds' rows, standardised with their own statistics.

    features : ndarray of shape (n, d), float16 or float32
    labels : ndarray of shape (n,), int64 in 0..C-1
    fold : ndarray of shape (n,), int64, the fold of each row
    k is ``neighbours``, or the smallest class of a bank when that is smaller.
    """
    x = torch.from_numpy(np.asarray(features, np.float32))
    y = torch.from_numpy(np.asarray(labels, np.int64))
    classes, right = int(y.max()) + 1, 0
    for f in np.unique(fold):
        held, bank = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
        if not len(bank):
            continue
        counts = np.bincount(labels[bank], minlength=classes)
        k = int(min(neighbours, counts[counts > 0].min()))
        var, mean = torch.var_mean(x[bank], dim=0, correction=0)
        std = var.sqrt().clamp_min(1e-6)
        knn = KNNHead((x[bank] - mean) / std, y[bank], classes, k)
        for lo in range(0, len(held), KNN_BLOCK_ROWS):
            rows = held[lo : lo + KNN_BLOCK_ROWS]
            with torch.no_grad():
                right += int((knn((x[rows] - mean) / std).argmax(1) == y[rows]).sum())
    return right / len(labels)


def score_features(
    features: np.ndarray, labels: np.ndarray, *, folds: int, seed: int
) -> tuple[float, float]:
    """(kNN accuracy, linear-probe accuracy), both by ``folds``-fold cross-validation on the
    same stratified folds: every row is scored by a model fitted on the other folds only.

    features : ndarray of shape (n, d), float16 or float32
    labels : ndarray of shape (n,), int64 in 0..C-1
    """
    labels = np.asarray(labels, np.int64)
    fold = folds_of(labels, folds=folds, seed=seed)
    knn = knn_accuracy(features, labels, fold)
    probs = out_of_fold_probabilities(features, labels, folds=folds, seed=seed)
    return knn, float(np.mean(probs.argmax(1) == labels))


def _cached_features(cache: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(features (n, d), labels (n,) int64, d) of a subsample cache's train split."""
    with open_cache(cache) as c:
        split = c.split("train")
        return split.features, split.labels, c.feature_dim


def _rank_one(manifest: Path, cache: Path, pair: tuple[str, str], cfg: RankConfig, progress: bool):
    """Extract one backbone on the subsample (or reuse its cache) and score it."""
    backbone, weights = pair
    start = time.perf_counter()
    done = extract(
        manifest,
        out=cache,
        backbone=backbone,
        weights=weights,
        image_size=cfg.image_size,
        device=cfg.device,
        progress=progress,
    )
    scored = time.perf_counter()
    features, labels, dim = _cached_features(cache)
    knn, probe = score_features(features, labels, folds=cfg.folds, seed=cfg.seed)
    return RankedBackbone(
        backbone,
        weights,
        knn,
        probe,
        extract_s=scored - start,
        score_s=time.perf_counter() - scored,
        feature_dim=dim,
        images=len(labels),
        extracted=done.extracted,
        cache=str(cache),
    )


def rank_backbones(
    data: str | Path,
    *,
    workdir: str | Path,
    config: RankConfig | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    **options,
) -> Ranking:
    """Rank backbones by cross-validated kNN accuracy on a stratified subsample of ``data``.

    ``options`` are the fields of :class:`RankConfig` (or pass ``config``): ``backbones``,
    ``weights`` (one for all or one per backbone), ``per_class``, ``folds``, ``seed``,
    ``image_size``, ``device``, ``val_fraction``. The subsample (``workdir/subsample.csv``)
    and one small cache per backbone stay in ``workdir``, so a second call extracts nothing.
    ``log`` gets a line per step.

    Returns
    -------
    Ranking : one RankedBackbone per backbone, the best kNN accuracy first; ``summary_lines()``
        and ``markdown()`` to show it, ``as_dict()`` for JSON.
    """
    cfg = RankConfig.build(config, **options)
    say = log or (lambda line: None)
    rows, held_out = _training_subsample(data, cfg)  # refused data leaves no folder behind
    work = work_folder(workdir, verb="rank")
    manifest = _write_manifest(work / MANIFEST, rows)
    classes = len({r[1] for r in rows})
    say(f"subsample: {len(rows)} training images of {classes} classes in {shown(manifest)}")
    ranked = []
    for i, pair in enumerate(cfg.pairs(), 1):
        say(f"{i}/{len(cfg.backbones)} {pair[0]} (weights {pair[1]}): extract and score")
        cache = work / cache_name(*pair, cfg.image_size)
        ranked.append(_rank_one(manifest, cache, pair, cfg, progress))
    # Ranked by kNN accuracy, not by the probe: over 42,000 transfer runs (16 data sets, 23
    # transferability metrics) plain kNN accuracy on frozen features predicted which source
    # model transfers best more reliably than LogME, LEEP, NCE and the rest (Sorkhei et al.,
    # "k-NN as a Simple and Effective Estimator of Transferability", TMLR 2025,
    # arXiv:2503.18528). The probe's accuracy breaks ties.
    ranked.sort(key=lambda r: (-r.knn_acc, -r.probe_acc, r.name))
    return Ranking(
        tuple(ranked),
        cfg.per_class,
        cfg.folds,
        cfg.seed,
        classes,
        len(rows),
        str(manifest),
        held_out,
    )
