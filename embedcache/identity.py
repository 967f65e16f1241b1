"""Which features these are: the one identity type and the one check every reader uses.

A cache, a head and a fine-tuned model each record the backbone, the weights
and the eval transform their features come from. Two sets of features are
interchangeable exactly when those agree; a cache also records how they are
stored (``dtype``), which matters for reuse but not for using a head on them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import EmbedcacheError


@dataclass(frozen=True)
class FeatureIdentity:
    """Backbone name, weights id and the transform JSON (canonical) that made some features."""

    backbone: str
    weights: str
    transform: str  # EvalTransform.to_json()

    @classmethod
    def from_mapping(cls, m: Mapping) -> FeatureIdentity:
        """Read the fields from checkpoint dicts or HDF5 attributes (extra keys are ignored)."""
        return cls(**{f.name: str(m[f.name]) for f in dataclasses.fields(cls)})

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def differences(self, other: FeatureIdentity) -> list[str]:
        """'field mine vs other' for each field both have that differs
        (the transform key by key)."""
        names = [f.name for f in dataclasses.fields(self) if hasattr(other, f.name)]
        diff = [
            f"{n} {getattr(self, n)} vs {getattr(other, n)}"
            for n in names
            if n != "transform" and getattr(self, n) != getattr(other, n)
        ]
        if self.transform != other.transform:
            mine, theirs = _json(self.transform), _json(other.transform)
            diff += [
                f"transform {k} {mine.get(k)} vs {theirs.get(k)}"
                for k in sorted(set(mine) | set(theirs))
                if mine.get(k) != theirs.get(k)
            ] or [f"transform {self.transform} vs {other.transform}"]
        return diff

    def check(
        self, other: FeatureIdentity, *, subject: str, mine: str, theirs: str, hint: str
    ) -> None:
        """Raise if ``other`` holds other features than ``self``.

        The one-line message reads '{subject} (field a vs b; ...; {mine} vs {theirs}); {hint}'.
        """
        diff = self.differences(other)
        if diff:
            raise EmbedcacheError(f"{subject} ({'; '.join(diff)}; {mine} vs {theirs}); {hint}")


@dataclass(frozen=True)
class CacheIdentity(FeatureIdentity):
    """A cache's identity: the features plus how they were computed and stored.

    ``precision`` is the forward pass's (fp32, bf16 or fp16): features of one image
    differ by up to a few percent between them, so one cache never mixes them.
    Caches written before it was recorded read as ``unrecorded``. ``views`` is the
    number of augmented views per training image (``extract --views``) and
    ``view_policy`` how they were drawn, seed included ("" without views).
    """

    dtype: str
    precision: str
    views: int = 0
    view_policy: str = ""

    @classmethod
    def from_mapping(cls, m: Mapping) -> CacheIdentity:
        return cls(
            **FeatureIdentity.from_mapping(m).as_dict(),
            dtype=str(m["dtype"]),
            precision=str(m.get("precision", "unrecorded")),
            views=int(m.get("views", 0)),
            view_policy=str(m.get("view_policy", "")),
        )


def _json(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
