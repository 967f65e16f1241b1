"""One sample of a shard as every reader lists it, and the split a sample names."""

from __future__ import annotations

from dataclasses import dataclass

from ..data.decode import UnreadableImage
from ..data.listing import SPLIT_NAMES
from ..errors import EmbedcacheError

SPLIT_FIELD = "split"


@dataclass(slots=True)  # a million of them: no frozen-dataclass __init__
class Broken:
    """A sample that cannot be read at all; decoding it skips it with ``reason``."""

    reason: str

    def read_bytes(self) -> bytes:
        raise UnreadableImage(self.reason)


@dataclass(slots=True)  # a million of them: no frozen-dataclass __init__
class Entry:
    """One sample of a shard: its key, where its image is, its raw label (a list of them:
    multi-label) and split ("" if none)."""

    key: str
    member: object  # a TarMember, a ParquetMember or a Broken: has read_bytes()
    label: int | str | list | None = None
    split: str = ""


def sample_split(value, where: str) -> str:
    if value is None or value == "":
        return ""
    split = SPLIT_NAMES.get(str(value).strip().lower())
    if split is None:
        raise EmbedcacheError(f"{where}: split must be train, val or test, got {value!r}")
    return split
