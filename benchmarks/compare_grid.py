"""`embedcache compare` over backbones x shares of train, as a user runs it, into results/.

    python benchmarks/compare_grid.py ../shared/data/flowers12 \
        --backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2 \
        --fractions 0.01,0.1,1 --unfreeze 2 --finetune-epochs 5

Writes results/compare_grid_DATA.md (the verdicts, the table, the cost of each cell, the
command and the machine's load), .json (every cell, with its interval and which test images it
got right) and the two plots.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import RESULTS, save

from embedcache import compare


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data", type=Path)
    p.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1")
    p.add_argument("--fractions", default="0.01,0.1,1")
    p.add_argument("--unfreeze", default="2")
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--workdir", type=Path, help="keep the caches and models here")
    p.add_argument(
        "--rank-per-class",
        type=int,
        default=20,
        help="also time compare --rank-only on the same backbones, first, in the same run",
    )
    p.add_argument(
        "--replot",
        action="store_true",
        help="only make the verdicts, table and plots again from the results JSON",
    )
    args = p.parse_args()
    name = f"compare_grid_{args.data.name}"
    if args.replot:
        return replot(name)
    load, start = os.getloadavg()[0], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp) / "work"
        t = time.perf_counter()
        ranked = compare(
            args.data,
            rank_only=True,
            backbones=(args.backbones,),
            per_class=args.rank_per_class,
            workdir=Path(tmp) / "rank",
            device="cpu",
            progress=False,
        )
        rank_s, start = time.perf_counter() - t, time.perf_counter()
        g = compare(
            args.data,
            backbones=(args.backbones,),
            fractions=tuple(float(f) for f in args.fractions.split(",")),
            unfreeze=tuple(args.unfreeze.split(",")),
            finetune_epochs=args.finetune_epochs,
            workdir=work,
            device="cpu",
            log=print,
        )
        for key in ("fractions", "time"):
            shutil.copy(g.files[key], RESULTS / f"{name}_{key}.png")
    grid_s = time.perf_counter() - start
    md = (
        f"Load average {load:.2f} at the start; the whole grid took {grid_s:.0f} s. Before it, "
        f"in the same run, `--rank-only --per-class {args.rank_per_class}` on the same "
        f"backbones took {rank_s:.0f} s, {rank_s / grid_s:.3f} of the grid's time, and ranked "
        f"them: {', '.join(r.name for r in ranked.rows)} (kNN accuracy "
        f"{', '.join(f'{r.knn_acc:.3f}' for r in ranked.rows)}).\n\n{_body(g, name)}"
    )
    cells = [{k: v for k, v in vars(c).items()} for c in g.cells]
    payload = {"split": g.split, "verdicts": g.verdicts, "cells": cells, "grid_s": grid_s}
    payload["rank"] = {"seconds": rank_s, **ranked.as_dict()}
    print(save(name, payload, md))


def replot(name: str) -> None:
    """The verdicts, the table and the two plots of results/NAME.* made again from the cells
    in NAME.json (after a change of how they are shown; the cells are not run again)."""
    import json

    from embedcache.comparison.grid import Cell, write

    saved = json.loads((RESULTS / f"{name}.json").read_text())
    fields = Cell.__dataclass_fields__
    cells = [Cell(**{k: v for k, v in c.items() if k in fields}) for c in saved["cells"]]
    title = f"{name.removeprefix('compare_grid_')}: backbones x training-set share"
    with tempfile.TemporaryDirectory() as tmp:
        g = write(cells, saved["split"], Path(tmp), {"title": title})
        for key in ("fractions", "time"):
            shutil.copy(g.files[key], RESULTS / f"{name}_{key}.png")
    md = (RESULTS / f"{name}.md").read_text()
    head, _, rest = md.partition("\n\n")  # the command and the machine
    runs = rest.split("\n\n", 1)[0]  # the load, the time, the ranking
    (RESULTS / f"{name}.md").write_text(f"{head}\n\n{runs}\n\n{_body(g, name)}\n")
    saved["verdicts"] = g.verdicts
    (RESULTS / f"{name}.json").write_text(json.dumps(saved, indent=2) + "\n")


def _body(g, name: str) -> str:
    return (
        f"{g.markdown}\n\n![accuracy by share of train]({name}_fractions.png)\n\n"
        f"![accuracy against wall time]({name}_time.png)"
    )


if __name__ == "__main__":
    main()
