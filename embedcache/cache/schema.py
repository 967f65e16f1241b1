"""The file layout every part of the cache shares: names, constants, stored names, digests.

A finished cache ``NAME.h5`` holds, per split group (``train``, ``val``,
``test`` or ``all``)::

    features  (N, D) float16|float32, chunked
    views     (N, V, D) like features, only in a cache made with ``extract --views K``:
              V = K for train (view 1 the mirrored eval crop, views 2..K random resized
              crops, see :func:`embedcache.data.with_views`), V = 1 (the mirror) elsewhere
    labels    (N,)   int64, -1 when unlabelled (multi-label: the first label listed, -1: none)
    label_matrix (N, ceil(C / 8)) uint8, only in a multi-label cache (format 5): bit c of row i
              (np.packbits(..., axis=1, bitorder="little")) says whether image i has class c
    paths     (N,)   UTF-8, relative to the data root
    sizes     (N,)   int64 bytes   } of the source file when extracted,
    mtimes    (N,)   int64 ns      } used to re-extract only what changed
    hashes    (N, 16) uint8, blake2b-128 of the file's bytes (format 3; all zeros: unknown,
              a row reused from a format 2 cache), what ``audit`` finds exact duplicates by
    thumbnails (N, 32, 32) uint8, the image in grey at 32 x 32 (format 4; all zeros: unknown,
              a row reused from an older cache), what ``audit`` confirms near duplicates by

a ``skipped`` group (split, path, reason, size, mtime of each unreadable file)
and root attributes (``format_version``, ``backbone``, ``weights``,
``feature_dim``, ``classes`` (JSON), ``transform`` (JSON),
``source_fingerprint``, ``views``, ``view_policy``, ``complete``, ``multi_label``
(only in a multi-label cache) ...).
``features`` and ``views`` are the *row arrays*: every write, copy, merge and
join treats them alike, row by row.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..data import SPLIT_ORDER, name_bytes

FORMAT_VERSION = 5  # 2: Fletcher-32 checksums on the arrays of finished caches; 3: hashes;
# 4: thumbnails; 5: label_matrix, in multi-label caches only
SINGLE_LABEL_FORMAT = 4  # a single-label cache holds nothing of format 5: older versions read it
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
STR = h5py.string_dtype("utf-8")
ROW_ARRAYS = ("features", "views", "hashes", "thumbnails")  # per-image, stored row for row


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


def split_names(h5: h5py.File) -> list[str]:
    """Split groups in the usual order (HDF5 lists groups alphabetically)."""
    return sorted((k for k in h5 if k in SPLIT_ORDER), key=SPLIT_ORDER.index)


def row_arrays(g) -> list[str]:
    """The row arrays group ``g`` holds (``features``, ``views`` in a cache with views, and
    ``hashes``, ``thumbnails`` from formats 3 and 4 on)."""
    return [name for name in ROW_ARRAYS if name in g]


def write_names(g: h5py.Group, name: str, names: list[str]) -> h5py.Dataset:
    """A dataset of file names, stored as the file system's bytes (names need not be UTF-8)."""
    return g.create_dataset(name, data=[name_bytes(str(n)) for n in names], dtype=STR)


def read_names(ds: h5py.Dataset) -> list[str]:
    """The names :func:`write_names` stored, as Python reads file names (surrogates for
    non-UTF-8)."""
    return list(ds.asstr(errors="surrogateescape")[:])


def write_ignored(h5: h5py.File, items: list[tuple[str, str]]) -> None:
    """The ``ignored`` group: path and reason of each file or folder the scan did not read
    (none when there is none)."""
    if not items:
        return
    g = h5.create_group("ignored")
    write_names(g, "path", [p for p, _ in items])
    write_names(g, "reason", [r for _, r in items])


