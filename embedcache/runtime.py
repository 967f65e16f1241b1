"""Device and precision decisions, made in one place and passed down."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .config import DEVICES, PRECISIONS
from .errors import EmbedcacheError


def resolve_device(name: str = "auto") -> torch.device:
    """Return the torch device for ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EmbedcacheError(
                f"--device {name} was asked but no CUDA GPU is available; use --device cpu or auto"
            )
        return torch.device(name)
    raise EmbedcacheError(f"--device must be one of {', '.join(DEVICES)} or cuda:N, got {name!r}")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """Return the autocast dtype for ``precision`` on ``device``, or None for plain fp32.

    ``auto`` means bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on CPU
    (CPU autocast is slower than fp32 on most machines).
    """
    if precision not in PRECISIONS:
        raise EmbedcacheError(
            f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cuda":
        raise EmbedcacheError(
            f"--precision {precision} needs a CUDA device; use fp32 or auto on CPU"
        )
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _cores() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


def default_num_workers(device: torch.device) -> int:
    """Decoders: processes beside a GPU (every core but one), threads on a CPU (one per core)."""
    if device.type == "cuda":
        return max(1, min(16, _cores() - 1))
    return max(1, min(8, _cores()))


def read_ahead(device: torch.device) -> bool:
    """Whether streamed features are read in a background thread while the heads train.

    Yes beside a GPU, or when torch leaves a core free. Where torch's threads
    already use every core, the reader only takes cores from the training step:
    on a 2-core CPU, 2M x 1280 float16 rows streamed at 17.9 and 24.8 s/epoch
    without it, 19.8 and 49.5 with it (two rounds; benchmarks/head_stream.py).
    """
    return device.type == "cuda" or torch.get_num_threads() < _cores()


def default_batch_size(device: torch.device) -> int:
    """Images per forward pass: 8 on a CPU, 128 on a GPU.

    On a CPU small batches are faster per image (activations stay in cache and
    no large buffers are page-faulted in on every call): efficientnet_lite0 ran
    at 70 images/s with batch 8 and 40 with batch 64 on this project's 2-core
    machine; resnet50 at 20 and 17 (batch 8 vs 16).
    """
    return 128 if device.type == "cuda" else 8


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the body with torch's global generator seeded, then restore the caller's state.

    Dropout and stochastic depth inside backbones draw from the global generator
    and take no ``generator`` argument; forking keeps the library's seeding from
    leaking into the caller's random state.
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class Run:
    """Where and how batches of images run: device, batch size, decoders, autocast, progress bars."""

    device: torch.device
    batch_size: int
    workers: int
    autocast: torch.dtype | None = None  # None: plain fp32
    progress: bool = False

    def amp(self):
        """The autocast context for this run's device and dtype (a no-op for fp32)."""
        return torch.autocast(
            self.device.type, dtype=self.autocast, enabled=self.autocast is not None
        )
