"""What a verb may write, and how: the one rule for every output, and writes that fail in one line.

A verb replaces only a file of its own kind that the user named as its output (a
cache, a head, a model, an export), never one of its inputs, never an image, a
manifest or a file of another kind; the refusal says what to pass instead. The
files written beside an output (metrics, report, plots) never land on an input,
and plots never inside the image folder, where the next extract would take them
for images. Every file is written under a temporary name and renamed into place:
a full disk, a read-only folder or a missing permission is one line naming the
file, and no temporary file stays behind.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import EmbedcacheError

KINDS = {
    "cache": "an embedcache cache",
    "head": "a head checkpoint",
    "model": "a fine-tuned model checkpoint",
    "state": "a fine-tuning state",
    "checkpoint": "a damaged torch checkpoint",
    "export": "an exported model",
    "plot": "a plot",
    "image": "an image",
    "manifest": "a CSV manifest",
    "other": "a file embedcache does not write",
}
SUFFIX = {"cache": ".h5", "head": ".pt", "model": ".pt", "export": ".onnx", "plot": ".png"}
_REPLACES = {
    "head": {"head", "checkpoint"},
    "model": {"model", "checkpoint"},
    "state": {"state", "checkpoint"},
}
_CHECKPOINTS = {
    "embedcache.head": "head",
    "embedcache.model": "model",
    "embedcache.finetune-state": "state",
}
_HDF5 = b"\x89HDF\r\n\x1a\n"
_ZIP = b"PK\x03\x04"


_NOT_IMAGES = ("HDF5", "GRIB", "BUFR")  # formats PIL registers a stub for: data files


def _image_suffix(path: Path) -> bool:
    from PIL import Image

    return Image.registered_extensions().get(path.suffix.lower()) not in (None, *_NOT_IMAGES)


def _checkpoint_kind(path: Path) -> str:
    """head, model or state (an embedcache checkpoint), export (TorchScript), else checkpoint."""
    import zipfile

    import torch

    try:
        with zipfile.ZipFile(path) as z:
            if any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist()):
                return "export"
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a torch file that does not read is a damaged checkpoint
        return "checkpoint"
    return _CHECKPOINTS.get(obj.get("format") if isinstance(obj, dict) else None, "other")


def kind_of(path: str | Path) -> str:
    """Which of :data:`KINDS` the existing file ``path`` is, from its bytes (and name)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return "other"
    if head.startswith(_HDF5):
        return "cache"
    if head.startswith(_ZIP):
        return _checkpoint_kind(path)
    if head.startswith(b"\x89PNG") and b"Matplotlib" in head:
        return "plot"
    if path.suffix.lower() == ".csv":
        return "manifest"
    if path.suffix.lower() == ".onnx" and head[:1] == b"\x08":  # protobuf field 1: ir_version
        return "export"
    if _image_suffix(path) or head[:3] == b"\xff\xd8\xff" or head.startswith(b"\x89PNG"):
        return "image"
    return "other"


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def _instead(out: Path, kind: str) -> Path:
    """A file name next to ``out`` for a new file of ``kind`` that does not exist yet."""
    suffix = SUFFIX.get(kind, out.suffix)
    name = out.with_suffix(suffix)
    n = 1
    while name.exists() or name == out:
        name = out.with_name(f"{out.stem}-{kind}{'' if n == 1 else n}{suffix}")
        n += 1
    return name


def inside(path: Path, folder: Path | None) -> bool:
    """Whether ``path`` would sit below ``folder`` (both resolved)."""
    if folder is None:
        return False
    return Path(os.path.abspath(path)).resolve().is_relative_to(Path(folder).resolve())


