"""The HDF5 feature cache: schema, crash-safe writing, resume, validation, reading.

A finished cache ``NAME.h5`` holds, per split group (``train``, ``val``,
``test`` or ``all``)::

    features  (N, D) float16|float32, chunked
    labels    (N,)   int64, -1 when unlabelled
    paths     (N,)   UTF-8, relative to the data root
    sizes     (N,)   int64 bytes   } of the source file when extracted,
    mtimes    (N,)   int64 ns      } used to re-extract only what changed

a ``skipped`` group (split, path, reason, size, mtime of each unreadable file)
and root attributes (``format_version``, ``backbone``, ``weights``,
``feature_dim``, ``classes`` (JSON), ``transform`` (JSON),
``source_fingerprint``, ``complete`` ...).

While extraction runs, rows go to ``NAME.h5.partial``. Every dataset in it is
allocated when the file is created, so later writes touch raw data only and
never HDF5 metadata: a SIGKILL at any moment leaves a readable file. Each
batch writes its features, flushes, then marks its rows done and flushes again;
the next run resumes from the rows marked done. The finished cache is written
to a temporary name and renamed over ``NAME.h5`` in one step, so a file with
that name is always complete.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import glob
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
from .data import SPLIT_ORDER, ImageSet, Sample
from .errors import EmbedcacheError
from .identity import CacheIdentity, FeatureIdentity

FORMAT_VERSION = 1
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


def _h5_error(path: Path, e: Exception) -> EmbedcacheError:
    return EmbedcacheError(f"{path} is not a readable HDF5 file ({str(e).splitlines()[0][:120]})")


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
        return self._group(split)["labels"][:]

    def paths(self, split: str) -> list[str]:
        """Image paths of a split, relative to the data root."""
        return list(self._group(split)["paths"].asstr()[:])

    def features(self, split: str) -> h5py.Dataset:
        """The on-disk features of a split, for reading in slices without loading it all."""
        return self._group(split)["features"]

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
                src["features"],
                np.full(n, DONE, np.uint8),
                np.zeros(n, f"S{REASON_BYTES}"),
            )
        if "skipped" in h5 and h5["skipped"]["path"].shape[0]:
            sk = h5["skipped"]
            keys = list(
                zip(
                    sk["path"].asstr()[:],
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
    def skipped(self) -> list[SkippedFile]:
        if "skipped" not in self._h5:
            return []
        g = self._h5["skipped"]
        cols = [g[k].asstr()[:] for k in ("split", "path", "reason")]
        return [SkippedFile(*row) for row in zip(*cols, strict=True)]

    def summary(self) -> dict:
        """Everything `embedcache info` shows, as plain JSON-ready data."""
        return {
            "path": str(self.path),
            "file_bytes": self.path.stat().st_size,
            **{k: v for k, v in self.attrs.items() if k not in ("classes", "transform")},
            "classes": self.classes,
            "transform": json.loads(self.transform),
            "splits": {
                s: {
                    "images": self.num_images(s),
                    "shape": list(self.features(s).shape),
                    "dtype": str(self.features(s).dtype),
                }
                for s in self.splits
            },
            "skipped": [vars(s) for s in self.skipped],
        }


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
        return Cache(path, h5)
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
        raise


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def estimate_bytes(images: ImageSet, feature_dim: int, dtype: str) -> int:
    """Disk needed while extracting: the in-progress file plus the finished one, with margin."""
    rows = len(images)
    paths = sum(len(s.path.encode()) + 16 for split in images.splits.values() for s in split)
    finished = rows * (feature_dim * np.dtype(dtype).itemsize + 24) + paths
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

        def layout(h5: h5py.File) -> None:
            h5.attrs.update(attrs)
            h5.attrs["complete"] = False
            for split, samples in images.splits.items():
                g = h5.create_group(split)
                n = len(samples)
                g.create_dataset("features", (n, feature_dim), dtype=dtype, dcpl=_early())
                g.create_dataset("status", data=np.zeros(n, np.uint8))
                g.create_dataset("reasons", data=np.zeros(n, f"S{REASON_BYTES}"))
                g.create_dataset("paths", data=[s.path for s in samples], dtype=_STR)
                g.create_dataset("labels", data=np.array([s.label for s in samples], np.int64))
                g.create_dataset("sizes", data=np.array([s.size for s in samples], np.int64))
                g.create_dataset("mtimes", data=np.array([s.mtime_ns for s in samples], np.int64))

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
            _reuse_rows(g, samples, index, src["features"], status, src["reasons"][:])

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
        return list(self.h5[split]["paths"].asstr()[:])

    def write(
        self, split: str, rows: np.ndarray, features: np.ndarray, failed: dict[int, str]
    ) -> None:
        """Store features for ``rows`` (ascending) and mark them, and the ``failed`` rows, done.

        features : ndarray of shape (len(rows), D), already in the cache dtype.
        """
        g = self.h5[split]
        if len(rows):
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            if hi - lo == len(rows):
                g["features"][lo:hi] = features
            else:  # rows with gaps (images reused from an older cache): read-modify-write the span
                span = g["features"][lo:hi]
                span[rows - lo] = features
                g["features"][lo:hi] = span
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
                feats = sh["features"][int(pos[0]) : int(pos[-1]) + 1][pos - pos[0]]
                marks = {}
                for i, split in enumerate(self.splits):
                    mine = np.flatnonzero(where[pos] == i)
                    ok = mine[status[pos[mine]] == DONE]
                    _write_rows(self.h5[split]["features"], rows[pos[ok]], feats[ok])
                    marks[split] = mine
                self.h5.flush()  # features before the status that points at them
                for split, mine in marks.items():
                    self._mark(split, rows[pos[mine]], status[pos[mine]], sh["reasons"], pos[mine])
                self.h5.flush()
        return len(done)

    def _mark(self, split: str, rows: np.ndarray, status: np.ndarray, reasons, src: np.ndarray) -> None:  # fmt: skip
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
        """Write the finished cache to ``out`` atomically, then remove this partial file."""
        keep = {split: np.flatnonzero(self.h5[split]["status"][:] == DONE) for split in self.splits}

        def layout(h5: h5py.File) -> None:
            h5.attrs.update(dict(self.h5.attrs))
            h5.attrs.update(attrs)
            h5.attrs["complete"] = False
            skipped: dict[str, list] = {k: [] for k in ("split", "path", "reason", "size", "mtime")}
            for split in self.splits:
                src, ok = self.h5[split], keep[split]
                status = src["status"][:]
                assert not np.any(status == TODO), "finalize before every row is done"
                bad = np.flatnonzero(status == SKIPPED)
                n, dim = len(ok), src["features"].shape[1]
                dst = h5.create_group(split)
                chunks = (
                    (min(n, _rows_per_chunk(dim, src["features"].dtype.itemsize)), dim)
                    if n
                    else None
                )
                dst.create_dataset(
                    "features", (n, dim), dtype=src["features"].dtype, chunks=chunks, dcpl=_early()
                )
                for name in ("labels", "sizes", "mtimes"):
                    dst.create_dataset(name, data=src[name][:][ok])
                paths = np.array(src["paths"].asstr()[:], dtype=object)
                dst.create_dataset("paths", data=list(paths[ok]), dtype=_STR)
                reasons = src["reasons"][:]
                skipped["split"] += [split] * len(bad)
                skipped["path"] += list(paths[bad])
                skipped["reason"] += [reasons[i].decode(errors="replace") for i in bad]
                skipped["size"] += list(src["sizes"][:][bad])
                skipped["mtime"] += list(src["mtimes"][:][bad])
            g = h5.create_group("skipped")
            for name in ("split", "path", "reason"):
                g.create_dataset(name, data=skipped[name], dtype=_STR)
            for name in ("size", "mtime"):
                g.create_dataset(name, data=np.array(skipped[name], np.int64))

        with _atomic_h5(out, layout) as h5:
            for split, ok in keep.items():
                _copy_rows(
                    self.h5[split]["features"], ok, h5[split]["features"], np.arange(len(ok))
                )
            h5.attrs.modify("complete", True)  # in place: no new space needed
        self.close()
        self.path.unlink(missing_ok=True)


def shard_path(out: Path, rank: int) -> Path:
    """Where rank ``rank`` of a torchrun extraction keeps its rows of ``out``."""
    return Path(f"{partial_path(out)}.shard{rank}")


def shard_paths(out: Path) -> list[Path]:
    """Every shard file next to ``out``, by rank (left by this run or by an earlier one)."""
    found = partial_path(out).parent.glob(glob.escape(partial_path(out).name) + ".shard*")
    return sorted((p for p in found if p.name.rsplit("shard", 1)[-1].isdigit()), key=lambda p: int(p.name.rsplit("shard", 1)[-1]))  # fmt: skip


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
    def create(cls, path: Path, splits: list[str], items: list[tuple[str, int]], *, feature_dim: int, dtype: str) -> ShardFile:  # fmt: skip
        """A new shard file for ``items`` (split, row), in that order, opened for filling."""
        index = {s: i for i, s in enumerate(splits)}

        def layout(h5: h5py.File) -> None:
            n = len(items)
            h5.create_dataset("split", data=np.array([index[s] for s, _ in items], np.uint8))
            h5.create_dataset("row", data=np.array([r for _, r in items], np.int64))
            h5.create_dataset("features", (n, feature_dim), dtype=dtype, dcpl=_early())
            h5.create_dataset("status", data=np.zeros(n, np.uint8))
            h5.create_dataset("reasons", data=np.zeros(n, f"S{REASON_BYTES}"))

        with _atomic_h5(path, layout):
            pass
        return cls(h5py.File(path, "r+"), splits)

    @property
    def dtype(self) -> str:
        """The stored feature dtype."""
        return str(self.h5["features"].dtype)

    def write(self, split: str, rows: np.ndarray, features: np.ndarray, failed: dict[int, str]) -> None:  # fmt: skip
        """Store one batch: the same contract as :meth:`PartialCache.write`."""
        pos = np.array([self._pos[(split, int(r))] for r in rows], np.int64)
        bad = np.array([self._pos[(split, int(r))] for r in failed], np.int64)
        every = np.concatenate([pos, bad])
        lo, hi = int(every.min()), int(every.max()) + 1  # one batch: contiguous positions
        if len(pos):
            span = self.h5["features"][lo:hi]
            span[pos - lo] = features
            self.h5["features"][lo:hi] = span
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
) -> Path:
    """Write a complete cache from arrays: ``{split: (features (N, D), labels (N,), paths)}``.

    For features computed elsewhere, tests and benchmarks; the file is the same
    schema `extract` writes (without file sizes and times: they are -1).
    """
    path = Path(path)
    dims = {f.shape[1] for f, _, _ in splits.values()}
    dtypes = {str(f.dtype) for f, _, _ in splits.values()}
    if len(dims) != 1 or len(dtypes) != 1 or dtypes - set(DTYPES):
        raise EmbedcacheError(
            f"every split needs (N, D) features of one D and a dtype in {DTYPES}; got dims {dims}, dtypes {dtypes}"
        )
    dim, dtype = dims.pop(), dtypes.pop()
    attrs = {
        "format_version": FORMAT_VERSION, "tool": "embedcache", "backbone": backbone, "weights": weights,
        "weights_arg": weights, "transform": transform, "dtype": dtype, "feature_dim": dim,
        "classes": json.dumps(classes), "num_classes": len(classes), "source": source, "layout": "arrays",
        "source_fingerprint": "", "created": now_iso(),
    }  # fmt: skip

    def layout(h5: h5py.File) -> None:
        h5.attrs.update(attrs)
        h5.attrs["complete"] = False
        for name, (_, labels, paths) in splits.items():
            n = len(labels)
            g = h5.create_group(name)
            chunks = (min(n, _rows_per_chunk(dim, np.dtype(dtype).itemsize)), dim) if n else None
            g.create_dataset("features", (n, dim), dtype=dtype, chunks=chunks, dcpl=_early())
            g.create_dataset("labels", data=np.asarray(labels, np.int64))
            g.create_dataset("paths", data=list(paths), dtype=_STR)
            g.create_dataset("sizes", data=np.full(n, -1, np.int64))
            g.create_dataset("mtimes", data=np.full(n, -1, np.int64))
        g = h5.create_group("skipped")
        for name in ("split", "path", "reason"):
            g.create_dataset(name, data=[], dtype=_STR)
        for name in ("size", "mtime"):
            g.create_dataset(name, data=np.zeros(0, np.int64))

    with _atomic_h5(path, layout) as h5:
        for name, (features, _, _) in splits.items():
            for lo in range(0, len(features), COPY_ROWS):
                h5[name]["features"][lo : lo + COPY_ROWS] = features[lo : lo + COPY_ROWS]
        h5.attrs.modify("complete", True)
    return path


def _keys(g: h5py.Group) -> list[tuple[str, int, int]]:
    return list(
        zip(g["paths"].asstr()[:], g["sizes"][:].tolist(), g["mtimes"][:].tolist(), strict=True)
    )


def _reuse_rows(
    g: h5py.Group,
    samples: list[Sample],
    index: dict,
    src_features: h5py.Dataset | None,
    src_status: np.ndarray,
    src_reasons: np.ndarray,
) -> None:
    """Copy the rows of ``samples`` found in ``index`` (key -> source row) into group ``g``."""
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
        _copy_rows(src_features, src_rows[done], g["features"], dst_rows[done])
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
            [(int(starts[g]), min(self.n, int(starts[g]) + BLOCK_ROWS)) for g in np.sort(order[i : i + per_buffer])]
            for i in range(0, len(order), per_buffer)
        ]  # fmt: skip

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
