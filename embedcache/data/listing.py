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

import numpy as np

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
LABEL_SEPARATOR = "|"  # between the labels of one image in a CSV field: beach|sunset


@dataclass(frozen=True)
class Sample:
    """One image file: ``path`` relative to the source root (POSIX), its label and stat.

    In a multi-label source ``labels`` holds every class index of the image in the order
    listed (maybe none) and ``label`` is the first of them (-1 when none); else None.
    """

    path: str
    label: int
    size: int
    mtime_ns: int
    labels: tuple[int, ...] | None = None

    @property
    def label_set(self) -> tuple[int, ...]:
        """Every class index of the image: ``labels``, else ``label`` alone (none if -1)."""
        if self.labels is not None:
            return self.labels
        return () if self.label == UNLABELLED else (self.label,)

    @property
    def labelled(self) -> bool:
        """Whether the source labels the image (in a multi-label source, maybe with none)."""
        return self.labels is not None or self.label != UNLABELLED


@dataclass
class ImageSet:
    """A listed data source: classes and, per split, samples sorted by path."""

    root: Path
    layout: str
    classes: list[str]
    splits: dict[str, list[Sample]]
    ignored: list[str] = field(default_factory=list)  # files of other kinds, not read
    unreadable: dict[str, str] = field(default_factory=dict)  # folders not listed: reason
    multi_label: bool = False  # several labels per image (see Sample.labels)

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
        """A digest of every (split, path, size, mtime, label, and the label set of a
        multi-label source): changes when any file or label does."""
        h = hashlib.sha256()
        for split in self.splits:
            for s in self.splits[split]:
                line = f"{split}\t{s.path}\t{s.size}\t{s.mtime_ns}\t{s.label}"
                if self.multi_label:
                    line += "\t" + ",".join(map(str, s.label_set))
                h.update(name_bytes(line + "\n"))
        return h.hexdigest()

    def class_counts(self) -> np.ndarray:
        """Images listed per class, int64 of shape (n_classes,); an image of several classes
        counts in each."""
        counts = np.zeros(len(self.classes), np.int64)
        for samples in self.splits.values():
            ids = [c for s in samples for c in s.label_set]
            counts += np.bincount(np.asarray(ids, np.int64), minlength=len(self.classes))
        return counts


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _stat_sample(
    root: Path, path: Path, label: int, labels: tuple[int, ...] | None = None
) -> Sample:
    try:
        st = path.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    except OSError:  # listed in a manifest but absent: recorded as skipped later
        size, mtime = -1, -1
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    return Sample(rel, label, size, mtime, labels)


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


