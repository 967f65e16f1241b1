"""Images stored the way large data sets are: WebDataset tar shards and Parquet files.

A shard source is listed into the same :class:`~embedcache.data.ImageSet` a folder gives,
so the cache, resume, incremental runs and torchrun work on it unchanged. Each sample's
``path`` is ``SHARD/KEY`` (the shard relative to the source root, then the WebDataset
``__key__`` or the Parquet row number) and its size and mtime are the shard's: a changed or
added shard is re-read, an unchanged one reused. Rows keep the shards' order (shards as
the patterns list them, samples as stored), and batches never straddle a shard, so under
torchrun every shard is read by one rank (:func:`plan`).

Tar shards are read with the standard library: plain ustar headers (what tarfile and
webdataset write for short names) by :func:`_plain_tar`, anything else by ``tarfile``. Only
the headers and the small label members are read to list a shard; image bytes are read at
their offsets while decoding (``os.pread``, so decode threads share nothing). Parquet is read with pyarrow, one row group
at a time, at most :data:`ROW_GROUPS_HELD` groups in memory.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ExtractConfig
from .data import (
    IMAGE_EXTENSIONS,
    SPLIT_NAMES,
    SPLIT_ORDER,
    UNLABELLED,
    ImageSet,
    Sample,
    UnreadableImage,
    holdout,
)
from .data import scan as scan_files
from .errors import EmbedcacheError

LAYOUTS = {".tar": "webdataset", ".parquet": "parquet"}
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # WebDataset image extensions, in preference order
CLASS_SIDECARS = ("classes.txt", "classes.json")
SPLIT_FIELD = "split"
PATTERN_SEPARATOR = "::"  # several patterns in one DATA argument, as webdataset writes them
ROW_GROUPS_HELD = 2  # Parquet row groups of image bytes held in memory per file
SHARDS_LISTED = 4  # shard listings a rank keeps while it extracts (a million rows: ~100 MB)
INSTALL_PARQUET = "pip install 'embedcache[parquet]'"
_KEY = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # webdataset's base_plus_ext
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


# ---------------------------------------------------------------------------
# Which files a DATA argument names


def _outer_brace(pattern: str) -> tuple[int, int] | None:
    """Where the first top-level ``{...}`` of ``pattern`` starts and ends, or None."""
    start, depth = pattern.find("{"), 0
    if start < 0:
        return None
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 0:
            return start, i
    raise EmbedcacheError(f"unbalanced braces in {pattern!r}")


def _top_level_split(body: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in body:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> three names; ``{train,val}`` -> two; nested and repeated braces
    expand outermost first, left to right, as a shell does (numbers keep the first bound's width)."""
    span = _outer_brace(pattern)
    if span is None:
        return [pattern]
    body, head, tail = pattern[span[0] + 1 : span[1]], pattern[: span[0]], pattern[span[1] + 1 :]
    r = _RANGE.match(body)
    if r:
        lo, hi, width = int(r.group(1)), int(r.group(2)), len(r.group(1))
        if hi < lo:
            raise EmbedcacheError(
                f"brace range {{{body}}} in {pattern!r} counts down; write {{{r.group(2)}..{r.group(1)}}}"
            )
        choices = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    else:
        choices = _top_level_split(body)
    return [x for c in choices for x in expand_braces(head + c + tail)]


def _matches(pattern: str, base: Path | None) -> list[Path]:
    """The files one pattern names: brace expansion, then a glob for each name with ``*?[``."""
    found: list[Path] = []
    for name in expand_braces(pattern):
        p = Path(name) if base is None or Path(name).is_absolute() else base / name
        if glob.has_magic(str(p)):
            found += sorted(Path(g) for g in glob.glob(str(p), recursive=True) if Path(g).is_file())
        elif p.is_file():
            found.append(p)
        else:
            raise EmbedcacheError(f"shard {p} (from {pattern!r}) does not exist; check the pattern")
    if not found:
        raise EmbedcacheError(f"no files match {pattern!r}; expected .tar shards or .parquet files")
    return found


def _folder_files(folder: Path) -> list[Path]:
    """A folder given as DATA: its .tar or .parquet files, if it holds them and no images
    (only its own entries are looked at, so an image folder costs no extra walk)."""
    entries = sorted(p for p in folder.iterdir() if p.is_file())
    files = [p for p in entries if p.suffix in LAYOUTS]
    return files if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in entries) else []


