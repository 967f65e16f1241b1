"""Writing a cache crash-safely: the in-progress file of an extraction, the finished cache.

While extraction runs, rows go to ``NAME.h5.partial``. Every dataset in it is
allocated when the file is created, so later writes touch raw data only and
never HDF5 metadata: a SIGKILL at any moment leaves a readable file. Each
batch writes its features, flushes, then marks its rows done and flushes again
(:func:`~embedcache.cache.storage.write_batch`); the next run resumes from the rows
marked done. The finished cache is written to a temporary name and renamed over
``NAME.h5`` in one step, so a file with that name is always complete.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from ..config import DTYPES
from ..data import HASH_BYTES, THUMB_SIDE, ImageSet, Sample, name_bytes, views_for
from ..errors import EmbedcacheError
from ..identity import CacheIdentity
from .reader import Cache
from .schema import (
    COPY_ROWS,
    DONE,
    REASON_BYTES,
    SKIPPED,
    STR,
    TODO,
    file_keys,
    first_labels,
    label_pairs,
    pack_label_sets,
    partial_path,
    read_names,
    row_arrays,
    seal,
    split_names,
    write_ignored,
    write_names,
    written_format,
)
from .shards import gather_parts, merge_shard, remove_unused_parts, virtual_arrays
from .storage import atomic_h5, checked, copy_rows, early, reuse_rows, rows_dataset, write_batch


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
                f"no space left on the device while writing {out} "
                f"(progress is kept in {partial_path(out).name}); "
                "free some space and re-run the same command to resume"
            ) from None
        if isinstance(e, OSError):
            reason = e.strerror or str(e).split("(")[0].strip() or type(e).__name__
            raise EmbedcacheError(
                f"cannot write {out} ({reason[:80]}; "
                f"progress is kept in {partial_path(out).name}); "
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
            f"not enough space in {folder}: extraction needs about {_mb(need_bytes)} "
            f"and {_mb(free)} is free; "
            "free some space or choose another --out"
        )


class PartialCache:
    """The in-progress file of an extraction (see the module docstring)."""

    def __init__(self, path: Path, h5: h5py.File):
        self.path = path
        self.h5 = h5
        self.identity = CacheIdentity.from_mapping(h5.attrs)
        self.splits = split_names(h5)

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
            if images.multi_label:
                h5.attrs.update(multi_label=True, format_version=written_format(True))
            for split, samples in images.splits.items():
                g = h5.create_group(split)
                n = len(samples)
                g.create_dataset("features", (n, feature_dim), dtype=dtype, dcpl=early())
                if views:
                    shape = (n, views_for(split, views), feature_dim)
                    g.create_dataset("views", shape, dtype=dtype, dcpl=early())
                g.create_dataset("hashes", data=np.zeros((n, HASH_BYTES), np.uint8))
                g.create_dataset("thumbnails", data=np.zeros((n, THUMB_SIDE, THUMB_SIDE), np.uint8))
                g.create_dataset("status", data=np.zeros(n, np.uint8))
                g.create_dataset("reasons", data=np.zeros(n, f"S{REASON_BYTES}"))
                write_names(g, "paths", [s.path for s in samples])
                g.create_dataset("labels", data=np.array([s.label for s in samples], np.int64))
                g.create_dataset("sizes", data=np.array([s.size for s in samples], np.int64))
                g.create_dataset("mtimes", data=np.array([s.mtime_ns for s in samples], np.int64))
                if images.multi_label:
                    sets = [s.label_set for s in samples]
                    g.create_dataset(
                        "label_matrix", data=pack_label_sets(sets, len(images.classes))
                    )
            write_ignored(h5, images.not_read())

        with atomic_h5(path, layout) as h5:
            for split, samples in images.splits.items():
                for source in reuse:
                    source.copy_into(h5[split], samples)
        return cls.open(path)

    def copy_into(self, g: h5py.Group, samples: list[Sample]) -> None:
        """Copy into group ``g`` every row of ``samples`` this file has done or skipped,
        unchanged."""
        for split in self.splits:
            src = self.h5[split]
            status = src["status"][:]
            index = {k: i for i, k in enumerate(file_keys(src)) if status[i] != TODO}
            reuse_rows(g, samples, index, src, status, src["reasons"][:])

    @property
    def dtype(self) -> str:
        """The stored feature dtype."""
        return self.identity.dtype

    def todo(self, split: str) -> np.ndarray:
        """Row indices of ``split`` not done yet, ascending."""
        return np.flatnonzero(self.h5[split]["status"][:] == TODO)

    def done(self) -> int:
        """Rows whose features are in the file already (skipped files not counted: they have
        none)."""
        return sum(int(np.count_nonzero(self.h5[s]["status"][:] == DONE)) for s in self.splits)

    def paths(self, split: str) -> list[str]:
        return read_names(self.h5[split]["paths"])

    def label_pairs(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(row, class) of every label of ``split``'s rows (see
        :func:`~embedcache.cache.schema.label_pairs`)."""
        g = self.h5[split]
        return label_pairs(g["labels"][:], g["label_matrix"][:] if "label_matrix" in g else None)

    def write(
        self,
        split: str,
        rows: np.ndarray,
        features: np.ndarray,
        failed: dict[int, str],
        views: np.ndarray | None = None,
        hashes: np.ndarray | None = None,
        thumbnails: np.ndarray | None = None,
    ) -> None:
        """Store features for ``rows`` (ascending) and mark them, and the ``failed`` rows, done.

        features : ndarray of shape (len(rows), D), already in the cache dtype.
        views : ndarray of shape (len(rows), V, D) in a cache with views, else None.
        hashes : ndarray of shape (len(rows), 16), uint8, the files' content hashes (None: unknown).
        thumbnails : ndarray of shape (len(rows), 32, 32), uint8, grey thumbnails (None: unknown).
        """
        rows = np.asarray(rows, dtype=np.int64)
        arrays = {"features": features, "views": views, "hashes": hashes, "thumbnails": thumbnails}
        write_batch(self.h5[split], rows, arrays, {int(r): reason for r, reason in failed.items()})

    def merge(self, shard: Path) -> int:
        """Take in the rows a shard file has done or skipped (a copy join, see
        :func:`~embedcache.cache.shards.merge_shard`); returns how many."""
        return merge_shard(self.h5, self.splits, shard)

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
                for name in row_arrays(self.h5[split]):
                    src = self.h5[split][name]
                    rows_dataset(h5[split], name, (len(ok), *src.shape[1:]), src.dtype)

        with atomic_h5(out, layout) as h5:
            for split, ok in keep.items():
                for name in row_arrays(self.h5[split]):
                    copy_rows(self.h5[split][name], ok, h5[split][name], np.arange(len(ok)))
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
        parts, where = gather_parts(self, out, shards, status, reasons)

        def layout(h5: h5py.File) -> None:
            _final_layout(h5, self, attrs, status, reasons)
            virtual_arrays(h5, self, out, parts, status, where)

        with atomic_h5(out, layout) as h5:
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
    multi = bool(partial.h5.attrs.get("multi_label", False))
    h5.attrs["format_version"] = written_format(multi)  # whatever version began the partial file
    h5.attrs["complete"] = False
    skipped: dict[str, list] = {k: [] for k in ("split", "path", "reason", "size", "mtime")}
    for split in partial.splits:
        src, st = partial.h5[split], status[split]
        assert not np.any(st == TODO), "finalize before every row is done"
        ok, bad = np.flatnonzero(st == DONE), np.flatnonzero(st == SKIPPED)
        dst = h5.create_group(split)
        for name in ("labels", "sizes", "mtimes", "label_matrix"):
            if name in src:
                checked(dst, name, src[name][:][ok])
        paths = np.array(read_names(src["paths"]), dtype=object)
        write_names(dst, "paths", list(paths[ok]))
        skipped["split"] += [split] * len(bad)
        skipped["path"] += list(paths[bad])
        skipped["reason"] += [reasons[split][i].decode(errors="replace") for i in bad]
        skipped["size"] += list(src["sizes"][:][bad])
        skipped["mtime"] += list(src["mtimes"][:][bad])
    g = h5.create_group("skipped")
    for name in ("split", "path", "reason"):
        write_names(g, name, skipped[name])
    for name in ("size", "mtime"):
        g.create_dataset(name, data=np.array(skipped[name], np.int64))
    if "ignored" in partial.h5:
        ig = partial.h5["ignored"]
        write_ignored(h5, list(zip(read_names(ig["path"]), read_names(ig["reason"]), strict=True)))
    seal(h5)


