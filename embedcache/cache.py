"""The HDF5 feature cache: schema, crash-safe writing, resume, validation, reading.

A finished cache ``NAME.h5`` holds, per split group (``train``, ``val``,
``test`` or ``all``)::

    features  (N, D) float16|float32, chunked
    views     (N, V, D) like features, only in a cache made with ``extract --views K``:
              V = K for train (view 1 the mirrored eval crop, views 2..K random resized
              crops, see :func:`embedcache.data.with_views`), V = 1 (the mirror) elsewhere
    labels    (N,)   int64, -1 when unlabelled
    paths     (N,)   UTF-8, relative to the data root
    sizes     (N,)   int64 bytes   } of the source file when extracted,
    mtimes    (N,)   int64 ns      } used to re-extract only what changed
    hashes    (N, 16) uint8, blake2b-128 of the file's bytes (format 3; all zeros: unknown,
              a row reused from a format 2 cache), what ``audit`` finds exact duplicates by

a ``skipped`` group (split, path, reason, size, mtime of each unreadable file)
and root attributes (``format_version``, ``backbone``, ``weights``,
``feature_dim``, ``classes`` (JSON), ``transform`` (JSON),
``source_fingerprint``, ``views``, ``view_policy``, ``complete`` ...).
``features`` and ``views`` are the *row arrays*: every write, copy, merge and
join below treats them alike, row by row.

While extraction runs, rows go to ``NAME.h5.partial``. Every dataset in it is
allocated when the file is created, so later writes touch raw data only and
never HDF5 metadata: a SIGKILL at any moment leaves a readable file. Each
batch writes its features, flushes, then marks its rows done and flushes again;
the next run resumes from the rows marked done. The finished cache is written
to a temporary name and renamed over ``NAME.h5`` in one step, so a file with
that name is always complete.

Under torchrun each rank writes its rows to ``NAME.h5.partial.shardR`` (see
:class:`ShardFile`). A copy join takes them into the partial file and writes one
ordinary cache; a virtual join writes ``NAME.h5`` with each split's ``features``
as an HDF5 virtual dataset over the shard files, kept in ``NAME.h5.parts/``
(relative paths, so both move together). Every other dataset is the same in both.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import glob
import hashlib
import json
import os
import queue
import resource
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .config import DTYPES
from .data import HASH_BYTES, SPLIT_ORDER, ImageSet, Sample, name_bytes, views_for
from .errors import EmbedcacheError
from .identity import CacheIdentity, FeatureIdentity

FORMAT_VERSION = 3  # 2: Fletcher-32 checksums on the arrays of finished caches; 3: hashes
PARTIAL_SUFFIX = ".partial"
CHUNK_BYTES = 1 << 20  # rows per HDF5 chunk are chosen so one chunk is about 1 MiB
COPY_ROWS = 65536  # rows copied at a time when reusing features
REASON_BYTES = 64
TODO, DONE, SKIPPED = 0, 1, 2
CACHE_ATTRS = (
    "backbone",
    "weights",
    "transform",
    "dtype",
    "feature_dim",
    "classes",
)  # read on open
_STR = h5py.string_dtype("utf-8")
ROW_ARRAYS = ("features", "views", "hashes")  # per-image arrays, stored row for row alike


@dataclass(frozen=True)
class SkippedFile:
    """An image that could not be decoded, and why."""

    split: str
    path: str
    reason: str


@dataclass
class SplitData:
    """One split loaded in memory.

    features : ndarray of shape (n_images, feature_dim), float16 or float32
    labels : ndarray of shape (n_images,), int64, -1 where unlabelled
    paths : list of n_images str, relative to the data root
    """

    features: np.ndarray
    labels: np.ndarray
    paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def partial_path(path: str | Path) -> Path:
    """Where the in-progress file for ``path`` lives."""
    return Path(str(path) + PARTIAL_SUFFIX)


def _split_names(h5: h5py.File) -> list[str]:
    """Split groups in the usual order (HDF5 lists groups alphabetically)."""
    return sorted((k for k in h5 if k in SPLIT_ORDER), key=SPLIT_ORDER.index)


def _row_arrays(g) -> list[str]:
    """The row arrays group ``g`` holds (``features``, and ``views`` in a cache with views)."""
    return [name for name in ROW_ARRAYS if name in g]


def _names(g: h5py.Group, name: str, names: list[str]) -> h5py.Dataset:
    """A dataset of file names, stored as the file system's bytes (names need not be UTF-8)."""
    return g.create_dataset(name, data=[name_bytes(str(n)) for n in names], dtype=_STR)


def _ignored(h5: h5py.File, items: list[tuple[str, str]]) -> None:
    """The ``ignored`` group: path and reason of each file or folder the scan did not read
    (none when there is none)."""
    if not items:
        return
    g = h5.create_group("ignored")
    _names(g, "path", [p for p, _ in items])
    _names(g, "reason", [r for _, r in items])


def read_names(ds: h5py.Dataset) -> list[str]:
    """The names :func:`_names` stored, as Python reads file names (surrogates for non-UTF-8)."""
    return list(ds.asstr(errors="surrogateescape")[:])


def _h5_error(path: Path, e: Exception) -> EmbedcacheError:
    return EmbedcacheError(f"{path} is not a readable HDF5 file ({str(e).splitlines()[0][:120]})")


# ---------------------------------------------------------------------------
# Integrity: what the Fletcher-32 checksums of the arrays do not cover

# Root attributes that say what a cache holds: sealed by a SHA-256 (``identity_digest``). Each
# split's labels and paths are sealed by another (its ``contents_digest``): HDF5 has no
# checksum for strings, and an edit through h5py rewrites a label's checksum with it.
SEALED_ATTRS = (
    "format_version",
    "backbone",
    "weights",
    "weights_arg",
    "transform",
    "dtype",
    "precision",
    "feature_dim",
    "image_size",
    "classes",
    "num_classes",
    "views",
    "view_policy",
    "source",
    "layout",
    "source_fingerprint",
)
_READ_ERRORS = (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError)


def _identity_digest(attrs) -> str:
    values = {k: attrs[k] for k in SEALED_ATTRS if k in attrs}
    plain = {k: v.item() if hasattr(v, "item") else v for k, v in values.items()}
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _contents_digest(labels: np.ndarray, raw_paths) -> str:
    h = hashlib.sha256(np.ascontiguousarray(labels, "<i8").tobytes())
    for p in raw_paths:
        h.update(bytes(p) + b"\0")
    return h.hexdigest()


def _seal(h5: h5py.File) -> None:
    """Record the digests :func:`open_cache` and :meth:`Cache.verify` check (a new cache)."""
    for split in _split_names(h5):
        g = h5[split]
        g.attrs["contents_digest"] = _contents_digest(g["labels"][:], g["paths"][:])
    h5.attrs["identity_digest"] = _identity_digest(h5.attrs)


