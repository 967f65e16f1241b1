"""The whole audit at scale: each stage's time and peak memory, from a cache on disk.

    python benchmarks/audit_scale.py --rows 100000,1000000 --exact-rows 100000

Caches (made once under --work, reused): 1280-d float16 rows made from real features,
grocery81's EfficientNet-Lite0 features (--cache, every split): each row a random one of them
plus Gaussian noise of its per-dimension spread (twice benchmarks/audit_index.py's: at half,
half the rows of 100,000 were near copies by feature cosine 0.85 alone), labelled
with that image's class (81), 2% of the labels flipped to another class, and 0.1% of the rows
replaced by a near copy (noise of 0.05 spread) of another row; 80% train, 10% val, 10% test.
Caches of up to 2,000,000 rows (the committed 100k and 1M results) are made in memory; bigger
ones (10,000,000 x 1280 float16 rows are 25.6 GB) are written block by block from a seed per
65,536 rows (`LazyAuditRows`), their copies made of rows among the first 65,536 train rows.
The caches hold features only: no content hashes or thumbnails (`write_cache` makes neither),
so exact duplicates are not checked and near duplicates are paired by feature cosine alone.

Each audit runs in a fresh process (its own peak resident memory, VmHWM): `embedcache.audit`
with its defaults (--index auto: faiss's index from 50,000 rows), its stages timed by the log
lines it writes: reading the cache (and scaling the rows), the label check, the neighbour
search (the index built, its recall checked, every row searched), then the findings from the
neighbours (near duplicates, leaks, groups, outliers) and the files. At --exact-rows the same
cache is audited again with --index exact, and the findings of the two compared.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import peak_rss_mb, save

FLIPPED, COPIES = 0.02, 0.001
LAZY_ABOVE = 2_000_000  # caches of more rows are written block by block (LazyAuditRows)


class LazyAuditRows:
    """Rows [start, stop) of a synthetic cache of ``rows`` rows (one split), made on demand as
    the module's docstring says, BLOCK rows of the global numbering at a time from
    ``default_rng([seed, block start])``: a cache bigger than memory is written block by block
    (``write_cache`` slices its features in order). Each block draws the rows' sources, flips
    and copies first, the noise last, so ``labels`` is made in one fast pass without the noise.
    Copies are near copies of rows among the cache's first BLOCK rows (train rows) that are not
    copies themselves; that block is made once and kept (``first``: pass another split's to
    share it), and the last block made is kept (a slice spans two blocks), so every row is the
    same whatever order the rows are asked for in."""

    BLOCK = 65536

    def __init__(self, real, real_labels, classes, rows, start, stop, seed=0, first=None):
        self.real, self.real_labels, self.classes = real, real_labels, classes
        self.spread = real.std(0).astype(np.float32)
        self.rows, self.start, self.seed = rows, start, seed
        self.shape, self.dtype, self.ndim = (stop - start, real.shape[1]), np.dtype(np.float16), 2
        self.first, self._last = first, (-1, None)
        if first is None:  # the first block's rows that are not copies, its labels, its rows
            _, _, labels, copies, _ = self._plan(0)
            originals = np.setdiff1d(np.arange(len(labels)), copies)
            self.first = originals, labels, self._block(0)
        lo = start - start % self.BLOCK
        blocks = [self._plan(b)[2] for b in range(lo, stop, self.BLOCK)]  # one fast pass
        self.labels = np.concatenate(blocks or [np.zeros(0, np.int64)])[start - lo : stop - lo]

    def __len__(self) -> int:
        return self.shape[0]

    def _plan(self, lo: int):
        """(rng, source, labels, copies, of) of the block at global row ``lo``: every draw but
        the noise, which the rng draws next."""
        rng = np.random.default_rng([self.seed, lo])
        n = min(self.rows, lo + self.BLOCK) - lo
        source = rng.integers(0, len(self.real), n)
        labels = self.real_labels[source].astype(np.int64)
        flip = rng.choice(n, int(n * FLIPPED), replace=False)
        labels[flip] = (labels[flip] + rng.integers(1, self.classes, len(flip))) % self.classes
        copies = rng.choice(n, int(n * COPIES), replace=False)
        if lo == 0:  # the first block's copies are of its own rows that are not copies
            originals, first_labels = np.setdiff1d(np.arange(n), copies), labels.copy()
        else:
            originals, first_labels, _ = self.first
        of = originals[rng.integers(0, len(originals), len(copies))]
        labels[copies] = first_labels[of]
        return rng, source, labels, copies, of

    def _block(self, lo: int) -> np.ndarray:
        """The float16 rows of the block at global row ``lo``."""
        if lo == 0 and self.first is not None:
            return self.first[2]
        if self._last[0] == lo:
            return self._last[1]
        self._last = (-1, None)  # let it go before making the next
        rng, source, _, copies, of = self._plan(lo)
        x = np.empty((len(source), self.shape[1]), np.float16)
        for i in range(0, len(x), 4096):  # float32 a part at a time: no block-sized temporary
            part = rng.standard_normal((len(x[i : i + 4096]), self.shape[1]), dtype=np.float32)
            part *= self.spread
            x[i : i + 4096] = part + self.real[source[i : i + 4096]]
        base = x if lo == 0 else self.first[2]  # of: rows that are not copies
        noise = rng.standard_normal((len(copies), self.shape[1]), dtype=np.float32)
        x[copies] = base[of].astype(np.float32) + noise * (self.spread * 0.05)
        x.flags.writeable = False  # kept, and handed out as views
        self._last = (lo, x)
        return x

    def __getitem__(self, s: slice) -> np.ndarray:
        lo, hi, step = s.indices(len(self))
        if step != 1:
            raise ValueError("LazyAuditRows takes slices of step 1")
        lo, hi = self.start + lo, self.start + max(lo, hi)
        if lo == hi:
            return np.empty((0, self.shape[1]), self.dtype)
        first = lo - lo % self.BLOCK
        if hi <= first + self.BLOCK:  # within one block: a view of it
            return self._block(first)[lo - first : hi - first]
        out = np.empty((hi - lo, self.shape[1]), self.dtype)
        for b in range(first, hi, self.BLOCK):
            a, z = max(lo, b), min(hi, b + self.BLOCK)
            out[a - lo : z - lo] = self._block(b)[a - b : z - b]
        return out


def _real(real_cache: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The real features (float32) and labels of every split of ``real_cache``, its classes."""
    from embedcache.cache import open_cache

    with open_cache(real_cache) as c:
        real = np.concatenate([c.features(s)[:].astype(np.float32) for s in c.splits])
        real_labels = np.concatenate([c.labels(s) for s in c.splits])
        return real, real_labels, list(c.classes)


