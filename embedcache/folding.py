"""BatchNorm folded into the convolution that feeds it, for a frozen backbone's forward pass.

In eval mode a BatchNorm is a fixed affine map per channel, so after a convolution it folds
into that convolution's weights and bias: the activations are read and written once instead
of twice. It needs no tracing, so it pays from the first batch and serves every precision.

A pair is folded only where the BatchNorm reads the very tensor one convolution returned,
each module ran once, and the folded copy gives the network's output up to rounding on a
probe input; anything else (a convolution shared between branches, a BatchNorm subclass
that does more, a pre-BatchNorm tensor used again) is left as it was.

On a CPU with oneDNN, a folded convolution followed by an activation (ReLU, ReLU6, SiLU,
Hardswish) that alone reads its output then runs as one oneDNN call that applies the
activation before writing the output (:class:`ConvAct`), instead of a second pass over it.
Alone is known from the code, not from a trace: the activation inside timm's BatchNormAct2d,
or the next module of an ``nn.Sequential`` row (torchvision's Conv2dNormActivation).

On a 2-core Xeon with AMX, efficientnet_lite0's bf16 forward pass ran 1.32x as fast folded
and 2.05x folded and fused (bit-identical to folded: clamping commutes with rounding); four
backbones 1.27-2.05x in bf16, 1.11-1.41x in fp32 (benchmarks/results/bn_fold_cpu.md).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator

import torch
from torch import nn

# The folded copy must match the network's float32 output to this share of its largest value
# (measured: 3.5e-6 on efficientnet_lite0, the sums only reordered).
FOLD_TOLERANCE = 1e-4
# The side of the probe image: a fold does not depend on the image size, and a 64 px probe
# took 0.07 s for lite0 where the 224 px one took 0.11-0.18 s (cold oneDNN plans included).
PROBE_SIDE = 64


def fold_batchnorm(net: nn.Module, x: torch.Tensor, *, fuse: bool = True) -> tuple[nn.Module, int]:
    """A copy of ``net`` (in eval mode) with each BatchNorm that reads a Conv2d's output folded
    into that convolution, and the number folded; ``(net, 0)`` itself when none folds or the
    copy does not reproduce ``net(x)`` in float32. ``net`` is not changed.

    With ``fuse``, on a CPU with oneDNN, each folded convolution followed by an activation that
    alone reads its output becomes one :class:`ConvAct`; a fused copy that fails the check, or
    that oneDNN refuses to run, is dropped for the folded one without fusion."""
    if net.training:  # batch statistics: nothing is a fixed map
        return net, 0
    fuse = fuse and x.device.type == "cpu" and torch.backends.mkldnn.is_available()
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False), _exact_convolutions():
        pairs, ref = _conv_bn_pairs(net, x)
        if not pairs:
            return net, 0
        for fusing in (True, False) if fuse else (False,):
            folded = copy.deepcopy(net).eval()
            done = sum(_fold(folded, conv, bn, fuse=fusing) for bn, conv in pairs)
            if not done:
                return net, 0
            try:
                out = folded(x)
            except RuntimeError:  # oneDNN refused a fused call: fold without fusing
                if not fusing:
                    raise
                continue
            if _agrees(ref, out):
                return folded, done
    return net, 0


class ConvAct(nn.Module):
    """A (folded) Conv2d and the activation after it as one oneDNN convolution that applies
    ``attr`` (oneDNN's name for the activation, with its ``scalars``) to each output before
    writing it. Under autocast it runs in autocast's dtype, as the convolution would. With
    gradients wanted it runs the two modules one after the other (oneDNN's fused call has no
    backward)."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module, attr: str, scalars: list[float]) -> None:
        super().__init__()
        self.conv, self.act, self.attr, self.scalars = conv, act, attr, scalars

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if torch.is_grad_enabled() and (x.requires_grad or c.weight.requires_grad):
            return self.act(c(x))
        w, b = c.weight, c.bias
        if torch.is_autocast_enabled(x.device.type):  # what autocast does for a convolution
            w = w.to(torch.get_autocast_dtype(x.device.type))
            b = None if b is None else b.to(w.dtype)
        if w.dtype not in onednn_dtypes():  # autocast's convolution takes another path there
            return self.act(c(x))
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(w.dtype),
            w,
            b,
            list(c.padding),
            list(c.stride),
            list(c.dilation),
            c.groups,
            self.attr,
            self.scalars,
            None,
        )


