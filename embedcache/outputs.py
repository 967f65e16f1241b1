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
import json
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
    """Which of :data:`KINDS` the existing file ``path`` is, from its bytes (and name); "other"
    for a folder, a FIFO (which open() would wait on) or a file that cannot be read."""
    path = Path(path)
    if not path.is_file():
        return "other"
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


# Where a file of each kind goes, for the error that finds one where another kind belongs.
_BELONGS = {
    "cache": "pass it as DATA (embedcache evaluate MODEL DATA)",
    "head": "pass it as MODEL (embedcache evaluate MODEL DATA, embedcache predict MODEL IMAGES)",
    "model": "pass it as MODEL (embedcache evaluate MODEL DATA, embedcache predict MODEL IMAGES)",
    "state": "finetune --resume reads it; the model is the checkpoint written beside it",
    "export": "it runs without embedcache (onnxruntime, torch.jit.load)",
    "manifest": "pass it as DATA (embedcache evaluate MODEL DATA)",
    "image": "pass it as IMAGES (embedcache predict MODEL IMAGES)",
}


def misplaced(
    path: str | Path,
    *,
    wanted: str,
    accept: Iterable[str] = (),
    hints: dict[str, str] | None = None,
) -> str | None:
    """The one-line error for ``path`` given where ``wanted`` belongs (words such as "a head or
    model checkpoint"): what its bytes say it is (:func:`kind_of`) and where it goes instead,
    e.g. "c.h5 is an embedcache cache, not a head or model checkpoint: pass it as DATA
    (embedcache evaluate MODEL DATA)". None where it is a kind in ``accept``, or one that says
    nothing (a damaged checkpoint, an unknown file): the caller's own error is better there.
    ``hints`` replaces the advice for some kinds."""
    kind = kind_of(path)
    if kind in accept or kind in ("checkpoint", "other"):
        return None
    advice = {**_BELONGS, **(hints or {})}.get(kind)
    return f"{shown(path)} is {KINDS[kind]}, not {wanted}" + (f": {advice}" if advice else "")


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
    what = KINDS[kind].split(" ", 1)[1]
    if str(out).strip() == "":
        example = kind + SUFFIX.get(kind, "")
        raise EmbedcacheError(f"{option} is empty; give a file name such as {example}")
    out = Path(out)
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
        if pid.isdigit() and not alive(int(pid)):
            tmp.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (a leftover of a dead one may go)."""
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


# ---------------------------------------------------------------------------------------------
# Folder outputs (audit, export-features, compare's work folder): what one may replace

MARKER = ".embedcache.json"  # in a folder output: the verb that wrote it and every file it wrote
FOLDER_LOCK = ".embedcache.lock"  # one writer per folder, inside it (OUT.lock would be ..lock)
STAGING = ".embedcache-tmp-"  # + pid: a run's files before they move into place


def _marker(out: Path) -> dict | None:
    try:
        data = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("files"), list)
    return data if ok and all(isinstance(f, str) for f in data["files"]) else None


def _entries(out: Path) -> list[str]:
    """Every file below ``out`` (POSIX, relative), links not followed; the marker, the lock and
    staging folders of runs that are dead left out (the latter removed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(out):
        rel = Path(dirpath).relative_to(out)
        if rel == Path("."):
            _drop_dead_staging(out, dirnames)
            filenames = [f for f in filenames if f not in (MARKER, FOLDER_LOCK)]
        found += [(rel / f).as_posix() for f in filenames]
        found += [(rel / d).as_posix() + "/" for d in dirnames if (Path(dirpath) / d).is_symlink()]
    return found


def _drop_dead_staging(out: Path, dirnames: list[str]) -> None:
    """Remove the staging folders of killed runs from ``out`` (and from the walk)."""
    import shutil

    for d in [d for d in dirnames if d.startswith(STAGING)]:
        dirnames.remove(d)
        pid = d[len(STAGING) :]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(out / d, ignore_errors=True)


def _suggest(out: Path) -> Path:
    n = 2
    while Path(f"{out}-{n}").exists():
        n += 1
    return Path(f"{out}-{n}")


def _owned(out: Path, verb: str, legacy: Callable[[Path], set[str] | None] | None) -> set[str]:
    """The files of ``out`` an earlier run of ``verb`` wrote: its marker's list, or what
    ``legacy`` recognises (an output from before markers); empty if neither. A work folder
    (see :func:`work_folder`) is all the verb's."""
    mark = _marker(out)
    if mark is not None and mark.get("verb") == verb:
        return set(_entries(out)) if mark.get("all") else set(mark["files"])
    return (legacy(out) or set()) if legacy else set()


def claim_folder(
    out: str | Path,
    *,
    verb: str,
    inputs: Iterable[tuple[str, str | Path | None]] = (),
    legacy: Callable[[Path], set[str] | None] | None = None,
    option: str = "--out",
) -> set[str]:
    """Check that ``verb`` may write the folder ``out``: absent, empty, or an earlier output
    of ``verb`` with nothing added (its marker lists every file in it). No input (``inputs``:
    (what, path) pairs) may lie inside it. Returns the files the earlier output holds, which
    the new one may replace; raises a one-line error that suggests another name otherwise."""
    if str(out).strip() == "":
        raise EmbedcacheError(f"{option} is empty; give a folder, e.g. {verb.split('-')[0]}/")
    out = Path(out)
    if out.exists() and not out.is_dir():
        instead = out.with_name(f"{out.stem}-{verb}")
        instead = _suggest(instead) if instead.exists() else instead
        raise EmbedcacheError(f"{option} {out} is a file; pass a folder, e.g. {instead}")
    for name, src in inputs:
        if src is not None and inside(Path(src), out):
            raise EmbedcacheError(
                f"{option} {out} holds {src} ({name} {verb} reads), which the output could "
                f"replace; pass another {option}, e.g. {_suggest(out)}"
            )
    if not out.exists():
        return set()
    owned = _owned(out, verb, legacy)
    foreign = [f for f in _entries(out) if f not in owned]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise EmbedcacheError(
            f"{option} {out} holds {', '.join(shown(f) for f in sorted(foreign)[:3])}{more}, "
            f"which {verb} did not write; pass a new or empty folder, e.g. {_suggest(out)}"
        )
    return owned


def _write_marker(out: Path, verb: str, files: Iterable[str], *, all: bool = False) -> None:
    mark = {"tool": "embedcache", "verb": verb, "files": sorted(files)}
    mark |= {"all": True} if all else {}
    with replacing(out / MARKER) as tmp:
        tmp.write_text(json.dumps(mark, indent=1) + "\n", encoding="utf-8")


def _files_below(folder: Path) -> list[str]:
    return sorted(
        (Path(d) / f).relative_to(folder).as_posix()
        for d, _, files in os.walk(folder)
        for f in files
    )


def _commit(out: Path, staging: Path, verb: str, owned: set[str], last: str) -> list[str]:
    """Replace the earlier output's files (``owned``) by those in ``staging``. The marker lists
    both while it happens, so a run killed half-way leaves a folder the next run may replace;
    ``last`` (the file that says the output is finished) goes first and comes back last."""
    new = _files_below(staging)
    for f in new:
        with open(staging / f, "rb+") as fh:
            os.fsync(fh.fileno())
    _write_marker(out, verb, owned | set(new))
    for f in sorted(owned, key=lambda f: f != last):
        (out / f).unlink(missing_ok=True)
        _prune(out, (out / f).parent)
    for f in sorted(new, key=lambda f: f == last):
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / f, out / f)
    with contextlib.suppress(OSError):  # the output is whole; the marker still lists a superset
        _write_marker(out, verb, new)
    return new


