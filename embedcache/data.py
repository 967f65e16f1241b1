"""Image sources (folders, CSV manifests), splits, safe decoding, fingerprints.

Nothing here writes to the user's data: files are only listed, stat'ed and read.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import stat
import warnings
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import EmbedcacheError

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
)
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
SPLIT_ORDER = ("train", "val", "test", "all")
UNLABELLED = -1
_RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
}


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvalTransform:
    """Deterministic preprocessing: resize the short side, centre-crop, normalise.

    ``jpeg_draft`` lets the JPEG decoder downscale by 2/4/8 while decoding when
    the image is at least that much larger than needed (much faster on big
    photos; the result differs from a full decode by resampling noise only).
    """

    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    jpeg_draft: bool = True

    def __post_init__(self):
        if not 0 < self.crop <= self.resize:
            raise EmbedcacheError(
                f"image size must satisfy 0 < crop <= resize, got crop={self.crop}, resize={self.resize}"
            )

    def to_json(self) -> str:
        """Return a canonical JSON string (the identity stored in caches)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EvalTransform:
        """Rebuild the transform recorded by :meth:`to_json`."""
        d = json.loads(text)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    def with_crop(self, crop: int) -> EvalTransform:
        """Return the same recipe at another crop size (resize scales with it)."""
        resize = int(round(crop * self.resize / self.crop))
        return dataclasses.replace(self, crop=crop, resize=resize)


@dataclass(frozen=True)
class Sample:
    """One image file: ``path`` relative to the source root (POSIX), its label and stat."""

    path: str
    label: int
    size: int
    mtime_ns: int


@dataclass
class ImageSet:
    """A listed data source: classes and, per split, samples sorted by path."""

    root: Path
    layout: str
    classes: list[str]
    splits: dict[str, list[Sample]]
    ignored: list[str] = field(default_factory=list)  # files of other kinds, not read
    unreadable: dict[str, str] = field(default_factory=dict)  # folders not listed: reason

    def __len__(self) -> int:
        return sum(len(s) for s in self.splits.values())

    def with_val(self, *, val_fraction: float, seed: int) -> tuple[ImageSet, str]:
        """This set with a val split: its own, or one held out of train by :func:`holdout`.

        Returns the set and where validation comes from (``val split`` or a note).
        """
        if "val" in self.splits or "train" not in self.splits or not self.classes:
            return self, "val split"
        train = self.splits["train"]
        parts = stratified_split(train, val_fraction=val_fraction, seed=seed)
        if "val" not in parts:
            return self, "val split"
        splits = {k: v for k, v in self.splits.items() if k != "train"}
        images = dataclasses.replace(self, splits={**parts, **splits})
        return images, holdout_note(len(parts["val"]), len(train), val_fraction, seed)

    def not_read(self) -> list[tuple[str, str]]:
        """(path, reason) of every file and folder the scan did not take as an image."""
        kind = [Path(p).suffix.lower() or "no extension" for p in self.ignored]
        files = [(p, f"not an image file ({k})") for p, k in zip(self.ignored, kind, strict=True)]
        return files + [(p, f"folder not readable: {r}") for p, r in self.unreadable.items()]

    def fingerprint(self) -> str:
        """A digest of every (split, path, size, mtime, label): changes when any file does."""
        h = hashlib.sha256()
        for split in self.splits:
            for s in self.splits[split]:
                h.update(name_bytes(f"{split}\t{s.path}\t{s.size}\t{s.mtime_ns}\t{s.label}\n"))
        return h.hexdigest()


def name_bytes(name: str) -> bytes:
    """The bytes of a file name as the file system holds them: UTF-8, and the bytes of a name
    that is not UTF-8 as they are (Python reads them as surrogates: ``os.fsencode``)."""
    return name.encode("utf-8", "surrogateescape")


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _stat_sample(root: Path, path: Path, label: int) -> Sample:
    try:
        st = path.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:  # listed in a manifest but absent: recorded as skipped later
        size, mtime = -1, -1
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    return Sample(rel, label, size, mtime)