def _checked_arrays(splits: dict, classes: list[str]) -> tuple[int, str, bool]:
    """(feature dim, dtype, multi-label) of write_cache's arrays, every split's checked: (N, D)
    features of one D and a dtype in DTYPES, and labels all (N,) or all (N, C) bool."""
    dims = {f.shape[1] for f, _, _ in splits.values()}
    dtypes = {str(f.dtype) for f, _, _ in splits.values()}
    if len(dims) != 1 or len(dtypes) != 1 or dtypes - set(DTYPES):
        raise EmbedcacheError(
            f"every split needs (N, D) features of one D and a dtype in {DTYPES}; "
            f"got dims {dims}, dtypes {dtypes}"
        )
    labels = {s: np.asarray(y) for s, (_, y, _) in splits.items()}
    kinds = {y.ndim for y in labels.values()}
    wide = kinds == {2} and all(y.dtype == bool for y in labels.values())
    if kinds != {1} and not wide:
        given = ", ".join(f"{s} {y.dtype} {y.shape}" for s, y in labels.items())
        raise EmbedcacheError(
            "labels must be (N,) class indices in every split, or (N, C) bool in every split "
            f"(multi-label); got {given}"
        )
    off = next((s for s, y in labels.items() if wide and y.shape[1] != len(classes)), None)
    if off is not None:
        raise EmbedcacheError(
            f"the label matrix of split {off} has {labels[off].shape[1]} columns, not one per "
            f"class ({len(classes)}); give labels of shape (N, {len(classes)})"
        )
    return dims.pop(), dtypes.pop(), bool(wide)


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
    """Write a complete cache from arrays: ``{split: (features (N, D), labels, paths)}``.

    labels : ndarray of shape (N,), int64 class indices (-1: unlabelled), or, in every split,
        bool of shape (N, len(classes)): a multi-label cache (``label_matrix``, and ``labels``
        each row's first class, -1 where it has none).

    For features computed elsewhere, tests and benchmarks; the file is the same
    schema `extract` writes (without file sizes and times: they are -1).
    ``views`` gives each split's stored views, ``{split: (N, V, D)}`` (V for train,
    1 elsewhere), as ``extract --views V`` stores them.
    """
    views = views or {}
    path = Path(path)
    dim, dtype, multi = _checked_arrays(splits, classes)
    attrs = {
        "format_version": written_format(multi),
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
        **({"multi_label": True} if multi else {}),
    }
    if views:
        attrs.update(views=int(views["train"].shape[1]), view_policy="given as arrays")

    def layout(h5: h5py.File) -> None:
        h5.attrs.update(attrs)
        h5.attrs["complete"] = False
        for name, (_, labels, paths) in splits.items():
            n = len(labels)
            g = h5.create_group(name)
            rows_dataset(g, "features", (n, dim), np.dtype(dtype))
            if name in views:
                rows_dataset(g, "views", views[name].shape, np.dtype(dtype))
            _write_labels(g, np.asarray(labels), multi)
            write_names(g, "paths", list(paths))
            checked(g, "sizes", np.full(n, -1, np.int64))
            checked(g, "mtimes", np.full(n, -1, np.int64))
        g = h5.create_group("skipped")
        for name in ("split", "path", "reason"):
            g.create_dataset(name, data=[], dtype=STR)
        for name in ("size", "mtime"):
            g.create_dataset(name, data=np.zeros(0, np.int64))
        seal(h5)

    with atomic_h5(path, layout) as h5:
        for name, (features, _, _) in splits.items():
            for lo in range(0, len(features), COPY_ROWS):
                h5[name]["features"][lo : lo + COPY_ROWS] = features[lo : lo + COPY_ROWS]
                if name in views:
                    h5[name]["views"][lo : lo + COPY_ROWS] = views[name][lo : lo + COPY_ROWS]
        h5.attrs.modify("complete", True)
    return path


def _write_labels(g: h5py.Group, labels: np.ndarray, multi: bool) -> None:
    """A split's ``labels`` (and, multi-label, its packed ``label_matrix``) from write_cache's
    labels: (N,) class indices, or (N, C) bool."""
    if not multi:
        checked(g, "labels", labels.astype(np.int64))
        return
    checked(g, "labels", first_labels(labels))
    checked(g, "label_matrix", np.packbits(labels, axis=1, bitorder="little"))


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
