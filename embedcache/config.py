"""Every choice and default of the verbs, defined once: the library validates them, the CLI
shows them.

Each verb that takes many settings takes one frozen config. A field carries its
default, its allowed values and its help text (in ``metadata``), so the command
line options are built from these classes and cannot drift from the library.
Nothing here imports torch: ``embedcache --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import EmbedcacheError

DEVICES = ("auto", "cpu", "cuda")  # and cuda:N
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = ("float16", "float32")
AUGMENTS = ("none", "light", "strong")
PREFIX_MODES = ("auto", "memory", "disk", "off")
JOINS = ("auto", "copy", "virtual")
DECODERS = ("auto", "cpu", "gpu")
EXPORT_FORMATS = ("onnx", "torchscript")
HEAD_KINDS = ("auto", "linear", "mlp", "logreg", "knn")
DEFAULT_BACKBONE = "efficientnet_lite0"


def setting(default, help: str, *, choices=None, low=None, high=None, flags=(), kind=None):
    """A config field with its command-line description.

    ``low``/``high`` bound numbers (``high`` exclusive for floats), ``flags`` are
    extra option names (``-b``), ``kind`` the value type when the default is None,
    or what a path option names: ``"file"``, ``"folder"`` or ``"existing"`` (a path
    that must exist).
    """
    meta = {"help": help, "choices": choices, "low": low, "high": high, "flags": flags}
    meta["kind"] = kind or (type(default) if default is not None else str)
    if isinstance(default, list | tuple):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


def _check_fields(cfg) -> None:
    """Validate every field against its metadata: one place for the plain range and choice
    checks."""
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        option = "--" + f.name.replace("_", "-")
        if value is None or not meta:
            continue
        if meta["choices"] and value not in meta["choices"]:
            raise EmbedcacheError(
                f"{option} must be one of {', '.join(meta['choices'])}, got {value!r}"
            )
        if meta["kind"] == "int-or-auto" and isinstance(value, str) and value != "auto":
            raise EmbedcacheError(f"{option} must be a number or auto, got {value!r}")
        for v in value if isinstance(value, tuple) else (value,):
            if not isinstance(v, int | float) or isinstance(v, bool):
                continue
            if not math.isfinite(v):
                raise EmbedcacheError(f"{option} must be a finite number, got {v}")
            if meta["low"] is not None and v < meta["low"]:
                raise EmbedcacheError(f"{option} must be at least {meta['low']}, got {v}")
            if meta["high"] is not None and v >= meta["high"]:
                raise EmbedcacheError(f"{option} must be below {meta['high']}, got {v}")


def _device_ok(device: str) -> None:
    if device not in DEVICES and not device.startswith("cuda:"):
        raise EmbedcacheError(f"--device must be one of auto, cpu, cuda or cuda:N, got {device!r}")


class _Config:
    """Shared behaviour: validated on creation, copied with changes by :meth:`replace`."""

    def __post_init__(self) -> None:
        _check_fields(self)
        if hasattr(self, "device"):
            _device_ok(self.device)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def build(cls, config=None, **options):
        """``config`` with ``options`` applied, or a new config from ``options``."""
        return dataclasses.replace(config, **options) if config is not None else cls(**options)


# Settings shared by several verbs (one help text each).
EXCLUDE_HELP = (
    "CSV of images to leave out: its path column (every audit CSV has one: the copy or image to "
    "drop), or one path per line; paths relative to the data root, as in the cache."
)


def _exclude():
    return setting(None, EXCLUDE_HELP, kind=str)


def _multi_label():
    return setting(
        False,
        "CSV manifests: a path listed on several rows (one split) has every label of its rows, "
        "and | separates labels in one field. A labels column, a JSON list label or a Parquet "
        "list column is multi-label without it.",
    )


def _backbone():
    return setting(
        DEFAULT_BACKBONE,
        "torchvision name, efficientnet_lite0/1/2, or timm:NAME (see `embedcache backbones`).",
        flags=("-b",),
    )


def _weights():
    return setting(
        "DEFAULT",
        "DEFAULT, a torchvision weights name, none (random init) or a state-dict file.",
        flags=("-w",),
    )


def _device():
    return setting("auto", "auto, cpu, cuda or cuda:N.")


def _max_memory(what: str):
    return setting(
        None, f"{what} past this size [default: half the available memory].", low=1, kind="bytes"
    )


def _image_size(default_help="the weights' own"):
    return setting(None, f"Crop size in pixels [default: {default_help}].", low=16, kind=int)


def _val_fraction():
    return setting(
        0.2,
        "Fraction of each class held out (seeded, stratified) when the data has no val split.",
        low=0.0,
        high=1.0,
    )


def _seed():
    return setting(0, "Seed of the held-out split, initialisation and shuffling.")


def _label_smoothing():
    help = "Label smoothing of the cross-entropy (one label per image; multi-label: none)."
    return setting(0.1, help, low=0.0, high=1.0)


def _batch_size():
    return setting(
        None,
        "Images per forward pass, or auto: on a GPU the largest power of two up to 1024 that fits "
        "in 80% of its memory, probed once [default: 8 on CPU, 128 on GPU].",
        low=1,
        kind="int-or-auto",
    )


def _augment(what: str):
    return setting(
        "light",
        f"{what} (light: random resized crop + flip; none for images whose label a crop or "
        "flip would change).",
        choices=AUGMENTS,
    )


def _views(help: str):
    return setting(4, help, low=0)


def _tta(default_help: str):
    return setting(
        None,
        "Test-time averaging: the mean of the logits of each image and its mirror "
        f"[default: {default_help}].",
        kind=bool,
    )


def _num_workers():
    return setting(
        None,
        "Decoders: threads on CPU, processes beside a GPU [default: one per core].",
        low=0,
        kind=int,
    )


def _log_dir():
    return setting(
        None,
        "TensorBoard event files of each training run, in a sub-folder of this folder (per "
        "epoch: loss and accuracy on train and val; the settings and hparams); tensorboard "
        "--logdir DIR shows the runs side by side. Needs pip install 'embedcache[tensorboard]'.",
        kind="folder",
    )


# audit --index auto: the faiss index from this many images (exact search costs N^2 x D: 100,000
# x 1280 rows took 111-349 s on 2 cores, the index 22 s at recall@10 0.999 there)
APPROX_FROM_ROWS = 50_000
COMPILE_FROM_IMAGES = 10_000  # torch.compile on a GPU: a minute of compiling pays back there
# A frozen graph on a CPU costs 0.5-1 s of tracing and checking and ran 0-5% faster
# than the folded net with its activations fused (benchmarks/results/bn_fold_cpu.md); end to
# end in fp32 the fused net was 1.05-1.17x the frozen graph on 398-960 images over four
# backbones and level on 5,421 (fp32_freeze_cpu*.md): freezing may pay only beyond that.
FREEZE_FROM_IMAGES = 10_000


@dataclass(frozen=True)
class ExtractConfig(_Config):
    """Settings of :func:`embedcache.extract`."""

    backbone: str = _backbone()
    weights: str = _weights()
    batch_size: int | str | None = _batch_size()
    num_workers: int | None = _num_workers()
    device: str = _device()
    dtype: str = setting("float16", "Stored feature precision.", choices=DTYPES)
    image_size: int | None = _image_size()
    val_fraction: float = _val_fraction()
    seed: int = _seed()
    unlabelled: bool = setting(
        False, "Images without labels: sub-folders are plain folders, shards need no label."
    )
    multi_label: bool = _multi_label()
    overwrite: bool = setting(False, "Replace a cache made with other settings.")
    allow_empty_class: bool = setting(
        False,
        "Write the cache even when a class has no readable image (a warning instead of an error).",
    )
    precision: str = setting(
        "auto",
        "Forward pass: auto is bf16 on GPUs, and on CPUs with native bf16 when "
        "benchmarks/results/precision_*.md allows it; fp32 otherwise. Part of the cache identity.",
        choices=PRECISIONS,
    )
    decode: str = setting(
        "auto",
        "Where JPEGs are decoded: auto is the GPU (nvJPEG) when extracting on CUDA, the CPU "
        "otherwise; other formats and files the GPU refuses always take the CPU path.",
        choices=DECODERS,
    )
    compile: str = setting(
        "auto",
        "Compile the backbone: on a GPU with torch.compile, on a CPU as a frozen TorchScript "
        "graph (each batch shape checked against eager first, eager where they differ). auto: "
        f"from {COMPILE_FROM_IMAGES:,} images in the cache on a GPU, from "
        f"{FREEZE_FROM_IMAGES:,} on a CPU for fp32 runs of nets with BatchNorm; every other "
        "auto run folds BatchNorm into the convolutions, eager, with no tracing (docs: "
        "performance). off: the backbone as built.",
        choices=("auto", "on", "off"),
    )
    views: int = setting(
        0,
        "Also store this many augmented views per training image (the mirror image, then random "
        "resized crops); val/test get the mirror alone, for test-time averaging. Each view is one "
        "more forward pass.",
        low=0,
    )
    join: str = setting(
        "auto",
        "Under torchrun, how the ranks' shard files become the cache: copy (one self-contained "
        "file), virtual (HDF5 virtual datasets over the shards, kept in OUT.parts/), auto "
        "(virtual from 8 GB of shards on).",
        choices=JOINS,
    )
    # Tar shards (WebDataset) and Parquet files: see embedcache/sources.py.
    split_shards: str | None = setting(
        None,
        "Tar shards or Parquet files per split, patterns relative to DATA (a folder): "
        "train=train-{000..009}.tar,val=val-*.tar [default: a split field in the sample, the "
        "file name's train-/val-/test- prefix, else the held-out split].",
    )
    label_key: str | None = setting(
        None,
        "Tar shards: the label is this field of each sample's .json (a class index or name) "
        "[default: the .cls member].",
    )
    image_column: str = setting(
        "image", "Parquet: the column of image bytes (or of `datasets`' {bytes, path} structs)."
    )
    label_column: str = setting(
        "label",
        "Parquet: the column of labels (class indices or names); pass --unlabelled if none.",
    )

    def request(self) -> str:
        """What an extract was asked for, as its cache records it (``request``): the options
        that decide the features, the weights file's size and mtime, the library versions. The
        same request on the same images makes the same cache, so a cache that records it and
        the images' fingerprint is up to date without a backbone being built (45.8 of 47.4 s
        of an up-to-date run in a profile)."""
        import json
        import os
        from importlib.metadata import version

        st = os.stat(self.weights) if self.weights and os.path.isfile(self.weights) else None
        asked = {k: getattr(self, k) for k in ("backbone", "image_size", "dtype", "precision")}
        asked |= {"weights": str(self.weights), "views": self.views}
        asked |= {"seed": self.seed if self.views else None}
        asked |= {"weights_file": [st.st_size, st.st_mtime_ns] if st else None}
        asked |= {p: version(p) for p in ("embedcache", "torch", "torchvision", "timm")}
        return json.dumps(asked, sort_keys=True, default=str)


@dataclass(frozen=True)
class HeadConfig(_Config):
    """Settings of :func:`embedcache.train_head`."""

    head: str = setting(
        "auto",
        "auto: a linear probe (L-BFGS, L2 strength chosen on validation loss) and an MLP, "
        "blended (their probabilities averaged) unless one is significantly more accurate on "
        "validation, which is then kept alone; linear/mlp train in torch (AdamW); "
        "logreg (L-BFGS over the 45 strengths of Kornblith et al.) and knn are references.",
        choices=HEAD_KINDS,
    )
    epochs: int = setting(100, "At most this many epochs.", low=1)
    batch_size: int | None = setting(
        None, "[default: the whole split when it is under 64 MB, else 1024]", low=1, kind=int
    )
    lr: tuple[float, ...] = setting((1e-3,), "Learning rate(s), e.g. --lr 1e-3,3e-3,1e-2.", low=0.0)
    weight_decay: tuple[float, ...] = setting(
        (1e-4,), "Weight decay(s); every (lr, weight decay) pair trains at once.", low=0.0
    )
    hidden: int = setting(512, "MLP hidden width.", low=1)
    dropout: float = setting(0.2, "MLP dropout.", low=0.0, high=1.0)
    label_smoothing: float = _label_smoothing()
    patience: int = setting(
        10,
        "Stop after this many epochs without a lower validation loss (or half the best epoch, "
        "if that is more).",
        low=1,
    )
    class_weight: str = setting(
        "auto",
        "balanced weighs each class's images by n / (classes x its count) in the loss, so a "
        "rare class counts as much as a common one; none weighs every image alike; auto: none, "
        "except the default head on skewed classes (largest over 5x the smallest), which tries "
        "both and keeps balanced weights where they raise val balanced accuracy significantly.",
        choices=("auto", "balanced", "none"),
    )
    precision_at: float | None = setting(
        None,
        "Multi-label caches: each class's threshold the lowest whose validation precision "
        "reaches this (e.g. 0.9) [default: best F1, drawn to the global one for rare classes].",
        low=0.0,
        high=1.0,
        kind=float,
    )
    sampler: str = setting(
        "shuffle",
        "linear/mlp heads: balanced draws each batch's images with probability 1 / their "
        "class's count (every class as often, rare images repeated); shuffle shows every image "
        "once an epoch.",
        choices=("shuffle", "balanced"),
    )
    device: str = _device()
    seed: int = _seed()
    val_fraction: float = _val_fraction()
    max_memory: int | None = _max_memory("Stream features from the file")
    stream: bool | None = None  # force streaming (True) or loading (False); None: by max_memory
    resume: bool = setting(False, "Continue the training saved in --out.")
    views: str = setting(
        "use",
        "With a cache made by extract --views: use shows each epoch one picture of every "
        "training image, drawn from its plain features and its views; ignore trains on the "
        "plain features alone.",
        choices=("use", "ignore"),
    )
    refit: bool | None = setting(
        None,
        "After choosing the configuration (and epochs) on validation, train it again on "
        "train + val and save that head; the reported val accuracy is the chosen one's before "
        "it [default: refit when validation was held out of train, not with a val split].",
        kind=bool,
    )
    exclude: str | None = _exclude()
    log_dir: str | None = _log_dir()

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay"):  # a single number is a one-value sweep
            value = getattr(self, name)
            if not isinstance(value, tuple):
                value = tuple(value) if isinstance(value, list) else (value,)
                object.__setattr__(self, name, tuple(float(v) for v in value))
            if not value:
                raise EmbedcacheError(f"--{name.replace('_', '-')} needs at least one value")
        super().__post_init__()


@dataclass(frozen=True)
class FinetuneConfig(_Config):
    """Settings of :func:`embedcache.finetune`."""

    head: str | None = setting(
        None, "A head from train-head to reattach [default: a fresh linear head]."
    )
    backbone: str | None = setting(None, "[default: the head's backbone]", flags=("-b",))
    weights: str | None = setting(
        None, "[default: the head's weights, else DEFAULT]", flags=("-w",)
    )
    unfreeze: str = setting(
        "2",
        "Blocks to train, counted from the end (see `embedcache backbones`); 0 = head only, "
        "all = everything.",
    )
    epochs: int = setting(10, "At most this many epochs.", low=1)
    lr: float | None = setting(
        None,
        "Learning rate of the head [default: 3e-4 with --head, 1e-3 for a fresh head].",
        low=0.0,
        kind=float,
    )
    backbone_lr_mult: float = setting(0.3, "Unfrozen blocks learn at lr x this.", low=0.0)
    weight_decay: float = setting(0.05, "AdamW decay (not on biases and norms).", low=0.0)
    warmup: float = setting(1.0, "Epochs of linear warm-up before the cosine decay.", low=0.0)
    batch_size: int = setting(
        32, "Images per step (under torchrun: the global batch, split across ranks).", low=1
    )
    augment: str = _augment("Train-time augmentation")
    views: int = _views(
        "Augmented views per image computed once through the frozen prefix; epochs cycle "
        "through them (0: fresh augmentation every epoch, no prefix cache)."
    )
    prefix_cache: str = setting(
        "auto",
        "Cache the frozen prefix's output (auto: whenever valid; disk: in OUT.prefix.h5).",
        choices=PREFIX_MODES,
    )
    patience: int = setting(
        5,
        "Stop after this many epochs without a better validation accuracy (loss, with several "
        "labels per image).",
        low=1,
    )
    label_smoothing: float = _label_smoothing()
    bn_stats: bool = setting(
        False, "Let unfrozen BatchNorm layers update their running statistics."
    )
    resume: bool = setting(False, "Continue from OUT.last.pt.")
    device: str = _device()
    precision: str = setting("auto", "auto: bf16 autocast on GPU, fp32 on CPU.", choices=PRECISIONS)
    seed: int = _seed()
    image_size: int | None = _image_size("the head's, else the weights' own")
    val_fraction: float = _val_fraction()
    num_workers: int | None = _num_workers()
    max_memory: int | None = _max_memory("Prefix cache on disk")
    exclude: str | None = _exclude()
    log_dir: str | None = _log_dir()
    multi_label: bool = _multi_label()

    def __post_init__(self) -> None:
        object.__setattr__(self, "unfreeze", str(self.unfreeze).lower())
        for name in ("head", "exclude"):  # a Path would not go into the checkpoint's config
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))
        super().__post_init__()

    @property
    def head_lr(self) -> float:
        """The head's learning rate: 3e-4 for a trained head (it only needs adjusting), 1e-3 for
        a fresh one."""
        if self.lr is not None:
            return self.lr
        return 3e-4 if self.head is not None else 1e-3

    @property
    def num_views(self) -> int:
        """Augmented views actually cached: without augmentation every view is the same image."""
        return 0 if self.augment == "none" else self.views


@dataclass(frozen=True)
class CompareConfig(_Config):
    """Settings of :func:`embedcache.compare`."""

    backbone: str = _backbone()
    weights: str = _weights()
    image_size: int | None = _image_size()
    unfreeze: tuple[str, ...] = setting(
        ("2",), "finetune --unfreeze values to compare (repeat the option for several)."
    )
    workdir: str = setting("runs/compare", "Where the cache, heads, models and results go.")
    tutorial_epochs: int = setting(
        30, "At most this many epochs of the tutorial recipe (early stopping, patience 5).", low=1
    )
    finetune_epochs: int = setting(10, "At most this many epochs of each finetune run.", low=1)
    augment: str = _augment("finetune's train-time augmentation")
    views: int = _views(
        "Views per training image for the rows of a head trained on cached views "
        "(0: leave those rows out)."
    )
    tutorial: bool = setting(
        True,
        "Include the tutorial recipe (the slowest row, the time reference); one backbone on all "
        "of train only.",
    )
    backbones: tuple[str, ...] = setting(
        (),
        "Compare these backbones (comma-separated, or repeat the option): each extracted once, "
        "each given the default head and finetune at every --fractions share.",
        kind=str,
    )
    fractions: tuple[float, ...] = setting(
        (),
        "Shares of the training images to compare at, e.g. 0.01,0.1,1: seeded, stratified, "
        "nested subsets (every class keeps an image); validation and test never shrink.",
        kind=float,
    )
    rank_only: bool = setting(
        False,
        "Only rank --backbones cheaply: each extracted on --per-class images per class, scored "
        "by cross-validated kNN and linear-probe accuracy.",
    )
    per_class: int = setting(20, "Images per class for --rank-only.", low=2)
    log_dir: str | None = _log_dir()
    device: str = _device()
    seed: int = _seed()
    val_fraction: float = _val_fraction()
    exclude: str | None = _exclude()
    title: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "unfreeze", tuple(str(u) for u in self.unfreeze))
        object.__setattr__(self, "workdir", str(self.workdir))
        names = [b.strip() for v in self.backbones for b in str(v).split(",") if b.strip()]
        object.__setattr__(self, "backbones", tuple(dict.fromkeys(names)))
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        super().__post_init__()

    @property
    def grid(self) -> bool:
        """Whether this compare runs the grid of backbones x fractions (else one backbone on
        all of train, approach by approach)."""
        return len(self.backbones) > 1 or self.fractions not in ((), (1.0,))

    def grid_config(self) -> CompareConfig:
        """This config with the grid's defaults filled in: --backbone alone, all of train."""
        return self.replace(
            backbones=self.backbones or (self.backbone,), fractions=self.fractions or (1.0,)
        )


