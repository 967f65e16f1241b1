"""Reading a finished cache: open it, check it, read its splits in checked slices.

:func:`open_cache` refuses what is not a complete cache of a format this version reads,
and checks the layout and the SHA-256 of the attributes; labels and paths are checked
against their digest when first read, and every slice of features against its
Fletcher-32 checksum and for non-finite values (:class:`CheckedFeatures`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from ..data import Sample
from ..errors import EmbedcacheError
from ..feed import BLOCK_ROWS
from ..identity import CacheIdentity, FeatureIdentity
from ..outputs import misplaced
from .schema import (
    CACHE_ATTRS,
    DONE,
    FORMAT_VERSION,
    REASON_BYTES,
    ROW_ARRAYS,
    SKIPPED,
    TODO,
    SkippedFile,
    SplitData,
    contents_digest,
    file_keys,
    identity_digest,
    label_matrix,
    label_pairs,
    packed_width,
    partial_path,
    read_names,
    split_names,
)
from .shards import parts_dir, virtual_parts
from .storage import reuse_rows


def _h5_error(path: Path, e: Exception) -> EmbedcacheError:
    return EmbedcacheError(f"{path} is not a readable HDF5 file ({str(e).splitlines()[0][:120]})")


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)  # set bits of a byte
_READ_ERRORS = (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError)


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
    if "identity_digest" in h5.attrs and h5.attrs["identity_digest"] != identity_digest(h5.attrs):
        what = "its attributes (backbone, weights, transform, classes ...)"
        raise _damaged(path, f"{what} do not match their SHA-256")
    for split in split_names(h5):
        g = h5[split]
        missing = [k for k in ("features", "labels", "paths") if k not in g]
        if missing:
            raise _damaged(path, f"split {split} has no {', '.join(missing)}")
        names = (*ROW_ARRAYS, "labels", "label_matrix", "paths", "sizes", "mtimes")
        rows = {k: g[k].shape[0] for k in names if k in g}
        if len(set(rows.values())) != 1:
            counts = ", ".join(f"{k} {v}" for k, v in rows.items())
            raise _damaged(path, f"the row counts of split {split} disagree ({counts})")
        if g["features"].shape[1:] != (dim,):
            shape = g["features"].shape
            raise _damaged(path, f"split {split} has features {shape}, not {dim} values per row")
        if bool(h5.attrs.get("multi_label", False)):
            _check_matrix(path, split, g, len(classes))


def _check_matrix(path: Path, split: str, g: h5py.Group, num_classes: int) -> None:
    """A multi-label cache's split has its packed label matrix, one bit a class."""
    if "label_matrix" not in g:
        raise _damaged(path, f"split {split} of a multi-label cache has no label_matrix")
    ds, width = g["label_matrix"], packed_width(num_classes)
    if ds.dtype != np.uint8 or ds.shape[1:] != (width,):
        raise _damaged(
            path,
            f"split {split} has a label_matrix {ds.shape} {ds.dtype}, not {width} bytes a row "
            f"(uint8) for {num_classes} classes",
        )


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
        self.splits: list[str] = split_names(h5)
        # checked labels, paths and (multi-label) packed label matrix of each split read
        self._read: dict[str, tuple[np.ndarray, list[str], np.ndarray | None]] = {}

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
        """Which features these are, whatever their storage dtype (what heads are checked
        against)."""
        return FeatureIdentity.from_mapping(self.attrs)

    @property
    def weights_arg(self) -> str:
        """The --weights value that rebuilds the backbone of these features."""
        from ..weights import weights_arg_for

        return str(self.attrs.get("weights_arg", weights_arg_for(self.weights)))

    @property
    def multi_label(self) -> bool:
        """Whether images may have several labels (see :meth:`label_matrix`)."""
        return bool(self.attrs.get("multi_label", False))

    def labels(self, split: str) -> np.ndarray:
        """Labels of a split, int64 of shape (n_images,), -1 where unlabelled; in a multi-label
        cache each image's first label listed (-1 where it has none)."""
        return self._contents(split)[0].copy()

    def label_matrix(self, split: str, rows: slice = slice(None)) -> np.ndarray:
        """Which classes each image of a split (or of its ``rows``) has: bool of shape
        (n_images, n_classes). In a single-label cache the one-hot of :meth:`labels`
        (unlabelled rows all False)."""
        labels, _, packed = self._contents(split)
        packed = None if packed is None else packed[rows]
        return label_matrix(labels[rows], packed, len(self.classes))

    def class_counts(self, split: str) -> np.ndarray:
        """Images of a split per class, int64 of shape (n_classes,); in a multi-label cache an
        image counts in each of its classes."""
        labels, _, packed = self._contents(split)
        return np.bincount(label_pairs(labels, packed)[1], minlength=len(self.classes))

    def paths(self, split: str, rows: slice = slice(None)) -> list[str]:
        """Image paths of a split (or of its ``rows``), relative to the data root."""
        return list(self._contents(split)[1][rows])

    def _contents(self, split: str) -> tuple[np.ndarray, list[str], np.ndarray | None]:
        """Labels, paths and (multi-label) packed label matrix of a split, read once and
        checked: their digest, the label range, the matrix against the labels."""
        if split not in self._read:
            g = self._group(split)
            with _damage(self.path, f"the labels or paths of split {split}"):
                labels, raw = g["labels"][:], g["paths"][:]
                paths = read_names(g["paths"])
                packed = g["label_matrix"][:] if self.multi_label else None
            sealed = g.attrs.get("contents_digest")
            if sealed is not None and sealed != contents_digest(labels, raw, packed):
                what = f"the labels or paths of split {split}"
                raise _damaged(self.path, f"{what} do not match their SHA-256")
            bad = (labels < -1) | (labels >= len(self.classes))
            if bad.any():
                row, n = int(np.flatnonzero(bad)[0]), len(self.classes)
                label = f"split {split} has label {int(labels[row])} at row {row}"
                raise _damaged(self.path, f"{label}, outside -1..{n - 1} for {n} classes")
            if packed is not None:
                self._check_sets(split, labels, packed)
            self._read[split] = (labels, paths, packed)
        return self._read[split]

    def _check_sets(self, split: str, labels: np.ndarray, packed: np.ndarray) -> None:
        """A multi-label split's matrix sets no bit past the last class, and each label is the
        class of a bit its row sets (-1: a row with none); read in blocks of rows."""
        n = len(self.classes)
        for lo in range(0, len(labels), BLOCK_ROWS):
            bits = np.unpackbits(packed[lo : lo + BLOCK_ROWS], axis=1, bitorder="little")
            y = labels[lo : lo + BLOCK_ROWS]
            has = bits[np.arange(len(y)), np.maximum(y, 0)].astype(bool)
            agree = np.where(y >= 0, has, ~bits[:, :n].any(axis=1))
            wrong = np.flatnonzero(bits[:, n:].any(axis=1) | ~agree)
            if len(wrong):
                row = lo + int(wrong[0])
                raise _damaged(
                    self.path,
                    f"split {split} row {row}: its label_matrix disagrees with its label "
                    f"{int(labels[row])} or sets a bit past the {n} classes",
                )

    def features(self, split: str) -> CheckedFeatures:
        """The on-disk features of a split, read in slices like the h5py dataset; a damaged
        block or a non-finite value is an error naming the rows (see :class:`CheckedFeatures`)."""
        return CheckedFeatures(self._group(split)["features"], self, split)

    def views(self, split: str) -> CheckedFeatures | None:
        """The stored views of a split, (N, V, D), checked like :meth:`features`; None without
        views."""
        g = self._group(split)
        return CheckedFeatures(g["views"], self, split) if "views" in g else None

    def hashes(self, split: str) -> np.ndarray | None:
        """Content hashes of a split, uint8 of shape (n_images, 16) (all zeros: unknown), or
        None for a cache written before format 3 (re-extract it to record them)."""
        g = self._group(split)
        return g["hashes"][:] if "hashes" in g else None

    def thumbnails(self, split: str) -> h5py.Dataset | None:
        """Grey thumbnails of a split, uint8 of shape (n_images, 32, 32) (all zeros: unknown),
        to read in slices (1 KiB a row), or None for a cache written before format 4
        (re-extract it to record them)."""
        g = self._group(split)
        return g.get("thumbnails")

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
            for name in ("labels", "label_matrix", "sizes", "mtimes", "hashes", "thumbnails"):
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
        """Copy into ``g`` the rows of a complete cache (and its skipped files) whose file is
        unchanged."""
        h5 = self._h5
        for split in self.splits:
            src = h5[split]
            n = src["labels"].shape[0]
            index = {k: i for i, k in enumerate(file_keys(src))}
            reuse_rows(
                g,
                samples,
                index,
                {
                    "features": self.features(split),
                    "views": self.views(split),
                    "hashes": src.get("hashes"),
                    "thumbnails": src.get("thumbnails"),
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
            reuse_rows(g, samples, index, None, np.full(len(keys), SKIPPED, np.uint8), reasons)

    @property
    def parts(self) -> list[Path]:
        """The part files a virtual cache reads its features from (none for a single file)."""
        return [self.path.parent / name for name in virtual_parts(self._h5)]

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
            "labels": self._labels_summary(),
            "transform": json.loads(self.transform),
            "splits": {s: self._split_summary(s) for s in self.splits},
            "skipped": [vars(s) for s in self.skipped],
            "ignored": self.ignored,
        }

    def _labels_summary(self) -> dict:
        """Which kind of labels the cache has: ``kind`` none, single or multi; for multi, how
        many labels an image has over every split (``min``, ``max``, ``mean``)."""
        if not self.classes:
            return {"kind": "none"}
        if not self.multi_label:
            return {"kind": "single"}
        per_split = [
            _POPCOUNT[self._contents(s)[2]].sum(axis=1, dtype=np.int64) for s in self.splits
        ]
        counts = np.concatenate([np.zeros(0, np.int64), *per_split])
        if not len(counts):
            return {"kind": "multi", "min": 0, "max": 0, "mean": 0.0}
        low, high, mean = int(counts.min()), int(counts.max()), float(counts.mean())
        return {"kind": "multi", "min": low, "max": high, "mean": round(mean, 3)}

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
                f"cache {self._cache.path} is damaged: split {self.split}{self._what}, "
                f"rows {span} fail their checksum ({_short(e)}); re-run extract with --overwrite"
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
            f"cache {self._cache.path} has non-finite features in split {self.split}{self._what}: "
            f"{len(bad)} row(s), {named}; re-extract them (--overwrite)"
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
        f"cache {path} is incomplete{progress}; "
        "re-run the same `embedcache extract` command to resume it"
    )


