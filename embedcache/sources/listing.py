"""A shard source as an :class:`~embedcache.data.ImageSet`: rows ``SHARD/KEY`` in the shards'
order, class names, splits."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..config import ExtractConfig
from ..data.listing import SPLIT_NAMES, SPLIT_ORDER, UNLABELLED, ImageSet, Sample
from ..data.listing import scan as scan_files
from ..data.splits import holdout
from ..errors import EmbedcacheError
from .base import Broken, Entry
from .parquet import list_parquet
from .patterns import LAYOUTS, is_shard_source, shard_files
from .tar import IMAGE_MEMBERS, list_tar

CLASS_SIDECARS = ("classes.txt", "classes.json")


# Integer labels without class names are named 0..max: a label past this is a mistake, not a
# class (ImageNet-21k has 21,841), and naming 0..10^12 would run out of memory.
MAX_CLASSES = 100_000


def _name_split(path: Path) -> str:
    """train-000001.tar, validation-00000-of-00001.parquet: the split a file's name gives."""
    return SPLIT_NAMES.get(re.split(r"[-_.]", path.name, maxsplit=1)[0].lower(), "")


def list_shard(path: Path, cfg: ExtractConfig) -> tuple[list[Entry], list[str] | None]:
    """The samples of one tar shard or Parquet file, and class names it carries (or None)."""
    if path.stat().st_size == 0:
        return [Entry("", Broken("empty shard (0 bytes)"))], None
    if path.suffix == ".parquet":
        return list_parquet(
            path,
            image_column=cfg.image_column,
            label_column=cfg.label_column,
            unlabelled=cfg.unlabelled,
        )
    return list_tar(path, label_key=cfg.label_key, unlabelled=cfg.unlabelled), None


def _sidecar_names(p: Path) -> list:
    """The raw names of a classes.txt (one a line) or classes.json (a list of names)."""
    try:
        text = p.read_text(encoding="utf-8-sig")  # -sig: a BOM is not part of the first name
    except UnicodeDecodeError as e:
        raise EmbedcacheError(
            f"{p} is not UTF-8 text (byte {e.start}); save it as UTF-8, one class name a line"
        ) from None
    except OSError as e:
        raise EmbedcacheError(f"cannot read {p}: {e.strerror or e}") from None
    if p.suffix != ".json":
        lines = text.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()  # a blank line at the end is not a class
        return lines
    try:
        names = json.loads(text)
    except ValueError as e:
        raise EmbedcacheError(
            f"{p} is not JSON ({str(e)[:60]}); it must hold a list of class names, "
            'e.g. ["cat", "dog"]'
        ) from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        got = (
            next((n for n in names if not isinstance(n, str)), None)
            if isinstance(names, list)
            else names
        )
        raise EmbedcacheError(
            f'{p} must hold a list of class names (strings), e.g. ["cat", "dog"]; '
            f"it holds {type(names).__name__} {_short(got)}"
        )
    return names


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _sidecar(root: Path) -> list[str] | None:
    """Class names from classes.txt (one a line) or classes.json (a list) in the source root;
    a name's place is its class index, so a blank or repeated name is an error."""
    for name in CLASS_SIDECARS:
        p = root / name
        if p.is_file():
            names = [str(n).strip() for n in _sidecar_names(p)]
            blank = next((i for i, n in enumerate(names) if not n), None)
            if blank is not None:
                raise EmbedcacheError(
                    f"class {blank} in {p} is blank; give one name for each class index, in order"
                )
            seen: set[str] = set()
            twice = next((n for n in names if n in seen or seen.add(n)), None)
            if twice is not None:
                raise EmbedcacheError(
                    f"class name {twice!r} appears twice in {p}; give each class one name"
                )
            return names
    return None


def _int_classes(labelled: list[int], known: list[str] | None, paths) -> list[str]:
    """The class names of integer labels: ``known``, or 0..max (at most MAX_CLASSES)."""
    top, low = max(labelled), min(labelled)
    if not known and top >= MAX_CLASSES:
        raise EmbedcacheError(
            f"label {top} of {paths(top)} is not a class index: without class names labels "
            f"must be below {MAX_CLASSES:,}; give the class names in classes.txt beside the "
            "shards (one a line, in label order), or fix the label"
        )
    names = known or [str(i) for i in range(top + 1)]
    if low < 0 or top >= len(names):
        bad = top if top >= len(names) else low
        raise EmbedcacheError(
            f"label {bad} of {paths(bad)} is outside the {len(names)} class names; "
            "fix the labels or the class list"
        )
    return names