@functools.cache
def onednn_dtypes() -> frozenset[torch.dtype]:
    """The dtypes this CPU's oneDNN convolves in: float32, and bf16 and fp16 where the CPU has
    the instructions oneDNN needs for them (else torch's convolution runs them another way)."""
    dtypes = {torch.float32}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.add(torch.bfloat16)
    if torch.ops.mkldnn._is_mkldnn_fp16_supported():
        dtypes.add(torch.float16)
    return frozenset(dtypes)


def _pointwise(act: nn.Module) -> tuple[str, list[float]] | None:
    """oneDNN's name and scalars for an activation it can apply inside a convolution."""
    kind = type(act)
    if kind is nn.ReLU:
        return "relu", []
    if kind in (nn.ReLU6, nn.Hardtanh):  # ReLU6 is Hardtanh(0, 6)
        return "hardtanh", [float(act.min_val), float(act.max_val)]
    if kind is nn.SiLU:
        return "swish", []
    if kind is nn.Hardswish:
        return "hardswish", []
    return None


def _fusable(conv: nn.Module) -> bool:
    """A plain Conv2d whose padding oneDNN's call takes as it is (numbers, zeros)."""
    return (
        type(conv) is nn.Conv2d and isinstance(conv.padding, tuple) and conv.padding_mode == "zeros"
    )


