"""How `audit` scales: time and peak memory on synthetic caches of 100,000 and 1,000,000 rows.

    python benchmarks/audit_scale_exact.py --work /tmp/audit_scale

Each measurement runs in a fresh process (its own peak resident memory, VmHWM). Synthetic
caches: 1280-d float16 features in 10 Gaussian classes with 0.1% near copies planted across
splits, 80% train, 10% val, 10% test.

- 100,000 rows: the whole audit (`embedcache.audit`, default settings, this machine's CPU), its
  time split into the search and the label check by the audit's own log lines.
- 100,000 and 1,000,000 rows: the audit's own steps up to the search (reading the cache, unit
  rows), then ``--query-blocks`` query blocks of the search against all rows, timed and
  extrapolated to every block (each block costs the same: QUERY_ROWS x N x D multiply-adds);
  the full run would take hours on 2 cores. Side by side in the same process: the search as it
  was before bf16 (float32, each key block converted for every query block) and as it is (the
  device's similarity dtype, candidates re-scored in float32). Peak memory is that of the
  search layout, which the full run keeps.

The model for other sizes: the search costs N^2 x D multiply-adds (fitted on the measured
rate) and holds N x D x 2 bytes of unit rows plus a fixed ~0.5 GB of blocks; the label check
holds 0.8 N x D x 4 bytes (a fold's training rows in float32) and costs about 600 passes over
the rows (L-BFGS, 5 folds).
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

    marks = {}

    def log(line: str) -> None:
        marks[line.split(":")[0]] = time.perf_counter()

    t = time.perf_counter()
    r = audit(cache, out=out, progress=False, report_rows=0, log=log)
    end = time.perf_counter()
    counts = {
        k: r.summary[k]["count"] for k in ("near_duplicates", "leaks", "label_errors", "outliers")
    }
    return {
        "seconds": round(end - t, 1),
        "search_and_findings_s": round(marks["label errors"] - marks["neighbours"], 1),
        "label_check_and_files_s": round(end - marks["label errors"], 1),
        "peak_rss_mb": round(peak_rss_mb()),
        "counts": counts,
    }


def _old_query_block(x, q0: int, q1: int, k: int):
    """The search's query block before bf16 (at da726c1): float32, every key block converted
    for every query block."""
    import torch

    q = x[q0:q1].float()
    rows = torch.arange(q0, q1)
    best_s = torch.full((q1 - q0, k), -float("inf"))
    best_i = torch.zeros((q1 - q0, k), dtype=torch.int64)
    for k0 in range(0, len(x), KEY_ROWS_OLD):
        keys = x[k0 : k0 + KEY_ROWS_OLD].float()
        s = q @ keys.T
        if k0 < q1 and q0 < k0 + len(keys):
            mine = (rows >= k0) & (rows < k0 + len(keys))
            s[mine.nonzero().squeeze(1), rows[mine] - k0] = -float("inf")
        top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
        best_s, pick = torch.cat([best_s, top_s], 1).topk(k, dim=1)
        best_i = torch.cat([best_i, top_i + k0], 1).gather(1, pick)
    return best_s, best_i


KEY_ROWS_OLD = 32768


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def run_search(cache: Path, blocks: int) -> dict:
    import torch

    from embedcache import open_cache
    from embedcache.auditing import search
    from embedcache.auditing.findings import Pool
    from embedcache.runtime import similarity_dtype

    t = time.perf_counter()
    with open_cache(cache) as c:
        pool = Pool.read(c)
    read_s = time.perf_counter() - t
    unit_s = _timed(lambda: search.unit_rows(pool.features, out=pool.features))
    x = torch.from_numpy(pool.features)
    n, rows = len(x), blocks * search.QUERY_ROWS
    dtype = similarity_dtype(torch.device("cpu"))
    kept = 10 + (search.MARGIN if dtype != torch.float32 else 0)
    found = {}

    def new() -> None:
        found["index"] = search.candidates(x, kept=kept, dtype=dtype, queries=rows)[1]

    with torch.inference_mode():
        old_s = _timed(
            lambda: [
                _old_query_block(x, b * rows // blocks, (b + 1) * rows // blocks, 10)
                for b in range(blocks)
            ]
        )
        new_s = _timed(new)
        rescore_s = _timed(lambda: search.rescored(x, found["index"], k=10)) if kept > 10 else 0.0
    total_blocks = -(-n // search.QUERY_ROWS)
    per_block = (new_s + rescore_s) / blocks
    return {
        "read_s": round(read_s, 1),
        "unit_s": round(unit_s, 1),
        "blocks_run": blocks,
        "similarity_dtype": str(dtype).removeprefix("torch."),
        "seconds_per_block": round(per_block, 2),
        "rescore_share": round(rescore_s / (new_s + rescore_s), 3),
        "search_s_extrapolated": round(per_block * total_blocks),
        "old_seconds_per_block": round(old_s / blocks, 2),
        "old_search_s_extrapolated": round(old_s / blocks * total_blocks),
        "peak_rss_mb": round(peak_rss_mb()),
        "madds_per_s": round(search.QUERY_ROWS * n * DIM / per_block / 1e9, 1),
        "old_madds_per_s": round(search.QUERY_ROWS * n * DIM / (old_s / blocks) / 1e9, 1),
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
        "label_check_memory_gb": round(0.8 * n * DIM * 4 / 1e9, 1),
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
    rows[1]["search_s"] = rows[1]["search_and_findings_s"]
    payload = {"measured": rows, "model_10m": model(rows[2]["madds_per_s"], rows[1])}
    save("audit_scale_exact_cpu", payload, markdown(payload))


def markdown(payload: dict) -> str:
    lines = ["| rows | what | seconds | peak RSS MB | notes |", "|---:|---|---:|---:|---|"]
    for r in payload["measured"]:
        if r["step"] == "full":
            lines.append(
                f"| {r['rows']:,} | whole audit | {r['seconds']} | {r['peak_rss_mb']} | "
                f"search and findings {r['search_and_findings_s']} s, label check and files "
                f"{r['label_check_and_files_s']} s; found {r['counts']} |"
            )
        else:
            lines.append(
                f"| {r['rows']:,} | exact kNN search (k=10, {r['similarity_dtype']}), "
                f"{r['blocks_run']} of the query blocks run, extrapolated | "
                f"{r['search_s_extrapolated']} | {r['peak_rss_mb']} | read {r['read_s']} s, "
                f"unit rows {r['unit_s']} s, {r['seconds_per_block']} s per block "
                f"({r['rescore_share']:.0%} of it the float32 re-score), "
                f"{r['madds_per_s']} G multiply-adds/s; side by side, the float32 search "
                f"before: {r['old_seconds_per_block']} s per block, "
                f"{r['old_search_s_extrapolated']} s, {r['old_madds_per_s']} G/s |"
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