def _classes(raw: list, known: list[str] | None, paths: list[str]) -> tuple[list[str], np.ndarray]:
    """Class names and label indices (-1: unlabelled) from raw labels (one for each of
    ``paths``): ints index ``known`` names (or 0..max without them), strings are names
    (sorted, or ``known``'s order)."""
    labelled = [x for x in raw if x is not None]
    if not labelled:
        return [], np.full(len(raw), UNLABELLED, np.int64)
    if all(isinstance(x, str) for x in labelled):
        names = known or sorted(set(labelled))
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(labelled) - set(index))
        if unknown:
            raise EmbedcacheError(
                f"labels {', '.join(unknown[:3])} are not in the class list "
                f"({', '.join(CLASS_SIDECARS)} or the file's metadata); "
                "add them there"
            )
        return names, np.array([index[x] if x is not None else UNLABELLED for x in raw], np.int64)
    if not all(isinstance(x, int) for x in labelled):
        raise EmbedcacheError("labels mix numbers and names; use one kind in every shard")
    names = _int_classes(labelled, known, lambda label: paths[raw.index(label)])
    return names, np.array([UNLABELLED if x is None else x for x in raw], np.int64)


def _class_sets(raw: list, known: list[str] | None, paths: list[str]):
    """:func:`_classes` of raw labels some of which are lists (multi-label): (class names,
    label indices, the label set of each row, None where unlabelled). A single label is a set
    of one; each label counts once, in the order given; the first is the row's label (-1:
    none)."""
    owner, flat = [], []
    for i, x in enumerate(raw):
        for a in x if isinstance(x, list) else () if x is None else (x,):
            if a is not None:  # a null in a Parquet list
                owner.append(i)
                flat.append(a)
    names, ids = _classes(flat, known, [paths[i] for i in owner])
    if not names:  # every list empty: no label at all
        return [], np.full(len(raw), UNLABELLED, np.int64), None
    sets: list = [None if x is None else [] for x in raw]
    for i, c in zip(owner, ids.tolist(), strict=True):
        sets[i].append(c)
    sets = [None if s is None else tuple(dict.fromkeys(s)) for s in sets]
    return names, np.array([s[0] if s else UNLABELLED for s in sets], np.int64), sets


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
    if has_classes and readable and "train" not in out and all(s.labelled for s in readable):
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
            data,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            unlabelled=cfg.unlabelled,
            multi_label=cfg.multi_label,
        )
    root, shards = shard_files(data, cfg.split_shards)
    layout = LAYOUTS[shards[0][0].suffix]
    listed, raw, known, whole = [], [], _sidecar(root), []
    for path, split in shards:
        st, rel, by_name = path.stat(), path.relative_to(root).as_posix(), _name_split(path)
        entries, names = list_shard(path, cfg)
        known = known or names
        for e in entries:
            where = (split or e.split or by_name, isinstance(e.member, Broken))
            listed.append((f"{rel}/{e.key}", st.st_size, st.st_mtime_ns, *where))
            raw.append(None if cfg.unlabelled else e.label)
            if not e.key:  # the shard as a whole: empty, damaged, no image member
                whole.append(f"{rel}: {e.member.reason}")
    _check_listing(whole, raw, cfg, f"{len(shards)} shards under {root}", layout)
    paths = [p for p, *_ in listed]
    if any(isinstance(x, list) for x in raw):  # a JSON list or a Parquet list column
        classes, labels, sets = _class_sets(raw, known, paths)
    else:
        (classes, labels), sets = _classes(raw, known, paths), None
    rows = [
        (Sample(path, y, size, mtime, sets[i] if sets else None), split, broken)
        for i, ((path, size, mtime, split, broken), y) in enumerate(
            zip(listed, labels.tolist(), strict=True)
        )
    ]
    splits = _splits(rows, bool(classes), cfg)
    return ImageSet(root, layout, classes, splits, multi_label=sets is not None)


def _check_listing(whole: list[str], raw: list, cfg: ExtractConfig, where: str, layout: str):
    """Refuse a listing without a single sample (``whole``: the reasons each shard was skipped
    whole, one for each row if so), or with --label-key and not one label (a misspelt field)."""
    if len(whole) == len(raw):
        more = "; ..." if len(whole) > 2 else ""
        raise EmbedcacheError(
            f"no samples in {where} ({'; '.join(whole[:2])}{more}); check that DATA names "
            f"the shards, samples with a {'/'.join(IMAGE_MEMBERS)} member or Parquet rows"
        )
    asked = cfg.label_key and not cfg.unlabelled and layout == "webdataset"
    if asked and all(x is None for x in raw):
        raise EmbedcacheError(
            f"no sample in {where} has a label in the .json field {cfg.label_key!r} "
            "(an int or name) or a .cls; check --label-key, or pass --unlabelled"
        )
