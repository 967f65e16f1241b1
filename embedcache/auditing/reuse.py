"""Incremental audit (``--reuse``): the approximate index saved beside the findings, and the
audit of the cache grown since that reuses it.

An approximate audit writes ``index.faiss`` (the trained IVF index, faiss's own format),
``index.json`` (which features it holds, its rows, the digest of the next file) and
``index_rows.npz`` (each id's split, path, content hash, a sketch of its features and its
nearest neighbours, as ids). ``--reuse AUDIT_DIR`` matches those rows to this cache's by split
and path, wherever they now are, checks they are the same images with the same features, adds
only the new rows to the index (no k-means) and searches only the new rows against all; an old
row's neighbours are its stored ones merged with the new rows found for it
(:func:`.index.grown`). The recall check runs as on a fresh index.

Other features, or an old image whose bytes or features changed, is a one-line error: the
index holds what no longer is. An old image gone from the cache (a shrunk cache, an image moved
to another split) cannot be taken out of the stored neighbours: a fresh index, said in a line.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EmbedcacheError
from ..outputs import shown
from .findings import Pool

INDEX, META, ROWS = "index.faiss", "index.json", "index_rows.npz"
FORMAT = 1
FRESH = "run a fresh audit (without --reuse)"
# seeded directions each row's unit features are projected on: a row whose features changed
# moves by far more than float32 rounding (about 1e-6) on at least one
SKETCH_DIMS, SKETCH_TOLERANCE, SKETCH_ROWS = 4, 1e-3, 4096  # 4,096: 21 MB of float32 at a time


@dataclass
class Searched:
    """An approximate search, to save: the faiss index (its ids 0.. the pool rows ``ids``),
    every row's ``neighbours`` (n, k) int64 (rows) and ``sketch`` (n, SKETCH_DIMS) float32."""

    index: object
    ids: np.ndarray
    neighbours: np.ndarray
    sketch: np.ndarray


@dataclass
class Earlier:
    """An earlier audit's index that matches this cache: ``rows`` (old,) int64, the pool row of
    each of its ids; ``stored`` (n, s) int64, the old rows' neighbours (rows; -1 on new rows),
    None where fewer than --neighbours were stored."""

    folder: Path
    index: object
    rows: np.ndarray
    stored: np.ndarray | None
    sketch: np.ndarray


def features_of(cache) -> dict:
    """What a cache's features are: backbone, weights, transform and feature_dim."""
    return {**cache.features_identity.as_dict(), "feature_dim": int(cache.feature_dim)}


def sketch(unit: np.ndarray) -> np.ndarray:
    """Each row of ``unit`` (n, d) projected on SKETCH_DIMS seeded directions: (n, 4) float32."""
    directions = np.random.default_rng(0).normal(size=(unit.shape[1], SKETCH_DIMS))
    directions = directions.astype(np.float32)
    out = np.empty((len(unit), SKETCH_DIMS), np.float32)
    for lo in range(0, len(unit), SKETCH_ROWS):
        out[lo : lo + SKETCH_ROWS] = unit[lo : lo + SKETCH_ROWS].astype(np.float32) @ directions
    return out


def _arrays(pool: Pool, searched: Searched) -> dict[str, np.ndarray]:
    """index_rows.npz: every id's split (into index.json's splits), path (UTF-8 bytes, ends),
    hash, sketch and neighbours (ids), in the order of the ids."""
    ids = searched.ids
    encoded = [pool.paths[r].encode("utf-8", "surrogateescape") for r in ids.tolist()]
    of_id = np.empty(len(ids), np.int64)  # the id of each row
    of_id[ids] = np.arange(len(ids))
    arrays = {
        "split": pool.split[ids].astype(np.int16),
        "path_bytes": np.frombuffer(b"".join(encoded), np.uint8),
        "path_ends": np.cumsum([len(p) for p in encoded], dtype=np.int64),
        "sketch": searched.sketch[ids],
        "neighbours": of_id[searched.neighbours[ids]].astype(np.int32),  # under 2**31 images
    }
    if pool.hashes is not None:
        arrays["hashes"] = pool.hashes[ids]
    return arrays


def _digest(arrays: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name} {a.dtype.str} {a.shape}\0".encode() + a.tobytes())
    return h.hexdigest()