def first_rows(rows: int, real_cache: str = "/tmp/longtail/grocery81.h5") -> np.ndarray:
    """The first ``rows`` rows of the 10,000,000-row cache, unit float32 in memory: what the
    probes of the index (probe_*.py) search."""
    real, labels, classes = _real(real_cache)
    x = LazyAuditRows(real, labels, len(classes), 10_000_000, 0, rows)[0:rows]
    x = x.astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _in_memory(real, real_labels, classes, rows: int, seed: int) -> tuple[np.ndarray, ...]:
    """Every row and label of the synthetic cache in memory (the 100k and 1M results')."""
    spread = real.std(0)
    rng = np.random.default_rng(seed)
    source = rng.integers(0, len(real), rows)
    x = np.empty((rows, real.shape[1]), np.float16)
    for lo in range(0, rows, 65536):
        n = min(rows, lo + 65536) - lo
        noise = rng.normal(0, 1, (n, real.shape[1])).astype(np.float32) * spread
        x[lo : lo + n] = real[source[lo : lo + n]] + noise
    labels = real_labels[source].astype(np.int64)
    flip = rng.choice(rows, int(rows * FLIPPED), replace=False)
    labels[flip] = (labels[flip] + rng.integers(1, len(classes), len(flip))) % len(classes)
    copies, of = rng.choice(rows, (2, int(rows * COPIES)), replace=False)
    x[copies] = x[of] + (rng.normal(0, 1, (len(of), x.shape[1])) * spread * 0.05).astype(np.float16)
    labels[copies] = labels[of]
    return x, labels


