"""Images stored the way large data sets are: WebDataset tar shards and Parquet files.

A shard source is listed into the same :class:`~embedcache.data.ImageSet` a folder gives,
so the cache, resume, incremental runs and torchrun work on it unchanged. Each sample's
``path`` is ``SHARD/KEY`` (the shard relative to the source root, then the WebDataset
``__key__`` or the Parquet row number) and its size and mtime are the shard's: a changed or
added shard is re-read, an unchanged one reused. Rows keep the shards' order (shards as
the patterns list them, samples as stored), and batches never straddle a shard, so under
torchrun every shard is read by one rank (:func:`plan`).

Tar shards are read with the standard library (:mod:`.tar`, their headers by
:mod:`.tarformat`, which also says what a damaged shard lost), Parquet with pyarrow
(:mod:`.parquet`); :mod:`.patterns` says which files DATA names, :mod:`.listing` makes the
ImageSet, :mod:`.work` plans one rank's share.
"""

from .base import Broken, Entry
from .listing import list_shard, scan
from .parquet import INSTALL_PARQUET, ROW_GROUPS_HELD, ParquetImages, ParquetMember, list_parquet
from .patterns import LAYOUTS, expand_braces, is_shard_source, shard_files
from .tar import IMAGE_MEMBERS, TarMember, list_tar
from .work import SHARDS_LISTED, Members, is_shard_layout, plan, shard_of

__all__ = [
    "IMAGE_MEMBERS",
    "INSTALL_PARQUET",
    "LAYOUTS",
    "ROW_GROUPS_HELD",
    "SHARDS_LISTED",
    "Broken",
    "Entry",
    "Members",
    "ParquetImages",
    "ParquetMember",
    "TarMember",
    "expand_braces",
    "is_shard_layout",
    "is_shard_source",
    "list_parquet",
    "list_shard",
    "list_tar",
    "plan",
    "scan",
    "shard_files",
    "shard_of",
]
