"""Running under torchrun: ranks, a process group that times out, and errors every rank sees.

``torchrun --nproc-per-node N -m embedcache VERB ...`` (or the same under Slurm's
``srun``) starts N processes with RANK, WORLD_SIZE and LOCAL_RANK set. Each
verb then runs its work through a :class:`Group`: steps done by rank 0 alone
(:meth:`Group.on_main`) or by every rank (:meth:`Group.each`) end at a point
where every rank learns whether any rank failed, so one bad rank makes every
rank stop with the same one-line error instead of leaving the others waiting.
A rank that dies without a word is caught by the process group's timeout.
Without torchrun (WORLD_SIZE unset or 1) nothing here touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

from .errors import EmbedcacheError
from .runtime import resolve_device

T = TypeVar("T")
TIMEOUT_ENV = "EMBEDCACHE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800  # a rank silent this long (dead, or stuck on I/O) fails the job


@dataclass(frozen=True)
class Group:
    """This process's place in the job: rank ``rank`` of ``world``, ``local_rank`` on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The device for ``--device``: under torchrun with GPUs, this rank's own GPU."""
        dev = resolve_device(name)
        if self.world > 1 and dev.type == "cuda" and dev.index is None:
            return torch.device("cuda", self.local_rank)
        return dev

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0; every rank gets its result, or the error it raised."""
        if self.world == 1:
            return fn()
        ok, value, error = _attempt(fn) if self.is_main else (True, None, None)
        box = [(ok, value, None)]  # the exception object stays here: it may not pickle
        torch.distributed.broadcast_object_list(box, src=0)
        return self._unpack((*box[0][:2], error), 0)

    def each(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank and return this rank's result; if any rank raised, every
        rank raises (the first failing rank's message)."""
        if self.world == 1:
            return fn()
        ok, value, error = _attempt(fn)
        outcomes = [None] * self.world
        torch.distributed.all_gather_object(outcomes, (ok, None if ok else value, None))
        for rank, outcome in enumerate(outcomes):
            if not outcome[0]:
                self._unpack((False, outcome[1], error if rank == self.rank else None), rank)
        return value

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (small and picklable), in rank order."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        torch.distributed.all_gather_object(values, value)
        return values

    def _unpack(self, outcome: tuple, rank: int):
        ok, value, error = outcome
        if ok:
            return value
        if rank == self.rank and error is not None:
            raise error
        raise EmbedcacheError(f"rank {rank} of {self.world} failed: {value}")


def _attempt(fn: Callable[[], T]) -> tuple[bool, object, BaseException | None]:
    """(True, result, None) or (False, one-line message, the local exception)."""
    try:
        return True, fn(), None
    except Exception as e:  # noqa: BLE001 - every error must reach the other ranks
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, EmbedcacheError):
            message = f"{type(e).__name__}: {message}"
        return False, message, e


def from_env() -> Group:
    """The rank, world size and local rank torchrun put in the environment
    (1 process without it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise EmbedcacheError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers") from None
    return Group(rank, world, local)


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[Group]:
    """The job's :class:`Group`; under torchrun, a process group (nccl on GPUs, gloo on CPUs)
    for the duration of the block, whose collectives time out after $EMBEDCACHE_DIST_TIMEOUT_S."""
    group = from_env()
    if group.world == 1 or torch.distributed.is_initialized():
        yield group
        return
    timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    backend = "nccl" if group.device(device).type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=dt.timedelta(seconds=timeout_s))
    try:
        yield group
    finally:
        torch.distributed.destroy_process_group()
