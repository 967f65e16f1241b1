"""How long does `train-head --head logreg` take on 100,000 rows now that it searches 13 values of C?

    python benchmarks/logreg_grid.py --rows 100000

A synthetic cache of ROWS x 1280 float16 train rows (and 10,000 val rows) whose labels are a
noisy linear function of the features; the whole train_head call is timed (the 13 warm-started
fits along C, the final fit of the chosen C from scratch, the reports).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import save

from embedcache import train_head, write_cache
from embedcache.backbones import EvalTransform
from embedcache.train import LOGREG_CS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1280)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    w = rng.standard_normal(args.dim)

    def make(n: int):
        x = rng.standard_normal((n, args.dim)).astype(np.float16)
        y = ((x.astype(np.float32) @ w + 8 * rng.standard_normal(n)) > 0).astype(np.int64)
        return x, y, [f"{i}.jpg" for i in range(n)]

    with tempfile.TemporaryDirectory() as tmp:
        cache = write_cache(Path(tmp) / "c.h5", {"train": make(args.rows), "val": make(10_000)}, classes=["a", "b"], backbone="b", weights="w", transform=EvalTransform(resize=256, crop=224).to_json())  # fmt: skip
        t = time.perf_counter()
        r = train_head(cache, out=Path(tmp) / "h.pt", head="logreg", progress=False)
        seconds = time.perf_counter() - t
    sweep = r.metrics["sweep"]
    md = [
        f"`train-head --head logreg` on {args.rows:,} x {args.dim} float16 rows (10,000 val): **{seconds:.1f} s** for {len(LOGREG_CS)} values of C ({LOGREG_CS[0]:.0e} to {LOGREG_CS[-1]:.0e}) warm-started, plus the final fit; chosen C {r.metrics['best']['C']:.3g}, val acc {r.metrics['val_acc']:.4f}.",
        "",
        "| C | val acc | val loss |",
        "| ---: | ---: | ---: |",
        *(f"| {row['C']:.3g} | {row['val_acc']:.4f} | {row['val_loss']:.4f} |" for row in sweep),
    ]  # fmt: skip
    print(save("logreg_grid_cpu", {"seconds": seconds, "sweep": sweep, "best": r.metrics["best"]}, "\n".join(md)).read_text())  # fmt: skip


if __name__ == "__main__":
    main()