def _prune(out: Path, folder: Path) -> None:
    """Remove ``folder`` and its parents below ``out`` while they are empty."""
    while folder != out and out in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _failed_write(e: BaseException, out: Path) -> bool:
    """Whether ``e`` is a failed write of the folder output ``out`` (not a bug, not a read)."""
    if isinstance(e, OSError) and e.filename is not None and not inside(Path(e.filename), out):
        return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
    return isinstance(e, OSError | RuntimeError) and write_reason(e) is not None


@contextlib.contextmanager
def folder_output(
    out: str | Path,
    *,
    verb: str,
    last: str,
    inputs: Iterable[tuple[str, str | Path | None]] = (),
    legacy: Callable[[Path], set[str] | None] | None = None,
) -> Iterator[Path]:
    """Write the folder output ``out`` of ``verb``: yield a staging folder (inside ``out``, so
    the final moves are renames) to write every file into. When the block ends the files move
    into place (see :func:`claim_folder` for what may be replaced). An error in the block, a
    full disk included, leaves the earlier output as it was and no staging folder; a failed
    write is one line. One run at a time per folder (a lock inside it)."""
    import shutil

    from .locks import exclusive

    inputs = list(inputs)
    claim_folder(out, verb=verb, inputs=inputs, legacy=legacy)
    out = Path(out)
    made = not out.exists()
    staging = out / f"{STAGING}{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with exclusive(out, verb, lock=out / FOLDER_LOCK):
            owned = claim_folder(out, verb=verb, inputs=inputs, legacy=legacy)  # now it is ours
            shutil.rmtree(staging, ignore_errors=True)  # a killed run's, whose pid we now have
            staging.mkdir()
            yield staging
            _commit(out, staging, verb, owned, last)
    except (OSError, RuntimeError) as e:
        if _failed_write(e, out):
            raise write_error(out, e) from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if the run left it empty


def work_folder(
    out: str | Path,
    *,
    verb: str,
    legacy: Callable[[Path], set[str] | None] | None = None,
    option: str = "--workdir",
) -> Path:
    """Claim ``out`` (see :func:`claim_folder`) as the work folder of ``verb``, which fills it in
    place, one file at a time, each checked by :func:`claim` as it is written; nothing in it is
    ever removed. Made if needed, and marked, so that a later run of ``verb`` may go on there."""
    claim_folder(out, verb=verb, legacy=legacy, option=option)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if (_marker(out) or {}).get("verb") != verb:
            _write_marker(out, verb, [], all=True)
    except OSError as e:
        raise write_error(out, e) from None
    return out
