"""The exact re-scoring of an on-disk audit's candidates (auditing/outofcore.py) at several
PAIRS, the pairs of rows gathered, widened to float32 and dotted at a time.

    python benchmarks/probe_rescore_pairs.py   # about 2 minutes, 6 GB

2,000,000 random float16 rows of 1280 in memory stand for the cache; the first 65,536 are the
queries, each with 120 random candidates among all (as a 10M audit's chunk re-scores 120 a row);
each PAIRS setting re-scores them all, one after the other, and the first is run again last to
show the machine's drift. Each run's products are checked against numpy's on 50 queries.
"""

from __future__ import annotations

import time

import numpy as np
from common import save

from embedcache.auditing import outofcore

ROWS, DIM, QUERIES, CANDIDATES = 2_000_000, 1280, 65536, 120
SETTINGS = (16384, 2048, 1024, 512, 256, 16384)


def main() -> None:
    rng = np.random.default_rng(0)
    unit = np.empty((ROWS, DIM), np.float16)
    for lo in range(0, ROWS, 65536):
        rows = min(65536, ROWS - lo)
        unit[lo : lo + rows] = rng.standard_normal((rows, DIM), dtype=np.float32) / 36
    q, cand = unit[:QUERIES], rng.integers(0, ROWS, size=(QUERIES, CANDIDATES))
    ref = (unit[cand[:50]].astype(np.float32) * q[:50, None].astype(np.float32)).sum(2)
    runs = []
    for pairs in SETTINGS:
        outofcore.PAIRS = pairs
        t = time.perf_counter()
        got = outofcore.rescored(unit, q, cand)
        seconds = time.perf_counter() - t
        err = float(np.abs(got[:50] - ref).max())
        runs.append(
            {
                "pairs": pairs,
                "s": round(seconds, 2),
                "ns_per_pair": round(seconds / (QUERIES * CANDIDATES) * 1e9),
                "max_error": err,
            }
        )
        print(runs[-1], flush=True)
    lines = [
        "| PAIRS | seconds | ns a pair | largest error against numpy |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['pairs']} | {r['s']} | {r['ns_per_pair']} | {r['max_error']:.1e} |" for r in runs
    ]
    best = min(runs, key=lambda r: r["s"])
    first = runs[0]["s"]
    lines += [
        "",
        f"{QUERIES:,} queries x {CANDIDATES} candidates among {ROWS:,} rows of {DIM}; "
        f"fastest: PAIRS {best['pairs']}, {first / best['s']:.2f}x faster than PAIRS "
        f"{runs[0]['pairs']} (its first run).",
    ]
    save("probe_rescore_pairs", {"runs": runs}, "\n".join(lines))


if __name__ == "__main__":
    main()
