"""folding.py: BatchNorm folded into the convolution before it gives the network's output, leaves
the network itself alone, and folds nothing it cannot prove equivalent."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from embedcache import folding
from embedcache.folding import ConvAct, Folded, fold_batchnorm, probe_like


def _with_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    """``net`` in eval mode with BatchNorm statistics and affines far from the identity (fresh
    ones fold to nothing, which would prove nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g))
    return net.eval()


def _batchnorms(net: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def _convs(net: nn.Module) -> list[nn.Conv2d]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)]


def _x(seed: int = 1, n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool((a - b).abs().max() <= tol * a.abs().max())


def test_timm_efficientnet_folds_every_batchnorm_keeps_its_activations_and_its_output():
    net = _with_statistics(timm.create_model("efficientnet_lite0", num_classes=0))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    folded, n = fold_batchnorm(net, probe_like(_x()))
    assert n == _batchnorms(net) > 40 and _batchnorms(folded) == 0
    assert any(isinstance(m, nn.ReLU6) for m in folded.modules())  # the act of BatchNormAct2d
    with torch.no_grad():
        x = _x(seed=2)
        assert _close(net(x), folded(x))
    # the network handed in is untouched: the fold works on a copy
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_torchvision_resnet_folds_including_convolutions_with_a_bias():
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1.bias = nn.Parameter(torch.randn(64))  # a conv with its own bias folds it in too
    net = _with_statistics(net)
    folded, n = fold_batchnorm(net, probe_like(_x()))
    assert n == _batchnorms(net) == 20 and _batchnorms(folded) == 0
    with torch.no_grad():
        assert _close(net(_x(seed=3)), folded(_x(seed=3)))


class _PreNormUsedAgain(nn.Module):
    """The conv's output goes through BatchNorm and is also added back raw: folding the
    BatchNorm would change what the addition reads."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class _SharedConv(nn.Module):
    """One convolution run twice, each time into its own BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.a, self.b = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.a(self.conv(x)) + self.b(self.conv(x))


def test_a_fold_that_would_change_the_output_is_refused_and_the_net_runs_as_built():
    net = _with_statistics(_PreNormUsedAgain())
    folded, n = fold_batchnorm(net, probe_like(_x()))
    assert folded is net and n == 0


def test_a_convolution_that_runs_twice_is_not_folded():
    net = _with_statistics(_SharedConv())
    folded, n = fold_batchnorm(net, probe_like(_x()))
    assert folded is net and n == 0


def test_batchnorm_not_after_a_convolution_and_batchnorm_in_training_stay():
    net = _with_statistics(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    folded, n = fold_batchnorm(net, probe_like(_x()))
    assert n == 1 and isinstance(folded[0], nn.BatchNorm2d) and isinstance(folded[2], nn.Identity)
    assert fold_batchnorm(net.train(), probe_like(_x())) == (net, 0)


def test_folded_decides_once_from_seeded_noise_not_from_the_batch():
    net = _with_statistics(timm.create_model("efficientnet_lite0", num_classes=0))
    run = Folded(net)
    with torch.no_grad():
        first = run(_x(seed=4))
        assert run.count == _batchnorms(net) and run.net is not net
        again = Folded(net)
        again(_x(seed=5))  # another first batch: the same folded weights
    assert all(
        torch.equal(a, b)
        for a, b in zip(run.net.state_dict().values(), again.net.state_dict().values(), strict=True)
    )
    with torch.no_grad():
        assert torch.equal(first, again(_x(seed=4)))
    assert torch.equal(probe_like(_x(seed=6)), probe_like(_x(seed=7)))


def test_the_fold_leaves_cudnns_tf32_setting_as_it_found_it():
    before = torch.backends.cudnn.allow_tf32
    try:
        for setting in (True, False):
            torch.backends.cudnn.allow_tf32 = setting
            fold_batchnorm(
                _with_statistics(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))), _x()
            )
            assert torch.backends.cudnn.allow_tf32 is setting
    finally:
        torch.backends.cudnn.allow_tf32 = before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_fold_is_checked_in_float32_and_kept():
    net = _with_statistics(timm.create_model("efficientnet_lite0", num_classes=0)).cuda()
    x = _x(seed=8).cuda()
    folded, n = fold_batchnorm(net, probe_like(x))  # TF32 (cuDNN's default) would fail the check
    assert n == _batchnorms(net) and next(folded.parameters()).is_cuda
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = net(x).float(), folded(x).float()
    assert _close(a, b, tol=0.05)


def test_under_autocast_the_convolutions_are_cast_once_and_give_autocasts_bits():
    net = _with_statistics(timm.create_model("efficientnet_lite0", num_classes=0))
    folded, _ = fold_batchnorm(net, probe_like(_x()))
    run = Folded(net)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cast = run(_x(seed=9))
        per_call = folded(_x(seed=9))  # fp32 weights, cast by autocast on every call
    assert run.cast == torch.bfloat16 and _convs(run.net)[0].weight.dtype == torch.bfloat16
    assert _convs(folded)[0].weight.dtype == torch.float32  # only Folded's own copy is cast
    assert torch.equal(cast, per_call)
    with torch.no_grad(), pytest.raises(RuntimeError, match="cast for torch.bfloat16"):
        run(_x(seed=9))  # without autocast the cast weights would not fit: refused, not wrong