@contextlib.contextmanager
def _damage(path: Path, what: str) -> Iterator[None]:
    """Any error reading ``what`` of the cache at ``path`` becomes the one-line 'damaged' error."""
    try:
        yield
    except EmbedcacheError:
        raise
    except _READ_ERRORS as e:
        raise _damaged(path, f"{what} cannot be read ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:80]


def _damaged(path: Path, what: str) -> EmbedcacheError:
    return EmbedcacheError(f"cache {path} is damaged: {what}; re-run extract with --overwrite")


def _check_layout(path: Path, h5: h5py.File, dim: int, classes: list) -> None:
    """Every split has its datasets, one row each per image, features of the recorded width."""
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise _damaged(path, "its classes are not a list of names")
    if "identity_digest" in h5.attrs and h5.attrs["identity_digest"] != _identity_digest(h5.attrs):
        what = "its attributes (backbone, weights, transform, classes ...)"
        raise _damaged(path, f"{what} do not match their SHA-256")
    for split in _split_names(h5):
        g = h5[split]
        missing = [k for k in ("features", "labels", "paths") if k not in g]
        if missing:
            raise _damaged(path, f"split {split} has no {', '.join(missing)}")
        names = (*ROW_ARRAYS, "labels", "paths", "sizes", "mtimes")
        rows = {k: g[k].shape[0] for k in names if k in g}
        if len(set(rows.values())) != 1:
            counts = ", ".join(f"{k} {v}" for k, v in rows.items())
            raise _damaged(path, f"the row counts of split {split} disagree ({counts})")
        if g["features"].shape[1:] != (dim,):
            shape = g["features"].shape
            raise _damaged(path, f"split {split} has features {shape}, not {dim} values per row")


# ---------------------------------------------------------------------------
# Reading


class Cache:
    """A complete cache opened for reading (use :func:`open_cache`)."""

    def __init__(self, path: Path, h5: h5py.File):
        self.path = path
        self._h5 = h5
        a = h5.attrs
        self.attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in a.items()}
        self.identity = CacheIdentity.from_mapping(a)
        self.backbone = self.identity.backbone
        self.weights = self.identity.weights
        self.transform = self.identity.transform
        self.feature_dim = int(a["feature_dim"])
        self.classes: list[str] = json.loads(a["classes"])
        self.splits: list[str] = _split_names(h5)
        self._read: dict[str, tuple[np.ndarray, list[str]]] = {}  # checked labels and paths

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._h5.close()

    def __contains__(self, split: str) -> bool:
        return split in self.splits

    def num_images(self, split: str) -> int:
        return int(self._group(split)["labels"].shape[0])

    def _group(self, split: str) -> h5py.Group:
        if split not in self.splits:
            raise EmbedcacheError(
                f"cache {self.path} has no split {split!r}; it has {', '.join(self.splits)}"
            )
        return self._h5[split]

    @property
    def features_identity(self) -> FeatureIdentity:
        """Which features these are, whatever their storage dtype (what heads are checked against)."""
        return FeatureIdentity.from_mapping(self.attrs)

    @property
    def weights_arg(self) -> str:
        """The --weights value that rebuilds the backbone of these features."""
        from .weights import weights_arg_for

        return str(self.attrs.get("weights_arg", weights_arg_for(self.weights)))

    def labels(self, split: str) -> np.ndarray:
        """Labels of a split, int64 of shape (n_images,), -1 where unlabelled."""
        return self._contents(split)[0].copy()

    def paths(self, split: str, rows: slice = slice(None)) -> list[str]:
        """Image paths of a split (or of its ``rows``), relative to the data root."""
        return list(self._contents(split)[1][rows])

    def _contents(self, split: str) -> tuple[np.ndarray, list[str]]:
        """Labels and paths of a split, read once and checked: their digest, the label range."""
        if split not in self._read:
            g = self._group(split)
            with _damage(self.path, f"the labels or paths of split {split}"):
                labels, raw = g["labels"][:], g["paths"][:]
                paths = read_names(g["paths"])
            sealed = g.attrs.get("contents_digest")
            if sealed is not None and sealed != _contents_digest(labels, raw):
                what = f"the labels or paths of split {split}"
                raise _damaged(self.path, f"{what} do not match their SHA-256")
            bad = (labels < -1) | (labels >= len(self.classes))
            if bad.any():
                row, n = int(np.flatnonzero(bad)[0]), len(self.classes)
                label = f"split {split} has label {int(labels[row])} at row {row}"
                raise _damaged(self.path, f"{label}, outside -1..{n - 1} for {n} classes")
            self._read[split] = (labels, paths)
        return self._read[split]

    def features(self, split: str) -> CheckedFeatures:
        """The on-disk features of a split, read in slices like the h5py dataset; a damaged
        block or a non-finite value is an error naming the rows (see :class:`CheckedFeatures`)."""
        return CheckedFeatures(self._group(split)["features"], self, split)

    def views(self, split: str) -> CheckedFeatures | None:
        """The stored views of a split, (N, V, D), checked like :meth:`features`; None without views."""
        g = self._group(split)
        return CheckedFeatures(g["views"], self, split) if "views" in g else None

    def hashes(self, split: str) -> np.ndarray | None:
        """Content hashes of a split, uint8 of shape (n_images, 16) (all zeros: unknown), or
        None for a cache written before format 3 (re-extract it to record them)."""
        g = self._group(split)
        return g["hashes"][:] if "hashes" in g else None

    @property
    def num_views(self) -> int:
        """Views per training image stored by ``extract --views`` (0: none)."""
        return self.identity.views

    @property
    def checksummed(self) -> bool:
        """Whether every split's features carry Fletcher-32 checksums (format 2, not virtual)."""
        return all(self._group(s)["features"].fletcher32 for s in self.splits if self.num_images(s))

    def _checksum_note(self, parts: list[Path]) -> str:
        if self.checksummed:
            return "Fletcher-32 on every block, checked on every read"
        if parts:
            return "none (a virtual cache: its shard files carry none)"
        return "none (a format 1 cache; re-extract with --overwrite to add them)"

    def verify(self) -> list[str]:
        """Read every block of every split; one line per damaged or non-finite block found."""
        problems = []
        for split in self.splits:
            try:
                self._contents(split)
            except EmbedcacheError as e:
                problems.append(str(e))
            for ds in (self.features(split), self.views(split)):
                if ds is None:
                    continue
                for lo in range(0, ds.shape[0], BLOCK_ROWS):
                    try:
                        ds[lo : lo + BLOCK_ROWS]
                    except EmbedcacheError as e:
                        problems.append(str(e))
            for name in ("labels", "sizes", "mtimes", "hashes"):
                if name not in self._group(split):
                    continue
                try:
                    self._group(split)[name][:]
                except OSError as e:
                    problems.append(
                        f"cache {self.path}: split {split}, {name} are damaged ({_short(e)})"
                    )
        return problems

    def split(self, split: str) -> SplitData:
        """Load one split into memory."""
        return SplitData(self.features(split)[:], self.labels(split), self.paths(split))

    def __getitem__(self, split: str) -> SplitData:
        return self.split(split)

    def copy_into(self, g: h5py.Group, samples: list[Sample]) -> None:
        """Copy into ``g`` the rows of a complete cache (and its skipped files) whose file is unchanged."""
        h5 = self._h5
        for split in self.splits:
            src = h5[split]
            n = src["labels"].shape[0]
            index = {k: i for i, k in enumerate(_keys(src))}
            _reuse_rows(
                g,
                samples,
                index,
                {
                    "features": self.features(split),
                    "views": self.views(split),
                    "hashes": src.get("hashes"),
                },
                np.full(n, DONE, np.uint8),
                np.zeros(n, f"S{REASON_BYTES}"),
            )
        if "skipped" in h5 and h5["skipped"]["path"].shape[0]:
            sk = h5["skipped"]
            keys = list(
                zip(
                    read_names(sk["path"]),
                    sk["size"][:].tolist(),
                    sk["mtime"][:].tolist(),
                    strict=True,
                )
            )
            reasons = np.array(
                [r.encode()[:REASON_BYTES] for r in sk["reason"].asstr()[:]], f"S{REASON_BYTES}"
            )
            index = {k: i for i, k in enumerate(keys)}
            _reuse_rows(g, samples, index, None, np.full(len(keys), SKIPPED, np.uint8), reasons)

    @property
    def parts(self) -> list[Path]:
        """The part files a virtual cache reads its features from (none for a single file)."""
        return [self.path.parent / name for name in _virtual_parts(self._h5)]

    @property
    def skipped(self) -> list[SkippedFile]:
        if "skipped" not in self._h5:
            return []
        g = self._h5["skipped"]
        with _damage(self.path, "its list of skipped files"):
            cols = [read_names(g[k]) for k in ("split", "path", "reason")]
            return [SkippedFile(*row) for row in zip(*cols, strict=True)]

    @property
    def ignored(self) -> list[dict]:
        """Files and folders the scan did not read (not images, unreadable folders)."""
        if "ignored" not in self._h5:
            return []
        g = self._h5["ignored"]
        with _damage(self.path, "its list of ignored files"):
            pairs = zip(read_names(g["path"]), read_names(g["reason"]), strict=True)
            return [{"path": p, "reason": r} for p, r in pairs]

    def summary(self) -> dict:
        """Everything `embedcache info` shows, as plain JSON-ready data."""
        parts = self.parts  # read from every split's dataset: once
        return {
            "path": str(self.path),
            "file_bytes": self.path.stat().st_size,
            **{
                k: v
                for k, v in self.attrs.items()
                if k not in ("classes", "transform", "identity_digest")
            },
            "storage": "virtual" if parts else "single file",
            "checksums": self._checksum_note(parts),
            "parts": [str(p) for p in parts],
            "parts_bytes": sum(p.stat().st_size for p in parts),
            "classes": self.classes,
            "transform": json.loads(self.transform),
            "splits": {s: self._split_summary(s) for s in self.splits},
            "skipped": [vars(s) for s in self.skipped],
            "ignored": self.ignored,
        }

    def _split_summary(self, split: str) -> dict:
        features, views = self.features(split), self.views(split)
        shown = {
            "images": self.num_images(split),
            "shape": list(features.shape),
            "dtype": str(features.dtype),
        }
        return shown if views is None else {**shown, "views_shape": list(views.shape)}