class Folded:
    """``net`` with its BatchNorms folded and, with ``fuse``, the activations after them fused
    into the convolutions (see :func:`fold_batchnorm`), decided on the first
    call from a probe of that call's shape: seeded noise, not the batch, so that a run gives the
    same features whichever batch it starts at.

    Under autocast the folded copy's convolution weights are cast once to the autocast dtype,
    which autocast would otherwise do on every call: the same bits, 5% less forward time for
    lite0 in bf16 on a 2-core CPU. Every later call must then run under that autocast."""

    def __init__(self, net: nn.Module, *, fuse: bool = True) -> None:
        self.net, self.count = net, None  # count: BatchNorms folded, once decided
        self.fuse = fuse  # activations into the convolutions, where fold_batchnorm can
        self.cast: torch.dtype | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        amp = _autocast_dtype(x.device.type)
        if self.count is None:
            fold = functools.partial(fold_batchnorm, self.net, fuse=self.fuse)
            try:
                self.net, self.count = fold(probe_like(x, PROBE_SIDE))
            except Exception:  # a net that takes only its own image size: probe at that
                self.net, self.count = fold(probe_like(x))
            if self.count and amp is not None:  # the copy is ours to cast
                self.cast = _cast_convolutions(self.net, amp)
        if self.cast is not None and amp != self.cast:
            raise RuntimeError(f"Folded was cast for {self.cast} autocast, called under {amp}")
        return self.net(x)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast_convolutions(net: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """Cast each Conv2d's weight and bias to ``dtype``, as autocast casts them for every
    convolution it runs in ``dtype``; other modules' parameters stay (autocast may run those
    ops in float32)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.to(dtype)
                if m.bias is not None:
                    m.bias.data = m.bias.data.to(dtype)
    return dtype


def probe_like(x: torch.Tensor, side: int | None = None) -> torch.Tensor:
    """One image of ``x``'s shape (with ``side``, at most that many pixels high and wide),
    device and memory layout: unit noise from a fixed seed."""
    shape = (1, *x.shape[1:])
    if side is not None and x.dim() == 4:
        shape = (1, x.shape[1], min(side, x.shape[2]), min(side, x.shape[3]))
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(shape, generator=g).to(x.device)
    return probe.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else probe


def _conv_bn_pairs(net: nn.Module, x: torch.Tensor) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """(BatchNorm name, Conv2d name) for each BatchNorm whose input is a convolution's output,
    from one forward pass over ``x`` with hooks on both kinds of module; and ``net(x)``."""
    made: dict[int, tuple[str, torch.Tensor]] = {}  # outputs kept alive, so no id is reused
    calls: dict[str, int] = {}
    read: dict[str, str] = {}

    def after_conv(name: str):
        def hook(module, args, out):
            calls[name] = calls.get(name, 0) + 1
            made[id(out)] = (name, out)

        return hook

    def before_bn(name: str):
        def hook(module, args):
            calls[name] = calls.get(name, 0) + 1
            if args and id(args[0]) in made:
                read[name] = made[id(args[0])][0]

        return hook

    hooks = []
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(after_conv(name)))
        elif _foldable(m):
            hooks.append(m.register_forward_pre_hook(before_bn(name)))
    try:
        out = net(x)
    finally:
        for h in hooks:
            h.remove()
    convs = list(read.values())
    pairs = [
        (bn, conv)
        for bn, conv in read.items()
        if calls[bn] == 1 and calls[conv] == 1 and convs.count(conv) == 1
    ]
    return pairs, out


def _is_timm_bn_act(m: nn.Module) -> bool:
    return type(m).__name__ == "BatchNormAct2d" and type(m).__module__.startswith("timm.")


def _foldable(m: nn.Module) -> bool:
    """torch's BatchNorm2d or timm's BatchNormAct2d (BatchNorm, then dropout and activation),
    with running statistics; no other subclass, whose forward may do more."""
    kind = type(m) is nn.BatchNorm2d or _is_timm_bn_act(m)
    return kind and m.running_mean is not None and m.running_var is not None


def _fold(net: nn.Module, conv_name: str, bn_name: str, *, fuse: bool = False) -> bool:
    conv, bn = net.get_submodule(conv_name), net.get_submodule(bn_name)
    if not _foldable(bn) or conv.out_channels != bn.num_features:
        return False
    keep = nn.Sequential(bn.drop, bn.act) if _is_timm_bn_act(bn) else nn.Identity()
    act = _activation_after(net, conv_name, bn_name) if fuse and _fusable(conv) else None
    fused = None if act is None else _pointwise(act[1])  # oneDNN's name for it, if any
    w = conv.weight.detach().double()
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    if conv.bias is not None:
        shift = shift + conv.bias.detach().double() * scale
    weight = torch.empty_like(conv.weight)  # keeps its layout (channels_last)
    weight.copy_(w * scale.reshape(-1, 1, 1, 1))
    conv.weight = nn.Parameter(weight, requires_grad=False)
    conv.bias = nn.Parameter(shift.to(weight.dtype), requires_grad=False)
    if fused is not None:  # the activation moves into the convolution
        slot, module = act
        keep = nn.Identity()
        _replace(net, conv_name, ConvAct(conv, module, *fused))
        if slot is not None:
            _replace(net, slot, nn.Identity())
    _replace(net, bn_name, keep)
    return True


def _activation_after(
    net: nn.Module, conv_name: str, bn_name: str
) -> tuple[str | None, nn.Module] | None:
    """The module that alone reads the BatchNorm's output, where the code makes that certain
    (whether oneDNN can apply it is :func:`_pointwise`'s question), as (its name, or None where
    the BatchNorm holds it; the module): timm's
    BatchNormAct2d's own (with no dropout), or the next module of an ``nn.Sequential`` that
    holds convolution, BatchNorm and that module in a row (torchvision's Conv2dNormActivation).
    None where the code does not make it certain."""
    bn = net.get_submodule(bn_name)
    if _is_timm_bn_act(bn):
        return (None, bn.act) if type(bn.drop) is nn.Identity else None
    prefix, _, attr = bn_name.rpartition(".")
    parent = net.get_submodule(prefix)
    if type(parent).forward is not nn.Sequential.forward:  # a forward of its own may branch
        return None
    names = list(parent._modules)
    at = names.index(attr)
    if at == 0 or at + 1 == len(names):
        return None
    before, after = (f"{prefix}.{n}" if prefix else n for n in (names[at - 1], names[at + 1]))
    return (after, parent.get_submodule(names[at + 1])) if before == conv_name else None


def _replace(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent), attr, module)


@contextlib.contextmanager
def _exact_convolutions() -> Iterator[None]:
    """cuDNN's convolutions in float32, not TF32 (its default; 1e-3 relative error would hide
    whether the fold is right)."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def _agrees(ref: torch.Tensor, out: torch.Tensor) -> bool:
    if not isinstance(ref, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    if ref.shape != out.shape:
        return False
    scale = ref.float().abs().max().clamp_min(1e-12)
    return bool((out.float() - ref.float()).abs().max() <= FOLD_TOLERANCE * scale)