@dataclass
class _Found:
    """What a folder scan found besides images: files it does not read (``ignored``), folders
    it could not list (``unreadable``: path -> reason), and which split/class each folder it
    walked belongs to, so that a linked folder cannot give one image two labels or two splits."""

    root: Path
    ignored: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)
    owners: dict[tuple[int, int], tuple[str, str]] = field(default_factory=dict)

    def rel(self, path: str | Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def owned(self, dirpath: str, owner: str) -> bool:
        """Record that ``dirpath`` is walked for ``owner``; False if it was walked already."""
        try:
            st = os.stat(dirpath)
        except OSError as e:
            self.unreadable[self.rel(dirpath)] = os_reason(e)
            return False
        key = (st.st_dev, st.st_ino)
        if key in self.owners and self.owners[key][0] != owner:
            first, where = self.owners[key]
            raise EmbedcacheError(
                f"{self.rel(dirpath)} (in {owner}) and {where} (in {first}) are the same folder "
                "through a link: its images would be in two classes or splits; remove the link"
            )
        return self.owners.setdefault(key, (owner, self.rel(dirpath)))[1] == self.rel(dirpath)


def _walk_images(folder: Path, found: _Found, owner: str) -> list[Path]:
    """All image files below ``folder`` (recursively), sorted; other files go to ``found``.

    Linked folders are followed once each (a link to a parent would loop); a folder named
    like an image is listed as one, so that reading it skips it with a reason."""
    images = []

    def unreadable(e: OSError) -> None:
        found.unreadable[found.rel(e.filename)] = os_reason(e)

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=unreadable):
        if not found.owned(dirpath, owner):
            dirnames[:] = []
            continue
        images += [Path(dirpath) / d for d in sorted(dirnames) if _is_image(Path(d))]
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not _is_image(Path(d))
        )
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if _is_image(p):
                images.append(p)
            elif not name.startswith("."):
                found.ignored.append(found.rel(p))
    return images


def _class_dirs(folder: Path) -> list[Path]:
    try:
        return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as e:
        raise EmbedcacheError(
            f"cannot list the data folder {folder} ({os_reason(e)}); check its permissions"
        ) from None


def _holdout_key(seed: int, path: str) -> str:
    # Hash order, not a shuffled list: adding images later moves few others across splits.
    return hashlib.sha256(name_bytes(f"{seed}:{path}")).hexdigest()


