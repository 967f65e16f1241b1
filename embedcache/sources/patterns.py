"""Which files a DATA argument names: brace ranges and lists, globs, several patterns,
``--split-shards``; which DATA is a shard source at all."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from ..data.listing import IMAGE_EXTENSIONS, SPLIT_NAMES
from ..errors import EmbedcacheError

LAYOUTS = {".tar": "webdataset", ".parquet": "parquet"}


PATTERN_SEPARATOR = "::"  # several patterns in one DATA argument, as webdataset writes them


# Names one pattern may expand to: a million shards is more than any data set has, and a
# wider range (x-{0000000000..9999999999}.tar) would be listed name by name for hours.
MAX_PATTERN_NAMES = 1_000_000


_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def _outer_brace(pattern: str) -> tuple[int, int] | None:
    """Where the first top-level ``{...}`` of ``pattern`` starts and ends, or None."""
    start, depth = pattern.find("{"), 0
    if start < 0:
        return None
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 0:
            return start, i
    raise EmbedcacheError(f"unbalanced braces in {pattern!r}")


def _top_level_split(body: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in body:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def _count(pattern: str) -> int:
    """How many names :func:`expand_braces` makes of ``pattern``, without making them: a range
    counts in constant time, a list's choices add up and the braces one after another multiply,
    so the pattern is read once whatever it expands to (a range counting down counts 0)."""
    total, rest = 1, pattern
    while (span := _outer_brace(rest)) is not None:
        body = rest[span[0] + 1 : span[1]]
        r = _RANGE.match(body)
        n = int(r.group(2)) - int(r.group(1)) + 1 if r else sum(map(_count, _top_level_split(body)))
        total *= max(n, 0)
        rest = rest[span[1] + 1 :]
    return total


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> three names; ``{train,val}`` -> two; nested and repeated braces
    expand outermost first, left to right, as a shell does
    (numbers keep the first bound's width). A pattern of more than
    :data:`MAX_PATTERN_NAMES` names is refused before any is made."""
    try:
        n = _count(pattern)
        if n > MAX_PATTERN_NAMES:
            raise EmbedcacheError(
                f"{pattern!r} would name {n:,} files, more than the {MAX_PATTERN_NAMES:,} a "
                "pattern may; name the shards with a glob (e.g. train-*.tar) or give their folder"
            )
        return _expand(pattern)
    except RecursionError:  # a brace a level, or one after another, for a thousand levels
        raise EmbedcacheError(f"too many braces in {pattern[:40]!r}...; use a glob") from None


def _expand(pattern: str) -> list[str]:
    span = _outer_brace(pattern)
    if span is None:
        return [pattern]
    body, head, tail = pattern[span[0] + 1 : span[1]], pattern[: span[0]], pattern[span[1] + 1 :]
    r = _RANGE.match(body)
    if r:
        lo, hi, width = int(r.group(1)), int(r.group(2)), len(r.group(1))
        if hi < lo:
            raise EmbedcacheError(
                f"brace range {{{body}}} in {pattern!r} counts down; "
                f"write {{{r.group(2)}..{r.group(1)}}}"
            )
        choices = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    else:
        choices = _top_level_split(body)
    return [x for c in choices for x in _expand(head + c + tail)]


def _matches(pattern: str, base: Path | None) -> list[Path]:
    """The files one pattern names: brace expansion, then a glob for each name with ``*?[``."""
    found: list[Path] = []
    for name in expand_braces(pattern):
        p = Path(name) if base is None or Path(name).is_absolute() else base / name
        if glob.has_magic(str(p)):
            found += sorted(Path(g) for g in glob.glob(str(p), recursive=True) if Path(g).is_file())
        elif p.is_file():
            found.append(p)
        else:
            raise EmbedcacheError(f"shard {p} (from {pattern!r}) does not exist; check the pattern")
    if not found:
        raise EmbedcacheError(f"no files match {pattern!r}; expected .tar shards or .parquet files")
    return found


def _folder_files(folder: Path) -> list[Path]:
    """A folder given as DATA: its .tar or .parquet files, if it holds them and no images
    (only its own entries are looked at, so an image folder costs no extra walk)."""
    entries = sorted(p for p in folder.iterdir() if p.is_file())
    files = [p for p in entries if p.suffix in LAYOUTS]
    return files if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in entries) else []


def is_shard_source(data, split_shards: str | None = None) -> bool:
    """Whether ``data`` names tar shards or Parquet files (else a folder or CSV manifest)."""
    if split_shards or isinstance(data, list | tuple):
        return True
    p = Path(str(data))
    if p.is_dir():
        return bool(_folder_files(p))
    if p.exists():
        return p.suffix in LAYOUTS
    return PATTERN_SEPARATOR in str(data) or glob.has_magic(str(data)) or "{" in str(data)


def _split_patterns(split_shards: str) -> list[tuple[str, str]]:
    pairs = []
    for part in split_shards.split(","):
        name, sep, pattern = part.partition("=")
        split = SPLIT_NAMES.get(name.strip().lower())
        if not sep or not split or not pattern.strip():
            raise EmbedcacheError(
                f"--split-shards takes train=PATTERN,val=PATTERN[,test=PATTERN], got {part!r}"
            )
        pairs.append((split, pattern.strip()))
    return pairs


def shard_files(data, split_shards: str | None = None) -> tuple[Path, list[tuple[Path, str]]]:
    """The source root and its shards in order, each with the split its pattern gives ("" if
    none). With ``split_shards`` the patterns are relative to ``data``, a folder."""
    if split_shards:
        base = Path(str(data))
        if not base.is_dir():
            raise EmbedcacheError(
                "with --split-shards DATA is the folder the patterns are relative to; "
                f"{base} is not a folder"
            )
        listed = [(p, s) for s, pat in _split_patterns(split_shards) for p in _matches(pat, base)]
    else:
        patterns = (
            list(data) if isinstance(data, list | tuple) else str(data).split(PATTERN_SEPARATOR)
        )
        listed = []
        for pat in patterns:
            p = Path(pat)
            files = _folder_files(p) if p.is_dir() else _matches(pat, None)
            if not files:
                raise EmbedcacheError(f"folder {p} holds no .tar or .parquet files")
            listed += [(f, "") for f in files]
    seen, unique = set(), []
    for p, split in listed:  # a shard named by two patterns is read once, for the first
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append((p.resolve(), split))
    kinds = {LAYOUTS.get(p.suffix) for p, _ in unique}
    if None in kinds or len(kinds) > 1:
        raise EmbedcacheError(
            "shard sources are .tar files or .parquet files, not a mix; "
            f"got {', '.join(sorted({p.suffix or p.name for p, _ in unique}))}"
        )
    root = Path(os.path.commonpath([p.parent for p, _ in unique]))
    return root, unique
