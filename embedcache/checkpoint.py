"""Every checkpoint layout on disk: heads, fine-tuned models, fine-tuning state.

A checkpoint is one plain dict of tensors and primitives (nanoGPT's habit),
written atomically and loaded with ``torch.load(weights_only=True)``, so no
pickled code ever runs. The rest of the package never reads a key of these
dicts: it goes through :class:`HeadCheckpoint`, :class:`ModelCheckpoint` and
:class:`FinetuneState`, which build, save, load and check them.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import EmbedcacheError
from .heads import build_head_module
from .identity import FeatureIdentity
from .outputs import misplaced, write_file

HEAD_FORMAT = "embedcache.head"
MODEL_FORMAT = "embedcache.model"
STATE_FORMAT = "embedcache.finetune-state"
DIGEST_KEY = "sha256"  # written by save_checkpoint (checkpoints from before have none)
FORMAT_VERSION = 1

# Exact types: subclasses (numpy scalars are float subclasses, defaultdict a dict subclass)
# are pickled as their own class, which weights_only loading then refuses.
_PLAIN = (str, int, float, bool, type(None))
_MAPPINGS = (dict, collections.OrderedDict)  # state_dict() gives OrderedDicts


def _check_plain(obj, where: str = "checkpoint") -> None:
    """Refuse anything torch.load(weights_only=True) could not read back."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:
        return
    if type(obj) in _MAPPINGS:
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: key {k!r} is not a str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} holds a {type(obj).__name__}; checkpoints hold tensors and plain containers only"
    )


