"""What the Fletcher-32 checksums cost: writing a finished cache and a train-head pass over it.

    python benchmarks/checksum_cost.py --rows 100000

The same synthetic features (ROWS x 1280 float16 per split, train and val) are written as a
finished cache twice, with checksums (format 2, what extract writes now) and without (as
format 1 did), alternately for --rounds rounds; then each is read in full in 2048-row blocks
and a linear head trains on each for --epochs epochs, streamed from the file.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import save

from embedcache import open_cache, train_head, write_cache
from embedcache.backbones import EvalTransform
from embedcache.cache import storage, writer


@contextlib.contextmanager
def checksums(on: bool):
    """Write caches with or without Fletcher-32 (without: the format 1 layout).

    The writer imports ``rows_dataset`` and ``checked`` from ``embedcache.cache.storage`` by
    name, so the stand-ins go into ``embedcache.cache.writer``, where ``write_cache`` looks
    them up.
    """
    if on:
        yield
        return
    rows_dataset, checked = writer.rows_dataset, writer.checked

    def plain_rows(g, name, shape, dtype):
        n, per_row = shape[0], int(np.prod(shape[1:]))
        if not n:
            return g.create_dataset(name, shape, dtype=dtype)
        chunks = (min(n, storage.rows_per_chunk(per_row, dtype.itemsize)), *shape[1:])
        return g.create_dataset(name, shape, dtype=dtype, chunks=chunks, dcpl=storage.early())

    writer.rows_dataset = plain_rows
    writer.checked = lambda g, name, data: g.create_dataset(name, data=data)
    try:
        yield
    finally:
        writer.rows_dataset, writer.checked = rows_dataset, checked


def one_round(tmp: Path, splits: dict, on: bool, args) -> dict:
    out = tmp / f"{'on' if on else 'off'}.h5"
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    with checksums(on):
        write_cache(
            out,
            splits,
            classes=["a", "b"],
            backbone="b",
            weights="w",
            transform=EvalTransform(resize=256, crop=224).to_json(),
        )
    written = time.perf_counter() - t
    with open_cache(out) as c:
        assert c.checksummed is on
        t = time.perf_counter()
        for s in c.splits:
            x = c.features(s)
            for lo in range(0, x.shape[0], 2048):
                x[lo : lo + 2048]
        read = time.perf_counter() - t
    size = out.stat().st_size
    t = time.perf_counter()
    train_head(
        out,
        out=tmp / "h.pt",
        epochs=args.epochs,
        patience=args.epochs,
        max_memory=size // 4,
        progress=False,
    )
    return {
        "write_s": written,
        "read_s": read,
        "train_head_s": time.perf_counter() - t,
        "bytes": size,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, 1280)).astype(np.float16)
    y = (x[:, :8].sum(1) > 0).astype(np.int64)
    splits = {s: (x, y, [f"{s}/{i:07d}.jpg" for i in range(args.rows)]) for s in ("train", "val")}
    rows: dict[str, list[dict]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for on in (True, False) if r % 2 == 0 else (False, True):
                rows["on" if on else "off"].append(one_round(Path(tmp), splits, on, args))
                print(r, on, rows["on" if on else "off"][-1], flush=True)
    med = {k: {m: statistics.median(d[m] for d in v) for m in v[0]} for k, v in rows.items()}
    md = [
        f"{args.rows:,} rows x 1280 float16 in each of train and val "
        f"({2 * args.rows * 1280 * 2 / 1e9:.2f} GB of features); "
        f"{args.rounds} alternating rounds, medians; train-head linear, {args.epochs} epochs, "
        "streamed (--max-memory a quarter of the file).",
        "",
        "| | write the cache (s) | read every block (s) | train-head (s) | file MB |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(
            f"| checksums {'on (format 2)' if k == 'on' else 'off (format 1)'} | "
            f"{m['write_s']:.2f} | {m['read_s']:.2f} | {m['train_head_s']:.2f} | "
            f"{m['bytes'] / 1e6:.1f} |"
            for k, m in med.items()
        ),
        "",
        "Cost of the checksums: "
        f"write {100 * (med['on']['write_s'] / med['off']['write_s'] - 1):+.0f}%, "
        f"read {100 * (med['on']['read_s'] / med['off']['read_s'] - 1):+.0f}%, "
        f"train-head {100 * (med['on']['train_head_s'] / med['off']['train_head_s'] - 1):+.0f}%, "
        f"file size {100 * (med['on']['bytes'] / med['off']['bytes'] - 1):+.2f}%.",
    ]
    print(save("checksum_cost_cpu", {"rows": rows, "median": med}, "\n".join(md)).read_text())


if __name__ == "__main__":
    main()