def make_cache(
    real_cache: str, path: Path, rows: int, seed: int = 0, lazy_above: int = LAZY_ABOVE
) -> Path:
    """The synthetic cache of ``rows`` rows (see the module's docstring), written once: in
    memory, or past ``lazy_above`` rows block by block (LazyAuditRows)."""
    from embedcache import write_cache

    if path.exists():
        return path
    real, real_labels, classes = _real(real_cache)
    cut = [int(rows * 0.8), int(rows * 0.9)]
    bounds = (("train", 0, cut[0]), ("val", cut[0], cut[1]), ("test", cut[1], rows))
    if rows > lazy_above:
        parts, first = [], None
        for _, a, b in bounds:
            parts.append(LazyAuditRows(real, real_labels, len(classes), rows, a, b, seed, first))
            first = parts[-1].first
        parts = [(p, p.labels) for p in parts]
    else:
        x, labels = _in_memory(real, real_labels, classes, rows, seed)
        parts = [(x[a:b], labels[a:b]) for _, a, b in bounds]
    splits = {
        name: (*part, [f"{name}/{i}.jpg" for i in range(a, b)])
        for (name, a, b), part in zip(bounds, parts, strict=True)
    }
    tmp = path.with_suffix(".tmp.h5")
    write_cache(tmp, splits, classes=classes, backbone="synthetic", weights="none", transform="{}")
    tmp.rename(path)
    return path


STAGES = (  # the log line that ends each stage: (stage, its first words)
    ("read the cache, scale the rows", "label errors:"),
    ("label check", "neighbours: faiss index over"),
    ("label check", "neighbours: exact cosine search"),
    ("neighbour search", "neighbours: approximate"),
)


def child(args) -> None:
    from embedcache import audit

    marks, on_disk = [("start", time.perf_counter())], []

    def log(line: str) -> None:
        on_disk.append(line.startswith("features: "))
        for stage, start in STAGES:
            if line.startswith(start):
                marks.append((stage, time.perf_counter()))

    cache = args.work / f"rows{args.rows}.h5"  # made by its own process, not measured here
    out = args.work / f"audit{args.rows}_{args.index}{'_mm' if args.max_memory else ''}"
    kw = {"index": args.index, "max_memory": args.max_memory}
    result = audit(cache, out=out, progress=False, report_rows=0, log=log, **kw)
    last = "findings, files" if len(marks) == 4 else "search, findings, files"
    marks.append((last, time.perf_counter()))
    stages = {b[0]: round(b[1] - a[1], 1) for a, b in zip(marks, marks[1:], strict=False)}
    s = result.summary
    print(
        json.dumps(
            {
                "rows": args.rows,
                "index": args.index,
                "seconds": round(marks[-1][1] - marks[0][1], 1),
                "stages": stages,
                "peak_mb": round(peak_rss_mb()),
                "features": "on disk" if any(on_disk) else "in memory",
                "search": {k: v for k, v in s["search"].items() if k != "how"},
                "found": {
                    k: s[k].get("images", s[k]["count"])
                    for k in ("near_duplicates", "leaks", "label_errors", "outliers")
                },
                "out": str(out),
            }
        )
    )


