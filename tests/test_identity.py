"""identity.py: which features a cache, head or model holds, and the one check between them."""

from __future__ import annotations

import re

import pytest

from embedcache.errors import EmbedcacheError
from embedcache.identity import CacheIdentity, FeatureIdentity

T64 = '{"crop": 64, "mean": [0.5, 0.5, 0.5], "resize": 73}'
T32 = '{"crop": 32, "mean": [0.5, 0.5, 0.5], "interpolation": "bicubic"}'


def test_differences_name_each_differing_field_and_transform_key():
    a = FeatureIdentity("resnet18", "none", T64)
    b = FeatureIdentity("resnet50", "IMAGENET1K_V2", T32)
    assert a.differences(b) == [
        "backbone resnet18 vs resnet50",
        "weights none vs IMAGENET1K_V2",
        "transform crop 64 vs 32",
        "transform interpolation None vs bicubic",
        "transform resize 73 vs None",
    ]
    assert a.differences(FeatureIdentity("resnet18", "none", T64)) == []


def test_a_transform_that_is_not_json_is_compared_whole():
    a, b = FeatureIdentity("r", "w", "crop=64"), FeatureIdentity("r", "w", "crop=32")
    assert a.differences(b) == ["transform crop=64 vs crop=32"]


def test_check_raises_one_line_with_subject_both_names_and_hint():
    head = FeatureIdentity("resnet18", "none", T64)
    cache = FeatureIdentity("resnet18", "DEFAULT", T64)
    expected = (
        "the head was trained on other features (weights none vs DEFAULT; head vs cache); "
        "extract the cache again"
    )
    with pytest.raises(EmbedcacheError, match=f"^{re.escape(expected)}$"):
        head.check(
            cache,
            subject="the head was trained on other features",
            mine="head",
            theirs="cache",
            hint="extract the cache again",
        )


def test_check_passes_for_equal_identities():
    a = FeatureIdentity("resnet18", "none", T64)
    kw = {"subject": "s", "mine": "a", "theirs": "b", "hint": "h"}
    assert a.check(FeatureIdentity("resnet18", "none", T64), **kw) is None


def test_a_cache_identity_against_a_feature_identity_ignores_the_dtype():
    cache = CacheIdentity("resnet18", "none", T64, "float16", "fp32")
    head = FeatureIdentity("resnet18", "none", T64)
    assert cache.differences(head) == [] and head.differences(cache) == []
    head.check(cache, subject="s", mine="a", theirs="b", hint="h")
    other = CacheIdentity("resnet18", "none", T64, "float32", "fp32")
    assert cache.differences(other) == ["dtype float16 vs float32"]


def test_from_mapping_ignores_extra_keys_and_reads_strings():
    m = {
        "backbone": "resnet18",
        "weights": "none",
        "transform": T64,
        "dtype": "float16",
        "feature_dim": 512,
        "weights_arg": "none",
    }
    assert FeatureIdentity.from_mapping(m) == FeatureIdentity("resnet18", "none", T64)
    assert type(FeatureIdentity.from_mapping(m)) is FeatureIdentity
    assert CacheIdentity.from_mapping(m) == CacheIdentity(
        "resnet18", "none", T64, "float16", "unrecorded"
    )
    assert CacheIdentity.from_mapping({**m, "precision": "bf16"}).precision == "bf16"
    assert FeatureIdentity.from_mapping({**m, "weights": 3}).weights == "3"


def test_as_dict_round_trips_through_from_mapping():
    a = FeatureIdentity("resnet18", "none", T64)
    assert a.as_dict() == {"backbone": "resnet18", "weights": "none", "transform": T64}
    assert FeatureIdentity.from_mapping(a.as_dict()) == a