@dataclass(frozen=True)
class AuditConfig(_Config):
    """Settings of :func:`embedcache.audit`."""

    near_threshold: float = setting(
        0.85,
        "Feature cosine from which two images are near duplicates when either has no thumbnail "
        "(a cache before format 4): the embedding alone cannot tell 0.5x copies from same-class "
        "look-alikes (benchmarks/results/audit_quality.md).",
        low=-1.0,
    )
    near_confirmed: float = setting(
        0.6,
        "Cosine similarity of the features from which two images with thumbnails are near "
        "duplicates, when their pixels agree too (--pixel-threshold). Chosen on "
        "efficientnet_lite0 features: seeded JPEG q60, 0.5x, cropped, mirrored and 1.5x-zoomed "
        "copies of flowers12 and hymenoptera are above it; other backbones may need another value.",
        low=-1.0,
    )
    pixel_threshold: float = setting(
        0.9,
        "Pixel similarity from which two images are near duplicates, with --near-confirmed: the "
        "correlation of their grey 32x32 thumbnails in a band of spatial frequencies, the best "
        "of the whole images, 18 crops of either, mirrored or not, and a 70% window anywhere, "
        "placed between whole pixels. "
        "Raised (to 0.98 at most) where different images of the cache are alike: to the 99th "
        "percentile of 2,000 images' similarity to their k-th nearest neighbour "
        "(benchmarks/results/audit_quality.md).",
        low=-1.0,
    )
    neighbours: int = setting(
        10,
        "Nearest neighbours searched per image: the outlier score is the mean cosine distance to "
        "them, and near duplicates are found among them.",
        low=1,
    )
    index: str = setting(
        "auto",
        "exact compares every image with every other (N^2); approx searches a faiss index "
        "(pip install 'embedcache[index]'), its recall checked on 1,000 images; auto: approx "
        f"from {APPROX_FROM_ROWS:,} images where faiss is installed.",
        choices=("auto", "exact", "approx"),
    )
    recall_floor: float = setting(0.95, "approx probes more until its recall@k is this.", low=0.0)
    reuse: str | None = setting(
        None,
        "An earlier approx audit's folder: grow its index, search only the images added since.",
        kind="folder",
    )
    outlier_z: float = setting(
        3.5,
        "Outlier: a score this many robust SDs (MAD x 1.4826) above the median (3.5 flagged at "
        "most 1% of the clean images of each set measured).",
        low=0.0,
    )
    folds: int = setting(
        5, "Folds of the out-of-fold probabilities that rank likely label errors.", low=2
    )
    max_memory: int | None = _max_memory(
        "Read the features from the file (--index approx, re-scored in passes of the file)"
    )
    report_rows: int = setting(
        30, "Entries per finding shown with thumbnails in report.html (the CSVs hold all).", low=0
    )
    device: str = _device()
    seed: int = _seed()


