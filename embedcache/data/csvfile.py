"""A user's CSV file (a manifest, an ``--exclude`` list) as numbered rows of text.

Every way such a file can be wrong (not a regular file, not UTF-8, a NUL byte, a field the csv
module refuses) is one line that names the file and the line, so the two readers share it.
"""

from __future__ import annotations

import csv
import io
import os
import stat
from pathlib import Path

from ..errors import EmbedcacheError
from .decode import os_reason

UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _bytes(path: Path, what: str) -> bytes:
    """The file's bytes; a folder, a FIFO (reading it would wait for a writer forever) or a
    device is refused."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise EmbedcacheError(f"{what} is a folder; pass a CSV file")
        if not stat.S_ISREG(mode):
            raise EmbedcacheError(
                f"{what} is not a regular file (a pipe or a device); save it as a CSV file first"
            )
        return path.read_bytes()
    except OSError as e:
        raise EmbedcacheError(f"cannot read {what} ({os_reason(e)})") from None


def csv_text(path: Path, what: str) -> str:
    """The text of a CSV file: UTF-8 (a BOM allowed) or UTF-16 with its BOM; else one line
    naming the first byte that does not decode and its line. ``what`` names the file in
    messages (``CSV manifest m.csv``, ``--exclude leaks.csv``)."""
    data = _bytes(path, what)
    utf16 = data[:2] in UTF16_BOMS
    try:
        text = data.decode("utf-16" if utf16 else "utf-8-sig")
    except UnicodeDecodeError as e:
        before = data[: e.start].decode("utf-16" if utf16 else "utf-8", "replace")
        line = before.count("\n") + 1
        raise EmbedcacheError(
            f"{what} is not {'UTF-16' if utf16 else 'UTF-8'} (byte 0x{data[e.start]:02x} on "
            f"line {line}); save it as UTF-8"
        ) from None
    if "\0" in text:  # no path holds one: a binary file, or UTF-16/32 without its BOM
        line = text[: text.index("\0")].count("\n") + 1
        raise EmbedcacheError(
            f"{what} has a NUL byte on line {line}, which no file name can hold; "
            "save it as UTF-8 text"
        )
    return text


def csv_rows(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """The rows of a CSV file that are not blank, each with the line it starts on (1-based):
    see :func:`csv_text` for the text and ``what``."""
    reader = csv.reader(io.StringIO(csv_text(path, what), newline=""))
    rows, start = [], 1
    try:
        for row in reader:
            if any(c.strip() for c in row):
                rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:  # a field over the csv module's limit (128 kB), ...
        raise EmbedcacheError(
            f"{what} line {start} cannot be read as CSV ({e}); "
            "check that it is a CSV of image paths (one a line, or a path column)"
        ) from None
    return rows
