"""export-features: a cache's features as .npy files plus Parquet tables, the layout that
clip-retrieval writes and autofaiss, numpy, pandas and cleanlab read as they are::

    OUT/export.json                          what was exported from which cache (written last)
    OUT/SPLIT/img_emb/img_emb_K.npy          (n_K, D) features, the cache's rows in order
    OUT/SPLIT/metadata/metadata_K.parquet    image_path, key, label, class_name, split:
                                             row i describes row i of img_emb_K.npy; a
                                             multi-label cache adds labels, class_names
                                             (lists: every label of the image)

Each pair holds at most ``chunk_rows`` rows; features are copied a block at a time, so a
cache of any size exports in bounded memory. OUT may be absent, empty, or an earlier export
with nothing added; the files are written aside and moved into place at the end, so a failed
run leaves the earlier export as it was (:func:`embedcache.outputs.folder_output`).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .cache import COPY_ROWS, Cache, open_cache
from .config import ExportFeaturesConfig
from .errors import EmbedcacheError
from .outputs import alive, folder_output
from .sources import INSTALL_PARQUET, is_shard_layout, shard_of

MANIFEST = "export.json"
TOOL = "embedcache export-features"
COLUMNS = ("image_path", "key", "label", "class_name", "split")
MULTI_LABEL_COLUMNS = ("labels", "class_names")  # in the tables of a multi-label cache


@dataclass
class FeatureExport:
    """What :func:`export_features` wrote: rows per split and the files, relative to ``path``."""

    path: Path
    splits: dict[str, int]
    feature_dim: int
    dtype: str
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rows = ", ".join(f"{s} {n}" for s, n in self.splits.items())
        return (
            f"wrote {self.path}: {rows} rows of {self.feature_dim} {self.dtype} "
            f"features in {len(self.files)} files"
        )


def _earlier_export(out: Path) -> set[str] | None:
    """The files of an export written before folder markers: export.json and what it lists."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("tool") != TOOL:
        return None
    return {MANIFEST, *(f for f in manifest.get("files", []) if isinstance(f, str))}


def _drop_old_leftovers(out: Path) -> None:
    """Remove ``.OUT.tmp-PID`` and ``.OUT.old-PID`` beside OUT, which runs before folder markers
    left when they were killed (or when OUT was a link)."""
    if not out.name:
        return
    for p in out.parent.glob(f".{glob.escape(out.name)}.*-*"):
        kind, _, pid = p.name[len(out.name) + 2 :].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _keys(paths: list[str], layout: str) -> list[str]:
    """The sample keys: the WebDataset key or Parquet row in a shard,
    else the path minus its suffix."""
    if is_shard_layout(layout):
        return [p[len(shard_of(p, layout)) + 1 :] for p in paths]
    return [os.path.splitext(p)[0] for p in paths]


def _split_names(cache: Cache, split: str | None) -> list[str]:
    if split is None:
        return list(cache.splits)
    names = [s.strip() for s in split.split(",") if s.strip()]
    missing = [s for s in names if s not in cache.splits]
    if missing or not names:
        raise EmbedcacheError(
            f"--split must name splits of the cache ({', '.join(cache.splits)}), got {split!r}"
        )
    return names


def _write_npy(path: Path, features, lo: int, hi: int, dtype: np.dtype, bar) -> None:
    """Rows [lo, hi) of ``features`` as one .npy file, a block at a time. Not a memmap: a write
    into a memmap on a full disk kills the process with SIGBUS instead of raising."""
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": (hi - lo, features.shape[1]),
    }
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for a in range(lo, hi, COPY_ROWS):
            b = min(hi, a + COPY_ROWS)
            f.write(np.ascontiguousarray(features[a:b], dtype=dtype).tobytes())
            bar.update(b - a)


