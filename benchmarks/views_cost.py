"""What `extract --views K` costs: plain and views extractions of one folder, alternated, warm.

    python benchmarks/views_cost.py ../shared/data/hymenoptera --views 4 --rounds 2

The backbone is built once and passed to every run, and a first unmeasured plain run warms the
file cache, so the ratio is that of the forward passes and decoding alone.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import save

from embedcache import extract
from embedcache.backbones import build_backbone


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    bb = build_backbone(args.backbone)
    times: dict[int, list[float]] = {0: [], args.views: []}
    with tempfile.TemporaryDirectory() as tmp:

        def run(k: int):
            return extract(
                args.data,
                out=Path(tmp) / f"{k}.h5",
                model=bb,
                views=k,
                overwrite=True,
                progress=False,
            )

        splits = run(0).splits  # warm-up: file cache, thread pools
        for _ in range(args.rounds):
            for k in times:
                t = time.perf_counter()
                run(k)
                times[k].append(time.perf_counter() - t)
    plain, viewed = (statistics.median(times[k]) for k in times)
    forwards = sum(n * (1 + (args.views if s == "train" else 1)) for s, n in splits.items())
    md = (
        f"`{args.backbone}` on {Path(args.data).name} "
        f"({', '.join(f'{s} {n}' for s, n in splits.items())}), "
        f"warm, median of {args.rounds} alternated rounds: "
        f"plain extract **{plain:.1f} s**, `--views {args.views}` **{viewed:.1f} s** = "
        f"**{viewed / plain:.2f}x** "
        f"for {forwards} forward passes against {sum(splits.values())} "
        f"({forwards / sum(splits.values()):.2f}x).\n\n"
        f"All rounds (s): plain {', '.join(f'{t:.1f}' for t in times[0])}; "
        f"views {', '.join(f'{t:.1f}' for t in times[args.views])}."
    )
    name = f"views_cost_{Path(args.data).name}"
    print(
        save(
            name,
            {
                "times": {str(k): v for k, v in times.items()},
                "splits": splits,
                "forwards": forwards,
            },
            md,
        ).read_text()
    )


if __name__ == "__main__":
    main()
