"""The audit's neighbour search at scale: exact (blocked matmuls) against the faiss index.

    python benchmarks/audit_index.py --rows 100000,1000000 --exact-rows 100000

Rows are made from real features: grocery81's EfficientNet-Lite0 features (--cache, every
split), each row a random one of them plus Gaussian noise of half its per-dimension spread, as
unit float16 rows (what the audit searches). Each measurement runs in a fresh process (its
own peak resident memory, VmHWM): the rows made, then `nearest` (exact, the device's
similarity dtype with float32 re-scoring) or `approximate` (the IVF index built, recall@k
checked on 1,000 rows, then every row searched), k = 30 as the audit searches. Exact runs only
up to --exact-rows
(it costs N^2 x D). Recall@k of the approximate search is the one it measured itself, and at
--exact-rows also against the exact run's neighbours of every row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import peak_rss_mb, save

K = 30  # the audit's near-duplicate candidates (embedcache.auditing.NEAR_CANDIDATES)


def make_rows(cache: str, rows: int, seed: int = 0) -> np.ndarray:
    from embedcache.auditing.search import unit_rows
    from embedcache.cache import open_cache

    with open_cache(cache) as c:
        real = np.concatenate([c.features(s)[:].astype(np.float32) for s in c.splits])
    spread = real.std(0) * 0.5
    rng = np.random.default_rng(seed)
    out = np.empty((rows, real.shape[1]), np.float16)
    for lo in range(0, rows, 65536):
        n = min(rows, lo + 65536) - lo
        block = real[rng.integers(0, len(real), n)] + rng.normal(0, 1, (n, real.shape[1])) * spread
        out[lo : lo + n] = block.astype(np.float16)
    return unit_rows(out, out=out)


def child(args) -> None:
    import torch

    from embedcache.auditing.index import approximate
    from embedcache.auditing.search import nearest

    t = time.perf_counter()
    unit = make_rows(args.cache, args.rows)
    made = time.perf_counter() - t
    t = time.perf_counter()
    if args.child == "exact":
        index, sims = nearest(unit, k=K, device=torch.device("cpu"))
        record = None
    else:
        index, sims, record = approximate(unit, k=K)
    seconds = time.perf_counter() - t
    if args.save:
        np.save(args.save, sims)
    out = {"kind": args.child, "rows": args.rows, "seconds": seconds, "make_s": made}
    out["peak_mb"] = peak_rss_mb()
    out["record"] = record.to_dict() if record else None
    print(json.dumps(out))


def measure(args, kind: str, rows: int, save_to: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--rows", str(rows), "--cache", args.cache]
    cmd += ["--save", str(save_to)] if save_to else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", default="100000,1000000")
    p.add_argument("--exact-rows", type=int, default=100000)
    p.add_argument("--cache", default="/tmp/grid_grocery81/efficientnet_lite0/cache.h5")
    p.add_argument("--child", choices=("exact", "approx"))
    p.add_argument("--save")
    args = p.parse_args()
    if args.child:
        args.rows = int(args.rows)
        return child(args)
    load = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in (int(r) for r in args.rows.split(",")):
            both = rows <= args.exact_rows
            a = measure(args, "approx", rows, Path(tmp) / "a.npy" if both else None)
            runs.append(a)
            if both:
                e = measure(args, "exact", rows, Path(tmp) / "e.npy")
                sa, se = np.load(Path(tmp) / "a.npy"), np.load(Path(tmp) / "e.npy")
                hit = (sa >= se[:, -1:] - 1e-6).sum(1).clip(max=K).mean() / K
                a["recall_all_rows"] = float(hit)
                runs.append(e)
    lines = [
        f"k = {K}; 1280-d rows from grocery81's EfficientNet-Lite0 features with noise; one "
        f"fresh process per row of the table. Load average {load:.2f} at the start.",
        "",
        f"| rows | search | seconds | peak memory (MB) | recall@{K} (sample of 1,000) "
        f"| recall@{K} (every row) | cells probed |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        rec = r["record"] or {}
        lines.append(
            f"| {r['rows']:,} | {'faiss ' + rec['index'] if rec else 'exact'} "
            f"| {r['seconds']:.1f} | {r['peak_mb']:,.0f} "
            f"| {rec.get('recall_at_k', 1.0):.4f} | {r.get('recall_all_rows', '')} "
            f"| {', '.join(str(t['nprobe']) for t in rec.get('tries', []))} |"
        )
    save("audit_index_cpu", {"runs": runs}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
