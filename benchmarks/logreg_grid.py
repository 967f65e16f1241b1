"""What the default head, the logreg reference and scikit-learn cost, side by side.

    python benchmarks/logreg_grid.py --rows 10000,100000 --big 10000000

For each size, a synthetic cache of ROWS x 1280 float16 train rows (and 10,000 val rows) of
CLASSES classes whose labels are a noisy linear function of the features. Timed in one run, in
this order and each as a whole train_head call (reports included): the default head
(`--head auto`: the L-BFGS probe, its strength chosen along 23 strengths on at most 10,000 of
the rows and then fitted on all, and the MLP beside it on a budget of rows seen), `--head
logreg` (the 45 strengths of Kornblith et al. 2019 by L-BFGS in torch on every row), the old
default (`--head linear`, AdamW), the default without a val split, and for reference
scikit-learn's L-BFGS along the same 45 strengths (warm-started), on the standardised features
the probe sees, at its default tolerance (1e-4) and at the logreg reference's (1e-5).

With ``--big``, the default head on a cache past memory (10,000,000 x 1280 float16 rows are
25.6 GB): the cache is written once in ``--work``, block by block, and the head trains in a
process of its own, streamed from the file, whose peak resident memory is recorded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from common import save

from embedcache import train_head, write_cache
from embedcache.backbones import EvalTransform
from embedcache.probe import KORNBLITH_LAMBDAS
from embedcache.train import describe_choice


def _data(rows: int, dim: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(1).standard_normal((dim, classes))

    def make(n: int):
        x = rng.standard_normal((n, dim)).astype(np.float16)
        z = x.astype(np.float32) @ w + 8 * rng.standard_normal((n, classes))
        return x, z.argmax(1).astype(np.int64), [f"{i}.jpg" for i in range(n)]

    return make(rows), make(10_000)


class LazyRows:
    """ROWS x DIM float16 rows made on demand, BLOCK rows at a time from a seed per block, and
    their labels (the same noisy linear function as ``_data``): a cache bigger than memory is
    written block by block (``write_cache`` slices its features in order)."""

    BLOCK = 65536

    def __init__(self, rows: int, dim: int, classes: int, seed: int):
        self.shape, self.dtype, self.ndim = (rows, dim), np.dtype(np.float16), 2
        self.seed, self.w = seed, np.random.default_rng(1).standard_normal((dim, classes))
        self.w = self.w.astype(np.float32)
        self.labels = np.concatenate(
            [self._block(i)[1] for i in range(0, rows, self.BLOCK)]
        )  # one pass for the labels, which write_cache writes first

    def __len__(self) -> int:
        return self.shape[0]

    def _block(self, lo: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, lo])
        n = min(self.shape[0], lo + self.BLOCK) - lo
        x = rng.standard_normal((n, self.shape[1]), dtype=np.float32).astype(np.float16)
        z = x.astype(np.float32) @ self.w + 8 * rng.standard_normal((n, self.w.shape[1]))
        return x, z.argmax(1).astype(np.int64)

    def __getitem__(self, s: slice) -> np.ndarray:
        lo, hi, _ = s.indices(self.shape[0])
        first = lo - lo % self.BLOCK
        x = np.concatenate([self._block(b)[0] for b in range(first, hi, self.BLOCK)])
        return x[lo - first : hi - first]


def _big_cache(rows: int, dim: int, classes: int, work: Path, meta: dict) -> Path:
    """A cache of ``rows`` lazily made train rows and 10,000 val rows in ``work``, made once."""
    path = work / f"grid{rows}x{dim}c{classes}.h5"
    if not path.exists():
        train, val = LazyRows(rows, dim, classes, 0), LazyRows(10_000, dim, classes, 1)
        splits = {
            name: (r, r.labels, [f"{name}/{i}.jpg" for i in range(len(r))])
            for name, r in (("train", train), ("val", val))
        }
        tmp = path.with_suffix(".tmp.h5")
        write_cache(tmp, splits, **meta)
        tmp.rename(path)
    return path


CHILD = """
import json, sys, time
sys.path.insert(0, {bench!r})
from common import peak_rss_mb
from embedcache import train_head
t = time.perf_counter()
r = train_head({cache!r}, out={out!r}, progress=False, max_memory={max_memory!r})
m = r.metrics
print("RESULT " + json.dumps({{"seconds": time.perf_counter() - t, "val_acc": m["val_acc"],
    "peak_mib": peak_rss_mb(), "streamed": m["streamed"], "auto": m["auto"]["chosen"],
    "best": m["best"]}}))