def duplicate_groups(hashes: np.ndarray) -> list[np.ndarray]:
    """Rows sharing one content hash: each group (2 rows or more) ascending, groups by first row.

    hashes : ndarray of shape (n, 16), uint8; all-zero rows (unknown) are in no group.
    """
    if not len(hashes):
        return []
    known = np.flatnonzero(hashes.any(axis=1))
    keys = np.ascontiguousarray(hashes[known]).view(f"V{hashes.shape[1]}").ravel()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(counts)[:-1]
    groups = [known[g] for g in np.split(order, bounds) if len(g) > 1]
    return sorted(groups, key=lambda g: int(g[0]))


def cross_split_duplicates(cache: Cache) -> int | None:
    """Files whose bytes equal a file's in another split (the copies outside the first split
    each content is in), or None when the cache records no hashes."""
    hashes = [cache.hashes(s) for s in cache.splits]
    if any(h is None for h in hashes):
        return None
    split_of = np.concatenate([np.full(len(h), i) for i, h in enumerate(hashes)])
    groups = duplicate_groups(np.concatenate(hashes)) if hashes else []
    return sum(int(np.count_nonzero(split_of[g] != split_of[g].min())) for g in groups)


def _short(e: OSError) -> str:
    return str(e).split("(")[0].strip()[:80] or type(e).__name__


class CheckedFeatures:
    """A split's features on disk, sliced like the h5py dataset (``x[lo:hi]``, ``x[rows]``,
    ``x[:]``), that never returns wrong numbers quietly: a block whose Fletcher-32 checksum
    fails, or values that are not finite, raise an error naming the file, split and rows
    (and the images of non-finite rows)."""

    def __init__(self, ds: h5py.Dataset, cache: Cache, split: str):
        self._ds, self._cache, self.split = ds, cache, split
        self.shape, self.dtype = ds.shape, ds.dtype
        self._what = "" if ds.name.endswith("/features") else f" ({ds.name.rsplit('/', 1)[-1]})"

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def is_virtual(self) -> bool:
        return self._ds.is_virtual

    def __getitem__(self, key) -> np.ndarray:
        return self._checked(key, lambda: self._ds[key])

    def read_direct(self, dest: np.ndarray, source_sel: slice, dest_sel: slice) -> None:
        """``dest[dest_sel] = self[source_sel]`` with no temporary array, checked the same way."""
        self._checked(
            source_sel,
            lambda: (self._ds.read_direct(dest, source_sel, dest_sel), dest[dest_sel])[1],
        )

    def _checked(self, key, read) -> np.ndarray:
        try:
            x = read()
        except OSError as e:
            rows = self._damaged(self._rows(key))
            span = f"{rows.min()}-{rows.max()}" if rows.size else "none"
            raise EmbedcacheError(
                f"cache {self._cache.path} is damaged: split {self.split}{self._what}, rows {span} fail their checksum ({_short(e)}); re-run extract with --overwrite"
            ) from None
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            self._non_finite(self._rows(key), x)
        return x

    def _damaged(self, rows: np.ndarray) -> np.ndarray:
        """Of ``rows``, those of the first block that fails to read (all of them if none does
        alone), so that the message names the damaged block, not the whole read."""
        step = (self._ds.chunks or (len(rows),))[0]
        for lo in range(0, len(rows), max(1, step)):
            part = rows[lo : lo + step]
            try:
                self._ds[int(part.min()) : int(part.max()) + 1]
            except OSError:
                return part
        return rows

    def _rows(self, key) -> np.ndarray:
        """The row numbers ``key`` selects (only worked out when something is wrong)."""
        return np.atleast_1d(np.arange(self.shape[0])[key[0] if isinstance(key, tuple) else key])

    def _non_finite(self, rows: np.ndarray, x: np.ndarray) -> None:
        bad = rows[~np.isfinite(x.reshape(len(rows), -1)).all(axis=1)]
        paths = self._cache.paths(self.split)
        named = ", ".join(f"{r} ({paths[r]})" for r in bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise EmbedcacheError(
            f"cache {self._cache.path} has non-finite features in split {self.split}{self._what}: {len(bad)} row(s), {named}; re-extract them (--overwrite)"
        )


def _incomplete_error(path: Path, h5: h5py.File | None = None) -> EmbedcacheError:
    progress = ""
    if h5 is not None:
        done = sum(
            int(np.count_nonzero(h5[s]["status"][:] != TODO))
            for s in h5
            if s != "skipped" and "status" in h5[s]
        )
        total = sum(
            int(h5[s]["status"].shape[0]) for s in h5 if s != "skipped" and "status" in h5[s]
        )
        progress = f" ({done} of {total} images done)"
    return EmbedcacheError(
        f"cache {path} is incomplete{progress}; re-run the same `embedcache extract` command to resume it"
    )


def open_cache(path: str | Path) -> Cache:
    """Open a complete cache for reading.

    Raises
    ------
    EmbedcacheError : missing file, not an embedcache file, a newer format, or
        an extraction that has not finished (with a hint to resume it).
    """
    path = Path(path)
    if not path.exists():
        if partial_path(path).exists():
            raise _incomplete_error(path)
        raise EmbedcacheError(
            f"cache {path} does not exist; create it with `embedcache extract DATA --out {path}`"
        )
    if path.is_dir():
        raise EmbedcacheError(
            f"cache {path} is a directory; pass the .h5 file written by `embedcache extract`"
        )
    try:
        # No chunk cache: features are read in long spans of whole chunks, where it only
        # adds a copy (65,536 x 1280 float16 rows: 0.043 s without it, 0.07-0.29 s with
        # the default 1 MiB one; os.pread of the same bytes 0.039 s).
        h5 = h5py.File(path, "r", rdcc_nbytes=0)
    except OSError as e:
        raise _h5_error(path, e) from None
    try:
        version = h5.attrs.get("format_version")
        if version is None or "backbone" not in h5.attrs:
            raise EmbedcacheError(
                f"{path} is an HDF5 file but not an embedcache cache (no format_version attribute)"
            )
        if int(version) > FORMAT_VERSION:
            raise EmbedcacheError(
                f"cache {path} has format {int(version)}, newer than this embedcache reads ({FORMAT_VERSION}); upgrade embedcache"
            )
        if not bool(h5.attrs.get("complete", False)):
            raise _incomplete_error(path, h5)
        missing = [k for k in CACHE_ATTRS if k not in h5.attrs]
        if missing:
            raise EmbedcacheError(
                f"{path} is not a complete embedcache cache (attributes missing: {', '.join(missing)}); re-run `embedcache extract`"
            )
        cache = Cache(path, h5)
        _check_layout(path, h5, cache.feature_dim, cache.classes)
        lost = [p for p in cache.parts if not p.is_file()]
        if lost:
            raise EmbedcacheError(
                f"cache {path} is virtual and its part file {lost[0]} is missing ({len(lost)} of {len(cache.parts)}); keep the folder {parts_dir(path).name} next to it, or re-run extract with --overwrite"
            )
        return cache
    except _READ_ERRORS as e:  # a damaged attribute, heap or object header
        h5.close()
        raise _damaged(
            path, f"its attributes or layout cannot be read ({_first_line(e)})"
        ) from None
    except BaseException:
        h5.close()
        raise


# ---------------------------------------------------------------------------
# Writing


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return True
    text = str(e)
    return any(
        s in text
        for s in ("No space left", "File too large", "Disk quota", "errno = 28", "errno = 27")
    )


@contextlib.contextmanager
def disk_errors(out: Path) -> Iterator[None]:
    """Turn 'disk full' while writing ``out`` into a one-line error that says progress is kept."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if _is_disk_full(e):
            raise EmbedcacheError(
                f"no space left on the device while writing {out} (progress is kept in {partial_path(out).name}); "
                "free some space and re-run the same command to resume"
            ) from None
        if isinstance(e, OSError):
            reason = e.strerror or str(e).split("(")[0].strip() or type(e).__name__
            raise EmbedcacheError(
                f"cannot write {out} ({reason[:80]}; progress is kept in {partial_path(out).name}); "
                "check the disk and re-run the same command to resume"
            ) from None
        raise


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def estimate_bytes(images: ImageSet, feature_dim: int, dtype: str, views: int = 0) -> int:
    """Disk needed while extracting: the in-progress file plus the finished one, with margin."""
    rows = len(images)
    vectors = sum(len(v) * (1 + views_for(k, views)) for k, v in images.splits.items())
    paths = sum(len(name_bytes(s.path)) + 16 for split in images.splits.values() for s in split)
    finished = vectors * feature_dim * np.dtype(dtype).itemsize + rows * 24 + paths
    in_progress = finished + rows * (REASON_BYTES + 1)
    return finished + in_progress + (4 << 20)


def check_space(folder: Path, need_bytes: int) -> None:
    """Refuse to start when the disk (or the process's file-size limit) cannot hold the cache."""
    free = shutil.disk_usage(folder).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        free = min(free, limit)
    if need_bytes > free:
        raise EmbedcacheError(
            f"not enough space in {folder}: extraction needs about {_mb(need_bytes)} and {_mb(free)} is free; "
            "free some space or choose another --out"
        )


def _reserve(path: Path) -> None:
    """Allocate disk blocks for the whole file now, so that later writes cannot run out of space.

    HDF5 does not survive a failed write well (its close can crash the process),
    so every dataset is allocated at creation and the file's blocks are reserved
    here: after this, filling the file in only overwrites bytes already on disk.
    """
    if not hasattr(os, "posix_fallocate"):  # macOS: best effort
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _early() -> h5py.h5p.PropDCID:
    """A layout allocated at creation and never filled: later writes change raw data only."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def _rows_per_chunk(dim: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // (dim * itemsize))


def _rows_dataset(g: h5py.Group, name: str, shape: tuple, dtype: np.dtype) -> h5py.Dataset:
    """A finished cache's row array (``features``, ``views``): chunks of about 1 MiB, each with
    a Fletcher-32 checksum that HDF5 verifies on every read (format 2), allocated at creation."""
    n, per_row = shape[0], int(np.prod(shape[1:]))
    if not n:
        return g.create_dataset(name, shape, dtype=dtype)
    chunks = (min(n, _rows_per_chunk(per_row, dtype.itemsize)), *shape[1:])
    return g.create_dataset(name, shape, dtype=dtype, chunks=chunks, fletcher32=True, dcpl=_early())


def _checked(g: h5py.Group, name: str, data: np.ndarray) -> None:
    """A small array of a finished cache, checksummed like the features (when not empty)."""
    g.create_dataset(name, data=data, fletcher32=len(data) > 0)


def _put_span(ds: h5py.Dataset, rows: np.ndarray, values: np.ndarray) -> None:
    """ds[rows] = values for ascending ``rows`` of one batch, in one write of their span."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo == len(rows):
        ds[lo:hi] = values
    else:  # rows with gaps (images reused from an older cache): read-modify-write the span
        span = ds[lo:hi]
        span[rows - lo] = values
        ds[lo:hi] = span


def _write_rows(dst: h5py.Dataset, rows: np.ndarray, values: np.ndarray) -> None:
    """dst[rows] = values, as one slice per run of consecutive rows."""
    order = np.argsort(rows, kind="stable")
    rows, values = rows[order], values[order]
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
        if b > a:
            dst[int(rows[a]) : int(rows[b - 1]) + 1] = values[a:b]


def _copy_rows(
    src: h5py.Dataset, src_rows: np.ndarray, dst: h5py.Dataset, dst_rows: np.ndarray
) -> None:
    """dst[dst_rows] = src[src_rows], copying runs of consecutive rows as slices."""
    order = np.argsort(dst_rows, kind="stable")
    s, d = src_rows[order], dst_rows[order]
    breaks = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(d)], strict=True):
        for lo in range(a, b, COPY_ROWS):
            hi = min(b, lo + COPY_ROWS)
            dst[d[lo] : d[hi - 1] + 1] = src[s[lo] : s[hi - 1] + 1]