def _once_each(csv_path: Path, root: Path, entries: list, multi: bool) -> list:
    """``entries`` (line, path, label, split) as (path, label, split), each path in one form
    (``./a.jpg`` is ``a.jpg``). A file listed twice (with two labels it would be in two
    classes, or train and val), under one name or two (a link to it), is an error that names
    both lines; in a multi-label manifest (``multi``: labels are tuples of names) the rows of
    one path in one split give it the labels of them all."""
    seen: dict[object, tuple[int, str, str]] = {}  # file -> line, path, normalised path
    out: dict[object, tuple] = {}  # file -> path, label, split, line
    for lineno, path, label, split in entries:
        key = os.path.normpath(root / path)
        real = _file_identity(key)
        if real in seen and seen[real][2] == key and multi:
            out[real] = _merged(csv_path, path, out[real], (label, split, lineno))
            continue
        if real in seen and seen[real][2] == key:
            raise EmbedcacheError(
                f"{csv_path} lists {path} twice (lines {seen[real][0]} and {lineno}); "
                "list each file once, with one label, or pass --multi-label if an image has "
                "several labels"
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
        out[real] = (rel, label, split, lineno)
    return [(rel, label, split) for rel, label, split, _ in out.values()]


def _merged(csv_path: Path, path: str, first: tuple, again: tuple) -> tuple:
    """A multi-label manifest's (path, labels, split, line) of ``path`` with the labels of a
    later row of it, ``again`` (labels, split, line), added: that row must name the same split."""
    rel, labels, split, line = first
    more, other, lineno = again
    if other != split:
        raise EmbedcacheError(
            f"{csv_path} lists {path} in {split or 'no split'} (line {line}) and in "
            f"{other or 'no split'} (line {lineno}); an image belongs to one split: give its "
            "rows the same split"
        )
    return rel, tuple(dict.fromkeys(labels + more)), split, line


def _label_names(text: str) -> tuple[str, ...]:
    """The labels of a multi-label field (``beach|sunset``), each once, in the order given."""
    return tuple(dict.fromkeys(n.strip() for n in text.split(LABEL_SEPARATOR) if n.strip()))


def _columns(csv_path: Path, header: list[str], multi_label: bool) -> tuple[dict, bool]:
    """(column of path, label, split, whether labels are sets) of a manifest's first row: a
    header naming them (``labels``: several a field, separated by |), else path,label,split."""
    if "path" not in header:
        positions = ("path", "label", "split")[: len(header)]
        return {name: i for i, name in enumerate(positions)}, multi_label
    if "label" in header and "labels" in header:
        raise EmbedcacheError(
            f"{csv_path} has both a label and a labels column; keep one (labels: every label "
            f"of an image in one field, separated by {LABEL_SEPARATOR})"
        )
    names = ("path", "label", "labels", "split")
    col = {name: header.index(name) for name in names if name in header}
    multi = multi_label or "labels" in col
    if "labels" in col:
        col["label"] = col.pop("labels")
    return col, multi


def _entries(
    csv_path: Path, rows: list[tuple[int, list[str]]], multi_label: bool
) -> tuple[list, bool]:
    """((line, path, label, split) of a manifest's rows (see :func:`csv_rows`), checked, and
    whether it is multi-label: then each label is a tuple of names)."""
    header = [c.strip().lower() for c in rows[0][1]]
    col, multi = _columns(csv_path, header, multi_label)
    if "path" in header:
        rows = rows[1:]
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
        entries.append((lineno, path, _label_names(label) if multi else label, split))
    return [(n, p, y, SPLIT_NAMES.get(s, "")) for n, p, y, s in entries], multi


def _scan_csv(csv_path: Path, *, val_fraction: float, seed: int, multi_label: bool) -> ImageSet:
    root = csv_path.parent.resolve()
    rows = csv_rows(csv_path, f"CSV manifest {csv_path}")
    if not rows:
        raise EmbedcacheError(
            f"CSV manifest {csv_path} is empty; expected rows of path,label[,split]"
        )
    entries, multi = _entries(csv_path, rows, multi_label)
    entries = _once_each(csv_path, root, entries, multi)
    classes = sorted({n for _, y, _ in entries for n in (y if multi else (y,)) if n})
    multi = multi and bool(classes)  # not one label: an unlabelled manifest
    index = {c: i for i, c in enumerate(classes)}
    samples: dict[str, list[Sample]] = defaultdict(list)
    for path, label, split in entries:
        if multi:
            ids = tuple(index[n] for n in label)
            s = _stat_sample(root, root / path, ids[0] if ids else UNLABELLED, ids)
        else:
            s = _stat_sample(root, root / path, index.get(label, UNLABELLED))
        samples[split].append(s)
    unsplit = samples.pop("", [])
    splits = {k: v for k, v in samples.items()}
    if unsplit:
        if classes and all(s.labelled for s in unsplit) and "train" not in splits:
            splits.update(stratified_split(unsplit, val_fraction=val_fraction, seed=seed))
        else:
            splits.setdefault("train" if classes else "all", []).extend(unsplit)
    ordered = {k: sorted(splits[k], key=lambda s: s.path) for k in SPLIT_ORDER if k in splits}
    return ImageSet(root, "csv", classes, ordered, [], multi_label=multi)


def scan(
    source: str | Path,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    unlabelled: bool = False,
    multi_label: bool = False,
) -> ImageSet:
    """List the images of a data source.

    Parameters
    ----------
    source : a folder (``root/train/<class>/*``, ``root/<class>/*`` or a flat
        folder of images) or a CSV manifest with columns ``path,label[,split]``
        (paths relative to the CSV), or ``path,labels[,split]`` with several labels an
        image separated by ``|`` (multi-label).
    val_fraction : fraction of each class held out as ``val`` when the source
        has no split of its own (seeded, stratified, stable as images are added).
    unlabelled : treat a folder as unlabelled even if it has sub-folders.
    multi_label : a CSV manifest may list a path on several rows (one split), and ``|``
        separate labels in a field: each image gets every label of its rows.
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
        images = _scan_csv(source, val_fraction=val_fraction, seed=seed, multi_label=multi_label)
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