def claim(
    out: str | Path,
    *,
    kind: str,
    verb: str,
    inputs: Iterable[tuple[str, str | Path | None]] = (),
    beside: Iterable[Path] = (),
    data_root: str | Path | None = None,
    option: str = "--out",
) -> Path:
    """Check that ``verb`` may write ``out`` (a file of ``kind``) and the files ``beside`` it.

    ``inputs`` are (what, path) pairs the verb reads; ``data_root`` the image folder,
    inside which no plot may go. Raises a one-line error that says what to pass
    instead; returns ``out`` as a Path.
    """
    out = Path(out)
    what = KINDS[kind].split(" ", 1)[1]
    if out.is_dir():
        example = out / (kind + SUFFIX.get(kind, ""))
        raise EmbedcacheError(f"{option} {out} is a directory; give a file name such as {example}")
    ins = [(name, Path(p)) for name, p in inputs if p is not None]
    for path in (out, *beside):
        for name, src in ins:
            if _same(path, src):
                raise EmbedcacheError(
                    f"{option} {out} would overwrite {path} ({name} {verb} reads); "
                    f"pass another {option} for the {what}, e.g. {_instead(out, kind)}"
                )
    if out.exists() and kind_of(out) not in _REPLACES.get(kind, {kind}):
        raise EmbedcacheError(
            f"{option} {out} is {KINDS[kind_of(out)]}; {verb} replaces only {KINDS[kind]}: "
            f"pass another {option}, e.g. {_instead(out, kind)}"
        )
    if kind not in ("plot", "image") and not out.exists() and _image_suffix(out):
        raise EmbedcacheError(
            f"{option} {out} is named like an image; "
            f"pass a name such as {_instead(out, kind)} for the {what}"
        )
    for side in (out, *beside):
        if side.suffix.lower() == ".png" and inside(side, data_root):
            raise EmbedcacheError(
                f"{option} {out} would put the plot {side.name} inside the image folder "
                f"{data_root}, where the next extract would take it for an image; "
                f"pass an {option} outside that folder"
            )
    for side in beside:
        if side.exists() and side.suffix.lower() == ".png" and kind_of(side) != "plot":
            raise EmbedcacheError(
                f"{verb} would overwrite {side}, which is not a plot embedcache wrote; "
                f"move it, or pass another {option}"
            )
    return out


def writable(folder: str | Path) -> bool:
    """Whether a new file can be created in ``folder`` (the folder itself may not exist yet)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK | os.X_OK)


_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
_TEXTS = {
    "No space left": errno.ENOSPC,
    "errno = 28": errno.ENOSPC,
    "Read-only": errno.EROFS,
    "errno = 30": errno.EROFS,
    "Permission denied": errno.EACCES,
    "errno = 13": errno.EACCES,
    "Disk quota": errno.EDQUOT,
    "File too large": errno.EFBIG,
}


def write_reason(e: BaseException) -> str | None:
    """Why a write failed, in a few words, or None if ``e`` is no failed write (a bug: re-raise).

    torch.save reports a failed write as a RuntimeError (from inline_container.cc) raised
    while it cleans up after the OSError of the write itself.
    """
    if isinstance(e, OSError):
        return _REASONS.get(e.errno) or (e.strerror or str(e) or type(e).__name__)[:80]
    if isinstance(e.__context__, OSError):  # torch.save's cleanup after the failed write
        return write_reason(e.__context__)
    text = str(e)
    for needle, code in _TEXTS.items():
        if needle in text:
            return _REASONS[code]
    if isinstance(e, RuntimeError) and any(
        t in text for t in ("failed writing", "inline_container")
    ):
        return "the write failed; is the disk full?"
    return None


def write_error(path: Path, e: BaseException) -> EmbedcacheError:
    reason = write_reason(e) or type(e).__name__
    return EmbedcacheError(
        f"cannot write {path} ({reason}); free some space or choose a writable location"
    )


def tmp_path(path: Path) -> Path:
    """The temporary name ``path`` is written under by this process (see :func:`replacing`)."""
    return Path(f"{path}.{os.getpid()}.tmp")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield the temporary name to write ``path`` under; when the block ends, fsync that file
    and rename it over ``path`` in one step, so ``path`` is always whole or absent. An error
    in the block (or in the fsync or rename) removes the temporary file and is re-raised."""
    tmp = tmp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_tmp(path: Path) -> None:
    """Delete temporary files that runs killed before their rename left next to ``path``."""
    for tmp in path.parent.glob(glob.escape(path.name) + "*.tmp"):
        pid = tmp.name[: -len(".tmp")].rsplit(".", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_file(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` then fsync and rename ``tmp`` to ``path``: the file is whole or absent.

    A failed write (disk full, read-only folder, no permission) removes the temporary
    file and raises one line naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:
            write(tmp)
    except (OSError, RuntimeError) as e:
        if write_reason(e) is None:
            raise
        raise write_error(path, e) from None
    return path


def write_text(path: str | Path, text: str) -> Path:
    """:func:`write_file` for a text file (UTF-8)."""
    return write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def shown(name: object) -> str:
    """``name`` as one printable line: control characters (a newline in a file name could
    forge a result line) and bytes that are not UTF-8 escaped as Python writes them
    (``\\n``, ``\\xe9``)."""
    text = str(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
