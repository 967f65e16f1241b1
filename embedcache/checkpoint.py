"""Safe checkpoints: plain dicts of tensors and primitives, written atomically, loaded without unpickling code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from .errors import EmbedcacheError

_PLAIN = (str, int, float, bool, type(None))


def _check_plain(obj, where: str = "checkpoint") -> None:
    """Refuse anything torch.load(weights_only=True) could not read back."""
    if isinstance(obj, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: key {k!r} is not a str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} holds a {type(obj).__name__}; checkpoints hold tensors and plain containers only"
    )


def save_checkpoint(obj: dict, path: str | Path) -> Path:
    """Write ``obj`` to ``path`` atomically (temporary file, fsync, rename)."""
    _check_plain(obj)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(f"{path}.{os.getpid()}.tmp").unlink(missing_ok=True)
        raise EmbedcacheError(
            f"cannot write {path} ({e.strerror or e}); choose a writable location"
        ) from None
    return path


def load_checkpoint(path: str | Path, *, kind: str | tuple[str, ...]) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`, refusing pickled code.

    ``kind`` is the expected ``format`` field (``embedcache.head``, ``embedcache.model``).
    """
    path = Path(path)
    kinds = (kind,) if isinstance(kind, str) else kind
    if not path.is_file():
        raise EmbedcacheError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:160]
        raise EmbedcacheError(
            f"refusing to load {path}: it holds Python objects other than tensors ({first})"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise EmbedcacheError(
            f"{path} is not a readable checkpoint ({str(e).splitlines()[0][:120]})"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") not in kinds:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise EmbedcacheError(
            f"{path} is not an embedcache {' or '.join(k.split('.')[-1] for k in kinds)} checkpoint (format {found!r})"
        )
    return obj
