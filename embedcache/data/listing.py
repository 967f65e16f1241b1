"""Listing a data source: image folders and CSV manifests as an :class:`ImageSet` of samples.

Nothing here writes to the user's data: files are only listed and stat'ed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EmbedcacheError
from .csvfile import csv_rows
from .decode import os_reason
from .splits import holdout_note, name_bytes, stratified_split

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


def _file_identity(path: str) -> object:
    """What tells one file from another however it is named: its device and inode (a link, a
    hard link, ``../`` or an absolute path all reach the same), its real path where the
    filesystem numbers no inodes, its name where it cannot be stat'ed. A stat, not
    ``os.path.realpath``, which costs an lstat per path component: 17 against 2.6 us a file."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return path
    return (st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(path)


def _once_each(csv_path: Path, root: Path, entries: list) -> list:
    """``entries`` (line, path, label, split) as (path, label, split), each path in one form
    (``./a.jpg`` is ``a.jpg``). A file listed twice (with two labels it would be in two
    classes, or train and val), under one name or two (a link to it), is an error that names
    both lines."""
    seen: dict[object, tuple[int, str, str]] = {}  # file -> line, path, normalised path
    out = []
    for lineno, path, label, split in entries:
        key = os.path.normpath(root / path)
        real = _file_identity(key)
        if real in seen and seen[real][2] == key:
            raise EmbedcacheError(
                f"{csv_path} lists {path} twice (lines {seen[real][0]} and {lineno}); "
                "list each file once, with one label"
            )
        if real in seen:
            first, name, _ = seen[real]
            raise EmbedcacheError(
                f"{csv_path} lists one file under two names (a link, or another path to it): "
                f"{name} (line {first}) and {path} (line {lineno}); list each file once, with "
                "one label"
            )
        seen[real] = (lineno, path, key)
        rel = Path(key).relative_to(root).as_posix() if Path(key).is_relative_to(root) else path
        out.append((rel, label, split))
    return out


def _entries(csv_path: Path, rows: list[tuple[int, list[str]]]) -> list:
    """(line, path, label, split) of a manifest's rows (see :func:`csv_rows`), checked."""
    header = [c.strip().lower() for c in rows[0][1]]
    if "path" in header:
        rows = rows[1:]
        col = {name: header.index(name) for name in ("path", "label", "split") if name in header}
    else:
        col = {name: i for i, name in enumerate(("path", "label", "split")[: len(header)])}
    entries = []
    for lineno, r in rows:
        try:
            path = r[col["path"]].strip()
            label = r[col["label"]].strip() if "label" in col else ""
            split = r[col["split"]].strip().lower() if "split" in col else ""
        except IndexError:
            raise EmbedcacheError(
                f"{csv_path} line {lineno} has {len(r)} columns; expected path,label[,split]"
            ) from None
        if not path:
            raise EmbedcacheError(
                f"{csv_path} line {lineno} has an empty path; give each row an image path"
            )
        if split and split not in SPLIT_NAMES:
            raise EmbedcacheError(
                f"{csv_path} line {lineno}: split must be train, val or test, got {split!r}"
            )
        entries.append((lineno, path, label, SPLIT_NAMES.get(split, "")))
    return entries


def _scan_csv(csv_path: Path, *, val_fraction: float, seed: int) -> ImageSet:
    root = csv_path.parent.resolve()
    rows = csv_rows(csv_path, f"CSV manifest {csv_path}")
    if not rows:
        raise EmbedcacheError(
            f"CSV manifest {csv_path} is empty; expected rows of path,label[,split]"
        )
    entries = _once_each(csv_path, root, _entries(csv_path, rows))
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
    if not source.is_file() and not source.is_dir():  # reading a FIFO would wait for a writer
        raise EmbedcacheError(
            f"data path {source} is not a folder or a regular file (a pipe or a device); "
            "pass an image folder or a CSV manifest"
        )
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise EmbedcacheError(
                f"data path {source} is a file but not a .csv manifest; "
                "pass a folder or a CSV of path,label[,split]"
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