def holdout(
    paths: list[str], labels: np.ndarray, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The one seeded, stratified validation holdout: (train rows, val rows), each ascending.

    Used wherever data has no val split of its own (scan, train-head, finetune,
    compare), so a head's validation images are exactly fine-tuning's. Per class,
    ``round(n * fraction)`` images (at least 1, at most n - 1) with the smallest
    hash of (seed, path) are held out.
    """
    if not 0.0 <= fraction < 1.0:
        raise EmbedcacheError(f"--val-fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    val = []
    for label in np.unique(labels):
        members = sorted(
            np.flatnonzero(labels == label), key=lambda i: _holdout_key(seed, paths[i])
        )
        n_val = int(round(len(members) * fraction))
        if fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        val += members[:n_val]
    is_val = np.zeros(len(labels), bool)
    is_val[np.asarray(val, dtype=np.int64)] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def stratified_split(
    samples: list[Sample], *, val_fraction: float, seed: int
) -> dict[str, list[Sample]]:
    """Split labelled samples into train/val per class (see :func:`holdout`)."""
    paths = [s.path for s in samples]
    train, val = holdout(
        paths, np.array([s.label for s in samples]), fraction=val_fraction, seed=seed
    )
    split = {"train": sorted((samples[i] for i in train), key=lambda s: s.path)}
    if len(val):
        split["val"] = sorted((samples[i] for i in val), key=lambda s: s.path)
    return split


def paths_digest(paths: list[str]) -> str:
    """A digest of a split's image paths (relative to the data root), in any order: how a
    checkpoint records the images it was trained on (:class:`embedcache.checkpoint.TrainedOn`)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(os.fsencode(p) + b"\0")
    return h.hexdigest()


def holdout_note(n_val: int, n_train: int, fraction: float, seed: int) -> str:
    """How a held-out validation set was made, for logs and metrics."""
    return (
        f"no val split: held out {n_val} of {n_train} train images "
        f"({fraction:.0%}, stratified, seed {seed})"
    )


def _scan_folder(root: Path, *, val_fraction: float, seed: int, unlabelled: bool) -> ImageSet:
    found = _Found(root)
    split_dirs = {
        SPLIT_NAMES[d.name.lower()]: d for d in _class_dirs(root) if d.name.lower() in SPLIT_NAMES
    }
    if unlabelled or not _class_dirs(root):  # asked for, or a flat folder of images
        files = _walk_images(root, found, "all")
        samples = {"all": [_stat_sample(root, p, UNLABELLED) for p in files]}
        return ImageSet(root, "unlabelled", [], samples, found.ignored, found.unreadable)
    if split_dirs:
        classes = sorted({c.name for d in split_dirs.values() for c in _class_dirs(d)})
        index = {c: i for i, c in enumerate(classes)}
        splits = {}
        for split in SPLIT_ORDER:
            if split not in split_dirs:
                continue
            d = split_dirs[split]
            samples = [
                _stat_sample(root, p, UNLABELLED)
                for p in sorted(d.iterdir())
                if p.is_file() and _is_image(p)
            ]
            for c in _class_dirs(d):
                samples += [
                    _stat_sample(root, p, index[c.name])
                    for p in _walk_images(c, found, f"{split}/{c.name}")
                ]
            splits[split] = sorted(samples, key=lambda s: s.path)
        return ImageSet(root, "split-folders", classes, splits, found.ignored, found.unreadable)
    classes_dirs = _class_dirs(root)
    classes = [d.name for d in classes_dirs]
    samples = [
        _stat_sample(root, p, i)
        for i, d in enumerate(classes_dirs)
        for p in _walk_images(d, found, d.name)
    ]
    found.ignored += [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    return ImageSet(
        root,
        "class-folders",
        classes,
        stratified_split(samples, val_fraction=val_fraction, seed=seed),
        found.ignored,
        found.unreadable,
    )


def _manifest_text(csv_path: Path) -> str:
    """The manifest as text: UTF-8 (a BOM allowed) or UTF-16 with its BOM; else one line saying
    where the first byte that is not UTF-8 is."""
    data = csv_path.read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise EmbedcacheError(
            f"CSV manifest {csv_path} is not UTF-8 (byte 0x{data[e.start]:02x} on line {line}); "
            "save it as UTF-8"
        ) from None


def _once_each(csv_path: Path, root: Path, entries: list, *, first: int) -> list:
    """``entries`` (path, label, split) with each path in one form (``./a.jpg`` is ``a.jpg``);
    a file listed twice (with two labels it would be in two classes, or train and val) is an
    error that names both lines."""
    seen: dict[str, int] = {}
    out = []
    for lineno, (path, label, split) in enumerate(entries, start=first):
        key = os.path.normpath(root / path)
        if key in seen:
            raise EmbedcacheError(
                f"{csv_path} lists {path} twice (lines {seen[key]} and {lineno}); "
                "list each file once, with one label"
            )
        seen[key] = lineno
        rel = Path(key).relative_to(root).as_posix() if Path(key).is_relative_to(root) else path
        out.append((rel, label, split))
    return out


def _scan_csv(csv_path: Path, *, val_fraction: float, seed: int) -> ImageSet:
    root = csv_path.parent.resolve()
    text = _manifest_text(csv_path)
    rows = [r for r in csv.reader(io.StringIO(text, newline="")) if r and any(c.strip() for c in r)]
    if not rows:
        raise EmbedcacheError(
            f"CSV manifest {csv_path} is empty; expected rows of path,label[,split]"
        )
    header = [c.strip().lower() for c in rows[0]]
    if "path" in header:
        rows = rows[1:]
        col = {name: header.index(name) for name in ("path", "label", "split") if name in header}
    else:
        col = {name: i for i, name in enumerate(("path", "label", "split")[: len(rows[0])])}
    entries = []
    for lineno, r in enumerate(rows, start=2 if "path" in header else 1):
        try:
            path = r[col["path"]].strip()
            label = r[col["label"]].strip() if "label" in col else ""
            split = r[col["split"]].strip().lower() if "split" in col else ""
        except IndexError:
            raise EmbedcacheError(
                f"{csv_path} line {lineno} has {len(r)} columns; expected path,label[,split]"
            ) from None
        if split and split not in SPLIT_NAMES:
            raise EmbedcacheError(
                f"{csv_path} line {lineno}: split must be train, val or test, got {split!r}"
            )
        entries.append((path, label, SPLIT_NAMES.get(split, "")))
    entries = _once_each(csv_path, root, entries, first=2 if "path" in header else 1)
    classes = sorted({label for _, label, _ in entries if label})
    index = {c: i for i, c in enumerate(classes)}
    samples: dict[str, list[Sample]] = defaultdict(list)
    for path, label, split in entries:
        s = _stat_sample(root, (root / path), index.get(label, UNLABELLED))
        samples[split].append(s)
    unsplit = samples.pop("", [])
    splits = {k: v for k, v in samples.items()}
    if unsplit:
        if classes and all(s.label != UNLABELLED for s in unsplit) and "train" not in splits:
            splits.update(stratified_split(unsplit, val_fraction=val_fraction, seed=seed))
        else:
            splits.setdefault("train" if classes else "all", []).extend(unsplit)
    ordered = {k: sorted(splits[k], key=lambda s: s.path) for k in SPLIT_ORDER if k in splits}
    return ImageSet(root, "csv", classes, ordered, [])


def scan(
    source: str | Path, *, val_fraction: float = 0.2, seed: int = 0, unlabelled: bool = False
) -> ImageSet:
    """List the images of a data source.

    Parameters
    ----------
    source : a folder (``root/train/<class>/*``, ``root/<class>/*`` or a flat
        folder of images) or a CSV manifest with columns ``path,label[,split]``
        (paths relative to the CSV).
    val_fraction : fraction of each class held out as ``val`` when the source
        has no split of its own (seeded, stratified, stable as images are added).
    unlabelled : treat a folder as unlabelled even if it has sub-folders.
    """
    source = Path(source)
    if not source.exists():
        raise EmbedcacheError(
            f"data path {source} does not exist; pass an image folder or a CSV manifest"
        )
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise EmbedcacheError(
                f"data path {source} is a file but not a .csv manifest; pass a folder or a CSV of path,label[,split]"
            )
        images = _scan_csv(source, val_fraction=val_fraction, seed=seed)
    else:
        images = _scan_folder(
            source.resolve(), val_fraction=val_fraction, seed=seed, unlabelled=unlabelled
        )
    images.splits = {k: v for k, v in images.splits.items() if v}
    if not len(images):
        raise EmbedcacheError(
            f"no images found under {source} (looked for {', '.join(IMAGE_EXTENSIONS)}); "
            "expected root/<class>/*.jpg, root/train/<class>/*.jpg or a CSV manifest"
        )
    return images


# ---------------------------------------------------------------------------
# Decoding


class UnreadableImage(Exception):
    """A file that cannot be decoded; ``str(e)`` is the short reason recorded in the cache."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha over white, 16-bit and float scaled, CMYK converted."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = (
            65535.0
            if mode.startswith("I;16") or (mode == "I" and a.max() > 255)
            else (1.0 if mode == "F" and a.max() <= 1.0 else 255.0)
        )
        a = np.clip(a / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX


_OS_REASONS = {
    errno.ENOENT: "file not found",
    errno.ELOOP: "symlink loop",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EIO: "I/O error",
    errno.ENAMETOOLONG: "name too long",
    errno.EISDIR: "a directory",
}


def os_reason(e: OSError) -> str:
    """A short reason for an OS error while reading one image (what the skipped list shows)."""
    return _OS_REASONS.get(e.errno, f"cannot read: {(e.strerror or str(e))[:48]}")


HASH_BYTES = 16  # blake2b-128 of a file's bytes: the content hash a cache records per image


def content_hash(path) -> bytes:
    """The blake2b-128 digest of a file's bytes (``HASH_BYTES`` long; all zeros if unreadable).

    Extraction hashes each image right after decoding it, from the page cache: on the 110 kB
    hymenoptera JPEGs 1.7 ms a file against 28 ms to decode it (2 busy cores), about 2% of the
    image's decode and forward pass.
    """
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    if not isinstance(path, str | os.PathLike):  # a tar or Parquet member (see _opened)
        try:
            h.update(path.read_bytes())
        except (OSError, UnreadableImage):
            return bytes(HASH_BYTES)
        return h.digest()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    except OSError:
        return bytes(HASH_BYTES)
    return h.digest()


def _check_file(path: Path) -> None:
    """Raise UnreadableImage unless ``path`` is a non-empty regular file we can stat."""
    try:
        st = path.stat()
    except OSError as e:
        raise UnreadableImage(os_reason(e)) from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the decoder forever
        raise UnreadableImage("not a regular file")
    if st.st_size == 0:
        raise UnreadableImage("empty file (0 bytes)")


def _open_image(path: Path | io.BytesIO, short_side: int | None) -> Image.Image:
    """``Image.open``, except that a JPEG is drafted (see :func:`load_rgb`) before PIL's pixel
    limit is applied: the limit guards the pixels decoded, and libjpeg decodes a 100 MP photo
    at 1/8 scale for a 256 px crop, so it is cheap, not a decompression bomb."""
    if isinstance(path, io.BytesIO):  # a shard member's bytes (see _opened)
        head, source = path.getvalue()[:3], path
    else:
        with open(path, "rb") as f:
            head, source = f.read(3), str(path)
    if head != JPEG_MAGIC:
        return Image.open(path)
    from PIL import JpegImagePlugin

    img = JpegImagePlugin.JpegImageFile(source)  # no pixel limit on the declared size
    try:
        if short_side:
            w, h = img.size
            scale = short_side / min(w, h)
            img.draft("RGB", (int(w * scale), int(h * scale)))
        if img.size[0] * img.size[1] > (Image.MAX_IMAGE_PIXELS or math.inf):
            raise Image.DecompressionBombError(f"{img.size} pixels to decode")
    except BaseException:
        img.close()
        raise
    return img


def _opened(path) -> Path | io.BytesIO:
    """A file path checked by :func:`_check_file`, or a member's bytes (see :func:`load_rgb`)."""
    if not isinstance(path, str | os.PathLike):
        return io.BytesIO(path.read_bytes())
    _check_file(Path(path))
    return Path(path)


def load_rgb(path: str | Path, *, short_side: int | None = None) -> Image.Image:
    """Decode an image file to 8-bit RGB, honouring EXIF orientation.

    With ``short_side``, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale, never
    smaller than ``short_side`` on its short side (libjpeg's DCT scaling).

    ``path`` may also be a member of a tar shard or Parquet file (anything with a
    ``read_bytes()`` that raises UnreadableImage, see :mod:`embedcache.sources`).

    Raises
    ------
    UnreadableImage : with a short reason (empty file, not an image, truncated, ...).
    """
    path = _opened(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _open_image(path, short_side) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except UnreadableImage:
        raise
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UnreadableImage("image too large (decompression bomb guard)") from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e).lower()
        reason = "truncated image" if "truncated" in msg else f"cannot decode: {str(e)[:48]}"
        raise UnreadableImage(reason) from None
    except Exception as e:  # a malformed file can make a decoder raise anything (IndexError, ...)
        raise UnreadableImage(f"cannot decode: {type(e).__name__} {str(e)[:40]}".strip()) from None


def preprocess(path: str | Path, t: EvalTransform) -> np.ndarray:
    """Decode, resize the short side to ``t.resize``, centre-crop ``t.crop``.

    Returns
    -------
    ndarray of shape (crop, crop, 3), uint8 — channels last, as decoded; normalisation
    happens later, on the device (:class:`embedcache.backbones.Normalise`).
    """
    img = load_rgb(path, short_side=t.resize if t.jpeg_draft else None)
    w, h = img.size
    # Same arithmetic as torchvision's Resize(int) + CenterCrop on PIL images.
    if w <= h:
        nw, nh = t.resize, int(t.resize * h / w)
    else:
        nw, nh = int(t.resize * w / h), t.resize
    top = int(round((nh - t.crop) / 2.0))
    left = int(round((nw - t.crop) / 2.0))
    if (nw, nh) == (w, h):
        img = img.crop((left, top, left + t.crop, top + t.crop))
    else:
        # Resample only the source region that survives the crop: the same pixels as
        # resize-then-crop (same centres, same filter support), for about half the work.
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + t.crop) * sx, (top + t.crop) * sy)
        img = img.resize((t.crop, t.crop), _RESAMPLE[t.interpolation], box=box)
    return np.array(img, dtype=np.uint8)  # a writable copy, so torch.from_numpy can share it


