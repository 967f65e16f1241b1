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
    if isinstance(feature, dict) and isinstance(feature.get("feature"), dict):
        feature = feature["feature"]  # a Sequence of ClassLabel: a multi-label column
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else None


def _is_bytes(t) -> bool:
    import pyarrow.types as pat

    return pat.is_binary(t) or pat.is_large_binary(t) or getattr(pat, "is_binary_view", bool)(t)


def _is_label(t) -> bool:
    """Whether an Arrow type holds class indices or names (dictionary-encoded or not), or lists
    of them (multi-label)."""
    import pyarrow.types as pat

    if pat.is_list(t) or pat.is_large_list(t) or pat.is_fixed_size_list(t):
        t = t.value_type
    t = t.value_type if pat.is_dictionary(t) else t
    names = pat.is_string(t) or pat.is_large_string(t) or getattr(pat, "is_string_view", bool)(t)
    return pat.is_integer(t) or names


def _is_image(t) -> bool:
    """Whether an Arrow type holds encoded images: bytes, or `datasets`' {bytes, path} struct."""
    import pyarrow.types as pat

    if pat.is_struct(t):
        return t.get_field_index("bytes") >= 0 and _is_bytes(t.field("bytes").type)
    return _is_bytes(t)


def _label_column(schema, path: Path, image_column: str, label_column: str | None) -> str | None:
    """The label column to read (None: unlabelled); the image column and the label column must
    exist and hold what they are for, else an error that lists the columns."""
    names = ", ".join(schema.names)
    if image_column not in schema.names:
        raise EmbedcacheError(
            f"{path} has no column {image_column!r} (columns: {names}); pass --image-column"
        )
    t = schema.field(image_column).type
    if not _is_image(t):
        raise EmbedcacheError(
            f"{path}: column {image_column!r} holds {t}, not image bytes (binary, or the "
            f"{{bytes, path}} struct `datasets` writes); pass --image-column (columns: {names})"
        )
    if label_column is None:
        return None
    if label_column not in schema.names:
        raise EmbedcacheError(
            f"{path} has no label column {label_column!r} (columns: {names}); "
            "pass --label-column, or --unlabelled to extract without labels"
        )
    t = schema.field(label_column).type
    if not _is_label(t):
        raise EmbedcacheError(
            f"{path}: label column {label_column!r} holds {t}, not class indices (integers) or "
            f"names (strings), or lists of them; pass --label-column, or --unlabelled "
            f"(columns: {names})"
        )
    return label_column


def _parquet_file(path: Path):
    """The opened file, or the reason it cannot be read."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EmbedcacheError(f"reading Parquet needs pyarrow: {INSTALL_PARQUET}") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        return f"not a Parquet file ({str(e)[:40]})"


def list_parquet(
    path: Path,
    *,
    image_column: str = "image",
    label_column: str = "label",
    unlabelled: bool = False,
) -> tuple[list[Entry], list[str] | None]:
    """The rows of one Parquet file (key: the row number) and the class names its metadata
    gives. Labels and splits are read a row group at a time; image bytes only when decoded.
    A row group whose labels cannot be read skips its rows with the reason; a file that cannot
    be read, or has no rows, is one entry of key "" skipped with the reason."""
    pf = _parquet_file(path)
    if isinstance(pf, str):
        return [Entry("", Broken(f"damaged shard: {pf}"))], None
    schema = pf.schema_arrow
    label = _label_column(schema, path, image_column, None if unlabelled else label_column)
    columns = [c for c in (label, SPLIT_FIELD) if c in schema.names and c != image_column]
    images, entries = ParquetImages(path, image_column), []
    for group in range(pf.num_row_groups):
        n = pf.metadata.row_group(group).num_rows
        try:
            table = pf.read_row_group(group, columns=columns).to_pydict() if columns else {}
        except Exception as e:  # noqa: BLE001 - a damaged page raises whatever pyarrow raises
            why = Broken(f"row group {group} is damaged ({str(e)[:40]})")
            entries += [Entry(str(len(entries) + i), why) for i in range(n)]
            continue
        labels = table.get(label, [None] * n)
        splits = table.get(SPLIT_FIELD, [""] * n)
        for i in range(n):
            where = f"{path.name} row {len(entries)}"
            entry = Entry(
                str(len(entries)),
                ParquetMember(images, group, i),
                labels[i],
                sample_split(splits[i], where),
            )
            entries.append(entry)
    if not entries:
        return [Entry("", Broken("no rows in the file"))], None
    return entries, _hf_class_names(schema, label) if label else None
