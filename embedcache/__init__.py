"""embedcache: run a frozen image backbone once, cache pooled features in HDF5, train heads fast.

The public API is imported lazily so that `embedcache --help` does not pay for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "extract": "extraction",
    "ExtractResult": "extraction",
    "open_cache": "cache",
    "write_cache": "cache",
    "train_head": "train",
    "load_head": "train",
    "HeadResult": "train",
    "evaluate": "inference",
    "finetune": "finetuning",
    "load_model": "models",
    "FinetuneResult": "finetuning",
    "predict": "inference",
    "load_classifier": "models",
    "Classifier": "models",
    "Cache": "cache",
    "SplitData": "cache",
    "build_backbone": "backbones",
    "list_backbones": "backbones",
    "Backbone": "backbones",
    "BackboneInfo": "backbones",
    "EvalTransform": "data",
    "scan": "data",
    "ImageSet": "data",
    "EmbedcacheError": "errors",
    "demo": "quickstart",
    "compare": "comparison",
    "rank_backbones": "ranking",
    "Ranking": "ranking",
    "ExtractConfig": "config",
    "HeadConfig": "config",
    "FinetuneConfig": "config",
    "CompareConfig": "config",
    "FeatureIdentity": "identity",
    "export": "exporting",
    "audit": "auditing",
    "AuditResult": "auditing",
    "AuditConfig": "config",
    "export_features": "feature_export",
    "FeatureExport": "feature_export",
    "ExportFeaturesConfig": "config",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'embedcache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