def _write_chunk(
    cache: Cache, split: str, lo: int, hi: int, folder: Path, k: int, dtype, bar
) -> list[str]:
    """Rows [lo, hi) of ``split`` as img_emb_K.npy and metadata_K.parquet under ``folder``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = folder / "img_emb" / f"img_emb_{k}.npy"
    _write_npy(emb, cache.features(split), lo, hi, dtype, bar)
    paths = cache.paths(split, slice(lo, hi))
    labels = cache.labels(split)[lo:hi]
    names = [cache.classes[y] if 0 <= y < len(cache.classes) else None for y in labels.tolist()]
    columns = {
        "image_path": pa.array(paths, pa.string()),
        "key": pa.array(_keys(paths, str(cache.attrs.get("layout", ""))), pa.string()),
        "label": pa.array(labels, pa.int64()),
        "class_name": pa.array(names, pa.string()),
        "split": pa.array([split] * len(paths), pa.string()),
    }
    if cache.multi_label:
        sets = [np.flatnonzero(row).tolist() for row in cache.label_matrix(split, slice(lo, hi))]
        named = [[cache.classes[c] for c in row] for row in sets]
        columns["labels"] = pa.array(sets, pa.list_(pa.int64()))
        columns["class_names"] = pa.array(named, pa.list_(pa.string()))
    table = pa.table(columns)
    meta = folder / "metadata" / f"metadata_{k}.parquet"
    pq.write_table(table, meta)
    return [emb.relative_to(folder.parent).as_posix(), meta.relative_to(folder.parent).as_posix()]


def _write(
    cache: Cache, splits: list[str], tmp: Path, cfg: ExportFeaturesConfig, progress: bool
) -> tuple[dict, list, str]:
    counts = {s: cache.num_images(s) for s in splits}
    dtype = np.dtype(cache.identity.dtype if cfg.dtype == "stored" else cfg.dtype)
    files = []
    with tqdm(
        total=sum(counts.values()),
        unit="row",
        desc="export-features",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        for split, n in counts.items():
            folder = tmp / split
            (folder / "img_emb").mkdir(parents=True)
            (folder / "metadata").mkdir()
            for k, lo in enumerate(range(0, max(n, 1), cfg.chunk_rows)):
                files += _write_chunk(
                    cache, split, lo, min(n, lo + cfg.chunk_rows), folder, k, dtype, bar
                )
    manifest = {
        "tool": TOOL,
        "cache": str(cache.path),
        "backbone": cache.backbone,
        "weights": cache.weights,
        "feature_dim": cache.feature_dim,
        "dtype": dtype.name,
        "classes": cache.classes,
        "splits": counts,
        "chunk_rows": cfg.chunk_rows,
        "columns": [*COLUMNS, *(MULTI_LABEL_COLUMNS if cache.multi_label else ())],
        "files": files,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return counts, files, dtype.name


def export_features(
    cache: str | Path,
    *,
    out: str | Path,
    config: ExportFeaturesConfig | None = None,
    progress: bool = True,
    **options,
) -> FeatureExport:
    """Write the features of ``cache`` to the folder ``out`` as .npy files and Parquet tables.

    ``options`` are the fields of :class:`embedcache.config.ExportFeaturesConfig` (``split``,
    ``dtype``, ``chunk_rows``). See the module docstring for the layout.

    Returns
    -------
    FeatureExport : rows per split and the files written (``(n, feature_dim)`` arrays of the
    cache's dtype, or ``dtype``, in the cache's row order).
    """
    cfg = ExportFeaturesConfig.build(config, **options)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise EmbedcacheError(
            f"export-features writes Parquet tables with pyarrow: {INSTALL_PARQUET}"
        ) from None
    _drop_old_leftovers(Path(out))
    with (
        open_cache(cache) as c,
        folder_output(
            out,
            verb="export-features",
            last=MANIFEST,
            inputs=[("the cache", cache)],
            legacy=_earlier_export,
        ) as staging,
    ):
        splits = _split_names(c, cfg.split)
        counts, files, dtype = _write(c, splits, staging, cfg, progress)
        return FeatureExport(Path(out), counts, c.feature_dim, dtype, files)