def _tmp_name(path: Path) -> Path:
    return Path(f"{path}.{os.getpid()}.tmp")


def remove_stale_tmp(path: Path) -> None:
    """Delete temporary files that runs killed before their rename left next to ``path``."""
    for tmp in path.parent.glob(glob.escape(path.name) + "*.tmp"):
        pid = tmp.name[: -len(".tmp")].rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _atomic_h5(path: Path, layout) -> Iterator[h5py.File]:
    """Create an HDF5 file under a temporary name with ``layout(h5)``, reserve its
    blocks, yield it reopened for filling, then fsync and rename it to ``path``."""
    tmp = _tmp_name(path)
    try:
        with h5py.File(tmp, "w") as h5:
            layout(h5)
        _reserve(tmp)
        with h5py.File(tmp, "r+") as h5:
            yield h5
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class PartialCache:
    """The in-progress file of an extraction (see the module docstring)."""

    def __init__(self, path: Path, h5: h5py.File):
        self.path = path
        self.h5 = h5
        self.identity = CacheIdentity.from_mapping(h5.attrs)
        self.splits = _split_names(h5)

    @classmethod
    def open(cls, path: Path, mode: str = "r+") -> PartialCache:
        return cls(path, h5py.File(path, mode))

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        attrs: dict,
        images: ImageSet,
        feature_dim: int,
        dtype: str,
        reuse: list[Cache | PartialCache] = (),
    ) -> PartialCache:
        """Write a new in-progress file, copying reusable rows from ``reuse``, and open it."""

        views = int(attrs.get("views", 0))

        def layout(h5: h5py.File) -> None:
            h5.attrs.update(attrs)
            h5.attrs["complete"] = False
            for split, samples in images.splits.items():
                g = h5.create_group(split)
                n = len(samples)
                g.create_dataset("features", (n, feature_dim), dtype=dtype, dcpl=_early())
                if views:
                    shape = (n, views_for(split, views), feature_dim)
                    g.create_dataset("views", shape, dtype=dtype, dcpl=_early())
                g.create_dataset("hashes", data=np.zeros((n, HASH_BYTES), np.uint8))
                g.create_dataset("status", data=np.zeros(n, np.uint8))
                g.create_dataset("reasons", data=np.zeros(n, f"S{REASON_BYTES}"))
                _names(g, "paths", [s.path for s in samples])
                g.create_dataset("labels", data=np.array([s.label for s in samples], np.int64))
                g.create_dataset("sizes", data=np.array([s.size for s in samples], np.int64))
                g.create_dataset("mtimes", data=np.array([s.mtime_ns for s in samples], np.int64))
            _ignored(h5, images.not_read())

        with _atomic_h5(path, layout) as h5:
            for split, samples in images.splits.items():
                for source in reuse:
                    source.copy_into(h5[split], samples)
        return cls.open(path)

    def copy_into(self, g: h5py.Group, samples: list[Sample]) -> None:
        """Copy into group ``g`` every row of ``samples`` this file has done or skipped, unchanged."""
        for split in self.splits:
            src = self.h5[split]
            status = src["status"][:]
            index = {k: i for i, k in enumerate(_keys(src)) if status[i] != TODO}
            _reuse_rows(g, samples, index, src, status, src["reasons"][:])

    @property
    def dtype(self) -> str:
        """The stored feature dtype."""
        return self.identity.dtype

    def todo(self, split: str) -> np.ndarray:
        """Row indices of ``split`` not done yet, ascending."""
        return np.flatnonzero(self.h5[split]["status"][:] == TODO)

    def done(self) -> int:
        """Rows whose features are in the file already (skipped files not counted: they have none)."""
        return sum(int(np.count_nonzero(self.h5[s]["status"][:] == DONE)) for s in self.splits)

    def paths(self, split: str) -> list[str]:
        return read_names(self.h5[split]["paths"])

    def write(
        self,
        split: str,
        rows: np.ndarray,
        features: np.ndarray,
        failed: dict[int, str],
        views: np.ndarray | None = None,
        hashes: np.ndarray | None = None,
    ) -> None:
        """Store features for ``rows`` (ascending) and mark them, and the ``failed`` rows, done.

        features : ndarray of shape (len(rows), D), already in the cache dtype.
        views : ndarray of shape (len(rows), V, D) in a cache with views, else None.
        hashes : ndarray of shape (len(rows), 16), uint8, the files' content hashes (None: unknown).
        """
        g = self.h5[split]
        if len(rows):
            _put_span(g["features"], rows, features)
            if "views" in g:
                _put_span(g["views"], rows, views)
            if hashes is not None and "hashes" in g:
                _put_span(g["hashes"], rows, hashes)
            self.h5.flush()  # features reach the file before the rows are marked done
        marked = [int(r) for r in rows] + [int(r) for r in failed]
        if not marked:
            return
        lo, hi = min(marked), max(marked) + 1
        status = g["status"][lo:hi]
        status[np.asarray(rows, dtype=np.int64) - lo] = DONE
        if failed:
            reasons = g["reasons"][lo:hi]
            for r, reason in failed.items():
                status[r - lo] = SKIPPED
                reasons[r - lo] = reason.encode()[:REASON_BYTES]
            g["reasons"][lo:hi] = reasons  # reasons before the status that points at them
            self.h5.flush()
        g["status"][lo:hi] = status
        self.h5.flush()

    def merge(self, shard: Path) -> int:
        """Take in the rows a shard file has done or skipped; returns how many.

        Features are copied in runs of consecutive rows and flushed before the
        rows are marked, as :meth:`write` does, so a kill during a merge loses nothing.
        """
        with h5py.File(shard, "r") as sh:
            status = sh["status"][:]
            done = np.flatnonzero(status != TODO)
            where, rows = sh["split"][:], sh["row"][:]
            for lo in range(0, len(done), COPY_ROWS):
                pos = done[lo : lo + COPY_ROWS]
                arrays = {
                    n: sh[n][int(pos[0]) : int(pos[-1]) + 1][pos - pos[0]] for n in _row_arrays(sh)
                }
                marks = {}
                for i, split in enumerate(self.splits):
                    mine = np.flatnonzero(where[pos] == i)
                    ok = mine[status[pos[mine]] == DONE]
                    for name in (n for n in _row_arrays(self.h5[split]) if n in arrays):
                        dst = self.h5[split][name]  # a shard keeps train's V views for every row
                        _write_rows(dst, rows[pos[ok]], arrays[name][ok][:, : dst.shape[1]])
                    marks[split] = mine
                self.h5.flush()  # features before the status that points at them
                for split, mine in marks.items():
                    self._mark(split, rows[pos[mine]], status[pos[mine]], sh["reasons"], pos[mine])
                self.h5.flush()
        return len(done)

    def _mark(
        self, split: str, rows: np.ndarray, status: np.ndarray, reasons, src: np.ndarray
    ) -> None:
        """Set the status of ``rows`` (and the reasons of the skipped ones, read from ``reasons[src]``)."""
        if not len(rows):
            return
        g = self.h5[split]
        for r, p in zip(rows[status == SKIPPED], src[status == SKIPPED], strict=True):
            g["reasons"][int(r)] = reasons[int(p)]
        all_status = g["status"][:]
        all_status[rows] = status
        g["status"][:] = all_status

    def close(self) -> None:
        self.h5.close()

    def finalize(self, out: Path, attrs: dict) -> None:
        """Write the finished cache to ``out`` atomically (features copied into it), then remove
        this partial file and any part files an earlier virtual cache at ``out`` used."""
        status = {s: self.h5[s]["status"][:] for s in self.splits}
        reasons = {s: self.h5[s]["reasons"][:] for s in self.splits}
        keep = {s: np.flatnonzero(status[s] == DONE) for s in self.splits}

        def layout(h5: h5py.File) -> None:
            _final_layout(h5, self, attrs, status, reasons)
            for split, ok in keep.items():
                for name in _row_arrays(self.h5[split]):
                    src = self.h5[split][name]
                    _rows_dataset(h5[split], name, (len(ok), *src.shape[1:]), src.dtype)

        with _atomic_h5(out, layout) as h5:
            for split, ok in keep.items():
                for name in _row_arrays(self.h5[split]):
                    _copy_rows(self.h5[split][name], ok, h5[split][name], np.arange(len(ok)))
            h5.attrs.modify("complete", True)  # in place: no new space needed
        self.close()
        self.path.unlink(missing_ok=True)
        remove_unused_parts(out)

    def finalize_virtual(self, out: Path, attrs: dict, shards: list[Path]) -> None:
        """Write the finished cache to ``out`` with features as HDF5 virtual datasets over the
        shard files, kept (hard-linked) in ``OUT.parts/``: rank 0 copies no shard rows, only the
        rows this partial file holds itself (reused from an earlier cache) into one base part."""
        status = {s: self.h5[s]["status"][:] for s in self.splits}
        reasons = {s: self.h5[s]["reasons"][:] for s in self.splits}
        where = {
            s: (np.full(len(status[s]), -1, np.int64), np.arange(len(status[s])))
            for s in self.splits
        }
        for i, shard in enumerate(shards):
            with h5py.File(shard, "r") as sh:
                _overlay(sh, i, self.splits, status, reasons, where)
        parts = _keep_parts(out, shards, self, status, where)

        def layout(h5: h5py.File) -> None:
            _final_layout(h5, self, attrs, status, reasons)
            for split in self.splits:
                ok = np.flatnonzero(status[split] == DONE)
                src, pos = where[split][0][ok], where[split][1][ok]
                for name in _row_arrays(self.h5[split]):
                    _virtual_rows(h5[split], name, out, parts, src, pos, self.h5[split][name])

        with _atomic_h5(out, layout) as h5:
            h5.attrs.modify("complete", True)
        self.close()
        self.path.unlink(missing_ok=True)
        remove_unused_parts(out)


