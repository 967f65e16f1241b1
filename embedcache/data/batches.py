"""Batches of decoded images: on CPU threads or DataLoader workers, or JPEGs on the GPU."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .decode import JPEG_MAGIC, UnreadableImage, check_file, check_jpeg, os_reason
from .transform import EvalTransform, preprocess, resize_geometry


class _Decode(torch.utils.data.Dataset):
    """Index -> (index, uint8 HWC tensor or the reason it could not be decoded)."""

    def __init__(self, items: list, decode: Callable[..., np.ndarray]):
        self.items, self.decode = items, decode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        try:
            return i, torch.from_numpy(self.decode(self.items[i]))
        except UnreadableImage as e:
            return i, str(e)


def _collate(
    items: list[tuple[int, torch.Tensor | str]],
) -> tuple[np.ndarray, torch.Tensor | None, dict[int, str]]:
    ok = [(i, x) for i, x in items if isinstance(x, torch.Tensor)]
    failed = {i: x for i, x in items if isinstance(x, str)}
    images = torch.stack([x for _, x in ok]) if ok else None
    return np.array([i for i, _ in ok], dtype=np.int64), images, failed


def decoded_batches(
    items: list,
    batches: list[list[int]],
    decode: Callable[..., np.ndarray],
    *,
    device: torch.device,
    num_workers: int,
) -> Iterable[tuple[np.ndarray, torch.Tensor | None, dict[int, str]]]:
    """``(indices, images, failed)`` per batch of indices into ``items``, in order.

    ``decode(items[i])`` gives one image (a path for :func:`preprocess`, a
    ``(path, seed)`` pair for :func:`augment`).

    images : uint8 tensor of shape (n_ok, H, W, 3), pinned when ``device`` is CUDA;
    failed : {index: reason} for files that could not be decoded.

    On a GPU, ``num_workers`` processes decode ahead while the GPU computes. On a
    CPU the forward pass already uses every core, and a decoder running beside
    it stalls each layer on its slowest thread; there ``num_workers`` threads
    (PIL releases the GIL) decode each batch while the model waits, which was
    faster on the 2-core machine (61 vs 54 images/s for efficientnet_lite0); the
    threads may start on the next batch once the forward pass is done
    (:meth:`ThreadDecoded.ahead`).
    """
    dataset = _Decode(items, decode)
    if device.type == "cuda":
        return torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=_collate,
            num_workers=num_workers,
            pin_memory=True,
            prefetch_factor=4 if num_workers else None,
        )
    if num_workers <= 1:
        return (_collate([dataset[i] for i in batch]) for batch in batches)
    return ThreadDecoded(dataset, batches, num_workers)


class ThreadDecoded:
    """The batches of ``dataset``, each decoded by ``workers`` threads when it is asked for, or
    from :meth:`ahead` on: call it once the forward pass of the batch in hand is done, so that
    the next batch decodes while that batch's features are written (beside the forward pass
    itself decoding was slower, see :func:`decoded_batches`)."""

    def __init__(self, dataset: _Decode, batches: list[list[int]], workers: int):
        self.dataset, self.batches, self.workers = dataset, batches, workers
        self._pool: ThreadPoolExecutor | None = None
        self._next, self._pending = 0, None  # the next batch's index, its futures once started

    def __iter__(self) -> Iterator[tuple[np.ndarray, torch.Tensor | None, dict[int, str]]]:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as self._pool:
            while self._next < len(self.batches):
                futures = self._submit() if self._pending is None else self._pending
                self._pending, self._next = None, self._next + 1
                yield _collate([f.result() for f in futures])
        self._pool = None

    def ahead(self) -> None:
        """Start decoding the next batch now (a no-op when it has started or there is none)."""
        if self._pool is not None and self._pending is None and self._next < len(self.batches):
            self._pending = self._submit()

    def _submit(self) -> list:
        return [self._pool.submit(self.dataset.__getitem__, i) for i in self.batches[self._next]]


# ---------------------------------------------------------------------------
# Decoding on the GPU (nvJPEG through torchvision), with the CPU path per file as fallback


def _read(path: Path) -> bytes | str:
    """The file's bytes, or the reason they cannot be read (as :func:`load_rgb` words it)."""
    try:
        if not isinstance(path, str | os.PathLike):  # a shard member: it checks itself
            return path.read_bytes()
        check_file(Path(path))
        return Path(path).read_bytes()
    except UnreadableImage as e:
        return str(e)
    except OSError as e:
        return os_reason(e)