def is_shard_source(data, split_shards: str | None = None) -> bool:
    """Whether ``data`` names tar shards or Parquet files (else a folder or CSV manifest)."""
    if split_shards or isinstance(data, list | tuple):
        return True
    p = Path(str(data))
    if p.is_dir():
        return bool(_folder_files(p))
    if p.exists():
        return p.suffix in LAYOUTS
    return PATTERN_SEPARATOR in str(data) or glob.has_magic(str(data)) or "{" in str(data)


def _split_patterns(split_shards: str) -> list[tuple[str, str]]:
    pairs = []
    for part in split_shards.split(","):
        name, sep, pattern = part.partition("=")
        split = SPLIT_NAMES.get(name.strip().lower())
        if not sep or not split or not pattern.strip():
            raise EmbedcacheError(
                f"--split-shards takes train=PATTERN,val=PATTERN[,test=PATTERN], got {part!r}"
            )
        pairs.append((split, pattern.strip()))
    return pairs


def shard_files(data, split_shards: str | None = None) -> tuple[Path, list[tuple[Path, str]]]:
    """The source root and its shards in order, each with the split its pattern gives ("" if
    none). With ``split_shards`` the patterns are relative to ``data``, a folder."""
    if split_shards:
        base = Path(str(data))
        if not base.is_dir():
            raise EmbedcacheError(
                f"with --split-shards DATA is the folder the patterns are relative to; {base} is not a folder"
            )
        listed = [(p, s) for s, pat in _split_patterns(split_shards) for p in _matches(pat, base)]
    else:
        patterns = (
            list(data) if isinstance(data, list | tuple) else str(data).split(PATTERN_SEPARATOR)
        )
        listed = []
        for pat in patterns:
            p = Path(pat)
            files = _folder_files(p) if p.is_dir() else _matches(pat, None)
            if not files:
                raise EmbedcacheError(f"folder {p} holds no .tar or .parquet files")
            listed += [(f, "") for f in files]
    seen, unique = set(), []
    for p, split in listed:  # a shard named by two patterns is read once, for the first
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append((p.resolve(), split))
    kinds = {LAYOUTS.get(p.suffix) for p, _ in unique}
    if None in kinds or len(kinds) > 1:
        raise EmbedcacheError(
            f"shard sources are .tar files or .parquet files, not a mix; got {', '.join(sorted({p.suffix or p.name for p, _ in unique}))}"
        )
    root = Path(os.path.commonpath([p.parent for p, _ in unique]))
    return root, unique


# ---------------------------------------------------------------------------
# Members: the bytes of one image inside a shard, read when it is decoded


@dataclass(slots=True)  # a million of them: no frozen-dataclass __init__
class TarMember:
    """An image member of a tar shard: ``size`` bytes at ``offset`` of ``shard``."""

    shard: Path
    offset: int
    size: int

    def read_bytes(self) -> bytes:
        if self.size == 0:
            raise UnreadableImage("empty member (0 bytes)")
        try:
            fd = os.open(self.shard, os.O_RDONLY)
            try:
                data = os.pread(fd, self.size, self.offset)
            finally:
                os.close(fd)
        except OSError as e:
            from .data import os_reason

            raise UnreadableImage(os_reason(e)) from None
        if len(data) < self.size:
            raise UnreadableImage("truncated member (the shard ends inside it)")
        return data


@dataclass(slots=True)  # a million of them: no frozen-dataclass __init__
class Broken:
    """A sample that cannot be read at all; decoding it skips it with ``reason``."""

    reason: str

    def read_bytes(self) -> bytes:
        raise UnreadableImage(self.reason)