def measure(args, rows: int, index: str) -> dict:
    cache = args.work / f"rows{rows}.h5"
    if not cache.exists():
        code = "import sys; sys.path.insert(0, sys.argv[1]); from audit_scale import make_cache; "
        code += "make_cache(sys.argv[2], __import__('pathlib').Path(sys.argv[3]), int(sys.argv[4]))"
        here = str(Path(__file__).parent)
        make = [sys.executable, "-c", code, here, args.cache, str(cache), str(rows)]
        subprocess.run(make, check=True)
    cmd = [sys.executable, __file__, "--child", "--rows", str(rows), "--index", index]
    cmd += ["--cache", args.cache, "--work", str(args.work)]
    cmd += ["--max-memory", str(args.max_memory)] if args.max_memory else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"audit of {rows} rows failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def _rows_of(out: str, name: str) -> set:
    with open(Path(out) / f"{name}.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    first = rows[0] if rows else {}
    if "path_a" in first:
        return {(r["path_a"], r["path_b"]) for r in rows}
    return {r["image" if "image" in first else "path"] for r in rows}


def compared(approx: dict, exact: dict) -> dict:
    """Per finding: rows in both audits, only in the approximate one, only in the exact one."""
    out = {}
    for name in ("near_duplicates", "leaks", "groups", "outliers", "label_errors"):
        a, e = _rows_of(approx["out"], name), _rows_of(exact["out"], name)
        out[name] = {"both": len(a & e), "approx_only": len(a - e), "exact_only": len(e - a)}
    return out


def markdown(runs: list[dict], comparison: dict | None) -> str:
    names = list(dict.fromkeys(s for r in runs for s in r["stages"]))
    lines = [
        "| rows | search | features | " + " | ".join(names) + " | whole audit | peak memory "
        "| recall@10 | recall@30 |",
        "|---:|---|---|" + "---:|" * (len(names) + 4),
    ]
    for r in runs:
        stage = " | ".join(f"{r['stages'][n]} s" if n in r["stages"] else "" for n in names)
        s = r["search"]
        r10 = f"{s['recall_at_k']:.4f}" if s.get("recall_at_k") is not None else "exact"
        r30 = f"{s['recall_at_depth']:.4f}" if s.get("recall_at_depth") is not None else "exact"
        lines.append(
            f"| {r['rows']:,} | {s['index']} | {r.get('features', 'in memory')} | {stage} | "
            f"{r['seconds']} s | "
            f"{r['peak_mb']:,} MiB | {r10} | {r30} |"
        )
    lines += ["", "Found (images, or rows for label errors and outliers):", ""]
    for r in runs:
        lines.append(f"- {r['rows']:,} rows, {r['search']['index']}: {r['found']}")
    tries = [r for r in runs if r["search"].get("tries")]
    if tries:
        lines += ["", "Tries of the approximate search (cells probed, candidates re-scored):", ""]
        lines += [f"- {r['rows']:,} rows: {r['search']['tries']}" for r in tries]
    if comparison:
        lines += ["", f"Approximate against exact at {comparison['rows']:,} rows:", ""]
        lines += ["| finding | in both | approximate only | exact only |", "|---|---:|---:|---:|"]
        for name, c in comparison["findings"].items():
            lines.append(f"| {name} | {c['both']} | {c['approx_only']} | {c['exact_only']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="100000,1000000")
    p.add_argument("--exact-rows", type=int, default=100_000, help="0: no exact audit")
    p.add_argument("--cache", default="/tmp/longtail/grocery81.h5", help="the real features")
    p.add_argument("--work", type=Path, default=Path("/tmp/audit_scale"))
    p.add_argument("--index", default="auto")
    p.add_argument("--max-memory", type=int, help="the audit's --max-memory, bytes")
    p.add_argument("--name", default="audit_scale_cpu", help="the results file")
    p.add_argument("--child", action="store_true")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.child:
        args.rows = int(args.rows)
        child(args)
        return
    runs, comparison = [], None
    for rows in map(int, args.rows.split(",")):
        runs.append(measure(args, rows, "auto"))
        if rows == args.exact_rows:
            runs.append(measure(args, rows, "exact"))
            comparison = {"rows": rows, "findings": compared(runs[-2], runs[-1])}
    save(args.name, {"runs": runs, "comparison": comparison}, markdown(runs, comparison))


if __name__ == "__main__":
    main()
