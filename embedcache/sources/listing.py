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


def _name_split(path: Path) -> str:
    """train-000001.tar, validation-00000-of-00001.parquet: the split a file's name gives."""
    return SPLIT_NAMES.get(re.split(r"[-_.]", path.name, maxsplit=1)[0].lower(), "")


def list_shard(path: Path, cfg: ExtractConfig) -> tuple[list[Entry], list[str] | None]:
    """The samples of one tar shard or Parquet file, and class names it carries (or None)."""
    if path.suffix == ".parquet":
        return list_parquet(path, image_column=cfg.image_column, label_column=cfg.label_column)
    return list_tar(path, label_key=cfg.label_key), None


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
                f"labels {', '.join(unknown[:3])} are not in the class list "
                f"({', '.join(CLASS_SIDECARS)} or the file's metadata); "
                "add them there"
            )
        return names, np.array([index[x] if x is not None else UNLABELLED for x in raw], np.int64)
    if not all(isinstance(x, int) for x in labelled):
        raise EmbedcacheError("labels mix numbers and names; use one kind in every shard")
    top = max(labelled)
    names = known or [str(i) for i in range(top + 1)]
    if min(labelled) < 0 or top >= len(names):
        raise EmbedcacheError(
            f"label {top if top >= len(names) else min(labelled)} "
            f"is outside the {len(names)} class names; "
            "fix the labels or the class list"
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
            f"no samples with a {'/'.join(IMAGE_MEMBERS)} member in {len(shards)} "
            f"shards under {root}"
        )
    return ImageSet(root, layout, classes, _splits(rows, bool(classes), cfg))