class ParquetImages:
    """The image column of one Parquet file, read a row group at a time; at most
    :data:`ROW_GROUPS_HELD` groups are held, so memory stays bounded on any file size."""

    def __init__(self, path: Path, column: str):
        self.path, self.column = path, column
        self._lock = threading.Lock()
        self._held: OrderedDict[int, object] = OrderedDict()
        self._file = None

    def _group(self, group: int):
        with self._lock:  # decode threads ask for the same group at once: one reads it
            if group in self._held:
                self._held.move_to_end(group)
                return self._held[group]
            import pyarrow.parquet as pq

            if self._file is None:
                self._file = pq.ParquetFile(self.path)
            col = self._file.read_row_group(group, columns=[self.column]).column(0).combine_chunks()
            if hasattr(col.type, "get_field_index"):  # the {bytes, path} struct `datasets` writes
                col = col.field("bytes")
            self._held[group] = col
            while len(self._held) > ROW_GROUPS_HELD:
                self._held.popitem(last=False)
            return col

    @property
    def held(self) -> int:
        """Row groups in memory now."""
        return len(self._held)

    def read(self, group: int, index: int) -> bytes:
        try:
            value = self._group(group)[index].as_py()
        except Exception as e:  # noqa: BLE001 - a damaged page raises whatever pyarrow raises
            raise UnreadableImage(f"cannot read row group {group}: {str(e)[:40]}") from None
        if value is None:
            raise UnreadableImage("no image bytes (null)")
        if not value:
            raise UnreadableImage("empty image bytes (0 bytes)")
        return value


@dataclass(slots=True)  # a million of them: no frozen-dataclass __init__
class ParquetMember:
    """Row ``index`` of row group ``group`` in a Parquet file."""

    images: ParquetImages
    group: int
    index: int

    def read_bytes(self) -> bytes:
        return self.images.read(self.group, self.index)


# ---------------------------------------------------------------------------
# Listing one shard


@dataclass(slots=True)  # a million of them: no frozen-dataclass __init__
class Entry:
    """One sample of a shard: its key, where its image is, its raw label and split ("" if none)."""

    key: str
    member: TarMember | ParquetMember | Broken
    label: int | str | None = None
    split: str = ""


def _name_split(path: Path) -> str:
    """train-000001.tar, validation-00000-of-00001.parquet: the split a file's name gives."""
    return SPLIT_NAMES.get(re.split(r"[-_.]", path.name, maxsplit=1)[0].lower(), "")


def _sample_split(value, where: str) -> str:
    if value is None or value == "":
        return ""
    split = SPLIT_NAMES.get(str(value).strip().lower())
    if split is None:
        raise EmbedcacheError(f"{where}: split must be train, val or test, got {value!r}")
    return split


def _tar_label(parts: dict, label_key: str | None, where: str) -> tuple[object, str, str]:
    """(raw label, split, problem) of one WebDataset sample from its .cls and .json members."""
    meta = {}
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except (ValueError, UnicodeDecodeError):
            return None, "", "damaged .json member"
        meta = meta if isinstance(meta, dict) else {}
    split = _sample_split(meta.get(SPLIT_FIELD), where)
    if label_key and label_key in meta:
        label = meta[label_key]
        ok = isinstance(label, str) or (isinstance(label, int) and not isinstance(label, bool))
        return (
            (label, split, "")
            if ok
            else (None, split, f"label {label_key!r} is not an int or name")
        )
    if "cls" in parts:
        try:
            return int(parts["cls"].decode().strip()), split, ""
        except (ValueError, UnicodeDecodeError):
            return None, split, "label .cls is not a whole number"
    return None, split, ""


class _NotPlainTar(Exception):
    """A header the fast reader leaves to tarfile: pax, GNU long names, base-256 sizes, v7."""


_ZERO_BLOCK = bytes(512)