AUGMENTS = ("none", "light", "strong")
_CROP_SCALE = {"light": (0.25, 1.0), "strong": (0.08, 1.0)}


def augment(
    item: tuple[str | Path, int | tuple[int, ...]], t: EvalTransform, kind: str
) -> np.ndarray:
    """Train-time view of an image, reproducible from its seed.

    ``item`` is ``(path, seed)``. ``light``: random resized crop (scale 0.25-1,
    aspect 3/4-4/3) and horizontal flip; ``strong``: crop scale 0.08-1, flip
    and colour jitter (brightness, contrast, saturation +-40%). ``none``: the
    eval transform.

    Returns
    -------
    ndarray of shape (crop, crop, 3), uint8.
    """
    path, seed = item
    if kind == "none":
        return preprocess(path, t)
    return augmented_views(path, t, kind, [seed])[0]


def augmented_views(path: str | Path, t: EvalTransform, kind: str, seeds: list) -> list[np.ndarray]:
    """One :func:`augment` view per seed, the file decoded once."""
    img = load_rgb(path, short_side=t.crop if t.jpeg_draft else None)
    return [_augmented(img, np.random.default_rng(seed), t, kind) for seed in seeds]


def _augmented(
    img: Image.Image, rng: np.random.Generator, t: EvalTransform, kind: str
) -> np.ndarray:
    w, h = img.size
    lo, hi = _CROP_SCALE[kind]
    box = None
    for _ in range(10):  # torchvision's RandomResizedCrop sampling
        area = w * h * rng.uniform(lo, hi)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (x0, y0, x0 + cw, y0 + ch)
            break
    if box is None:  # fall back to the central square
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    img = img.resize((t.crop, t.crop), _RESAMPLE[t.interpolation], box=box)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if kind == "strong":
        from PIL import ImageEnhance

        for i in rng.permutation(3):
            enhancer = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[i]
            img = enhancer(img).enhance(float(rng.uniform(0.6, 1.4)))
    return np.array(img, dtype=np.uint8)