def _final_layout(
    h5: h5py.File, partial: PartialCache, attrs: dict, status: dict, reasons: dict
) -> None:
    """Attributes, and per split every dataset but ``features``, of the finished cache; the
    ``skipped`` group. ``status``/``reasons`` per split say which rows are done or skipped."""
    h5.attrs.update(dict(partial.h5.attrs))
    h5.attrs.update(attrs)
    h5.attrs["format_version"] = FORMAT_VERSION  # whatever version began the partial file
    h5.attrs["complete"] = False
    skipped: dict[str, list] = {k: [] for k in ("split", "path", "reason", "size", "mtime")}
    for split in partial.splits:
        src, st = partial.h5[split], status[split]
        assert not np.any(st == TODO), "finalize before every row is done"
        ok, bad = np.flatnonzero(st == DONE), np.flatnonzero(st == SKIPPED)
        dst = h5.create_group(split)
        for name in ("labels", "sizes", "mtimes"):
            _checked(dst, name, src[name][:][ok])
        paths = np.array(read_names(src["paths"]), dtype=object)
        _names(dst, "paths", list(paths[ok]))
        skipped["split"] += [split] * len(bad)
        skipped["path"] += list(paths[bad])
        skipped["reason"] += [reasons[split][i].decode(errors="replace") for i in bad]
        skipped["size"] += list(src["sizes"][:][bad])
        skipped["mtime"] += list(src["mtimes"][:][bad])
    g = h5.create_group("skipped")
    for name in ("split", "path", "reason"):
        _names(g, name, skipped[name])
    for name in ("size", "mtime"):
        g.create_dataset(name, data=np.array(skipped[name], np.int64))
    if "ignored" in partial.h5:
        ig = partial.h5["ignored"]
        _ignored(h5, list(zip(read_names(ig["path"]), read_names(ig["reason"]), strict=True)))
    _seal(h5)


