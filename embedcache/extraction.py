"""The batched inference loop that fills a cache: decode in workers, forward once, write rows."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .backbones import Backbone, Normalise, build_backbone
from .cache import (
    FORMAT_VERSION,
    Cache,
    PartialCache,
    check_space,
    disk_errors,
    estimate_bytes,
    now_iso,
    open_cache,
    partial_path,
    remove_stale_tmp,
)
from .config import ExtractConfig
from .data import ImageSet, decoded_batches, preprocess, scan
from .errors import EmbedcacheError
from .identity import CacheIdentity
from .runtime import (
    Run,
    autocast_dtype,
    default_batch_size,
    default_num_workers,
    resolve_device,
)


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

    @property
    def images_per_s(self) -> float:
        return self.extracted / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """A one-paragraph report for humans."""
        if self.up_to_date:
            return f"{self.path} is up to date ({self.images} images); nothing to extract"
        splits = ", ".join(f"{k} {v}" for k, v in self.splits.items())
        mb = self.file_bytes / 1e6
        return (
            f"wrote {self.path}: {self.images} images ({splits}), {self.skipped} skipped, "
            f"{self.extracted} extracted in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s), "
            f"{self.reused} reused, {mb:.1f} MB"
        )


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
    """Decide what to do with existing files at ``out``: ('fresh'|'resume'|'rebuild'|'up_to_date', reusable)."""
    reuse: list[Cache | PartialCache] = []
    partial = partial_path(out)
    if out.exists() and not overwrite:
        reuse.append(open_cache(out))
        _reusable(identity, reuse, f"{out} holds other features", "pass --overwrite to replace it or choose another --out")  # fmt: skip
        if (
            reuse[0].attrs.get("source_fingerprint") == images.fingerprint()
            and not partial.exists()
        ):
            reuse.pop().close()
            return "up_to_date", []
    if partial.exists() and not overwrite:
        try:
            p = PartialCache.open(partial)
        except OSError:  # killed while the file was being created: it holds nothing yet
            partial.unlink()
            return ("rebuild" if reuse else "fresh"), reuse
        _reusable(identity, [*reuse, p], f"{partial} is an unfinished extraction with other settings", "pass --overwrite to start over")  # fmt: skip
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


def _attrs(bb: Backbone, identity: CacheIdentity, images: ImageSet) -> dict:
    """Root attributes of a new cache: what made it, from what, with which libraries."""
    return {
        "format_version": FORMAT_VERSION, **_versions(), **identity.as_dict(),
        "weights_arg": bb.weights_arg,
        "feature_dim": bb.feature_dim, "image_size": bb.transform.crop,
        "classes": json.dumps(images.classes), "source": str(images.root),
        "layout": images.layout, "source_fingerprint": images.fingerprint(),
        "num_classes": len(images.classes),
    }  # fmt: skip


def _result(
    out: Path, extracted: int, reused: int, seconds: float, up_to_date=False
) -> ExtractResult:
    with open_cache(out) as c:
        counts = {s: c.num_images(s) for s in c.splits}
        skipped = len(c.skipped)
    return ExtractResult(
        out, sum(counts.values()), extracted, reused, skipped, seconds, out.stat().st_size,
        counts, up_to_date=up_to_date,
    )  # fmt: skip


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

    Returns
    -------
    ExtractResult : counts, seconds and the file written.
    """
    cfg = ExtractConfig.build(config, **options)
    out = Path(out)
    _check_writable(out)
    images = scan(data, val_fraction=cfg.val_fraction, seed=cfg.seed, unlabelled=cfg.unlabelled)
    dev = resolve_device(cfg.device)
    bb = model or build_backbone(
        cfg.backbone, weights=cfg.weights, image_size=cfg.image_size, device=dev
    )
    identity = CacheIdentity(**bb.identity().as_dict(), dtype=cfg.dtype)
    mode, reuse = _plan(out, identity, images, cfg.overwrite)
    if mode == "up_to_date":
        return _result(out, 0, 0, 0.0, up_to_date=True)
    start = time.perf_counter()
    remove_stale_tmp(out)
    with disk_errors(out):
        partial = _open_partial(out, mode, reuse, _attrs(bb, identity, images), images, bb)
        try:
            todo = {s: partial.todo(s) for s in partial.splits}
            reused = partial.progress()[0]
            batch_size = cfg.batch_size or default_batch_size(dev)
            workers = default_num_workers(dev) if cfg.num_workers is None else cfg.num_workers
            extracted = _run(
                bb,
                images,
                partial,
                todo,
                batch_size=batch_size,
                num_workers=workers,
                device=dev,
                progress=progress,
            )
            partial.finalize(out, {"created": now_iso()})
        finally:
            if partial.h5.id.valid:
                with contextlib.suppress(Exception):  # the error that got us here matters more
                    partial.close()
    return _result(out, extracted, reused, time.perf_counter() - start)