def _plain_tar(f, size: int) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file of a plain ustar archive (what tarfile and
    webdataset write for short ASCII names): 8x faster than tarfile, which parses every field."""
    offset = 0
    while offset + 512 <= size:
        f.seek(offset)
        buf = f.read(512)
        if buf == _ZERO_BLOCK:
            return
        kind = buf[156:157]
        if buf[257:262] != b"ustar" or kind in (b"x", b"g", b"L", b"K") or buf[124] & 0x80:
            raise _NotPlainTar
        stored = buf[148:156].split(b"\0", 1)[0].strip()
        if not stored.isdigit() or int(stored, 8) != sum(buf) - sum(buf[148:156]) + 256:
            raise _NotPlainTar  # tarfile decides: a signed checksum, or a damaged header
        n = int(buf[124:136].strip(b"\0 ") or b"0", 8)
        name, prefix = buf[:100].split(b"\0", 1)[0], buf[345:500].split(b"\0", 1)[0]
        if kind in (b"0", b"\0", b"7"):
            full = prefix + b"/" + name if prefix else name
            yield full.decode("utf-8", "surrogateescape"), offset + 512, n
        offset += 512 + (n + 511) // 512 * 512
    if offset > size:
        raise tarfile.ReadError("unexpected end of data")


def _any_tar(f, size: int) -> Iterator[tuple[str, int, int]]:
    """:func:`_plain_tar` for every tar format, through tarfile."""
    with tarfile.open(fileobj=f, mode="r:") as tf:
        while (info := tf.next()) is not None:
            tf.members.clear()  # tarfile keeps every header it read: a million, otherwise
            if info.isfile():
                yield info.name, info.offset_data, info.size


def _tar_members(path: Path) -> tuple[OrderedDict, str]:
    """Members grouped by key: {key: {ext: TarMember, or the bytes of .cls/.json}}, and why the
    listing stopped early ("" if it did not)."""
    try:
        return _grouped(path, _plain_tar)
    except _NotPlainTar:
        return _grouped(path, _any_tar)


def _grouped(path: Path, members) -> tuple[OrderedDict, str]:
    groups: OrderedDict[str, dict] = OrderedDict()
    try:
        with open(path, "rb") as f:
            for name, offset, size in members(f, os.fstat(f.fileno()).st_size):
                m = _KEY.match(name)
                if not m:
                    continue
                key, ext = m.group(1), m.group(2).lower()
                parts = groups.setdefault(key, {})
                if ext in IMAGE_MEMBERS:
                    parts.setdefault(ext, TarMember(path, offset, size))
                elif ext in ("cls", "json") and size < 1 << 20:
                    f.seek(offset)
                    parts[ext] = f.read(size)
    except (tarfile.TarError, OSError, EOFError) as e:
        what = "not a tar file" if not groups else f"damaged after {len(groups)} samples"
        return groups, f"{what} ({str(e)[:40]})"
    return groups, ""


def list_tar(path: Path, *, label_key: str | None = None) -> list[Entry]:
    """The samples of one WebDataset shard, in the order stored. A shard that cannot be read
    (or read to its end) ends with an entry of key "" that is skipped with the reason."""
    groups, damage = _tar_members(path)
    entries = []
    for key, parts in groups.items():
        image = next((parts[e] for e in IMAGE_MEMBERS if e in parts), None)
        if image is None:
            continue  # a key without an image member (captions alone, ...) is not a sample
        label, split, problem = _tar_label(parts, label_key, f"{path.name} {key}")
        entries.append(Entry(key, Broken(problem) if problem else image, label, split))
    if damage:
        entries.append(Entry("", Broken(f"damaged shard: {damage}")))
    return entries


def _hf_class_names(schema, column: str) -> list[str] | None:
    """Class names a `datasets` ClassLabel column carries in the file's metadata, if any."""
    try:
        info = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
        feature = info.get("info", {}).get("features", {}).get(column, {})
    except (ValueError, AttributeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else None


def _parquet_file(path: Path, image_column: str):
    """The opened file, or the reason it cannot be read; a missing image column is an error."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EmbedcacheError(f"reading Parquet needs pyarrow: {INSTALL_PARQUET}") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        return f"not a Parquet file ({str(e)[:40]})"
    if image_column not in pf.schema_arrow.names:
        raise EmbedcacheError(
            f"{path} has no column {image_column!r} (columns: {', '.join(pf.schema_arrow.names)}); pass --image-column"
        )
    return pf


def list_parquet(
    path: Path, *, image_column: str = "image", label_column: str = "label"
) -> tuple[list[Entry], list[str] | None]:
    """The rows of one Parquet file (key: the row number) and the class names its metadata
    gives. Labels and splits are read a row group at a time; image bytes only when decoded."""
    pf = _parquet_file(path, image_column)
    if isinstance(pf, str):
        return [Entry("", Broken(f"damaged shard: {pf}"))], None
    names = pf.schema_arrow.names
    columns = [c for c in (label_column, SPLIT_FIELD) if c in names and c != image_column]
    images, entries = ParquetImages(path, image_column), []
    for group in range(pf.num_row_groups):
        try:
            table = pf.read_row_group(group, columns=columns).to_pydict() if columns else {}
        except Exception as e:  # noqa: BLE001
            entries.append(Entry("", Broken(f"damaged shard: row group {group} ({str(e)[:40]})")))
            return entries, None
        n = pf.metadata.row_group(group).num_rows
        labels = table.get(label_column, [None] * n)
        splits = table.get(SPLIT_FIELD, [""] * n)
        for i in range(n):
            where = f"{path.name} row {len(entries)}"
            label = labels[i] if isinstance(labels[i], int | str) else None
            entry = Entry(
                str(len(entries)),
                ParquetMember(images, group, i),
                label,
                _sample_split(splits[i], where),
            )
            entries.append(entry)
    return entries, _hf_class_names(pf.schema_arrow, label_column)


def list_shard(path: Path, cfg: ExtractConfig) -> tuple[list[Entry], list[str] | None]:
    """The samples of one tar shard or Parquet file, and class names it carries (or None)."""
    if path.suffix == ".parquet":
        return list_parquet(path, image_column=cfg.image_column, label_column=cfg.label_column)
    return list_tar(path, label_key=cfg.label_key), None


# ---------------------------------------------------------------------------
# A shard source as an ImageSet


def _sidecar(root: Path) -> list[str] | None:
    """Class names from classes.txt (one a line) or classes.json (a list) in the source root."""
    for name in CLASS_SIDECARS:
        p = root / name
        if p.is_file():
            text = p.read_text(encoding="utf-8")
            names = json.loads(text) if name.endswith(".json") else text.splitlines()
            return [str(n).strip() for n in names if str(n).strip()]
    return None


def _classes(raw: list, known: list[str] | None) -> tuple[list[str], np.ndarray]:
    """Class names and label indices (-1: unlabelled) from raw labels: ints index ``known``
    names (or 0..max without them), strings are names (sorted, or ``known``'s order)."""
    labelled = [x for x in raw if x is not None]
    if not labelled:
        return [], np.full(len(raw), UNLABELLED, np.int64)
    if all(isinstance(x, str) for x in labelled):
        names = known or sorted(set(labelled))
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(labelled) - set(index))
        if unknown:
            raise EmbedcacheError(
                f"labels {', '.join(unknown[:3])} are not in the class list ({', '.join(CLASS_SIDECARS)} or the file's metadata); add them there"
            )
        return names, np.array([index[x] if x is not None else UNLABELLED for x in raw], np.int64)
    if not all(isinstance(x, int) for x in labelled):
        raise EmbedcacheError("labels mix numbers and names; use one kind in every shard")
    top = max(labelled)
    names = known or [str(i) for i in range(top + 1)]
    if min(labelled) < 0 or top >= len(names):
        raise EmbedcacheError(
            f"label {top if top >= len(names) else min(labelled)} is outside the {len(names)} class names; fix the labels or the class list"
        )
    return names, np.array([UNLABELLED if x is None else x for x in raw], np.int64)


def _splits(
    rows: list[tuple[Sample, str, bool]], has_classes: bool, cfg: ExtractConfig
) -> dict[str, list[Sample]]:
    """Rows by split, in source order; unsplit labelled rows get the seeded holdout of
    :func:`embedcache.data.holdout` when no row says train (as a CSV manifest's do)."""
    out: dict[str, list[Sample]] = {}
    unsplit = [(s, broken) for s, split, broken in rows if not split]
    for s, split, _ in rows:
        if split:
            out.setdefault(split, []).append(s)
    readable = [s for s, broken in unsplit if not broken]
    if (
        has_classes
        and readable
        and "train" not in out
        and all(s.label != UNLABELLED for s in readable)
    ):
        labels = np.array([s.label for s in readable])
        train, val = holdout(
            [s.path for s in readable], labels, fraction=cfg.val_fraction, seed=cfg.seed
        )
        out["train"] = [readable[i] for i in train] + [s for s, broken in unsplit if broken]
        if len(val):
            out["val"] = [readable[i] for i in val]
    elif unsplit:
        out.setdefault("train" if has_classes else "all", []).extend(s for s, _ in unsplit)
    return {k: out[k] for k in SPLIT_ORDER if k in out}


def scan(data, cfg: ExtractConfig) -> ImageSet:
    """List ``data`` for ``extract``: tar shards or Parquet files (see :func:`is_shard_source`),
    else a folder or CSV manifest through :func:`embedcache.data.scan`."""
    if not is_shard_source(data, cfg.split_shards):
        return scan_files(
            data, val_fraction=cfg.val_fraction, seed=cfg.seed, unlabelled=cfg.unlabelled
        )
    root, shards = shard_files(data, cfg.split_shards)
    layout = LAYOUTS[shards[0][0].suffix]
    listed, raw, known = [], [], _sidecar(root)
    for path, split in shards:
        st, rel, by_name = path.stat(), path.relative_to(root).as_posix(), _name_split(path)
        entries, names = list_shard(path, cfg)
        known = known or names
        for e in entries:
            where = (split or e.split or by_name, isinstance(e.member, Broken))
            listed.append((f"{rel}/{e.key}", st.st_size, st.st_mtime_ns, *where))
            raw.append(None if cfg.unlabelled else e.label)
    classes, labels = _classes(raw, known)
    rows = [
        (Sample(path, y, size, mtime), split, broken)
        for (path, size, mtime, split, broken), y in zip(listed, labels.tolist(), strict=True)
    ]
    if not rows:
        raise EmbedcacheError(
            f"no samples with a {'/'.join(IMAGE_MEMBERS)} member in {len(shards)} shards under {root}"
        )
    return ImageSet(root, layout, classes, _splits(rows, bool(classes), cfg))


# ---------------------------------------------------------------------------
# The work of one rank: whole shards, batches that never straddle one


def is_shard_layout(layout: str) -> bool:
    """Whether a cache's ``layout`` attribute says its rows come from shards."""
    return layout in LAYOUTS.values()


def shard_of(path: str, layout: str) -> str:
    """The shard part of a row's path (``SHARD/KEY``)."""
    suffix = next(s for s, name in LAYOUTS.items() if name == layout) + "/"
    return path[: path.index(suffix) + len(suffix) - 1]


class Members(Sequence):
    """Row ``i`` of ``flat`` -> its member, each shard listed the first time one of its rows
    is asked for (so the first batch waits for one shard's listing, not all of them); the
    last :data:`SHARDS_LISTED` listings are kept."""

    def __init__(self, root: Path, layout: str, names: list[str], cfg: ExtractConfig):
        self.root, self.layout, self.names, self.cfg = root, layout, names, cfg
        self._shards: OrderedDict[str, dict[str, object]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        name = self.names[i]
        shard = shard_of(name, self.layout)
        with self._lock:  # rows come shard after shard: the last few listings are enough
            if shard not in self._shards:
                entries, _ = list_shard(self.root / shard, self.cfg)
                self._shards[shard] = {e.key: e.member for e in entries}
                while len(self._shards) > SHARDS_LISTED:
                    self._shards.popitem(last=False)
            members = self._shards[shard]
        gone = Broken("not in the shard any more (it changed while extracting)")
        return members.get(name[len(shard) + 1 :], gone)


def plan(
    attrs,
    todo: dict[str, np.ndarray],
    paths: dict[str, list[str]],
    *,
    batch_size: int,
    rank: int,
    world: int,
    cfg: ExtractConfig,
) -> tuple[list, list[list[int]], Members]:
    """This rank's work on a shard source: (flat, batches, members).

    flat : (split, row) of every row to do; batches : this rank's, lists of indices into
    flat, each ``batch_size`` rows of one shard counted from its first row (so a shard
    of n rows makes n // batch_size full batches and one more, the same in a resumed run as in
    an uninterrupted one, and few batch shapes); members : flat index -> member.
    Shards go to ranks whole and in order, each to the rank whose even share of the rows
    to do holds the shard's middle row.
    """
    layout = str(attrs["layout"])
    flat, batches, units, last = [], [], [], None
    for split, rows in todo.items():
        names = paths[split]
        first: dict[str, int] = {}  # a shard's first row in the split: where its batches start
        for r, name in enumerate(names):
            first.setdefault(shard_of(name, layout), r)
        for r in rows.tolist():
            shard = shard_of(names[r], layout)
            at = (split, shard, (r - first[shard]) // batch_size)
            if at != last:
                batches.append([])
                units.append(at[1])
                last = at
            batches[-1].append(len(flat))
            flat.append((split, r))
    sizes: dict[str, int] = {}
    for unit, batch in zip(units, batches, strict=True):
        sizes[unit] = sizes.get(unit, 0) + len(batch)
    owner, start = {}, 0
    for unit, n in sizes.items():
        owner[unit] = (2 * start + n) * world // (2 * len(flat))  # by its middle row
        start += n
    mine = [b for b, unit in zip(batches, units, strict=True) if owner[unit] == rank]
    names = [paths[s][r] for s, r in flat]
    return flat, mine, Members(Path(str(attrs["source"])), layout, names, cfg)
