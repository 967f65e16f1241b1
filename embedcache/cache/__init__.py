"""The HDF5 feature cache: what the rest of embedcache reads and writes through.

One job a module: :mod:`.schema` the file layout (names, constants, digests),
:mod:`.storage` the crash-safe way rows reach a file, :mod:`.reader` opening and
checking a finished cache, :mod:`.writer` the in-progress file of an extraction and
the finished cache it writes, :mod:`.shards` the per-rank shard files and the copy and
virtual joins. The training feed that reads a cache's rows is :mod:`embedcache.feed`.
"""

from .reader import (
    Cache,
    CheckedFeatures,
    cross_split_duplicates,
    duplicate_groups,
    open_cache,
    recorded_precision,
)
from .schema import (
    COPY_ROWS,
    FORMAT_VERSION,
    SkippedFile,
    SplitData,
    partial_path,
    read_names,
)
from .shards import ShardFile, parts_dir, remove_unused_parts, shard_path, shard_paths
from .writer import (
    PartialCache,
    check_space,
    disk_errors,
    estimate_bytes,
    now_iso,
    write_cache,
)

__all__ = [
    "COPY_ROWS",
    "FORMAT_VERSION",
    "Cache",
    "CheckedFeatures",
    "PartialCache",
    "ShardFile",
    "SkippedFile",
    "SplitData",
    "check_space",
    "cross_split_duplicates",
    "disk_errors",
    "duplicate_groups",
    "estimate_bytes",
    "now_iso",
    "open_cache",
    "recorded_precision",
    "partial_path",
    "parts_dir",
    "read_names",
    "remove_unused_parts",
    "shard_path",
    "shard_paths",
    "write_cache",
]
