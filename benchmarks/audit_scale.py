"""How `audit` scales: time and peak memory on synthetic caches of 100,000 and 1,000,000 rows.

    python benchmarks/audit_scale.py --work /tmp/audit_scale

Each measurement runs in a fresh process (its own peak resident memory, VmHWM). Synthetic
caches: 1280-d float16 features in 10 Gaussian classes with 0.1% near copies planted across
splits, 80% train, 10% val, 10% test.

- 100,000 rows: the whole audit (`embedcache.audit`, default settings, this machine's CPU).
- 1,000,000 rows: the audit's own steps up to the search (reading the cache, unit rows), then
  ``--query-blocks`` query blocks of the exact search against all rows, timed and extrapolated
  to every block (each block costs the same: QUERY_ROWS x N x D multiply-adds); the full run
  would take hours on 2 cores. Peak memory is that of the search layout, which the full run keeps.

The model for other sizes: the search costs N^2 x D multiply-adds (fitted on the measured
rate) and holds N x D x 2 bytes of unit rows plus a fixed ~0.5 GB of blocks; the label check
holds N x D x 4 bytes (float32) and costs about 600 passes over the rows (L-BFGS, 5 folds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import peak_rss_mb, save

DIM, CLASSES = 1280, 10


def make_cache(path: Path, rows: int, seed: int = 0) -> Path:
    """A synthetic cache of ``rows`` 1280-d float16 rows, written in blocks."""
    from embedcache import write_cache

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (CLASSES, DIM)).astype(np.float32)
    labels = rng.integers(0, CLASSES, rows)
    x = np.empty((rows, DIM), np.float16)
    for lo in range(0, rows, 65536):
        hi = min(rows, lo + 65536)
        x[lo:hi] = centres[labels[lo:hi]] + rng.normal(0, 1.5, (hi - lo, DIM)).astype(np.float32)
    copies = rng.choice(rows, rows // 1000, replace=False)
    sources = rng.choice(rows, rows // 1000, replace=False)
    x[copies] = x[sources] + rng.normal(0, 0.05, (len(copies), DIM)).astype(np.float16)
    labels[copies] = labels[sources]
    cut = [int(rows * 0.8), int(rows * 0.9)]
    splits = {
        name: (x[a:b], labels[a:b], [f"{name}/{i}.jpg" for i in range(a, b)])
        for name, a, b in (("train", 0, cut[0]), ("val", cut[0], cut[1]), ("test", cut[1], rows))
    }
    classes = [f"c{i}" for i in range(CLASSES)]
    return write_cache(
        path, splits, classes=classes, backbone="synthetic", weights="none", transform="{}"
    )


def run_full(cache: Path, out: Path) -> dict:
    from embedcache import audit

    t = time.perf_counter()
    r = audit(cache, out=out, progress=False, report_rows=0)
    counts = {
        k: r.summary[k]["count"] for k in ("near_duplicates", "leaks", "label_errors", "outliers")
    }
    return {
        "seconds": round(time.perf_counter() - t, 1),
        "peak_rss_mb": round(peak_rss_mb()),
        "counts": counts,
    }


def run_search(cache: Path, blocks: int) -> dict:
    import torch

    from embedcache import open_cache
    from embedcache.auditing import search
    from embedcache.auditing.findings import Pool

    t = time.perf_counter()
    with open_cache(cache) as c:
        pool = Pool.read(c)
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    unit = search.unit_rows(pool.features, out=pool.features)
    unit_s = time.perf_counter() - t
    x = torch.from_numpy(unit)
    t = time.perf_counter()
    for b in range(blocks):
        search._query_block(x, b * search.QUERY_ROWS, (b + 1) * search.QUERY_ROWS, 10)
    per_block = (time.perf_counter() - t) / blocks
    total_blocks = -(-len(unit) // search.QUERY_ROWS)
    return {
        "read_s": round(read_s, 1),
        "unit_s": round(unit_s, 1),
        "blocks_run": blocks,
        "seconds_per_block": round(per_block, 2),
        "search_s_extrapolated": round(per_block * total_blocks),
        "peak_rss_mb": round(peak_rss_mb()),
        "madds_per_s": round(search.QUERY_ROWS * len(unit) * DIM / per_block / 1e9, 1),
    }


def child(args) -> None:
    cache = make_cache(args.work / f"synthetic_{args.rows}.h5", args.rows)
    if args.step == "make":
        return
    result = (
        run_full(cache, args.work / f"audit_{args.rows}")
        if args.step == "full"
        else run_search(cache, args.query_blocks)
    )
    print(json.dumps(result))


def measure(work: Path, rows: int, step: str, blocks: int = 2) -> dict:
    base = [
        sys.executable,
        __file__,
        "--work",
        str(work),
        "--rows",
        str(rows),
        "--query-blocks",
        str(blocks),
    ]
    subprocess.run([*base, "--step", "make"], check=True)
    out = subprocess.run([*base, "--step", step], check=True, capture_output=True, text=True)
    return {"rows": rows, "step": step, **json.loads(out.stdout.strip().splitlines()[-1])}


def model(rate_madds: float, full_100k: dict) -> dict:
    """Seconds and bytes of the search and the label check at 10M rows, from the measured rates."""
    n = 10_000_000
    label_s = full_100k["seconds"] - full_100k.get("search_s", 0)
    return {
        "rows": n,
        "search_hours_this_cpu": round(n * n * DIM / (rate_madds * 1e9) / 3600, 1),
        "search_memory_gb": round(n * DIM * 2 / 1e9 + 0.5, 1),
        "label_check_memory_gb": round(n * DIM * 4 / 1e9, 1),
        "label_check_hours_this_cpu": round(label_s * n / 100_000 / 3600, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/audit_scale"))
    p.add_argument("--rows", type=int, default=0)
    p.add_argument("--step", choices=("make", "full", "search"))
    p.add_argument("--query-blocks", type=int, default=2)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.step:
        child(args)
        return
    rows = [measure(args.work, 100_000, "search", 2), measure(args.work, 100_000, "full")]
    rows.append(measure(args.work, 1_000_000, "search", args.query_blocks))
    rows[1]["search_s"] = rows[0]["search_s_extrapolated"]
    payload = {"measured": rows, "model_10m": model(rows[2]["madds_per_s"], rows[1])}
    save("audit_scale_cpu", payload, markdown(payload))


def markdown(payload: dict) -> str:
    lines = ["| rows | what | seconds | peak RSS MB | notes |", "|---:|---|---:|---:|---|"]
    for r in payload["measured"]:
        if r["step"] == "full":
            lines.append(
                f"| {r['rows']:,} | whole audit | {r['seconds']} | {r['peak_rss_mb']} | "
                f"found {r['counts']} |"
            )
        else:
            lines.append(
                f"| {r['rows']:,} | exact kNN search (k=10), "
                f"{r['blocks_run']} of the query blocks run, extrapolated | "
                f"{r['search_s_extrapolated']} | {r['peak_rss_mb']} | read {r['read_s']} s, "
                f"unit rows {r['unit_s']} s, {r['seconds_per_block']} s per block, "
                f"{r['madds_per_s']} G multiply-adds/s |"
            )
    m = payload["model_10m"]
    lines += [
        "",
        f"Model at {m['rows']:,} rows on this CPU: exact search {m['search_hours_this_cpu']} h and "
        f"{m['search_memory_gb']} GB (unit rows in float16 + blocks); label check "
        f"{m['label_check_hours_this_cpu']} h and {m['label_check_memory_gb']} GB (float32 rows). "
        "The search is N^2 x D multiply-adds: "
        "on one GPU at ~50 T fp32 multiply-adds/s that is about "
        f"{10_000_000**2 * DIM / 50e12 / 3600:.1f} h; "
        "faiss (IVF or HNSW, not built in) trades exactness for roughly N log N.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