def write(staging: Path, searched: Searched, pool: Pool, features: dict) -> None:
    """Write the index, index.json and index_rows.npz of an approximate audit into ``staging``."""
    from .index import faiss_module
    from .index import name as index_name

    faiss_module().write_index(searched.index, str(staging / INDEX))
    arrays = _arrays(pool, searched)
    with open(staging / ROWS, "wb") as f:
        np.savez(f, **arrays)
    meta = {
        "format": FORMAT,
        "features": features,
        "rows": len(searched.ids),
        "index": index_name(searched.index),
        "neighbours": int(searched.neighbours.shape[1]),
        "splits": list(pool.splits),
        "hashes": pool.hashes is not None,
        "digest": _digest(arrays),
        "how": f"--reuse this folder: a later audit adds only its new images to {INDEX}",
    }
    (staging / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _meta(folder: Path) -> dict:
    """index.json of an earlier audit, or a one-line error."""
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or not (folder / INDEX).is_file():
        raise EmbedcacheError(
            f"--reuse {shown(folder)} holds no {INDEX} and {META}: an audit writes them with "
            f"--index approx (or from 50,000 images); {FRESH}"
        )
    if meta.get("format") != FORMAT:
        raise EmbedcacheError(
            f"--reuse {shown(folder)}: {META} is format {meta.get('format')}, this version "
            f"reads {FORMAT}; {FRESH}"
        )
    return meta


def _rows_of(folder: Path, meta: dict) -> dict[str, np.ndarray]:
    try:
        with np.load(folder / ROWS, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError) as e:
        raise EmbedcacheError(
            f"--reuse {shown(folder)}: cannot read {ROWS} ({e}); {FRESH}"
        ) from None
    if _digest(arrays) != meta.get("digest") or len(arrays.get("split", ())) != meta.get("rows"):
        raise EmbedcacheError(
            f"--reuse {shown(folder)}: {ROWS} is not the one {META} describes (its digest "
            f"differs); {FRESH}"
        )
    return arrays


def _positions(pool: Pool, splits: list[str], arrays: dict) -> tuple[np.ndarray, list[str]]:
    """The pool row of each old id (-1: not in this cache), and the old paths."""
    raw, ends = arrays["path_bytes"].tobytes(), arrays["path_ends"].tolist()
    starts = [0, *ends[:-1]]
    paths = [raw[a:b].decode("utf-8", "surrogateescape") for a, b in zip(starts, ends, strict=True)]
    names = [pool.splits[s] for s in pool.split.tolist()]
    where = {key: r for r, key in enumerate(zip(names, pool.paths, strict=True))}
    if len(where) < len(pool):
        return np.full(len(paths), -2, np.int64), paths  # a path twice in a split: no map
    keys = zip((splits[s] for s in arrays["split"].tolist()), paths, strict=True)
    return np.array([where.get(key, -1) for key in keys], np.int64), paths


def load(folder, pool: Pool, unit: np.ndarray, features: dict, k: int):
    """The index of the earlier audit in ``folder``, matched to this cache: (:class:`Earlier`,
    None), or (None, why a fresh index is built instead). Raises where its features or an old
    image differ."""
    folder = Path(folder)
    meta = _meta(folder)
    old = meta.get("features") or {}
    if old != features:
        diff = "; ".join(f"{n} {old.get(n)} vs {v}" for n, v in features.items() if old.get(n) != v)
        raise EmbedcacheError(
            f"--reuse {shown(folder)} indexes other features than this cache ({diff}); {FRESH}"
        )
    arrays = _rows_of(folder, meta)
    rows, paths = _positions(pool, meta.get("splits", []), arrays)
    if (rows == -2).any():
        return None, "a path appears twice in a split of this cache: a fresh index"
    if (rows < 0).any():
        gone = int(np.count_nonzero(rows < 0))
        first = shown(paths[int(np.argmax(rows < 0))])
        return None, (
            f"{gone} of its {len(rows)} images are not in this cache's splits (e.g. {first}), "
            "and its stored neighbours may name them: a fresh index"
        )
    now = sketch(unit)
    _check_same(folder, pool, rows, paths, arrays, now)
    from .index import faiss_module

    index = faiss_module().read_index(str(folder / INDEX))
    if index.ntotal != len(rows) or index.d != features["feature_dim"]:
        raise EmbedcacheError(f"--reuse {shown(folder)}: {INDEX} is not the one {META} describes")
    stored = None
    if arrays["neighbours"].shape[1] >= k:
        stored = np.full((len(pool), arrays["neighbours"].shape[1]), -1, np.int64)
        stored[rows] = rows[arrays["neighbours"]]
    return Earlier(folder, index, rows, stored, now), None


def _check_same(folder, pool: Pool, rows, paths, arrays: dict, now: np.ndarray) -> None:
    """Raise where an old image's content hash or features differ from this cache's."""
    moved = np.abs(now[rows] - arrays["sketch"]).max(1) > SKETCH_TOLERANCE
    changed, what = moved, "features"
    if "hashes" in arrays and pool.hashes is not None:
        old, new = arrays["hashes"], pool.hashes[rows]
        other = old.any(1) & new.any(1) & (old != new).any(1)
        changed, what = moved | other, "bytes" if other.any() else what
    if changed.any():
        first = shown(paths[int(np.argmax(changed))])
        raise EmbedcacheError(
            f"--reuse {shown(folder)}: {np.count_nonzero(changed)} of its images have other "
            f"{what} in this cache (e.g. {first}), so its index no longer holds them; {FRESH}"
        )


def search(unit: np.ndarray, earlier: Earlier, cfg, progress: bool, say, checked=None):
    """Each image's neighbours through the earlier index, only the new rows added: as
    :func:`embedcache.auditing._neighbours` returns them, with the :class:`Searched` to save."""
    from .index import grown

    new = np.setdiff1d(np.arange(len(unit)), earlier.rows)
    say(
        f"neighbours: reused the index of {shown(earlier.folder)} ({len(earlier.rows)} old "
        f"images), added {len(new)}"
    )
    best, sims, record, ids, merged = grown(
        earlier.index,
        unit,
        (earlier.rows, earlier.stored),
        k=cfg.neighbours,
        floor=cfg.recall_floor,
        seed=cfg.seed,
        progress=progress,
        checked=checked,
    )
    say(f"neighbours: {record.describe()}")
    old = "stored ones merged with the new images found for them"
    if not merged:
        why = "fewer than --neighbours stored" if earlier.stored is None else "recall under floor"
        old = f"searched again ({why})"
    reused = {
        "from": str(earlier.folder),
        "old_rows": len(earlier.rows),
        "new_rows": len(new),
        "old_neighbours": old,
    }
    searched = Searched(earlier.index, ids, best, earlier.sketch)
    return best, sims, {**record.to_dict(), "how": record.describe(), "reused": reused}, searched
