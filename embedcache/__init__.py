"""embedcache: run a frozen image backbone once, cache pooled features in HDF5, train heads fast."""

__version__ = "0.1.0"

from .backbones import Backbone, BackboneInfo, EvalTransform, build_backbone, list_backbones  # noqa: E402
from .cache import Cache, SplitData, open_cache  # noqa: E402
from .data import ImageSet, scan  # noqa: E402
from .errors import EmbedcacheError  # noqa: E402
from .extract import ExtractResult, extract  # noqa: E402

__all__ = [
    "Backbone", "BackboneInfo", "Cache", "EmbedcacheError", "EvalTransform", "ExtractResult",
    "ImageSet", "SplitData", "build_backbone", "extract", "list_backbones", "open_cache", "scan",
]  # fmt: skip