def file_keys(g: h5py.Group) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of each row of a split group: what says a file is unchanged."""
    return list(
        zip(read_names(g["paths"]), g["sizes"][:].tolist(), g["mtimes"][:].tolist(), strict=True)
    )


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
    "request",  # extraction.request: an up-to-date cache answers without building the backbone
    "multi_label",  # only in a multi-label cache: a single-label cache's digest is unchanged
)


def identity_digest(attrs) -> str:
    """SHA-256 of the attributes in SEALED_ATTRS that ``attrs`` holds."""
    values = {k: attrs[k] for k in SEALED_ATTRS if k in attrs}
    plain = {k: v.item() if hasattr(v, "item") else v for k, v in values.items()}
    text = json.dumps(plain, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def contents_digest(labels: np.ndarray, raw_paths, label_matrix: np.ndarray | None = None) -> str:
    """SHA-256 of a split's labels and stored path bytes (and its packed label matrix, in a
    multi-label cache: a single-label cache's digest is the one it always was)."""
    h = hashlib.sha256(np.ascontiguousarray(labels, "<i8").tobytes())
    for p in raw_paths:
        h.update(bytes(p) + b"\0")
    if label_matrix is not None:
        h.update(b"label_matrix %d %d\0" % label_matrix.shape)
        h.update(np.ascontiguousarray(label_matrix, np.uint8).tobytes())
    return h.hexdigest()


def seal(h5: h5py.File) -> None:
    """Record the digests :func:`open_cache` and :meth:`Cache.verify` check (a new cache)."""
    for split in split_names(h5):
        g = h5[split]
        matrix = g["label_matrix"][:] if "label_matrix" in g else None
        g.attrs["contents_digest"] = contents_digest(g["labels"][:], g["paths"][:], matrix)
    h5.attrs["identity_digest"] = identity_digest(h5.attrs)


# ---------------------------------------------------------------------------
# Multi-label caches: each split's label sets as a matrix of bits


def written_format(multi_label: bool) -> int:
    """The format_version a new cache records: 5 where it holds a label matrix, else 4."""
    return FORMAT_VERSION if multi_label else SINGLE_LABEL_FORMAT


def packed_width(num_classes: int) -> int:
    """Bytes a row of a packed label matrix takes: one bit a class."""
    return (num_classes + 7) // 8


def pack_label_sets(sets: list, num_classes: int) -> np.ndarray:
    """Label sets (a tuple of class indices for each image) as a packed label matrix,
    uint8 of shape (n_images, ceil(num_classes / 8)): bit ``c % 8`` of byte ``c // 8``."""
    rows = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
    cols = np.fromiter((c for s in sets for c in s), np.int64, count=len(rows))
    packed = np.zeros((len(sets), packed_width(num_classes)), np.uint8)
    np.bitwise_or.at(packed, (rows, cols >> 3), (1 << (cols & 7)).astype(np.uint8))
    return packed


def first_labels(matrix: np.ndarray) -> np.ndarray:
    """The ``labels`` vector of a (n, C) bool label matrix: each row's first class, -1 if none."""
    return np.where(matrix.any(axis=1), matrix.argmax(axis=1), -1).astype(np.int64)


def label_pairs(labels: np.ndarray, packed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(row, class) of every label of a split, by row (int64 arrays of one length): the bits
    ``packed`` sets (a multi-label cache, unpacked COPY_ROWS rows at a time), else each row's
    label (none for -1). Memory grows with the labels, not with rows x classes."""
    if packed is None:
        rows = np.flatnonzero(labels >= 0)
        return rows, labels[rows].astype(np.int64)
    found = [(np.zeros(0, np.int64), np.zeros(0, np.int64))]
    for lo in range(0, len(packed), COPY_ROWS):
        rows, cols = np.nonzero(
            np.unpackbits(packed[lo : lo + COPY_ROWS], axis=1, bitorder="little")
        )
        found.append((rows + lo, cols))
    return tuple(np.concatenate(part).astype(np.int64) for part in zip(*found, strict=True))


def label_matrix(labels: np.ndarray, packed: np.ndarray | None, num_classes: int) -> np.ndarray:
    """A split's labels as a bool matrix of shape (n_images, num_classes): ``packed`` unpacked
    (a multi-label cache), else the one-hot of ``labels`` with -1 rows all False."""
    if packed is not None:
        bits = np.unpackbits(packed, axis=1, count=num_classes, bitorder="little")
        return bits.astype(bool)
    out = np.zeros((len(labels), num_classes), bool)
    rows = np.flatnonzero(labels >= 0)
    out[rows, labels[rows]] = True
    return out