# ---------------------------------------------------------------------------
# Views stored in a cache (extract --views)

VIEW_POLICY = "flip, then light random resized crops"


def views_for(split: str, views: int) -> int:
    """Views a cache stores per image of ``split``: all ``views`` for train, the flip alone
    for val, test and unlabelled images (what test-time averaging uses), none without --views."""
    if views <= 0:
        return 0
    return views if split == "train" else 1


def view_policy(views: int, seed: int) -> str:
    """How ``extract --views`` draws its views: part of the cache identity ("" without views)."""
    return f"{VIEW_POLICY} (scale {_CROP_SCALE['light'][0]}-1), seed {seed}" if views else ""


def view_key(seed: int, path: str) -> tuple[int, int]:
    """The seed of one image's views: from the path relative to the data root, so the same
    image gets the same views in a resumed, incremental or moved extraction."""
    return seed, zlib.crc32(name_bytes(path))


def with_views(item: tuple[str | Path, int, tuple[int, int]], t: EvalTransform) -> np.ndarray:
    """An image's eval crop followed by its ``n`` stored views: (1 + n, crop, crop, 3) uint8.

    ``item`` is ``(path, n, key)``. View 1 is the eval crop mirrored left-right; views
    2..n are :func:`augment`'s ``light`` views seeded by ``(*key, v)``.
    """
    path, n, key = item
    plain = preprocess(path, t)
    out = [plain, np.ascontiguousarray(plain[:, ::-1])][: 1 + n]
    if n > 1:
        out += augmented_views(path, t, "light", [(*key, v) for v in range(1, n)])
    return np.stack(out)