def _overlay(
    sh: h5py.File, index: int, splits: list[str], status: dict, reasons: dict, where: dict
) -> None:
    """Record what shard file ``sh`` (number ``index``) has done or skipped: its status and
    reasons over the partial file's, and where each done row's features are (shard, position)."""
    st, split_of, rows = sh["status"][:], sh["split"][:], sh["row"][:]
    shard_reasons = sh["reasons"][:]
    for i, split in enumerate(splits):
        mine = np.flatnonzero((split_of == i) & (st != TODO))
        r = rows[mine]
        status[split][r] = st[mine]
        reasons[split][r] = shard_reasons[mine]
        where[split][0][r] = index
        where[split][1][r] = mine


def parts_dir(out: Path) -> Path:
    """The folder of the files a virtual cache ``out`` reads its features from."""
    return Path(f"{out}.parts")


def _keep_parts(
    out: Path, shards: list[Path], partial: PartialCache, status: dict, where: dict
) -> list[str]:
    """Put the files a virtual cache will read into ``OUT.parts/`` under a new name each: the
    shards (hard links, so the shards stay resumable until the cache is in place) and, when the
    partial file holds done rows itself, a base file with those rows (index -1). Returns the
    names relative to ``out``'s folder, by shard index, the base file last."""
    folder = parts_dir(out)
    folder.mkdir(exist_ok=True)
    token = f"{os.getpid()}-{int(dt.datetime.now().timestamp() * 1e6):x}"
    names = []
    for i, shard in enumerate(shards):
        name = f"{token}-shard{i}.h5"
        try:
            os.link(shard, folder / name)
        except OSError:  # a filesystem without hard links: move it (resumable no longer)
            os.replace(shard, folder / name)
        names.append(f"{folder.name}/{name}")
    base = f"{token}-base.h5"
    with h5py.File(folder / base, "w") as h5:
        for split in partial.splits:
            own = np.flatnonzero((status[split] == DONE) & (where[split][0] == -1))
            for name in _row_arrays(partial.h5[split]):
                src = partial.h5[split][name]
                dst = h5.create_dataset(
                    _base_name(split, name), (len(own), *src.shape[1:]), dtype=src.dtype
                )
                _copy_rows(src, own, dst, np.arange(len(own)))
            where[split][1][own] = np.arange(len(own))
    return [*names, f"{folder.name}/{base}"]


def _base_name(split: str, name: str) -> str:
    """The dataset of the base part holding a split's row array ``name``."""
    return split if name == "features" else f"{split}.{name}"


def _virtual_rows(
    g: h5py.Group,
    name: str,
    out: Path,
    parts: list[str],
    src: np.ndarray,
    pos: np.ndarray,
    like: h5py.Dataset,
) -> None:
    """``g[name]`` (a row array) as a virtual dataset: row k is row ``pos[k]`` of part ``src[k]``
    (-1: the base part), one mapping per run of consecutive rows of one part. Shards keep
    train's views for every row; a split with fewer maps the first of them."""
    n, tail, dtype = len(src), like.shape[1:], like.dtype
    if not n:
        g.create_dataset(name, (0, *tail), dtype=dtype)
        return
    layout = h5py.VirtualLayout((n, *tail), dtype)
    sources = {}
    for i in np.unique(src).tolist():  # -1 picks the base part, the last
        inner = name if i >= 0 else _base_name(g.name.strip("/"), name)
        with h5py.File(out.parent / parts[i], "r") as f:
            shape = f[inner].shape
        sources[i] = h5py.VirtualSource(parts[i], inner, shape=shape, dtype=dtype)
    breaks = np.flatnonzero((np.diff(src) != 0) | (np.diff(pos) != 1)) + 1
    within = tuple(slice(0, k) for k in tail)
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, n], strict=True):
        rows = slice(int(pos[a]), int(pos[b - 1]) + 1)
        layout[int(a) : int(b)] = sources[int(src[a])][(rows, *within)]
    g.create_virtual_dataset(name, layout)


def _virtual_parts(h5: h5py.File) -> list[str]:
    """The files (relative to the cache's folder) the virtual features of ``h5`` read from."""
    names = []
    for split in _split_names(h5):
        ds = h5[split].get("features")
        if ds is not None and ds.is_virtual:
            names += [m.file_name for m in ds.virtual_sources()]
    return sorted(set(names))


def remove_unused_parts(out: Path) -> None:
    """Delete the part files in ``OUT.parts/`` that the cache at ``out`` does not read (left by
    an earlier virtual cache, or by a join killed before its rename)."""
    folder = parts_dir(out)
    if not folder.is_dir():
        return
    try:
        with h5py.File(out, "r") as h5:
            used = {Path(name).name for name in _virtual_parts(h5)}
    except OSError:  # no readable cache to ask: delete nothing
        return
    for f in folder.glob("*.h5"):
        if f.name not in used:
            f.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when empty


def shard_path(out: Path, rank: int) -> Path:
    """Where rank ``rank`` of a torchrun extraction keeps its rows of ``out``."""
    return Path(f"{partial_path(out)}.shard{rank}")


def shard_paths(out: Path) -> list[Path]:
    """Every shard file next to ``out``, by rank (left by this run or by an earlier one)."""
    found = partial_path(out).parent.glob(glob.escape(partial_path(out).name) + ".shard*")
    return sorted(
        (p for p in found if p.name.rsplit("shard", 1)[-1].isdigit()),
        key=lambda p: int(p.name.rsplit("shard", 1)[-1]),
    )


class ShardFile:
    """The rows one rank extracts, in the order it extracts them: ``split`` (index into the
    partial file's splits), ``row``, ``features``, ``status`` and ``reasons`` per row.

    Allocated in full when created, like the partial file, and filled batch by
    batch (features flushed before their status), so a killed rank leaves rows
    that are either done or to do; :meth:`PartialCache.merge` takes in the done ones.
    """

    def __init__(self, h5: h5py.File, splits: list[str]):
        self.h5, self.splits = h5, splits
        pos = {}
        for i, (s, r) in enumerate(zip(h5["split"][:], h5["row"][:], strict=True)):
            pos[(splits[int(s)], int(r))] = i
        self._pos = pos

    @classmethod
    def create(
        cls,
        path: Path,
        splits: list[str],
        items: list[tuple[str, int]],
        *,
        feature_dim: int,
        dtype: str,
        views: int = 0,
    ) -> ShardFile:
        """A new shard file for ``items`` (split, row), in that order, opened for filling;
        with ``views``, room for train's number of views on every row."""
        index = {s: i for i, s in enumerate(splits)}

        def layout(h5: h5py.File) -> None:
            n = len(items)
            h5.create_dataset("split", data=np.array([index[s] for s, _ in items], np.uint8))
            h5.create_dataset("row", data=np.array([r for _, r in items], np.int64))
            h5.create_dataset("features", (n, feature_dim), dtype=dtype, dcpl=_early())
            if views:
                h5.create_dataset("views", (n, views, feature_dim), dtype=dtype, dcpl=_early())
            h5.create_dataset("hashes", data=np.zeros((n, HASH_BYTES), np.uint8))
            h5.create_dataset("status", data=np.zeros(n, np.uint8))
            h5.create_dataset("reasons", data=np.zeros(n, f"S{REASON_BYTES}"))

        with _atomic_h5(path, layout):
            pass
        return cls(h5py.File(path, "r+"), splits)

    @property
    def dtype(self) -> str:
        """The stored feature dtype."""
        return str(self.h5["features"].dtype)

    def write(
        self,
        split: str,
        rows: np.ndarray,
        features: np.ndarray,
        failed: dict[int, str],
        views: np.ndarray | None = None,
        hashes: np.ndarray | None = None,
    ) -> None:
        """Store one batch: the same contract as :meth:`PartialCache.write`."""
        pos = np.array([self._pos[(split, int(r))] for r in rows], np.int64)
        bad = np.array([self._pos[(split, int(r))] for r in failed], np.int64)
        every = np.concatenate([pos, bad])
        lo, hi = int(every.min()), int(every.max()) + 1  # one batch: contiguous positions
        if len(pos):
            for name, values in (("features", features), ("views", views), ("hashes", hashes)):
                if name in self.h5 and values is not None:
                    span = self.h5[name][lo:hi]
                    span[pos - lo, : values.shape[1]] = values
                    self.h5[name][lo:hi] = span
            self.h5.flush()  # features reach the file before the rows are marked done
        status, reasons = self.h5["status"][lo:hi], self.h5["reasons"][lo:hi]
        status[pos - lo] = DONE
        for r, reason in failed.items():
            status[self._pos[(split, int(r))] - lo] = SKIPPED
            reasons[self._pos[(split, int(r))] - lo] = reason.encode()[:REASON_BYTES]
        self.h5["reasons"][lo:hi] = reasons
        self.h5.flush()
        self.h5["status"][lo:hi] = status
        self.h5.flush()

    def close(self) -> None:
        self.h5.close()