"""


def _big(rows: int, args, meta: dict) -> dict:
    """The default head on a cache of ``rows`` rows in its own process: seconds (the
    train_head call), val accuracy and the process's peak resident memory."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    cache = _big_cache(rows, args.dim, args.classes, work, meta)
    print(f"cache {cache} ready in {time.perf_counter() - t:.0f} s", flush=True)
    code = CHILD.format(
        bench=str(Path(__file__).parent),
        cache=str(cache),
        out=str(work / "h.pt"),
        max_memory=args.max_memory,
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    r = json.loads(done.stdout.split("RESULT ", 1)[1])
    chosen = f"{r['auto']}; " + ", ".join(f"{k} {v:.3g}" for k, v in r["best"].items())
    row = {"rows": rows, "name": "default (auto), streamed, own process", **r, "chosen": chosen}
    print(row, flush=True)
    return row


def _sklearn_path(train, val, tol: float = 1e-4) -> tuple[float, float]:
    """(seconds, best val acc) of scikit-learn along KORNBLITH_LAMBDAS, warm-started, at
    gradient tolerance ``tol`` (its default 1e-4; the logreg reference's is 1e-5)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x, y = train[0].astype(np.float32), train[1]
    mean, scale = x.mean(0), np.sqrt(x.var(0).mean())
    xs, xv = (x - mean) / scale, (val[0].astype(np.float32) - mean) / scale
    m, best = LogisticRegression(warm_start=True, tol=tol), 0.0
    t = time.perf_counter()
    for lam in sorted(KORNBLITH_LAMBDAS, reverse=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            m.set_params(C=1.0 / (lam * len(y))).fit(xs, y)
        best = max(best, float((m.predict(xv) == val[1]).mean()))
    return time.perf_counter() - t, best


HEADS = (  # (--only key, name, train_head options)
    ("default", "default (auto)", {}),
    ("logreg", "logreg (45 strengths)", {"head": "logreg"}),
    ("linear", "linear (old default, AdamW)", {"head": "linear"}),
)
SKLEARN = {"sklearn": 1e-4, "sklearn-tight": 1e-5}  # --only key: scikit-learn's tolerance
ONLY = "default,logreg,linear,noval,sklearn,sklearn-tight"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", default="100000", help="train rows, one size or several: 10000,100000")
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--only", default=ONLY, help=f"the rows to run (default: all of {ONLY})")
    p.add_argument("--name", default="logreg_grid_cpu", help="the results file's name")
    p.add_argument(
        "--big",
        default="",
        help="train rows past memory, one size or several (10000000): the default head only, "
        "streamed from a cache made once in --work, in its own process (its peak memory)",
    )
    p.add_argument("--work", default="/tmp/logreg_grid", help="where --big's caches are kept")
    p.add_argument(
        "--max-memory", type=int, default=None, help="--big's train_head max_memory (bytes)"
    )
    args = p.parse_args()
    only = set(args.only.split(","))
    sizes = [int(v) for v in args.rows.split(",") if v]
    meta = {
        "classes": [f"c{i}" for i in range(args.classes)],
        "backbone": "b",
        "weights": "w",
        "transform": EvalTransform(resize=256, crop=224).to_json(),
    }
    rows = []
    for n in sizes:
        train, val = _data(n, args.dim, args.classes)
        with tempfile.TemporaryDirectory() as tmp:
            cache = write_cache(Path(tmp) / "c.h5", {"train": train, "val": val}, **meta)
            rows += [_timed(name, n, cache, Path(tmp), kw) for k, name, kw in HEADS if k in only]
            if "noval" in only:
                # a user without a val folder: 20% of train carved out for the choice, then the
                # chosen configuration refitted on all the train rows (the default)
                carved = write_cache(Path(tmp) / "t.h5", {"train": train}, **meta)
                name = "default, no val split (carve 20%, refit)"
                rows.append(_timed(name, n, carved, Path(tmp), {}))
        for tol in (tol for k, tol in SKLEARN.items() if k in only):
            seconds, acc = _sklearn_path(train, val, tol)
            name = f"scikit-learn L-BFGS, 45 strengths, tol {tol:g}"
            rows.append({"rows": n, "name": name, "seconds": seconds, "val_acc": acc})
            print(rows[-1], flush=True)
    rows += [_big(int(v), args, meta) for v in args.big.split(",") if v]
    sizes += [int(v) for v in args.big.split(",") if v]
    md = [
        f"{', '.join(f'{n:,}' for n in sizes)} x {args.dim} float16 train rows, {args.classes} "
        "classes, 10,000 val rows; each row one whole `train_head` call, run one after the other "
        "in one process (scikit-learn on the standardised rows in memory); the no-val row trains "
        "on the same train rows without the val split, as a user without a val folder does "
        "(val acc: on the carved 20%); a row with a peak memory is `--big`'s: the default head "
        "alone, streamed from the file, in a process of its own.",
        "",
        "| rows | head | seconds | val acc | peak memory | chosen |",
        "| ---: | --- | ---: | ---: | ---: | --- |",
        *(
            f"| {r['rows']:,} | {r['name']} | {r['seconds']:.1f} | {r['val_acc']:.4f} "
            f"| {_peak(r)} | {r.get('chosen', '')} |"
            for r in rows
        ),
    ]
    print(save(args.name, {"rows": rows}, "\n".join(md)).read_text())


def _peak(row: dict) -> str:
    return f"{row['peak_mib']:,.0f} MiB" if "peak_mib" in row else ""


def _timed(name: str, n: int, cache: Path, tmp: Path, kw: dict) -> dict:
    t = time.perf_counter()
    r = train_head(cache, out=tmp / "h.pt", progress=False, **kw)
    seconds = time.perf_counter() - t
    m = r.metrics
    chosen = ", ".join(f"{k} {v:.3g}" for k, v in m["best"].items())
    if "auto" in m:
        chosen = f"{describe_choice(m['auto'])}; {chosen}"
    if m.get("refit"):
        chosen += f"; refit on {m['refit']['images']:,} rows"
    row = {"rows": n, "name": name, "seconds": seconds, "val_acc": m["val_acc"], "chosen": chosen}
    print(row, flush=True)
    return row


if __name__ == "__main__":
    main()
