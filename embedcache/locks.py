"""One writer per output: an OS-level lock the kernel drops when the holder dies.

``extract`` and ``finetune`` hold ``OUT.lock`` (``fcntl.flock``, exclusive,
non-blocking) for their whole run. A second run with the same output fails at once
naming the holder's pid; a SIGKILL leaves nothing stale, since the kernel releases
the lock with the process (the file may stay; it is reused). Readers of finished
files take no lock. Where ``fcntl`` does not exist (Windows) this is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import EmbedcacheError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def lock_path(out: Path) -> Path:
    return Path(f"{out}.lock")


@contextlib.contextmanager
def exclusive(out: str | Path, verb: str, *, lock: Path | None = None) -> Iterator[None]:
    """Hold the lock on ``out`` (the file ``lock``, by default ``OUT.lock``) for the body;
    raise at once if another process holds it."""
    if fcntl is None:
        yield
        return
    path = lock or lock_path(Path(out))
    fd = _acquire(path, verb, Path(out))
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still held: a waiting opener then sees another file and retries
        os.close(fd)


def _acquire(path: Path, verb: str, out: Path) -> int:
    """Open and lock ``path``; retry when the file was replaced between open and lock."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise EmbedcacheError(
                f"cannot write next to --out {out} ({e.strerror}); choose a writable location"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise EmbedcacheError(
                f"another `embedcache {verb}` (pid {holder}) "
                f"is writing {out}; "
                "wait for it to finish, or choose another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed it as we locked it: take the new one


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode().strip()
        if text.isdigit():
            return text
    return "unknown"