class _OwnSizeOnly(nn.Module):
    """Conv + BatchNorm that refuses any image but its own size (as a fixed position table
    would)."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.conv, self.bn = size, nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.shape[-1] != self.size:
            raise ValueError(f"expected {self.size} px, got {x.shape[-1]}")
        return self.bn(self.conv(x))


def test_folded_probes_small_and_at_the_batchs_own_size_when_the_net_refuses_small():
    from embedcache.folding import PROBE_SIDE

    assert probe_like(_x(size=224), PROBE_SIDE).shape == (1, 3, PROBE_SIDE, PROBE_SIDE)
    assert probe_like(_x(size=32), PROBE_SIDE).shape == (1, 3, 32, 32)  # never larger
    run = Folded(_with_statistics(_OwnSizeOnly(96)))
    with torch.no_grad():
        run(_x(size=96))
    assert run.count == 1 and isinstance(run.net.bn, nn.Identity)


def _fused(net: nn.Module) -> list[ConvAct]:
    return [m for m in net.modules() if isinstance(m, ConvAct)]


def _bn_acts(net: nn.Module, act: type) -> int:
    return sum(type(m).__name__ == "BatchNormAct2d" and type(m.act) is act for m in net.modules())


def test_timms_batchnorm_activations_run_inside_the_convolution_with_unfused_bits():
    net = _with_statistics(timm.create_model("efficientnet_lite0", num_classes=0))
    fused, n = fold_batchnorm(net, probe_like(_x()))
    plain, m = fold_batchnorm(net, probe_like(_x()), fuse=False)
    assert n == m == _batchnorms(net) and not _fused(plain)
    # every BatchNorm with ReLU6 (the 16 projections have none: they stay plain convolutions)
    assert len(_fused(fused)) == _bn_acts(net, nn.ReLU6) > 30
    assert {(c.attr, tuple(c.scalars)) for c in _fused(fused)} == {("hardtanh", (0.0, 6.0))}
    assert not any(type(m).__name__ == "BatchNormAct2d" for m in fused.modules())
    x = _x(seed=10)
    with torch.no_grad():
        assert _close(net(x), fused(x))
        assert torch.equal(plain(x), fused(x))  # clamping commutes with rounding: same bits
        run = Folded(net)  # as extract runs it: fused, its weights cast once to bf16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b, c = run(x), plain(x), fused(x)  # plain, fused: cast by autocast every call
    assert _fused(run.net) and a.dtype == b.dtype == c.dtype == torch.bfloat16
    assert torch.equal(a, b) and torch.equal(c, b)


def test_torchvisions_conv_norm_activation_rows_fuse_and_other_containers_do_not():
    net = _with_statistics(torchvision.models.mobilenet_v3_small(num_classes=10))
    fused, n = fold_batchnorm(net, probe_like(_x()))
    assert n == _batchnorms(net) and _batchnorms(fused) == 0
    attrs = {c.attr for c in _fused(fused)}
    assert attrs == {"relu", "hardswish"} and not any(
        isinstance(m, (nn.ReLU, nn.Hardswish)) and not isinstance(p, ConvAct)
        for p in fused.modules()
        if isinstance(p, torchvision.ops.Conv2dNormActivation)
        for m in p.children()
    )
    with torch.no_grad():
        assert _close(net(_x(seed=11)), fused(_x(seed=11)))

    class Branching(nn.Sequential):  # a forward of its own: the BatchNorm's output is reused
        def forward(self, x):
            y = self[1](self[0](x))
            return self[2](y) + y

    for row in (
        Branching(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GELU()),
        nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4), nn.ReLU()
        ),
    ):
        folded, n = fold_batchnorm(_with_statistics(row), probe_like(_x()))
        assert n == 1 and not _fused(folded), row  # folded, not fused
    row = _with_statistics(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU())
    )
    folded, _ = fold_batchnorm(row, probe_like(_x()))
    assert [type(m) for m in folded] == [ConvAct, nn.Identity, nn.Identity]
    assert folded[0].attr == "swish"


def test_a_fusion_that_changes_the_output_is_dropped_and_the_fold_kept(monkeypatch):
    monkeypatch.setattr(folding, "_pointwise", lambda act: ("sigmoid", []))  # not ReLU6's map
    net = _with_statistics(timm.create_model("efficientnet_lite0", num_classes=0))
    folded, n = fold_batchnorm(net, probe_like(_x()))
    assert n == _batchnorms(net) and not _fused(folded)


def test_a_fused_call_that_onednn_refuses_leaves_the_fold_without_fusion(monkeypatch):
    def refuse(*args):
        raise RuntimeError("mkldnn_convolution_pointwise: unsupported")

    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", refuse)
    net = _with_statistics(timm.create_model("efficientnet_lite0", num_classes=0))
    folded, n = fold_batchnorm(net, probe_like(_x()))
    assert n == _batchnorms(net) and not _fused(folded)


def test_the_fused_convolution_runs_unfused_where_a_gradient_is_wanted():
    row = _with_statistics(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU6())
    )
    folded, _ = fold_batchnorm(row, probe_like(_x()))
    x = _x(seed=12).requires_grad_()
    y = folded(x)
    y.sum().backward()  # oneDNN's fused call has no backward; the modules have
    with torch.no_grad():
        assert torch.equal(y, folded(x)) and _close(row(x), y)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_where_onednn_lacks_the_autocast_dtype_the_pair_runs_as_autocast_runs_it(monkeypatch):
    row = _with_statistics(
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU6())
    )
    fused, _ = fold_batchnorm(row, probe_like(_x()))
    plain, _ = fold_batchnorm(row, probe_like(_x()), fuse=False)
    called = []
    real = torch.ops.mkldnn._convolution_pointwise
    monkeypatch.setattr(folding, "onednn_dtypes", lambda: frozenset({torch.float32}))
    monkeypatch.setattr(
        torch.ops.mkldnn, "_convolution_pointwise", lambda *a: called.append(1) or real(*a)
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        a, b = fused(_x(seed=13)), plain(_x(seed=13))
    assert not called and a.dtype == torch.float16 and torch.equal(a, b)
    with torch.no_grad():
        fused(_x(seed=13))  # float32: oneDNN's fused call
    assert called