# ---------------------------------------------------------------------------
# Batches of decoded images


class _Decode(torch.utils.data.Dataset):
    """Index -> (index, uint8 HWC tensor or the reason it could not be decoded)."""

    def __init__(self, items: list, decode: Callable[..., np.ndarray]):
        self.items, self.decode = items, decode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        try:
            return i, torch.from_numpy(self.decode(self.items[i]))
        except UnreadableImage as e:
            return i, str(e)


def _collate(
    items: list[tuple[int, torch.Tensor | str]],
) -> tuple[np.ndarray, torch.Tensor | None, dict[int, str]]:
    ok = [(i, x) for i, x in items if isinstance(x, torch.Tensor)]
    failed = {i: x for i, x in items if isinstance(x, str)}
    images = torch.stack([x for _, x in ok]) if ok else None
    return np.array([i for i, _ in ok], dtype=np.int64), images, failed


def decoded_batches(
    items: list,
    batches: list[list[int]],
    decode: Callable[..., np.ndarray],
    *,
    device: torch.device,
    num_workers: int,
) -> Iterator[tuple[np.ndarray, torch.Tensor | None, dict[int, str]]]:
    """Yield ``(indices, images, failed)`` per batch of indices into ``items``.

    ``decode(items[i])`` gives one image (a path for :func:`preprocess`, a
    ``(path, seed)`` pair for :func:`augment`).

    images : uint8 tensor of shape (n_ok, H, W, 3), pinned when ``device`` is CUDA;
    failed : {index: reason} for files that could not be decoded.

    On a GPU, ``num_workers`` processes decode ahead while the GPU computes. On a
    CPU the forward pass already uses every core, and a decoder running beside
    it stalls each layer on its slowest thread; there ``num_workers`` threads
    (PIL releases the GIL) decode each batch while the model waits, which was
    faster on the 2-core machine (61 vs 54 images/s for efficientnet_lite0).
    """
    dataset = _Decode(items, decode)
    if device.type == "cuda":
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=_collate,
            num_workers=num_workers,
            pin_memory=True,
            prefetch_factor=4 if num_workers else None,
        )
        yield from loader
        return
    if num_workers <= 1:
        for batch in batches:
            yield _collate([dataset[i] for i in batch])
        return
    with ThreadPoolExecutor(num_workers, thread_name_prefix="decode") as pool:
        for batch in batches:
            yield _collate(list(pool.map(dataset.__getitem__, batch)))