def write_cache(
    path: str | Path,
    splits: dict[str, tuple[np.ndarray, np.ndarray, list[str]]],
    *,
    classes: list[str],
    backbone: str,
    weights: str,
    transform: str,
    source: str = "",
    views: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a complete cache from arrays: ``{split: (features (N, D), labels (N,), paths)}``.

    For features computed elsewhere, tests and benchmarks; the file is the same
    schema `extract` writes (without file sizes and times: they are -1).
    ``views`` gives each split's stored views, ``{split: (N, V, D)}`` (V for train,
    1 elsewhere), as ``extract --views V`` stores them.
    """
    views = views or {}
    path = Path(path)
    dims = {f.shape[1] for f, _, _ in splits.values()}
    dtypes = {str(f.dtype) for f, _, _ in splits.values()}
    if len(dims) != 1 or len(dtypes) != 1 or dtypes - set(DTYPES):
        raise EmbedcacheError(
            f"every split needs (N, D) features of one D and a dtype in {DTYPES}; got dims {dims}, dtypes {dtypes}"
        )
    dim, dtype = dims.pop(), dtypes.pop()
    attrs = {
        "format_version": FORMAT_VERSION,
        "tool": "embedcache",
        "backbone": backbone,
        "weights": weights,
        "weights_arg": weights,
        "transform": transform,
        "dtype": dtype,
        "feature_dim": dim,
        "classes": json.dumps(classes),
        "num_classes": len(classes),
        "source": source,
        "layout": "arrays",
        "source_fingerprint": "",
        "created": now_iso(),
    }
    if views:
        attrs.update(views=int(views["train"].shape[1]), view_policy="given as arrays")

    def layout(h5: h5py.File) -> None:
        h5.attrs.update(attrs)
        h5.attrs["complete"] = False
        for name, (_, labels, paths) in splits.items():
            n = len(labels)
            g = h5.create_group(name)
            _rows_dataset(g, "features", (n, dim), np.dtype(dtype))
            if name in views:
                _rows_dataset(g, "views", views[name].shape, np.dtype(dtype))
            _checked(g, "labels", np.asarray(labels, np.int64))
            _names(g, "paths", list(paths))
            _checked(g, "sizes", np.full(n, -1, np.int64))
            _checked(g, "mtimes", np.full(n, -1, np.int64))
        g = h5.create_group("skipped")
        for name in ("split", "path", "reason"):
            g.create_dataset(name, data=[], dtype=_STR)
        for name in ("size", "mtime"):
            g.create_dataset(name, data=np.zeros(0, np.int64))
        _seal(h5)

    with _atomic_h5(path, layout) as h5:
        for name, (features, _, _) in splits.items():
            for lo in range(0, len(features), COPY_ROWS):
                h5[name]["features"][lo : lo + COPY_ROWS] = features[lo : lo + COPY_ROWS]
                if name in views:
                    h5[name]["views"][lo : lo + COPY_ROWS] = views[name][lo : lo + COPY_ROWS]
        h5.attrs.modify("complete", True)
    return path


def _keys(g: h5py.Group) -> list[tuple[str, int, int]]:
    return list(
        zip(read_names(g["paths"]), g["sizes"][:].tolist(), g["mtimes"][:].tolist(), strict=True)
    )


def _reuse_rows(
    g: h5py.Group,
    samples: list[Sample],
    index: dict,
    src_arrays: dict | None,
    src_status: np.ndarray,
    src_reasons: np.ndarray,
) -> None:
    """Copy the rows of ``samples`` found in ``index`` (key -> source row) into group ``g``:
    each row array of ``g`` from ``src_arrays`` (name -> dataset; None: skipped files only)."""
    pairs = [
        (i, index[(s.path, s.size, s.mtime_ns)])
        for i, s in enumerate(samples)
        if (s.path, s.size, s.mtime_ns) in index
    ]
    if not pairs:
        return
    dst_rows, src_rows = (np.array(c) for c in zip(*pairs, strict=True))
    done = src_status[src_rows] == DONE
    if done.any():
        for name in _row_arrays(g):
            if src_arrays.get(name) is not None:  # hashes of a format 2 cache: stay unknown
                _copy_rows(src_arrays[name], src_rows[done], g[name], dst_rows[done])
    status, reasons = g["status"][:], g["reasons"][:]
    status[dst_rows] = src_status[src_rows]
    reasons[dst_rows[~done]] = src_reasons[src_rows[~done]]
    g["reasons"][:] = reasons
    g["status"][:] = status


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------
# Reading rows in blocks: in memory when they fit, streamed from HDF5 when not

MEMORY_FRACTION = 0.5  # default --max-memory: this share of the memory available now
BLOCK_ROWS = 2048  # rows read from the file at a time
SHUFFLE_ROWS = 65536  # rows shuffled together (the whole split when it is smaller)


def available_memory_bytes() -> int:
    """Memory available to new allocations now (MemAvailable), or total memory if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget(max_memory: int | None) -> int:
    """Bytes of features that may be loaded: ``max_memory``, or half the memory available now."""
    return max_memory if max_memory is not None else int(MEMORY_FRACTION * available_memory_bytes())


def _f32(a: np.ndarray) -> np.ndarray:
    """float16 -> float32 through torch: vectorised, about 9x numpy's astype here."""
    import torch  # here, so that reading a cache's attributes (info) does not load torch

    return a if a.dtype == np.float32 else torch.from_numpy(np.ascontiguousarray(a)).float().numpy()


def _read_ahead(jobs: list, read, threaded: bool, slots: int = 2):
    """Yield ``read(job)`` for each job in order, the next one read in a background thread.

    At most ``slots`` results exist at once: the one the caller holds and the
    one being read (a result is let go when the caller asks for the next). An
    error in the reader is raised here; closing the generator stops the reader.
    Not ``threaded``: each job is read here when asked for, in the same order.
    """
    if not threaded:
        for job in jobs:
            yield read(job)
        return
    free, ready, stop = threading.Semaphore(slots), queue.Queue(), threading.Event()

    def reader() -> None:
        try:
            for job in jobs:
                free.acquire()
                if stop.is_set():
                    return
                ready.put((read(job), None))
        except BaseException as e:  # handed to the caller, raised there
            ready.put((None, e))

    thread = threading.Thread(target=reader, name="embedcache-read-ahead", daemon=True)
    thread.start()
    try:
        for _ in jobs:
            result, error = ready.get()
            if error is not None:
                raise error
            yield result
            free.release()  # the caller is done with this result: its slot may be refilled
    finally:
        stop.set()
        free.release()  # wake a reader waiting for a slot, so that it sees stop
        thread.join()


