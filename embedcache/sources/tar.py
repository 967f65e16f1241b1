"""WebDataset tar shards: members grouped by key, the image chosen by extension, labels from
``.cls`` or a ``.json`` field. Headers are read by :mod:`.tarformat`; only headers and the small
label members are read to list a shard; image bytes are read at their offsets while decoding
(``os.pread``, so decode threads share nothing). A shard damaged mid-way lists what it lost:
each sample past the damage is skipped with the reason, found by its headers alone."""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..data.decode import UnreadableImage, os_reason
from .base import SPLIT_FIELD, Broken, Entry, sample_split
from .tarformat import BLOCK, DamagedHeader, NotPlainTar, any_members, members_after, plain_members

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # WebDataset image extensions, in preference order


LABEL_MEMBER_BYTES = 1 << 20  # a .cls or .json larger than this is not a label: not read


_KEY = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$")  # webdataset's base_plus_ext


@dataclass(slots=True)  # a million of them: no frozen-dataclass __init__
class TarMember:
    """An image member of a tar shard: ``size`` bytes at ``offset`` of ``shard``."""

    shard: Path
    offset: int
    size: int

    def read_bytes(self) -> bytes:
        if self.size == 0:
            raise UnreadableImage("empty member (0 bytes)")
        try:
            fd = os.open(self.shard, os.O_RDONLY)
            try:
                # a header may declare any size: never ask pread for more than the file holds
                if self.offset + self.size > os.fstat(fd).st_size:
                    raise UnreadableImage("truncated member (the shard ends inside it)")
                data = os.pread(fd, self.size, self.offset)
            finally:
                os.close(fd)
        except OSError as e:
            raise UnreadableImage(os_reason(e)) from None
        if len(data) < self.size:
            raise UnreadableImage("truncated member (the shard ends inside it)")
        return data


def _is_class(value) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _json_label(meta: dict, label_key: str) -> tuple[object, str]:
    """(raw label, problem) of a .json member's ``label_key`` field: an int or name, or a list
    of them (the labels of a multi-label sample)."""
    label = meta[label_key]
    if _is_class(label) or (isinstance(label, list) and all(map(_is_class, label))):
        return label, ""
    return None, f"label {label_key!r} is not an int or name, or a list of them"


def _tar_label(
    parts: dict, label_key: str | None, unlabelled: bool, where: str
) -> tuple[object, str, str]:
    """(raw label, split, problem) of one WebDataset sample from its .cls and .json members."""
    meta = {}
    if "json" in parts:
        if parts["json"] is None:
            return None, "", f"its .json is over {LABEL_MEMBER_BYTES >> 20} MiB"
        try:
            meta = json.loads(parts["json"])
        except (ValueError, UnicodeDecodeError):
            return None, "", "damaged .json member"
        meta = meta if isinstance(meta, dict) else {}
    split = sample_split(meta.get(SPLIT_FIELD), where)
    if unlabelled:
        return None, split, ""
    if label_key and label_key in meta:
        label, problem = _json_label(meta, label_key)
        return label, split, problem
    if "cls" in parts:
        if parts["cls"] is None:
            return None, split, f"label .cls is over {LABEL_MEMBER_BYTES >> 20} MiB"
        try:
            return int(parts["cls"].decode().strip()), split, ""
        except (ValueError, UnicodeDecodeError):
            return None, split, "label .cls is not a whole number"
    return None, split, ""


class _Samples:
    """Members grouped by key as webdataset groups them, in the order stored: {key: {ext: a
    TarMember, the bytes of a .cls or .json (None: too large), or None when not read}}, and
    the keys that appear twice (members not adjacent, or an extension twice)."""

    def __init__(self):
        self.parts: OrderedDict[str, dict] = OrderedDict()
        self.twice: set[str] = set()
        self._last: str | None = None

    def add(self, name: str) -> tuple[dict, str] | None:
        """The parts of ``name``'s key and its extension (None: a name with no extension)."""
        m = _KEY.match(name)
        if not m:
            return None  # no extension: not a sample member, and no break between a key's members
        key, ext = m.group(1), m.group(2).lower()
        parts = self.parts.get(key)
        if parts is None:
            parts = self.parts[key] = {}
        elif key != self._last or ext in parts:
            self.twice.add(key)
        self._last = key
        return parts, ext