def recorded_precision(out: Path) -> str | None:
    """The forward precision (fp32, bf16, fp16) the cache at ``out``, or its unfinished
    in-progress file, records; None where neither is readable or records one."""
    for path in (out, partial_path(out)):
        with contextlib.suppress(OSError, KeyError, ValueError):
            with h5py.File(path, "r") as f:
                recorded = str(f.attrs["precision"])
            if recorded in ("fp32", "bf16", "fp16"):
                return recorded
    return None


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
        wrong = misplaced(  # a checkpoint, a manifest? (an image: the HDF5 error says enough)
            path,
            wanted="an embedcache cache",
            accept=("cache", "image", "plot"),
            hints={"manifest": "extract it first (embedcache extract DATA --out cache.h5)"},
        )
        raise (EmbedcacheError(wrong) if wrong else _h5_error(path, e)) from None
    try:
        version = h5.attrs.get("format_version")
        if version is None or "backbone" not in h5.attrs:
            raise EmbedcacheError(
                f"{path} is an HDF5 file but not an embedcache cache (no format_version attribute)"
            )
        if int(version) > FORMAT_VERSION:
            raise EmbedcacheError(
                f"cache {path} has format {int(version)}, newer than this embedcache reads "
                f"({FORMAT_VERSION}); upgrade embedcache"
            )
        if not bool(h5.attrs.get("complete", False)):
            raise _incomplete_error(path, h5)
        missing = [k for k in CACHE_ATTRS if k not in h5.attrs]
        if missing:
            raise EmbedcacheError(
                f"{path} is not a complete embedcache cache "
                f"(attributes missing: {', '.join(missing)}); re-run `embedcache extract`"
            )
        cache = Cache(path, h5)
        _check_layout(path, h5, cache.feature_dim, cache.classes)
        lost = [p for p in cache.parts if not p.is_file()]
        if lost:
            raise EmbedcacheError(
                f"cache {path} is virtual and its part file {lost[0]} is missing "
                f"({len(lost)} of {len(cache.parts)}); keep the folder {parts_dir(path).name} "
                "next to it, or re-run extract with --overwrite"
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