class Rows:
    """Some rows of a split: labels in memory, features in memory or read in blocks from HDF5.

    Positions ``0..n-1`` index the chosen rows; ``rows[p]`` is the row in the file
    (increasing).
    Both modes read and shuffle the same way, so training gives the same result.
    Streaming reads blocks and shuffle buffers in row order; with ``read_ahead``
    (see :func:`embedcache.runtime.read_ahead`) the next one is read in a
    background thread while the current one is used.
    """

    def __init__(self, source, labels: np.ndarray, rows: np.ndarray, in_memory: bool):
        self.read_ahead = False
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = labels[self.rows]
        self.n = len(self.rows)
        self.in_memory = in_memory
        self._source = source
        self._data = None  # in memory: the stored dtype (float16 halves the footprint)
        # streamed: the two shuffle buffers, kept between epochs
        self._buffers: list[np.ndarray] = []
        if in_memory:
            everything = source[:]
            whole = self.n == len(everything) and np.array_equal(self.rows, np.arange(self.n))
            self._data = everything if whole else everything[self.rows]

    @property
    def dim(self) -> int:
        """Values per row (the feature dimension)."""
        return int(self._source.shape[1])

    def _read(self, lo: int, hi: int) -> np.ndarray:
        """Features of positions [lo, hi) as float32."""
        if self._data is not None:
            return _f32(self._data[lo:hi])
        r = self.rows[lo:hi]
        block = self._source[int(r[0]) : int(r[-1]) + 1]
        return _f32(block[r - r[0]])

    def _fill(self, spans: list[tuple[int, int]], out: np.ndarray) -> np.ndarray:
        """Features of the position spans, in the stored dtype, read into ``out``; returns the filled part.

        Adjacent spans whose rows are consecutive in the file are one read straight
        into ``out`` (no temporary array: fresh memory costs page faults, as much as
        the read itself here); rows with gaps are read one block at a time.
        """
        at = 0
        for lo, hi in _runs(spans):
            r0, r1 = int(self.rows[lo]), int(self.rows[hi - 1]) + 1
            if r1 - r0 == hi - lo and hasattr(self._source, "read_direct"):
                self._source.read_direct(out, np.s_[r0:r1], np.s_[at : at + hi - lo])
            else:
                for a in range(lo, hi, BLOCK_ROWS):
                    r = self.rows[a : min(hi, a + BLOCK_ROWS)]
                    block = self._source[int(r[0]) : int(r[-1]) + 1]
                    out[at + a - lo : at + a - lo + len(r)] = block[r - r[0]]
            at += hi - lo
        return out[:at]

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Features of the given positions, in that order, as float32 (one sorted read from HDF5)."""
        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        if self._data is not None:
            return _f32(self._data[np.asarray(positions, dtype=np.int64)])
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), *self._source.shape[1:]), self._source.dtype)
        if len(rows):
            out[order] = self._source[rows[order]]  # h5py reads increasing indices
        return _f32(out)

    def blocks(self):
        """(positions, features) in order, BLOCK_ROWS at a time (streamed: one block read ahead)."""
        spans = [(lo, min(self.n, lo + BLOCK_ROWS)) for lo in range(0, self.n, BLOCK_ROWS)]
        if self._data is not None:
            for lo, hi in spans:
                yield np.arange(lo, hi), self._read(lo, hi)
            return
        shape, dtype = self._source.shape[1:], self._source.dtype
        fresh = lambda s: self._fill([s], np.empty((s[1] - s[0], *shape), dtype))  # noqa: E731
        reads = _read_ahead(spans, fresh, self.read_ahead)
        try:  # the thread only reads: torch's conversion stays here, off a second thread pool
            for (lo, hi), x in zip(spans, reads, strict=True):
                yield np.arange(lo, hi), _f32(x)
        finally:
            reads.close()

    def _shuffle_groups(self, rng: np.random.Generator) -> list[list[tuple[int, int]]]:
        """Random blocks, SHUFFLE_ROWS of them at a time, each group's spans in increasing order."""
        starts = np.arange(0, self.n, BLOCK_ROWS)
        order = rng.permutation(len(starts))
        per_buffer = max(1, SHUFFLE_ROWS // BLOCK_ROWS)
        return [
            [
                (int(starts[g]), min(self.n, int(starts[g]) + BLOCK_ROWS))
                for g in np.sort(order[i : i + per_buffer])
            ]
            for i in range(0, len(order), per_buffer)
        ]

    def batches(self, batch_size: int, rng: np.random.Generator):
        """Shuffled (features, labels) batches: random blocks, shuffled within SHUFFLE_ROWS.

        Streaming reads each group of blocks once, in row order, into one of two
        reusable buffers in the stored dtype (the next group while this one's
        batches train); in memory the same rows are gathered directly. Either
        way a batch is gathered in the stored dtype, then made float32, so the
        batches are the same arrays.
        """
        groups = self._shuffle_groups(rng)
        if self._data is not None:
            for spans in groups:
                pos = np.concatenate([np.arange(lo, hi) for lo, hi in spans])
                for take in _chunks(rng.permutation(len(pos)), batch_size):
                    yield _f32(self._data[pos[take]]), self.labels[pos[take]]
            return
        buffers, self._buffers = self._buffers or self._new_buffers(), []  # lent to this pass only
        jobs = list(enumerate(groups))
        reads = _read_ahead(
            jobs, lambda job: self._fill(job[1], buffers[job[0] % 2]), self.read_ahead
        )
        try:
            for (_, spans), buffer in zip(jobs, reads, strict=True):
                pos = np.concatenate([np.arange(lo, hi) for lo, hi in spans])
                for take in _chunks(rng.permutation(len(pos)), batch_size):
                    yield _f32(buffer[take]), self.labels[pos[take]]
        finally:
            reads.close()  # the reader stops before its buffers are handed back
            self._buffers = buffers

    def _new_buffers(self) -> list[np.ndarray]:
        """Two shuffle buffers of the stored dtype (one being trained on, one being read)."""
        rows = min(self.n, max(1, SHUFFLE_ROWS // BLOCK_ROWS) * BLOCK_ROWS)
        return [np.empty((rows, *self._source.shape[1:]), self._source.dtype) for _ in range(2)]

    def all(self) -> np.ndarray:
        """All features as float32 (only for the references that need them in memory)."""
        return np.concatenate([x for _, x in self.blocks()])


class ViewRows(Rows):
    """Training rows, in memory, that show one stored picture of each image per epoch: the
    plain features or one of the image's views, drawn uniformly by :meth:`pick`.

    views : (n_source, V, D) stored views of the source rows; counts : (n_source,) how many
    of them each row has (default: all V; 0 for the val rows a refit joins, see :func:`join_rows`).
    """

    def __init__(self, source, views, labels: np.ndarray, rows: np.ndarray, counts=None):
        super().__init__(source, labels, rows, in_memory=True)
        self._plain = self._data
        self._views = np.asarray(views[:])[self.rows] if len(self.rows) else np.asarray(views[:0])
        full = np.full(len(labels), self._views.shape[1], np.int64)
        self.counts = (full if counts is None else np.asarray(counts, np.int64))[self.rows]

    def pick(self, rng: np.random.Generator) -> None:
        """Draw this epoch's picture of every row: 0 the plain features, k the k-th view."""
        choice = np.floor(rng.random(self.n) * (self.counts + 1)).astype(np.int64)
        data = self._plain.copy()
        viewed = np.flatnonzero(choice > 0)
        data[viewed] = self._views[viewed, choice[viewed] - 1]
        self._data = data


def join_rows(a: Rows, val: Rows) -> Rows:
    """The rows of ``a`` then the (plain) rows of ``val`` as one in-memory set, for a refit on
    train + val; when ``a`` draws views, the val rows have none to draw (count 0)."""
    if not (a.in_memory and val.in_memory):
        raise EmbedcacheError("--refit needs the features in memory; raise --max-memory")
    plain = np.concatenate([a._plain if isinstance(a, ViewRows) else a._data, val._data])
    labels = np.concatenate([a.labels, val.labels])
    rows = np.arange(len(labels))
    if not isinstance(a, ViewRows):
        return Rows(plain, labels, rows, in_memory=True)
    none = np.zeros((val.n, *a._views.shape[1:]), a._views.dtype)  # padding, never drawn
    counts = np.r_[a.counts, np.zeros(val.n, np.int64)]
    return ViewRows(plain, np.concatenate([a._views, none]), labels, rows, counts)


def _runs(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Increasing spans [(lo, hi), ...] with touching neighbours joined."""
    out: list[tuple[int, int]] = []
    for lo, hi in spans:
        if out and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _chunks(a: np.ndarray, size: int) -> list[np.ndarray]:
    return [a[lo : lo + size] for lo in range(0, len(a), size)]