def _has_image(parts: dict) -> bool:
    return any(e in parts for e in IMAGE_MEMBERS)


@dataclass
class _Listing:
    """A shard's members, and what a damaged shard lost: the members past the damage (found
    by their headers, not read), what the damage is ("" if none), where, and whether it is an
    end-of-archive block (which cuts no member in two) rather than a damaged header."""

    samples: _Samples = field(default_factory=_Samples)
    lost: _Samples = field(default_factory=_Samples)
    damage: str = ""
    where: str = ""
    past_end: bool = False


def _tar_members(path: Path) -> _Listing:
    """The members of a shard, through the fast reader where every header is plain."""
    try:
        return _grouped(path, plain_members)
    except NotPlainTar:
        return _grouped(path, any_members)


def _grouped(path: Path, members) -> _Listing:
    out = _Listing()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                _read(f, path, members(f, size), out.samples)
            except DamagedHeader as e:  # report, not recover: the members past it are not read
                for name, _, _ in members_after(f, e.offset + BLOCK, size):
                    if (added := out.lost.add(name)) is not None:
                        added[0][added[1]] = None
                nothing = e.offset == 0 and not out.lost.parts
                out.damage = "not a tar file (no tar header at byte 0)" if nothing else e.damage
                out.where, out.past_end = e.where, e.past_end
    except (tarfile.TarError, OSError, EOFError) as e:
        n = len(out.samples.parts)
        what = f"damaged after {n} samples" if n else "not a tar file"
        out.damage = f"{what} ({str(e)[:40]})"
    return out


def _read(f, path: Path, members, samples: _Samples) -> None:
    """Add each member to ``samples``: an image (or any other) member by its offset, a label
    member by its bytes."""
    for name, offset, n in members:
        if (added := samples.add(name)) is None:
            continue
        parts, ext = added
        if ext not in ("cls", "json"):
            parts[ext] = TarMember(path, offset, n)
        elif n <= LABEL_MEMBER_BYTES:
            f.seek(offset)
            parts[ext] = f.read(n)
        else:
            parts[ext] = None


def _cut(listing: _Listing) -> set[str]:
    """Keys read before the damage that may have members past it: those found past it again,
    and before a damaged header the last one when it has fewer extensions than the sample
    before it (or, with none, the first one past the damage): its missing member may be the
    damaged one."""
    samples, lost = listing.samples.parts, listing.lost.parts
    cut = {k for k in lost if k in samples}
    if samples and not listing.past_end:
        keys = reversed(samples)
        last, before = next(keys), next(keys, None)
        like = samples[before] if before is not None else next(iter(lost.values()), None)
        if like is not None and samples[last].keys() < like.keys():
            cut.add(last)
    return cut


def list_tar(path: Path, *, label_key: str | None = None, unlabelled: bool = False) -> list[Entry]:
    """The samples of one WebDataset shard, in the order stored. A sample that cannot be used
    (a key twice, a bad label, lost to damage) is a Broken entry with the reason; a shard that
    is damaged or holds no image ends with an entry of key "" that is skipped with the reason."""
    listing = _tar_members(path)
    cut = _cut(listing) if listing.where else set()
    entries = []
    for key, parts in listing.samples.parts.items():
        if not _has_image(parts):
            continue  # a key without an image member (captions alone, ...) is not a sample
        image = next(parts[e] for e in IMAGE_MEMBERS if e in parts)
        if key in listing.samples.twice:
            label, split, problem = None, "", f"key {key} appears twice in the shard"
        elif key in cut:
            label, split, problem = None, "", f"cut by {listing.where}"
        else:
            label, split, problem = _tar_label(parts, label_key, unlabelled, f"{path.name} {key}")
        entries.append(Entry(key, Broken(problem) if problem else image, label, split))
    for i, (key, parts) in enumerate(listing.lost.parts.items()):
        # the first key past a damaged header, image or not: the damaged one may be its image's
        first = i == 0 and not listing.past_end
        if (_has_image(parts) or first) and key not in listing.samples.parts:
            entries.append(Entry(key, Broken(f"after {listing.where}")))
    if listing.damage:
        entries.append(Entry("", Broken(f"damaged shard: {listing.damage}")))
    elif not entries:
        entries.append(Entry("", Broken(f"no {'/'.join(IMAGE_MEMBERS)} member in the shard")))
    return entries
