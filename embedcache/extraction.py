"""The batched inference loop that fills a cache: decode in workers, forward once, write rows."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__, sources
from .backbones import Backbone, Normalise, build_backbone
from .cache import (
    FORMAT_VERSION,
    Cache,
    PartialCache,
    ShardFile,
    check_space,
    cross_split_duplicates,
    disk_errors,
    estimate_bytes,
    now_iso,
    open_cache,
    partial_path,
    recorded_precision,
    shard_path,
    shard_paths,
)
from .config import ExtractConfig
from .data import (
    HASH_BYTES,
    THUMB_SIDE,
    ImageSet,
    content_hash,
    decoded_batches,
    gpu_decoded_batches,
    grey_thumbnail,
    preprocess,
    view_key,
    view_policy,
    views_for,
    with_views,
)
from .distributed import Group, from_env, process_group
from .errors import EmbedcacheError
from .forward import check_batch_memory
from .identity import CacheIdentity
from .locks import exclusive
from .outputs import claim, remove_stale_tmp, shown
from .runtime import (
    Pace,
    Run,
    auto_batch_size,
    autocast_dtype,
    choose_gpu_decode,
    compile_mode,
    compiled,
    default_batch_size,
    default_num_workers,
    precision_name,
    tune_allocator,
)

# --join auto: from this many bytes of shard files on, the cache is virtual. Copying runs at
# 7.5-20 s/GB through rank 0 here (benchmarks/results/scale_extract_cpu.md), so 8 GB is
# minutes of every other rank waiting; below it one self-contained file is worth the wait.
VIRTUAL_JOIN_BYTES = 8 * 10**9

# --precision auto on a CPU with native bf16: bf16, because heads on bf16 features were not
# significantly worse than on fp32 features anywhere (one-sided exact McNemar on the same held-out
# images of hymenoptera, flowers12, digits: 4 images won, 3 lost of 752 pooled, p = 0.77, on a
# Xeon with AMX, BatchNorm folded, which fusing the activations leaves bit for bit for lite0;
# 6 won, 3 lost, p = 0.91 on an EPYC, eager), and bf16 ran 1.5-1.6x fp32 on that EPYC, 2.0x
# fp32 on the Xeon, both folded and fused (lite0's forward pass): precision_cpu.md,
# cli_vs_0c5bfa9_epyc_bf16.md, bn_fold_cpu.md in benchmarks/results.
CPU_BF16_AUTO = True


@dataclass
class ExtractResult:
    """What one `extract` run did."""

    path: Path
    images: int  # images in the finished cache
    extracted: int  # run through the backbone by this run
    reused: int  # copied from an earlier (partial or complete) cache
    skipped: int  # unreadable files, listed in the cache
    seconds: float
    file_bytes: int
    splits: dict[str, int] = field(default_factory=dict)
    up_to_date: bool = False
    ranks: list[tuple[int, float]] = field(default_factory=list)  # (extracted, seconds) per rank
    pace: Pace | None = None  # where the time went, every rank's together (None: nothing run)
    views: int = 0  # augmented views stored per training image (extract --views)
    leaks: int | None = None  # files byte-identical to one in another split (None: no hashes)
    ignored: list[dict] = field(default_factory=list)  # files not read: path, reason
    empty_classes: list[str] = field(default_factory=list)  # with --allow-empty-class

    @property
    def images_per_s(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """For people: what the cache holds first, then how this run made it, then warnings."""
        if self.up_to_date:
            return f"{shown(self.path)} is up to date ({self.images} images); nothing to extract"
        splits = ", ".join(f"{k} {v}" for k, v in self.splits.items())
        views = f", {self.views} augmented views per train image" if self.views else ""
        skipped = f"; {self.skipped} skipped (unreadable)" if self.skipped else ""
        lines = [f"{shown(self.path)}: features of {self.images} images ({splits}){views}{skipped}"]
        how = f"{self.extracted} extracted in {self.seconds:.1f} s"
        if self.extracted:
            how += f" ({self.images_per_s:.1f} images/s)"
        how += f", {self.reused} reused; {self.file_bytes / 1e6:.1f} MB"
        if len(self.ranks) > 1:
            rates = ", ".join(f"{n / s:.1f}" if s > 0 else "0" for n, s in self.ranks)
            how += f"; {len(self.ranks)} ranks at {rates} images/s"
        if self.pace is not None and self.extracted:
            how += f"; {self.pace.verdict()}"
        lines.append(how)
        if self.ignored:
            lines.append(self._ignored())
        lines += [f"warning: class {shown(k)!r} has no image" for k in self.empty_classes]
        return "\n".join(lines) + self._leak_warning()

    def _leak_warning(self) -> str:
        if not self.leaks:
            return ""
        return (
            f"\nwarning: {self.leaks} file(s) are byte-identical to a file in another split, so "
            "accuracy measured on those splits is inflated; "
            f"run `embedcache audit {self.path} --out audit/`"
        )

    def _ignored(self) -> str:
        """'3 ignored (2 .heic, 1 folder; ...)': the files the scan did not read."""
        kinds: dict[str, int] = {}
        for item in self.ignored:
            kind = item["reason"].split("(")[-1].rstrip(")") if "(" in item["reason"] else "folder"
            kinds[kind] = kinds.get(kind, 0) + 1
        top = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:3])
        return f"{len(self.ignored)} ignored ({top}; see embedcache info {shown(self.path)})"


def _batches(todo: dict[str, np.ndarray], batch_size: int) -> tuple[list, list[list[int]]]:
    """Flatten to-do rows into items and batches aligned to ``row // batch_size``.

    Aligned batches mean a resumed run forwards exactly the batches an
    uninterrupted run would, so it writes bit-identical features.
    """
    items, batches = [], []
    for split, rows in todo.items():
        if not len(rows):
            continue
        block = rows // batch_size
        cuts = np.flatnonzero(np.diff(block)) + 1
        for part in np.split(np.arange(len(rows)), cuts):
            batches.append([len(items) + int(i) for i in part])
        items += [(split, int(r)) for r in rows]
    return items, batches


def share(batches: list, rank: int, world: int) -> list:
    """Rank ``rank``'s batches: one contiguous run of them, the runs as even as can be. Contiguous
    runs keep each shard's rows in order, so a virtual join maps a shard in a few pieces."""
    n = len(batches)
    return batches[n * rank // world : n * (rank + 1) // world]


def _reusable(identity: CacheIdentity, opened: list, subject: str, hint: str) -> None:
    """Check that the last of ``opened`` holds the features asked for; on error close them all."""
    try:
        identity.check(
            opened[-1].identity, subject=subject, mine="asked", theirs="existing", hint=hint
        )
    except EmbedcacheError:
        for source in opened:
            source.close()
        raise


def _plan(
    out: Path, identity: CacheIdentity, images: ImageSet, overwrite: bool
) -> tuple[str, list]:
    """Decide what to do with existing files at ``out``:
    ('fresh'|'resume'|'rebuild'|'up_to_date', reusable)."""
    reuse: list[Cache | PartialCache] = []
    partial = partial_path(out)
    if out.exists() and not overwrite:
        reuse.append(open_cache(out))
        _reusable(
            identity,
            reuse,
            f"{out} holds other features",
            "pass --overwrite to replace it or choose another --out",
        )
        if reuse[0].attrs.get("source_fingerprint") == images.fingerprint():
            reuse.pop().close()
            partial.unlink(missing_ok=True)  # stale: the finished cache holds every row it could
            return "up_to_date", []
    if partial.exists() and not overwrite:
        try:
            p = PartialCache.open(partial)
        except OSError:  # killed while the file was being created: it holds nothing yet
            partial.unlink()
            return ("rebuild" if reuse else "fresh"), reuse
        _reusable(
            identity,
            [*reuse, p],
            f"{partial} is an unfinished extraction with other settings",
            "pass --overwrite to start over",
        )
        if p.h5.attrs.get("source_fingerprint") == images.fingerprint():
            for c in reuse:
                c.close()
            return "resume", [p]
        reuse.append(p)
    return ("rebuild" if reuse else "fresh"), reuse


def _check_writable(out: Path) -> None:
    """Refuse an --out that is a folder or sits where nothing can be written, before any work."""
    if out.is_dir():
        raise EmbedcacheError(
            f"--out {out} is a directory; give a file name such as {out / 'cache.h5'}"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = Path(f"{out}.{os.getpid()}.probe")
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise EmbedcacheError(
            f"cannot write next to --out {out} ({e.strerror}); choose a writable location"
        ) from None


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {
        "tool": "embedcache",
        "tool_version": __version__,
        "torch_version": str(torch.__version__),
        "torchvision_version": version("torchvision"),
        "timm_version": version("timm"),
    }


def _attrs(bb: Backbone, identity: CacheIdentity, images: ImageSet, cfg: ExtractConfig) -> dict:
    """Root attributes of a new cache: what made it, from what, with which libraries."""
    return {
        "format_version": FORMAT_VERSION,
        **_versions(),
        **identity.as_dict(),
        "weights_arg": bb.weights_arg,
        "feature_dim": bb.feature_dim,
        "image_size": bb.transform.crop,
        "classes": json.dumps(images.classes),
        "source": str(images.root),
        "layout": images.layout,
        "source_fingerprint": images.fingerprint(),
        "num_classes": len(images.classes),
        "request": cfg.request(),
    }


def _result(out: Path, extracted: int, reused: int, seconds: float, **extra) -> ExtractResult:
    with open_cache(out) as c:
        counts = {s: c.num_images(s) for s in c.splits}
        skipped, views, ignored = len(c.skipped), c.num_views, c.ignored
        leaks = cross_split_duplicates(c)
        per_class = sum((c.class_counts(s) for s in c.splits), np.zeros(len(c.classes), int))
        empty = [k for i, k in enumerate(c.classes) if not per_class[i]]
    return ExtractResult(
        out,
        sum(counts.values()),
        extracted,
        reused,
        skipped,
        seconds,
        out.stat().st_size,
        counts,
        views=views,
        ignored=ignored,
        empty_classes=empty,
        leaks=leaks,
        **extra,
    )


def _listed_per_class(images: ImageSet) -> tuple[list[str], np.ndarray, dict[int, str]]:
    """(classes, files listed per class, why a class has none): before any work."""
    counts = images.class_counts()
    why = {}
    for i, name in enumerate(images.classes):
        lost = [f"{k}: {r}" for k, r in images.unreadable.items() if name in k.split("/")[:2]]
        why[i] = f"folder {lost[0]}" if lost else "no image file in its folder"
    return images.classes, counts, why


def _extracted_per_class(partial: PartialCache) -> tuple[list[str], np.ndarray, dict[int, str]]:
    """(classes, images extracted per class, why a class has none): before the cache is written."""
    classes = json.loads(partial.h5.attrs["classes"])
    counts, reasons = np.zeros(len(classes), np.int64), {i: [] for i in range(len(classes))}
    for split in partial.splits:
        g = partial.h5[split]
        (rows, ids), status, why = partial.label_pairs(split), g["status"][:], g["reasons"][:]
        counts += np.bincount(ids[status[rows] == 1], minlength=len(classes))
        lost = status[rows] == 2
        for r, c in zip(rows[lost].tolist(), ids[lost].tolist(), strict=True):
            reasons[c].append(why[r].decode(errors="replace"))
    why = {
        i: f"all {len(r)} of its files were skipped: {', '.join(sorted(set(r))[:3])}"
        for i, r in reasons.items()
    }
    return classes, counts, why


def _check_classes(
    classes: list[str], counts: np.ndarray, why: dict[int, str], *, allow: bool
) -> None:
    """Refuse a class with no image (unless ``allow``): a head would train without a word on it."""
    empty = np.flatnonzero(counts == 0)
    if len(empty) and not allow:
        i = int(empty[0])
        more = f" (and {len(empty) - 1} more classes)" if len(empty) > 1 else ""
        raise EmbedcacheError(
            f"class {shown(classes[i])!r} has no readable image ({why[i]}){more}; "
            "fix its files, or pass --allow-empty-class to write the cache without them"
        )


def extract(
    data: str | Path,
    *,
    out: str | Path,
    config: ExtractConfig | None = None,
    model: Backbone | None = None,
    progress: bool = True,
    **options,
) -> ExtractResult:
    """Run a frozen backbone once over ``data`` and write its pooled features to ``out``.

    ``options`` are the fields of :class:`embedcache.config.ExtractConfig` (or pass
    ``config``): ``backbone``, ``weights``, ``dtype``, ``image_size``, ... ``model``
    is an already built backbone to use instead of building ``backbone``.
    Resumes an interrupted run, extracts only new or changed images when the
    cache exists, and refuses a cache made with other settings unless
    ``overwrite``. See :func:`embedcache.data.scan` for the accepted layouts.

    Under torchrun each rank forwards one contiguous run of the batches to do
    (:func:`share`) into its own shard file next to ``out``; rank 0 then joins
    the shards into one ordinary cache, the same file a one-process run writes.

    Returns
    -------
    ExtractResult : counts, seconds and the file written.
    """
    cfg = ExtractConfig.build(config, **options)
    tune_allocator()
    out = Path(out)
    if model is None and from_env().world == 1 and _up_to_date(data, out, cfg):
        return _result(out, 0, 0, 0.0, up_to_date=True)  # without building the backbone
    with process_group(cfg.device) as group, contextlib.ExitStack() as held:
        dev = group.device(cfg.device)
        bb = group.each(
            lambda: (
                model
                or build_backbone(
                    cfg.backbone, weights=cfg.weights, image_size=cfg.image_size, device=dev
                )
            )
        )
        precision = _precision(out, cfg.precision, overwrite=cfg.overwrite)
        amp = autocast_dtype(dev, precision, cpu_bf16=CPU_BF16_AUTO)
        batch = cfg.batch_size if isinstance(cfg.batch_size, int) else default_batch_size(dev)
        if isinstance(batch, int):  # before any file is written
            check_batch_memory(batch, bb.transform.crop, dev)
        group.on_main(lambda: held.enter_context(exclusive(out, "extract")))  # one writer per --out
        mode, reused = group.on_main(lambda: _begin(data, out, cfg, bb, precision_name(amp)))
        if mode == "up_to_date":
            return _result(out, 0, 0, 0.0, up_to_date=True)
        start = time.perf_counter()
        run = _run_for(cfg, bb, dev, amp, progress and group.is_main)
        extracted, pace = group.each(lambda: _extract_part(out, bb, run, group, cfg))
        ranks = group.gather((extracted, time.perf_counter() - start, pace.waited, pace.busy))
        group.on_main(lambda: _join(out, cfg.join, cfg.allow_empty_class))
        seconds = time.perf_counter() - start
    pace = Pace(sum(r[2] for r in ranks), sum(r[3] for r in ranks))
    ranks = [(n, s) for n, s, *_ in ranks]
    return _result(out, sum(n for n, _ in ranks), reused, seconds, ranks=ranks, pace=pace)


def _up_to_date(data, out: Path, cfg: ExtractConfig) -> bool:
    """Whether the finished cache at ``out`` records this request and these very images (and
    no unfinished run waits beside it): then there is nothing to do."""
    if cfg.overwrite or not out.is_file() or partial_path(out).exists() or shard_paths(out):
        return False
    try:
        with open_cache(out) as c:
            recorded = (c.attrs.get("request"), c.attrs.get("source_fingerprint"))
    except (EmbedcacheError, OSError):
        return False  # the full path says what is wrong with it
    if recorded[0] != cfg.request():
        return False
    return recorded[1] == sources.scan(data, cfg).fingerprint()  # shards, folders, manifests


def _precision(out: Path, precision: str, *, overwrite: bool) -> str:
    """``precision``, except that ``auto`` keeps the forward pass an existing cache (or an
    unfinished one) at ``out`` was made with: a cache never mixes precisions, and auto's choice
    changing (a new release, another machine) must not refuse an incremental run. With
    ``overwrite`` nothing is kept, so auto chooses afresh."""
    if precision != "auto" or overwrite:
        return precision
    return recorded_precision(out) or precision


def _begin(data, out: Path, cfg: ExtractConfig, bb: Backbone, precision: str) -> tuple[str, int]:
    """Rank 0: scan the data, plan against existing files, write the in-progress file.

    Returns (mode, rows reused): mode is up_to_date, fresh, resume or rebuild.
    """
    claim(out, kind="cache", verb="extract", inputs=[("the data", data)])
    _check_writable(out)
    images = sources.scan(data, cfg)  # tar shards, Parquet files, folders, CSV manifests
    _check_classes(*_listed_per_class(images), allow=cfg.allow_empty_class)
    identity = CacheIdentity(
        **bb.identity().as_dict(),
        dtype=cfg.dtype,
        precision=precision,
        views=cfg.views,
        view_policy=view_policy(cfg.views, cfg.seed),
    )
    with disk_errors(out):
        _take_in_shards(out, keep=not cfg.overwrite)
        mode, reuse = _plan(out, identity, images, cfg.overwrite)
        if mode == "up_to_date":
            return mode, 0
        remove_stale_tmp(out)
        partial = _open_partial(out, mode, reuse, _attrs(bb, identity, images, cfg), images, bb)
        try:
            return mode, partial.done()
        finally:
            partial.close()


def _take_in_shards(out: Path, *, keep: bool) -> None:
    """Shard files an earlier torchrun left (killed before its join): merge their finished rows
    into the in-progress file, so nothing is forwarded twice, whatever the number of ranks now."""
    shards, partial = shard_paths(out), partial_path(out)
    if shards and keep and partial.exists():
        with contextlib.suppress(OSError):  # an unreadable partial file is dropped by _plan
            p = PartialCache.open(partial)
            try:
                for shard in shards:
                    with contextlib.suppress(OSError):  # killed while being created: holds nothing
                        p.merge(shard)
            finally:
                p.close()
    for shard in shards:
        shard.unlink(missing_ok=True)


def _run_for(
    cfg: ExtractConfig, bb: Backbone, dev: torch.device, amp: torch.dtype | None, progress: bool
) -> Run:
    workers = default_num_workers(dev) if cfg.num_workers is None else cfg.num_workers
    if cfg.views and cfg.decode == "gpu":
        raise EmbedcacheError(
            "--views draws its crops on the CPU; use --decode cpu or auto with --views"
        )
    gpu = choose_gpu_decode(cfg.decode, dev) and not cfg.views
    batch = cfg.batch_size or default_batch_size(dev)
    if batch == "auto":
        batch = auto_batch_size(bb.net, bb.transform.crop, dev, amp)
    return Run(dev, batch, workers, amp, progress, gpu, cfg.compile)


def _extract_part(
    out: Path, bb: Backbone, run: Run, group: Group, cfg: ExtractConfig
) -> tuple[int, Pace]:
    """Forward this rank's share of the rows to do: a contiguous run of the batches (of tar
    shards or Parquet files: whole shards, see sources.plan), into its own shard file (one
    process: straight into the in-progress file). Returns the images forwarded."""
    alone, seed = group.world == 1, cfg.seed
    partial = PartialCache.open(partial_path(out), "r+" if alone else "r")
    splits, dtype, views = partial.splits, partial.identity.dtype, partial.identity.views
    root = Path(str(partial.h5.attrs["source"]))
    todo = {s: partial.todo(s) for s in splits}
    paths = {s: partial.paths(s) for s in splits}
    batch_size = run.batch_size
    layout = str(partial.h5.attrs.get("layout", ""))
    if sources.is_shard_layout(layout):
        rank = {"rank": group.rank, "world": group.world, "batch_size": batch_size}
        flat, mine, files = sources.plan(partial.h5.attrs, todo, paths, **rank, cfg=cfg)
    else:
        flat, batches = _batches(todo, batch_size)
        mine = share(batches, group.rank, group.world)
        files = [root / paths[s][r] for s, r in flat]
    writer = partial
    if not alone:
        partial.close()
        items = [flat[i] for batch in mine for i in batch]
        with disk_errors(out):
            writer = ShardFile.create(
                shard_path(out, group.rank),
                splits,
                items,
                feature_dim=bb.feature_dim,
                dtype=dtype,
                views=views,
            )
    if views:  # decode items: (file, views of its split, the seed of its views)
        files = [
            (f, views_for(s, views), view_key(seed, paths[s][r]))
            for f, (s, r) in zip(files, flat, strict=True)
        ]
    # Compiled or not is decided on the whole cache, not on the rows left nor on a rank's share,
    # so that a resumed, incremental or torchrun run computes its rows as one run over everything
    # would (compiled and eager agree only up to rounding): features never depend on the world.
    images = sum(len(p) for p in paths.values())
    mode = compile_mode(run.compile, run.device, images, bb.net, run.autocast)
    try:
        with disk_errors(out):
            return _run(bb, files, flat, mine, writer, run, mode=mode, scale=group.world)
    finally:
        writer.close()


def join_kind(join: str, shards: list[Path]) -> str:
    """copy or virtual: what ``--join`` means for these shard files (auto: virtual from
    VIRTUAL_JOIN_BYTES of shard files on, where copying through rank 0 starts to cost minutes)."""
    if not shards:
        return "copy"  # one process writes one file
    if join != "auto":
        return join
    return "virtual" if sum(p.stat().st_size for p in shards) >= VIRTUAL_JOIN_BYTES else "copy"


def _join(out: Path, join: str = "auto", allow_empty_class: bool = False) -> None:
    """Rank 0: write the finished cache from the partial file and the shards, copying their
    rows into it or, for a virtual join, mapping them where they are (one process: a copy)."""
    with disk_errors(out):
        partial = PartialCache.open(partial_path(out))
        shards = shard_paths(out)
        try:
            if join_kind(join, shards) == "virtual":
                partial.finalize_virtual(out, {"created": now_iso()}, shards)
            else:
                for shard in shards:  # merged rows are flushed and marked: the shard can go,
                    partial.merge(shard)  # so the disk holds partial + shards, then + the cache
                    shard.unlink()
                _check_classes(*_extracted_per_class(partial), allow=allow_empty_class)
                partial.finalize(out, {"created": now_iso()})
        finally:
            if partial.h5.id.valid:
                with contextlib.suppress(Exception):  # the error that got us here matters more
                    partial.close()
    for shard in shard_paths(out):
        shard.unlink(missing_ok=True)


def _open_partial(
    out: Path, mode: str, reuse: list, attrs: dict, images: ImageSet, bb: Backbone
) -> PartialCache:
    """The in-progress file to fill: the one being resumed, or a new one seeded with reusable
    rows."""
    if mode == "resume":
        return reuse[0]
    try:
        dtype = attrs["dtype"]
        check_space(
            out.parent, estimate_bytes(images, bb.feature_dim, dtype, int(attrs.get("views", 0)))
        )
        return PartialCache.create(
            partial_path(out),
            attrs=attrs,
            images=images,
            feature_dim=bb.feature_dim,
            dtype=dtype,
            reuse=reuse,
        )
    finally:
        for source in reuse:
            source.close()


def _run(
    bb: Backbone,
    files: list[Path],
    flat: list,
    batches: list[list[int]],
    writer,
    run: Run,
    *,
    mode: str | None,
    scale: int = 1,
) -> tuple[int, Pace]:
    """Forward ``batches`` (indices into ``flat``, (split, row) pairs, and ``files``) and write
    each batch, the backbone compiled as ``mode`` says (see compile_mode); returns the number
    of images run through the backbone and where the time went. The progress bar counts every
    rank's images as ``scale`` times this rank's (ranks share batches evenly)."""
    if not batches:
        return 0, Pace()
    thumbs: dict = {}  # grey thumbnails the CPU decoders made: id(item) -> (side, side) uint8
    if run.gpu_decode:
        loader = gpu_decoded_batches(
            files, batches, bb.transform, device=run.device, num_workers=run.workers
        )
    else:
        viewed = isinstance(files[0], tuple)  # items with views: each decodes to (1 + V, H, W, 3)
        kw = {} if viewed else {"thumbnails": thumbs}
        decode = functools.partial(with_views if viewed else preprocess, t=bb.transform, **kw)
        loader = decoded_batches(files, batches, decode, device=run.device, num_workers=run.workers)
    ahead = getattr(loader, "ahead", lambda: None)  # see ThreadDecoded
    net = bb.net.to(run.device).eval().to(memory_format=torch.channels_last)
    net = compiled(net, mode)
    norm = Normalise(bb.transform).to(run.device)
    out_dtype = np.dtype(writer.dtype)
    done = skipped = 0
    total, pace = len(flat), Pace()
    desc = "extract" if scale == 1 else f"extract ({scale} ranks)"
    bar = tqdm(total=total, unit="img", desc=desc, disable=not run.progress, dynamic_ncols=True)
    # hashes and thumbnails of a batch are read in a thread while the backbone runs on it
    with ThreadPoolExecutor(1, thread_name_prefix="hash") as hasher, torch.inference_mode(), bar:
        ready = time.perf_counter()
        for index, batch, failed_at in loader:
            got = time.perf_counter()
            pace.waited += got - ready
            file_rows = hasher.submit(_file_rows, [files[i] for i in index], thumbs)
            split = flat[int(index[0]) if len(index) else next(iter(failed_at))][0]  # one per batch
            rows = np.array([flat[i][1] for i in index], dtype=np.int64)
            failed = {flat[i][1]: reason for i, reason in failed_at.items()}
            feats, views = np.zeros((0, bb.feature_dim), out_dtype), None
            if batch is not None:
                per_image = batch.shape[1] if batch.dim() == 5 else 0  # with views: 1 + V
                with run.amp():
                    out = net(norm(batch.flatten(0, 1) if per_image else batch))
                ahead()  # the next batch decodes while this one is written
                feats = _finite(out.float().cpu().numpy().astype(out_dtype), bb, out_dtype)
                if per_image:
                    feats = feats.reshape(len(rows), per_image, -1)
                    feats, views = feats[:, 0], feats[:, 1:]
                done += len(rows)
            writer.write(split, rows, feats, failed, views, *file_rows.result())
            bar.update(min((len(rows) + len(failed)) * scale, total - bar.n))
            if failed:
                skipped += len(failed)
                bar.set_postfix(skipped=skipped, refresh=False)
            ready = time.perf_counter()
            pace.busy += ready - got
    return done, pace


def _file_rows(files: list, made: dict) -> tuple[np.ndarray, np.ndarray]:
    """Content hashes and grey thumbnails of a batch's decoded files (items with views are
    (file, n, key)): (n, HASH_BYTES) and (n, THUMB_SIDE, THUMB_SIDE) uint8, both read back from
    the page cache the decoder just filled."""
    paths = [f[0] if isinstance(f, tuple) else f for f in files]
    digests = b"".join(content_hash(p) for p in paths)
    thumbs = np.zeros((len(paths), THUMB_SIDE, THUMB_SIDE), np.uint8)
    for k, p in enumerate(paths):
        made_here = made.pop(id(p), None)  # by the decoder, or decoded once more here
        thumbs[k] = grey_thumbnail(p) if made_here is None else made_here
    return np.frombuffer(digests, np.uint8).reshape(len(paths), HASH_BYTES), thumbs


def _finite(feats: np.ndarray, bb: Backbone, dtype: np.dtype) -> np.ndarray:
    """``feats`` if every value is finite; else stop: a cache of NaN would help nobody."""
    if np.isfinite(feats).all():
        return feats
    hint = " or --dtype float32 (float16 overflows past 65504)" if dtype == np.float16 else ""
    raise EmbedcacheError(
        f"{bb.name} with weights {bb.weights} gave non-finite features (NaN or infinity); "
        f"check the weights (--weights){hint}"
    )