@dataclass(frozen=True)
class ExportFeaturesConfig(_Config):
    """Settings of :func:`embedcache.export_features`."""

    split: str | None = setting(
        None, "Splits to export, separated by commas, e.g. train,val [default: every split]."
    )
    dtype: str = setting(
        "stored",
        "Feature dtype of the .npy files: stored keeps the cache's; float32 for other tools.",
        choices=("stored", *DTYPES),
    )
    chunk_rows: int = setting(
        1_000_000,
        "Rows per img_emb_K.npy / metadata_K.parquet pair (clip-retrieval writes 1,000,000).",
        low=1,
    )


@dataclass(frozen=True)
class EvaluateConfig(_Config):
    """Settings of :func:`embedcache.evaluate` (``embedcache evaluate``)."""

    split: str = setting("test", "train, val, test or all.")
    plot: str | None = setting(
        None,
        "Confusion matrix PNG [default: MODEL.SPLIT.confusion.png next to MODEL].",
        kind="file",
    )
    tta: bool | None = _tta(
        "on when DATA is a cache that stores them (extract --views), or images and MODEL a head "
        "trained on views"
    )
    exclude: str | None = setting(None, EXCLUDE_HELP, kind="file")
    device: str = _device()
    batch_size: int | str | None = _batch_size()
    num_workers: int | None = _num_workers()