def _nvjpeg(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEG bytes on ``device`` in one batch: (3, H, W) uint8 each, None where the
    decoder refused a file (the batch is retried file by file to find which)."""
    with warnings.catch_warnings():  # torchvision 0.29 points to torchcodec; decode_jpeg works
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        return _decode_jpegs(datas, device, ImageReadMode.RGB, decode_jpeg)


def _decode_jpegs(
    datas: list[bytes], device: torch.device, rgb, decode_jpeg
) -> list[torch.Tensor | None]:
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    if not tensors:
        return []
    kw = {"mode": rgb, "device": device, "apply_exif_orientation": True}
    try:
        return list(decode_jpeg(tensors, **kw))
    except Exception:  # noqa: BLE001 - whatever the GPU decoder raises, the CPU path decides
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, **kw))
            except Exception:  # noqa: BLE001
                out.append(None)
        return out


def resize_crop(img: torch.Tensor, t: EvalTransform) -> torch.Tensor:
    """:func:`preprocess` on a decoded (3, H, W) uint8 tensor, on its device: resize the short
    side to ``t.resize`` (antialiased), centre-crop ``t.crop``; returns (crop, crop, 3) uint8."""
    from torchvision.transforms.v2 import functional as F

    h, w = img.shape[-2:]
    nw, nh, top, left = resize_geometry(w, h, t)
    if (nw, nh) != (w, h):
        img = F.resize(
            img, [nh, nw], interpolation=F.InterpolationMode(t.interpolation), antialias=True
        )
    return img[:, top : top + t.crop, left : left + t.crop].permute(1, 2, 0).contiguous()


def _cpu_fallback(path: Path, t: EvalTransform, device: torch.device) -> torch.Tensor | str:
    try:
        x = torch.from_numpy(preprocess(path, t))
    except UnreadableImage as e:
        return str(e)
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def gpu_decoded_batches(
    files: list[Path],
    batches: list[list[int]],
    t: EvalTransform,
    *,
    device: torch.device,
    num_workers: int,
) -> Iterator[tuple[np.ndarray, torch.Tensor | None, dict[int, str]]]:
    """:func:`decoded_batches` for ``preprocess`` with the JPEGs decoded, resized and cropped on
    ``device`` (nvJPEG on CUDA), a batch at a time. Files that are not JPEG, or that the GPU
    decoder refuses, go through the CPU path one by one; ``num_workers`` threads read the
    next batch's bytes while this one decodes. Images come back on ``device``."""
    if not batches:
        return
    with ThreadPoolExecutor(max(1, num_workers), thread_name_prefix="read") as pool:
        ahead = pool.submit(lambda b=batches[0]: [_read(files[i]) for i in b])
        for k, batch in enumerate(batches):
            datas = ahead.result()
            if k + 1 < len(batches):
                ahead = pool.submit(lambda b=batches[k + 1]: [_read(files[i]) for i in b])
            yield _gpu_batch([files[i] for i in batch], batch, datas, t, device)


def _gpu_batch(
    paths: list[Path], index: list[int], datas: list, t: EvalTransform, device: torch.device
):
    failed = {k: d for k, d in enumerate(datas) if isinstance(d, str)}
    jpeg = [k for k, d in enumerate(datas) if isinstance(d, bytes) and d[:3] == JPEG_MAGIC]
    for k in jpeg:
        try:  # before nvJPEG, which would allocate what the header claims
            check_jpeg(io.BytesIO(datas[k]), len(datas[k]))
        except UnreadableImage as e:
            failed[k] = str(e)
    jpeg = [k for k in jpeg if k not in failed]
    images: dict[int, torch.Tensor] = {}
    for k, img in zip(jpeg, _nvjpeg([datas[k] for k in jpeg], device), strict=True):
        if img is not None:
            images[k] = resize_crop(img, t)
    for k in range(len(paths)):
        if k not in images and k not in failed:
            x = _cpu_fallback(paths[k], t, device)
            if isinstance(x, str):
                failed[k] = x
            else:
                images[k] = x
    ok = sorted(images)
    stacked = torch.stack([images[k] for k in ok]) if ok else None
    return (
        np.array([index[k] for k in ok], np.int64),
        stacked,
        {index[k]: r for k, r in failed.items()},
    )