def _open_partial(
    out: Path, mode: str, reuse: list, attrs: dict, images: ImageSet, bb: Backbone
) -> PartialCache:
    """The in-progress file to fill: the one being resumed, or a new one seeded with reusable rows."""
    if mode == "resume":
        return reuse[0]
    try:
        dtype = attrs["dtype"]
        check_space(out.parent, estimate_bytes(images, bb.feature_dim, dtype))
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
    images: ImageSet,
    partial: PartialCache,
    todo: dict[str, np.ndarray],
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    progress: bool,
) -> int:
    """Forward every to-do row and write it; returns the number of images run through the backbone."""
    flat, batches = _batches(todo, batch_size)
    if not flat:
        return 0
    paths = {s: partial.paths(s) for s in todo}
    files = [images.root / paths[s][r] for s, r in flat]
    decode = functools.partial(preprocess, t=bb.transform)
    loader = decoded_batches(files, batches, decode, device=device, num_workers=num_workers)
    net = bb.net.to(device).eval().to(memory_format=torch.channels_last)
    norm = Normalise(bb.transform).to(device)
    amp = autocast_dtype(device)
    out_dtype = np.dtype(partial.identity.dtype)
    done = skipped = 0
    bar = tqdm(
        total=len(files), unit="img", desc="extract", disable=not progress, dynamic_ncols=True
    )
    with torch.inference_mode(), bar:
        for index, batch, failed_at in loader:
            split = flat[int(index[0]) if len(index) else next(iter(failed_at))][
                0
            ]  # one split per batch
            rows = np.array([flat[i][1] for i in index], dtype=np.int64)
            failed = {flat[i][1]: reason for i, reason in failed_at.items()}
            feats = np.zeros((0, bb.feature_dim), out_dtype)
            if batch is not None:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    feats = net(norm(batch)).float().cpu().numpy().astype(out_dtype)
                done += len(rows)
            partial.write(split, rows, feats, failed)
            bar.update(len(rows) + len(failed))
            if failed:
                skipped += len(failed)
                bar.set_postfix(skipped=skipped, refresh=False)
    return done


def forward_images(
    fn: Callable[[torch.Tensor], torch.Tensor],
    items: list,
    decode: Callable[..., np.ndarray],
    run: Run,
    *,
    desc: str,
) -> tuple[np.ndarray | None, np.ndarray, dict[int, str]]:
    """``fn`` over every decodable item, in batches of ``run.batch_size`` under ``run.amp()``.

    ``fn`` takes a normalised float batch (N, 3, H, W) on the device; ``decode(items[i])``
    gives one uint8 image (see :func:`embedcache.data.decoded_batches`).

    Returns
    -------
    outputs : ndarray of shape (n_ok, ...) as ``fn`` returns them (on the CPU), or None if none decoded
    ok : ndarray of shape (n_ok,), indices into ``items``
    failed : {index: reason} for items that could not be decoded
    """
    batches = [
        list(range(i, min(len(items), i + run.batch_size)))
        for i in range(0, len(items), run.batch_size)
    ]
    loader = decoded_batches(items, batches, decode, device=run.device, num_workers=run.workers)
    outs, ok, failed = [], [], {}
    bar = tqdm(
        total=len(items), desc=desc, unit="img", disable=not run.progress, dynamic_ncols=True
    )
    with torch.inference_mode(), bar:
        for index, x, bad in loader:
            if x is not None:
                with run.amp():
                    outs.append(fn(x).cpu().numpy())
                ok.append(index)
            failed.update(bad)
            bar.update(len(index) + len(bad))
    if not outs:
        return None, np.zeros(0, np.int64), failed
    return np.concatenate(outs), np.concatenate(ok), failed