def _digest(obj, h=None) -> str:
    """SHA-256 over every key, value and tensor byte of a plain checkpoint dict, in key order."""
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"D")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _digest(obj[k], h)
    elif isinstance(obj, list | tuple):
        h.update(b"L")
        for v in obj:
            _digest(v, h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()


def _check_digest(obj: dict, path: Path) -> None:
    """Refuse a checkpoint whose contents no longer match the digest written with them."""
    recorded = obj.pop(DIGEST_KEY, None)
    if recorded is not None and recorded != _digest(obj):
        raise EmbedcacheError(
            f"checkpoint {path} is damaged (its contents do not match their SHA-256); re-create it"
        )


def save_checkpoint(obj: dict, path: str | Path) -> Path:
    """Write ``obj`` to ``path`` atomically (temporary file, fsync, rename), with a SHA-256 of
    its contents that :func:`load_checkpoint` checks, so a damaged byte is an error."""
    _check_plain(obj)
    body = {k: v for k, v in obj.items() if k != DIGEST_KEY}  # a re-saved checkpoint's old one
    obj = {**body, DIGEST_KEY: _digest(body)}
    return write_file(path, lambda tmp: _save(obj, tmp))


def _save(obj: dict, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path: str | Path, *, kind: str | tuple[str, ...]) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`, refusing pickled code.

    ``kind`` is the expected ``format`` field (``embedcache.head``, ``embedcache.model``).
    """
    path = Path(path)
    kinds = (kind,) if isinstance(kind, str) else kind
    if not path.is_file():
        raise EmbedcacheError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # a plain pickle: "Detected pickle protocol 4", then
            warnings.simplefilter("ignore", UserWarning)  # the refusal below says it all
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # the class torch refused to import
        if found:
            raise EmbedcacheError(
                f"refusing to load {path}: it holds Python objects other than tensors ({found[1]})"
            ) from None
        raise _unreadable(path, kinds, "not a torch file") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise _unreadable(path, kinds, first) from None
    if isinstance(obj, dict):
        _check_digest(obj, path)
    if not isinstance(obj, dict) or obj.get("format") not in kinds:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        wrong = None if isinstance(obj, dict) else misplaced(path, wanted=f"a {_wanted(kinds)}")
        raise EmbedcacheError(
            wrong or f"{path} is not an embedcache {_wanted(kinds)} (format {found!r})"
        )
    if int(obj.get("format_version", 1)) > FORMAT_VERSION:
        raise EmbedcacheError(
            f"{path} has checkpoint format {obj['format_version']}, newer than this embedcache "
            f"reads ({FORMAT_VERSION}); upgrade embedcache"
        )
    return obj


_NAMES = {HEAD_FORMAT: "head", MODEL_FORMAT: "model", STATE_FORMAT: "fine-tuning state"}


def _wanted(kinds: tuple[str, ...]) -> str:
    """What a loader for the formats ``kinds`` reads, e.g. "head or model checkpoint"."""
    return f"{' or '.join(_NAMES[k] for k in kinds)} checkpoint"


def _unreadable(path: Path, kinds: tuple[str, ...], why: str) -> EmbedcacheError:
    """The error for a file torch cannot read as a checkpoint: what it is instead where its
    bytes tell (a cache, an image, an export: see :func:`embedcache.outputs.misplaced`), else
    a truncated or damaged checkpoint."""
    return EmbedcacheError(
        misplaced(path, wanted=f"a {_wanted(kinds)}")
        or f"{path} is not a readable checkpoint ({why[:120]}); it may be truncated or damaged"
    )


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}


def check_finite(state: dict, path: Path | str | None, what: str) -> None:
    """Refuse weights that hold NaN or infinity: a diverged training must not look like a result."""
    floats = {
        k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
    }
    bad = [k for k, v in floats.items() if not torch.isfinite(v).all()]
    if bad:
        where = f"{path}: " if path is not None else ""
        raise EmbedcacheError(
            f"{where}the {what} has non-finite weights ({_describe_keys(bad)}): training diverged; "
            "lower the learning rate (--lr) and train again"
        )


def _describe_keys(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _require(obj: dict, keys: tuple[str, ...], path: Path) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise EmbedcacheError(
            f"{path} is an incomplete {_NAMES[obj['format']]} checkpoint "
            f"(missing {', '.join(missing)})"
        )


def _thresholds(obj: dict, path: Path, *, config: str = "config") -> list[float] | None:
    """A multi-label head's or model's per-class thresholds (None for one label per image),
    checked; ``config`` names the entry that holds the head's config (a model's head_config)."""
    th = obj.get("thresholds")
    if not (obj.get(config) or {}).get("multi_label"):
        return None
    C = obj[config].get("num_classes")
    ok = isinstance(th, list) and len(th) == C
    if not ok or not all(isinstance(t, int | float) and 0 <= t <= 1.0 + 1e-6 for t in th):
        what, verb = ("head", "train-head") if config == "config" else ("model", "finetune")
        raise EmbedcacheError(
            f"{path} is a multi-label {what} without {C} thresholds in [0, 1]; re-create it with "
            f"{verb}"
        )
    return [float(t) for t in th]


def _threshold_entry(thresholds: list[float] | None) -> dict:
    """What a checkpoint saves of its thresholds: nothing for one label per image."""
    return {} if thresholds is None else {"thresholds": [float(t) for t in thresholds]}


def _temperature(obj: dict, path: Path) -> float:
    """A checkpoint's calibration temperature: 1.0 where it has none (saved before temperatures
    were fitted); refused unless finite and positive."""
    t = obj.get("temperature", 1.0)
    if not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
        raise EmbedcacheError(
            f"{path} has a temperature of {t!r}; it must be a positive number: re-create it"
        )
    return float(t)


RECORDED_KEYS = ("backbone", "weights", "transform", "weights_arg", "feature_dim")


@dataclass
class Recorded:
    """The features a head or model expects: identity plus what rebuilds the backbone."""

    identity: FeatureIdentity
    weights_arg: str  # the --weights value that rebuilds these weights
    feature_dim: int
    dtype: str | None = None  # the cache's, for heads
    # the cache's forward pass (fp32, bf16, fp16, unrecorded), for heads; None for models and
    # heads saved before it was recorded
    precision: str | None = None

    def to_dict(self) -> dict:
        d = {
            **self.identity.as_dict(),
            "weights_arg": self.weights_arg,
            "feature_dim": self.feature_dim,
        }
        extra = {"dtype": self.dtype, "precision": self.precision}
        return {**d, **{k: v for k, v in extra.items() if v is not None}}

    @classmethod
    def from_dict(cls, d: dict, path: Path | None = None, kind: str = "head") -> Recorded:
        missing = [k for k in (*RECORDED_KEYS,) if k not in d]
        if missing:
            raise EmbedcacheError(
                f"{path} is an incomplete {kind} checkpoint "
                f"(its identity lacks {', '.join(missing)})"
            )
        return cls(
            FeatureIdentity.from_mapping(d),
            str(d["weights_arg"]),
            int(d["feature_dim"]),
            d.get("dtype"),
            d.get("precision"),
        )

    @property
    def crop(self) -> int:
        import json

        return int(json.loads(self.identity.transform)["crop"])


@dataclass
class TrainedOn:
    """Which images a head or model has seen while training, so that no later verb scores it
    on them: the digest of each seen split's paths (:func:`embedcache.data.paths_digest`), the
    validation holdout it was chosen on (None: a val split), and whether it was refit on it."""

    splits: dict  # split name -> digest of its paths
    holdout: dict | None = None  # {"fraction": ..., "seed": ...} when val was held out of train
    refit: bool = False

    def to_dict(self) -> dict:
        return {"splits": dict(self.splits), "holdout": self.holdout, "refit": self.refit}

    @classmethod
    def from_dict(cls, d: dict | None) -> TrainedOn | None:
        if not d:
            return None  # checkpoints from before it was recorded
        return cls(dict(d.get("splits") or {}), d.get("holdout"), bool(d.get("refit", False)))

    def seen(self, digest: str) -> str | None:
        """The name of the seen split whose images have this digest, or None."""
        return next((k for k, v in self.splits.items() if v == digest), None)


@dataclass
class HeadCheckpoint:
    """A head trained by train-head: architecture config, weights, classes, features it expects."""

    config: dict  # kind, dim, num_classes, hidden, dropout (and k for knn)
    state_dict: dict
    classes: list[str]
    recorded: Recorded
    metrics: dict = field(default_factory=dict)
    train_state: dict | None = None  # what --resume continues from (torch heads only)
    path: Path | None = None
    trained: TrainedOn | None = None  # None: a checkpoint from before it was recorded
    # a refit head's weights as chosen on validation, before the refit saw the validation images
    selected: dict | None = None
    # divides the logits before the softmax (embedcache.calibration); 1.0 for a head saved
    # before it was fitted
    temperature: float = 1.0
    # several labels per image (config["multi_label"]): each class's probability threshold,
    # chosen on validation; None for a head with one label per image
    thresholds: list[float] | None = None

    @property
    def multi_label(self) -> bool:
        """Whether the head scores each class by a sigmoid (several labels per image)."""
        return bool(self.config.get("multi_label"))

    def module(self, *, selected: bool = False) -> torch.nn.Module:
        """The head (standardisation included) in eval mode; with ``selected``, as it was before
        its refit (the weights that never saw the validation images)."""
        state = self.selected if selected and self.selected is not None else self.state_dict
        return build_head_module(self.config, state).eval()

    def save(self, path: str | Path) -> Path:
        check_finite(self.state_dict, path, "head")
        obj = {"format": HEAD_FORMAT, "format_version": FORMAT_VERSION, "config": self.config}
        obj.update(classes=list(self.classes), state_dict=_cpu(self.state_dict))
        obj.update(identity=self.recorded.to_dict(), metrics=self.metrics)
        obj.update(train_state=self.train_state)
        obj["trained"] = self.trained.to_dict() if self.trained else None
        obj["selected"] = _cpu(self.selected) if self.selected is not None else None
        obj["temperature"] = float(self.temperature)
        obj.update(_threshold_entry(self.thresholds))
        return save_checkpoint(obj, path)

    @classmethod
    def from_dict(cls, obj: dict, path: Path) -> HeadCheckpoint:
        _require(obj, ("config", "state_dict", "classes", "identity"), path)
        check_finite(obj["state_dict"], path, "head")
        recorded = Recorded.from_dict(obj["identity"], path)
        return cls(
            obj["config"],
            obj["state_dict"],
            list(obj["classes"]),
            recorded,
            obj.get("metrics") or {},
            obj.get("train_state"),
            Path(path),
            TrainedOn.from_dict(obj.get("trained")),
            obj.get("selected"),
            _temperature(obj, path),
            _thresholds(obj, path),
        )

    @classmethod
    def load(cls, path: str | Path) -> HeadCheckpoint:
        return cls.from_dict(load_checkpoint(path, kind=HEAD_FORMAT), Path(path))


@dataclass
class ModelCheckpoint:
    """A fine-tuned model: backbone weights, the head, where the trainable blocks start."""

    recorded: Recorded
    net_state_dict: dict
    head_config: dict
    head_state_dict: dict
    classes: list[str]
    start: int  # index of the first trained block
    config: dict  # the FinetuneConfig it was trained with, as plain values
    metrics: dict = field(default_factory=dict)
    path: Path | None = None
    trained: TrainedOn | None = None  # None: a checkpoint from before it was recorded
    temperature: float = 1.0  # as a head's, fitted on validation after fine-tuning
    # several labels per image (head_config["multi_label"]): each class's probability threshold,
    # chosen on validation after fine-tuning; None for one label per image
    thresholds: list[float] | None = None

    @property
    def multi_label(self) -> bool:
        """Whether the model scores each class by a sigmoid (several labels per image)."""
        return bool(self.head_config.get("multi_label"))

    def head_module(self) -> torch.nn.Module:
        return build_head_module(self.head_config, self.head_state_dict).eval()

    @property
    def bn_stats(self) -> bool:
        return bool(self.config.get("bn_stats", False))

    def save(self, path: str | Path) -> Path:
        check_finite({**self.net_state_dict, **self.head_state_dict}, path, "model")
        return save_checkpoint(
            {
                "format": MODEL_FORMAT,
                "format_version": FORMAT_VERSION,
                "identity": self.recorded.to_dict(),
                "net_state_dict": _cpu(self.net_state_dict),
                "head_config": self.head_config,
                "head_state_dict": _cpu(self.head_state_dict),
                "classes": list(self.classes),
                "start": int(self.start),
                "config": self.config,
                "metrics": self.metrics,
                "trained": self.trained.to_dict() if self.trained else None,
                "temperature": float(self.temperature),
                **_threshold_entry(self.thresholds),
            },
            path,
        )

    @classmethod
    def from_dict(cls, obj: dict, path: Path) -> ModelCheckpoint:
        keys = ("identity", "net_state_dict", "head_config", "head_state_dict", "classes", "start")
        _require(obj, keys, path)
        check_finite({**obj["net_state_dict"], **obj["head_state_dict"]}, path, "model")
        return cls(
            Recorded.from_dict(obj["identity"], path, "model"),
            obj["net_state_dict"],
            obj["head_config"],
            obj["head_state_dict"],
            list(obj["classes"]),
            int(obj["start"]),
            obj.get("config") or {},
            obj.get("metrics") or {},
            Path(path),
            TrainedOn.from_dict(obj.get("trained")),
            _temperature(obj, path),
            _thresholds(obj, path, config="head_config"),
        )

    @classmethod
    def load(cls, path: str | Path) -> ModelCheckpoint:
        return cls.from_dict(load_checkpoint(path, kind=MODEL_FORMAT), Path(path))


def load_classifier_checkpoint(path: str | Path) -> HeadCheckpoint | ModelCheckpoint:
    """A head or a fine-tuned model, whichever ``path`` holds."""
    obj = load_checkpoint(path, kind=(HEAD_FORMAT, MODEL_FORMAT))
    kind = HeadCheckpoint if obj["format"] == HEAD_FORMAT else ModelCheckpoint
    return kind.from_dict(obj, Path(path))


# Settings newer than the finetune state: a state saved before them ran with these values.
STATE_DEFAULTS = {"multi_label": False}


@dataclass
class FinetuneState:
    """Everything --resume needs after an epoch: weights, optimiser, schedule, history."""

    config: dict
    epoch: int
    net_state_dict: dict
    head_state_dict: dict
    optimizer: dict
    scheduler: dict
    scaler: dict
    history: dict
    best: dict
    best_val: dict | None = None  # labels and predictions of the kept epoch on validation

    def save(self, path: str | Path) -> Path:
        check_finite({**self.net_state_dict, **self.head_state_dict}, path, "model")
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # no deep copies
        d["net_state_dict"], d["head_state_dict"] = (
            _cpu(self.net_state_dict),
            _cpu(self.head_state_dict),
        )
        return save_checkpoint(
            {"format": STATE_FORMAT, "format_version": FORMAT_VERSION, **d}, path
        )

    @classmethod
    def load(cls, path: str | Path, *, config: dict) -> FinetuneState:
        """The state saved at ``path``, refused unless it was saved by a run with ``config``."""
        path = Path(path)
        if not path.exists():
            raise EmbedcacheError(
                f"--resume found no {path}; "
                "it is written after each epoch of a run with the same --out"
            )
        obj = load_checkpoint(path, kind=STATE_FORMAT)
        names = [f.name for f in dataclasses.fields(cls)]
        _require(obj, tuple(names[:-1]), path)  # best_val is newer than the format
        saved = {**STATE_DEFAULTS, **obj["config"]}
        diff = [k for k in config if saved.get(k) != config[k]]
        if diff:
            k = diff[0]
            raise EmbedcacheError(
                f"{path} is from a run with other settings "
                f"({k} {saved.get(k)} vs {config[k]}); "
                "resume with the same options or start without --resume"
            )
        return cls(**{k: obj.get(k) for k in names})