@dataclass(frozen=True)
class PredictConfig(_Config):
    """Settings of :func:`embedcache.predict` (``embedcache predict``)."""

    top_k: int = setting(3, "Classes shown per image, the most probable first.", low=1)
    tta: bool | None = _tta("on when MODEL is a head trained on views (extract --views)")
    device: str = _device()
    batch_size: int | str | None = _batch_size()
    num_workers: int | None = _num_workers()


@dataclass(frozen=True)
class ExportConfig(_Config):
    """Settings of :func:`embedcache.exporting.export` (``embedcache export``)."""

    format: str = setting(
        "onnx",
        "ONNX (onnxruntime, TensorRT, ...) or TorchScript (torch.jit.load).",
        choices=EXPORT_FORMATS,
    )


@dataclass(frozen=True)
class DemoConfig(_Config):
    """Settings of :func:`embedcache.quickstart.demo` (``embedcache demo``)."""

    data: str | None = setting(
        None, "Run on your own folder instead of the built-in digits.", kind="existing"
    )
    workdir: str = setting(
        "runs/demo", "Where the cache, heads, models and results go.", kind="folder"
    )
    image_size: int | None = _image_size("64 for the digits, the weights' own otherwise")
    tutorial_epochs: int = setting(
        CompareConfig.tutorial_epochs, "At most this many epochs of the tutorial recipe.", low=1
    )
