"""Image sources (folders, CSV manifests), splits, safe decoding, transforms, augmentation.

Nothing here writes to the user's data: files are only listed, stat'ed and read.

:mod:`.listing` makes an :class:`ImageSet` of a folder or CSV manifest, :mod:`.splits` holds
the one validation holdout, :mod:`.decode` turns any file into RGB (or a reason it cannot),
:mod:`.transform` is the eval recipe and its CPU path, :mod:`.augment` the train-time views
and those a cache stores, :mod:`.batches` the decoding loops (CPU threads, or the GPU).
"""

from .augment import (
    VIEW_POLICY,
    augment,
    augmented_views,
    view_key,
    view_policy,
    views_for,
    with_views,
)
from .batches import decoded_batches, gpu_decoded_batches, resize_crop
from .decode import (
    HASH_BYTES,
    JPEG_MAGIC,
    THUMB_SIDE,
    UnreadableImage,
    content_hash,
    grey_thumbnail,
    load_rgb,
    os_reason,
)
from .listing import IMAGE_EXTENSIONS, SPLIT_NAMES, SPLIT_ORDER, UNLABELLED, ImageSet, Sample, scan
from .splits import (
    holdout,
    holdout_note,
    name_bytes,
    nested_fractions,
    paths_digest,
    stratified_split,
)
from .transform import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, preprocess, resize_geometry

__all__ = [
    "HASH_BYTES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "JPEG_MAGIC",
    "SPLIT_NAMES",
    "SPLIT_ORDER",
    "THUMB_SIDE",
    "UNLABELLED",
    "VIEW_POLICY",
    "EvalTransform",
    "ImageSet",
    "Sample",
    "UnreadableImage",
    "augment",
    "augmented_views",
    "content_hash",
    "decoded_batches",
    "gpu_decoded_batches",
    "grey_thumbnail",
    "holdout",
    "holdout_note",
    "load_rgb",
    "name_bytes",
    "nested_fractions",
    "os_reason",
    "paths_digest",
    "preprocess",
    "resize_crop",
    "resize_geometry",
    "scan",
    "stratified_split",
    "view_key",
    "view_policy",
    "views_for",
    "with_views",
]