# ---------------------------------------------------------------------------
# Decoding on the GPU (nvJPEG through torchvision), with the CPU path per file as fallback

JPEG_MAGIC = b"\xff\xd8\xff"


def _read(path: Path) -> bytes | str:
    """The file's bytes, or the reason they cannot be read (as :func:`load_rgb` words it)."""
    try:
        if not isinstance(path, str | os.PathLike):  # a shard member: it checks itself
            return path.read_bytes()
        _check_file(Path(path))
        return Path(path).read_bytes()
    except UnreadableImage as e:
        return str(e)
    except OSError as e:
        return os_reason(e)


def _nvjpeg(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEG bytes on ``device`` in one batch: (3, H, W) uint8 each, None where the
    decoder refused a file (the batch is retried file by file to find which)."""
    with warnings.catch_warnings():  # torchvision 0.29 points to torchcodec; decode_jpeg works
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        return _decode_jpegs(datas, device, ImageReadMode.RGB, decode_jpeg)


def _decode_jpegs(
    datas: list[bytes], device: torch.device, rgb, decode_jpeg
) -> list[torch.Tensor | None]:
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    if not tensors:
        return []
    kw = {"mode": rgb, "device": device, "apply_exif_orientation": True}
    try:
        return list(decode_jpeg(tensors, **kw))
    except Exception:  # noqa: BLE001 - whatever the GPU decoder raises, the CPU path decides
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, **kw))
            except Exception:  # noqa: BLE001
                out.append(None)
        return out


def resize_crop(img: torch.Tensor, t: EvalTransform) -> torch.Tensor:
    """:func:`preprocess` on a decoded (3, H, W) uint8 tensor, on its device: resize the short
    side to ``t.resize`` (antialiased), centre-crop ``t.crop``; returns (crop, crop, 3) uint8."""
    from torchvision.transforms.v2 import functional as F

    h, w = img.shape[-2:]
    if w <= h:
        nw, nh = t.resize, int(t.resize * h / w)
    else:
        nw, nh = int(t.resize * w / h), t.resize
    top, left = int(round((nh - t.crop) / 2.0)), int(round((nw - t.crop) / 2.0))
    if (nw, nh) != (w, h):
        img = F.resize(
            img, [nh, nw], interpolation=F.InterpolationMode(t.interpolation), antialias=True
        )
    return img[:, top : top + t.crop, left : left + t.crop].permute(1, 2, 0).contiguous()


def _cpu_fallback(path: Path, t: EvalTransform, device: torch.device) -> torch.Tensor | str:
    try:
        x = torch.from_numpy(preprocess(path, t))
    except UnreadableImage as e:
        return str(e)
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def gpu_decoded_batches(
    files: list[Path],
    batches: list[list[int]],
    t: EvalTransform,
    *,
    device: torch.device,
    num_workers: int,
) -> Iterator[tuple[np.ndarray, torch.Tensor | None, dict[int, str]]]:
    """:func:`decoded_batches` for ``preprocess`` with the JPEGs decoded, resized and cropped on
    ``device`` (nvJPEG on CUDA), a batch at a time. Files that are not JPEG, or that the GPU
    decoder refuses, go through the CPU path one by one; ``num_workers`` threads read the
    next batch's bytes while this one decodes. Images come back on ``device``."""
    if not batches:
        return
    with ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="read") as pool:
        ahead = pool.submit(lambda b=batches[0]: [_read(files[i]) for i in b])
        for k, batch in enumerate(batches):
            datas = ahead.result()
            if k + 1 < len(batches):
                ahead = pool.submit(lambda b=batches[k + 1]: [_read(files[i]) for i in b])
            yield _gpu_batch([files[i] for i in batch], batch, datas, t, device)


def _gpu_batch(
    paths: list[Path], index: list[int], datas: list, t: EvalTransform, device: torch.device
):
    failed = {k: d for k, d in enumerate(datas) if isinstance(d, str)}
    jpeg = [k for k, d in enumerate(datas) if isinstance(d, bytes) and d[:3] == JPEG_MAGIC]
    images: dict[int, torch.Tensor] = {}
    for k, img in zip(jpeg, _nvjpeg([datas[k] for k in jpeg], device), strict=True):
        if img is not None:
            images[k] = resize_crop(img, t)
    for k in range(len(paths)):
        if k not in images and k not in failed:
            x = _cpu_fallback(paths[k], t, device)
            if isinstance(x, str):
                failed[k] = x
            else:
                images[k] = x
    ok = sorted(images)
    stacked = torch.stack([images[k] for k in ok]) if ok else None
    return (
        np.array([index[k] for k in ok], np.int64),
        stacked,
        {index[k]: r for k, r in failed.items()},
    )
