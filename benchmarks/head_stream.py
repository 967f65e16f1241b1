"""Heads on a cache larger than --max-memory: streamed vs in memory, side by side.

    python benchmarks/head_stream.py --rows 2000000 --epochs 2 --rounds 2

Writes a synthetic cache of ROWS x 1280 float16 training features (about 5 GB
at 2M rows, 10 classes around random centres, plus ROWS/20 validation rows)
through the library's own writer, then trains the same linear head on it in
fresh processes, alternating the order each round:

- in memory: ``max_memory`` large enough to load the features;
- streamed: ``max_memory`` = a quarter of the training features;
- streamed, before: the same, with ``Rows.batches`` as it was before the
  prefetching reader (copied below), to show the gain.

Reports seconds per epoch, the ratio streamed / in memory, peak RSS of each
process, and validation accuracy (the same in every mode). The cache is deleted
afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import peak_rss_mb, save

DIM = 1280
CLASSES = 10
GEN_ROWS = 65536  # rows generated at a time while writing the cache


class SyntheticFeatures:
    """Rows of float16 features generated slice by slice, so that 5 GB never sit in memory.

    ``write_cache`` reads ``shape``, ``dtype``, ``len`` and slices; row i is its
    class centre plus noise, the same whichever slice asks for it.
    """

    def __init__(self, labels: np.ndarray, centres: np.ndarray, seed: int):
        self.labels, self.centres, self.seed = labels, centres, seed
        self.shape, self.dtype = (len(labels), centres.shape[1]), np.dtype(np.float16)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, s: slice) -> np.ndarray:
        lo, hi, _ = s.indices(len(self))
        rng = np.random.default_rng([self.seed, lo])
        noise = rng.standard_normal((hi - lo, self.shape[1]), dtype=np.float32)
        return (self.centres[self.labels[lo:hi]] + 4 * noise).astype(np.float16)


def write_synthetic(path: Path, rows: int) -> Path:
    """A real embedcache cache: ``rows`` train and ``rows // 20`` val rows of DIM float16."""
    from embedcache.cache import write_cache

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 0.35, (CLASSES, DIM)).astype(np.float32)

    def split(n: int, seed: int):
        labels = np.random.default_rng(seed).integers(0, CLASSES, n)
        return SyntheticFeatures(labels, centres, seed), labels, [str(i) for i in range(n)]

    splits = {"train": split(rows, 1), "val": split(rows // 20, 2)}
    return write_cache(
        path,
        splits,
        classes=[str(c) for c in range(CLASSES)],
        backbone="synthetic",
        weights="none",
        transform="{}",
    )


def _batches_before(self, batch_size: int, rng: np.random.Generator):
    """``Rows.batches`` as it was before the read-ahead (streamed path), for the 'before' figure."""
    starts = np.arange(0, self.n, 2048)
    order = rng.permutation(len(starts))
    for i in range(0, len(order), 32):
        group = np.sort(order[i : i + 32])
        spans = [(int(starts[g]), min(self.n, int(starts[g]) + 2048)) for g in group]
        pos = np.concatenate([np.arange(lo, hi) for lo, hi in spans])
        perm = rng.permutation(len(pos))
        buffer = np.concatenate([self._read(lo, hi) for lo, hi in spans])
        for lo in range(0, len(perm), batch_size):
            take = perm[lo : lo + batch_size]
            yield buffer[take], self.labels[pos[take]]


def _blocks_before(self):
    for lo in range(0, self.n, 2048):
        yield np.arange(lo, min(self.n, lo + 2048)), self._read(lo, min(self.n, lo + 2048))


class _H5Before:
    """h5py with ``File`` opening as before this change: with HDF5's default chunk cache."""

    def __getattr__(self, name: str):
        import h5py

        return getattr(h5py, name)

    @staticmethod
    def File(path, mode="r", **_):  # noqa: N802 - stands in for h5py.File
        import h5py

        return h5py.File(path, mode)


MODES = {
    "in memory": "memory",
    "streamed (read-ahead as runtime.read_ahead decides)": "stream",
    "streamed, read-ahead thread forced on": "stream-read-ahead",
    "streamed, before this change": "stream-before",
}


def _patch(mode: str) -> None:
    """Make this process run ``mode``'s variant of the streamed path."""
    from embedcache import feed
    from embedcache import train as train_mod
    from embedcache.cache import reader

    if mode == "stream-read-ahead":
        train_mod.read_ahead = lambda device: True
    if mode == "stream-before":
        feed.Rows.batches, feed.Rows.blocks = _batches_before, _blocks_before
        reader.h5py = _H5Before()  # open_cache opens the file that the rows are read from


def train_child(cache: Path, mode: str, epochs: int) -> dict:
    """One train_head run in this (fresh) process, so that its peak RSS is its own."""
    import h5py

    from embedcache.runtime import read_ahead, resolve_device
    from embedcache.train import train_head

    with h5py.File(cache) as f:
        d = f["train/features"]
        train_bytes = d.shape[0] * d.shape[1] * d.dtype.itemsize
    auto = read_ahead(resolve_device("cpu"))
    _patch(mode)
    max_memory = 2 * train_bytes if mode == "memory" else train_bytes // 4
    base = peak_rss_mb()
    t = time.perf_counter()
    m = train_head(
        cache,
        head="linear",
        epochs=epochs,
        patience=epochs,
        max_memory=max_memory,
        device="cpu",
        seed=0,
        progress=False,
    ).metrics
    seconds = time.perf_counter() - t
    return {
        "mode": mode,
        "streamed": m["streamed"],
        "max_memory": max_memory,
        "train_bytes": train_bytes,
        "seconds": seconds,
        "epoch_seconds": m["epoch_seconds"],
        "setup_seconds": seconds - sum(m["epoch_seconds"]),
        "val_acc": m["val_acc"],
        "history": m["history"],
        "batch_size": m["batch_size"],
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": base,
        "read_ahead_auto": auto,
    }


def run_child(cache: Path, mode: str, epochs: int) -> dict:
    cmd = [sys.executable, __file__, "--child", str(cache), "--mode", mode, "--epochs", str(epochs)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    print(
        f"  {mode}: {statistics.mean(r['epoch_seconds']):.2f} s/epoch, val_acc {r['val_acc']:.4f}, "
        f"peak RSS {r['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    return r


def side_by_side(cache: Path, modes: list[str], epochs: int, rounds: int) -> list[list[dict]]:
    """Every mode once per round, the order reversed every other round (the machine is shared)."""
    out = []
    for r in range(rounds):
        order = modes if r % 2 == 0 else modes[::-1]
        print(f"round {r + 1}: {', '.join(order)}", flush=True)
        runs = {m: run_child(cache, m, epochs) for m in order}
        out.append([runs[m] for m in modes])
    return out


def report(rounds: list[list[dict]], args, write_s: float) -> str:
    """The Markdown table: per mode, s/epoch per round and the ratio to in memory in the same
    round."""
    names = {v: k for k, v in MODES.items()}
    gb = rounds[0][0]["train_bytes"] / 1e9
    md = [
        f"Synthetic cache: {args.rows:,} x {DIM} float16 train rows ({gb:.2f} GB) + "
        f"{args.rows // 20:,} val rows, "
        f"{'reused from --workdir' if write_s is None else f'written in {write_s:.0f} s'}. "
        f"Linear head, {args.epochs} epochs, batch {rounds[0][0]['batch_size']}, CPU. "
        "Streamed: `max_memory` = train features / 4 = "
        f"{rounds[0][-1]['max_memory'] / 1e9:.2f} GB. "
        "Each mode in a fresh process; rounds alternate the order. "
        "s/epoch includes the validation pass.",
        "",
        "| mode | round | s/epoch | ratio to in memory (same round) | setup s (load, stats) "
        "| peak RSS MB | val acc |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, runs in enumerate(rounds):
        mem = statistics.mean(runs[0]["epoch_seconds"])
        for r in runs:
            s = statistics.mean(r["epoch_seconds"])
            md.append(
                f"| {names[r['mode']]} | {i + 1} | {s:.2f} | {s / mem:.2f} | "
                f"{r['setup_seconds']:.1f} | "
                f"{r['peak_rss_mb']:.0f} | {100 * r['val_acc']:.2f}% |"
            )
    same = len({json.dumps(r["history"]) for runs in rounds for r in runs}) == 1
    auto = rounds[0][0]["read_ahead_auto"]
    md += [
        "",
        f"Validation accuracy and loss history identical in every run: **{same}**. "
        f"`runtime.read_ahead` chose {'the thread' if auto else 'no thread'} here "
        "(torch threads vs cores).",
    ]
    return "\n".join(md)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--modes", default=",".join(MODES.values()), help="of " + ", ".join(MODES.values())
    )
    p.add_argument("--workdir", type=Path, default=None, help="where the cache goes [a temp dir]")
    p.add_argument("--keep", action="store_true", help="keep the cache (reused when it exists)")
    p.add_argument("--name", default="head_stream_cpu", help="results/NAME.{md,json}")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="memory", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(train_child(args.child, args.mode, args.epochs)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="head_stream_"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / f"synthetic_{args.rows}x{DIM}.h5"
    try:
        t = time.perf_counter()
        write_s = None  # None: an existing cache (--keep) was reused
        if not cache.exists():
            write_synthetic(cache, args.rows)
            write_s = time.perf_counter() - t
        rounds = side_by_side(cache, args.modes.split(","), args.epochs, args.rounds)
    finally:
        if not args.keep:
            cache.unlink(missing_ok=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)
    md = report(rounds, args, write_s)
    path = save(
        args.name, {"rows": args.rows, "dim": DIM, "epochs": args.epochs, "rounds": rounds}, md
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
