"""Parquet files with image bytes (or the ``{bytes, path}`` struct `datasets` writes), read
with pyarrow one row group at a time, at most :data:`ROW_GROUPS_HELD` groups in memory."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..data.decode import UnreadableImage
from ..errors import EmbedcacheError
from .base import SPLIT_FIELD, Broken, Entry, sample_split

ROW_GROUPS_HELD = 2  # Parquet row groups of image bytes held in memory per file


INSTALL_PARQUET = "pip install 'embedcache[parquet]'"


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
            f"{path} has no column {image_column!r} (columns: {', '.join(pf.schema_arrow.names)}); "
            "pass --image-column"
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
                sample_split(splits[i], where),
            )
            entries.append(entry)
    return entries, _hf_class_names(pf.schema_arrow, label_column)
