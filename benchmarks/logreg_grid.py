"""What the default head, the logreg reference and scikit-learn cost, side by side.

    python benchmarks/logreg_grid.py --rows 10000,100000

For each size, a synthetic cache of ROWS x 1280 float16 train rows (and 10,000 val rows) of
CLASSES classes whose labels are a noisy linear function of the features. Timed in one run, in
this order and each as a whole train_head call (reports included): the default head
(`--head auto`: the L-BFGS probe, its strength chosen along 23 strengths on at most 10,000 of
the rows and then fitted on all, and the MLP beside it on a budget of rows seen), `--head
logreg` (the 45 strengths of Kornblith et al. 2019 by L-BFGS in torch on every row), the old
default (`--head linear`, AdamW), the default without a val split, and for reference
scikit-learn's L-BFGS along the same 45 strengths (warm-started, its default tolerance), on the
standardised features the probe sees.
"""

from __future__ import annotations

import argparse
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


def _sklearn_path(train, val) -> tuple[float, float]:
    """(seconds, best val acc) of scikit-learn along KORNBLITH_LAMBDAS, warm-started."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x, y = train[0].astype(np.float32), train[1]
    mean, scale = x.mean(0), np.sqrt(x.var(0).mean())
    xs, xv = (x - mean) / scale, (val[0].astype(np.float32) - mean) / scale
    m, best = LogisticRegression(warm_start=True), 0.0
    t = time.perf_counter()
    for lam in sorted(KORNBLITH_LAMBDAS, reverse=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            m.set_params(C=1.0 / (lam * len(y))).fit(xs, y)
        best = max(best, float((m.predict(xv) == val[1]).mean()))
    return time.perf_counter() - t, best


HEADS = (
    ("default (auto)", {}),
    ("logreg (45 strengths)", {"head": "logreg"}),
    ("linear (old default, AdamW)", {"head": "linear"}),
)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", default="100000", help="train rows, one size or several: 10000,100000")
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--no-sklearn", action="store_true", help="skip the scikit-learn row")
    args = p.parse_args()
    sizes = [int(v) for v in args.rows.split(",")]
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
            rows += [_timed(name, n, cache, Path(tmp), kw) for name, kw in HEADS]
            # a user without a val folder: 20% of train carved out for the choice, then the
            # chosen configuration refitted on all the train rows (the default)
            carved = write_cache(Path(tmp) / "t.h5", {"train": train}, **meta)
            name = "default, no val split (carve 20%, refit)"
            rows.append(_timed(name, n, carved, Path(tmp), {}))
        if not args.no_sklearn:
            seconds, acc = _sklearn_path(train, val)
            name = "scikit-learn L-BFGS, 45 strengths"
            rows.append({"rows": n, "name": name, "seconds": seconds, "val_acc": acc})
            print(rows[-1], flush=True)
    md = [
        f"{', '.join(f'{n:,}' for n in sizes)} x {args.dim} float16 train rows, {args.classes} "
        "classes, 10,000 val rows; each row one whole `train_head` call, run one after the other "
        "in one process (scikit-learn on the standardised rows in memory); the no-val row trains "
        "on the same train rows without the val split, as a user without a val folder does "
        "(val acc: on the carved 20%).",
        "",
        "| rows | head | seconds | val acc | chosen |",
        "| ---: | --- | ---: | ---: | --- |",
        *(
            f"| {r['rows']:,} | {r['name']} | {r['seconds']:.1f} | {r['val_acc']:.4f} "
            f"| {r.get('chosen', '')} |"
            for r in rows
        ),
    ]
    print(save("logreg_grid_cpu", {"rows": rows}, "\n".join(md)).read_text())


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
