"""What the default head and the logreg reference cost on 100,000 rows, side by side.

    python benchmarks/logreg_grid.py --rows 100000

A synthetic cache of ROWS x 1280 float16 train rows (and 10,000 val rows) of CLASSES classes
whose labels are a noisy linear function of the features. Timed in one run, in this order and
each as a whole train_head call (reports included): the default head (`--head auto`: the
L-BFGS probe along 23 strengths and the MLP beside it), the old default (`--head linear`,
AdamW), `--head logreg` (the 45 strengths of Kornblith et al. 2019 by L-BFGS in torch) and,
for reference, scikit-learn's L-BFGS along the same 45 strengths (warm-started, its default
tolerance), on the standardised features the probe sees.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from common import save

import embedcache.train
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


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--no-sklearn", action="store_true", help="skip the scikit-learn row")
    args = p.parse_args()
    train, val = _data(args.rows, args.dim, args.classes)
    meta = {
        "classes": [f"c{i}" for i in range(args.classes)],
        "backbone": "b",
        "weights": "w",
        "transform": EvalTransform(resize=256, crop=224).to_json(),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_cache(Path(tmp) / "c.h5", {"train": train, "val": val}, **meta)
        for name, kw in (("default (auto)", {}), ("linear (old default)", {"head": "linear"})):
            rows.append(_timed(name, cache, Path(tmp), kw))
        rows.append(_timed("logreg (45 strengths)", cache, Path(tmp), {"head": "logreg"}))
        # The case of a user without a val folder: 20% of train carved out for the choice,
        # then (the default) the chosen configuration refitted on all the train rows.
        carved = write_cache(Path(tmp) / "t.h5", {"train": train}, **meta)
        for name, kw in (
            ("default, no val split (carve 20%, refit)", {}),
            ("linear (old default), no val split", {"head": "linear", "refit": False}),
        ):
            rows.append(_timed(name, carved, Path(tmp), kw))
        # These labels are linear, so the default keeps the probe alone; its dearest outcome
        # is the blend (the MLP refitted too), timed by forcing that choice.
        chosen = embedcache.train.auto_choice
        embedcache.train.auto_choice = lambda a, b: ("blend", *chosen(a, b)[1:])
        try:
            rows.append(_timed("default forced to blend, no val split", carved, Path(tmp), {}))
        finally:
            embedcache.train.auto_choice = chosen
    if not args.no_sklearn:
        seconds, acc = _sklearn_path(train, val)
        sk = {"name": "scikit-learn L-BFGS, 45 strengths", "seconds": seconds, "val_acc": acc}
        rows.append(sk)
    md = [
        f"{args.rows:,} x {args.dim} float16 train rows, {args.classes} classes, 10,000 val rows; "
        "each row one whole `train_head` call, run one after the other in one process; "
        "the last rows train on the same train rows without the val split, as a user without "
        "a val folder does (val acc: on the carved 20%).",
        "",
        "| head | seconds | val acc | chosen |",
        "| --- | ---: | ---: | --- |",
        *(
            f"| {r['name']} | {r['seconds']:.1f} | {r['val_acc']:.4f} | {r.get('chosen', '')} |"
            for r in rows
        ),
    ]
    print(save("logreg_grid_cpu", {"rows": rows}, "\n".join(md)).read_text())


def _timed(name: str, cache: Path, tmp: Path, kw: dict) -> dict:
    t = time.perf_counter()
    r = train_head(cache, out=tmp / "h.pt", progress=False, **kw)
    seconds = time.perf_counter() - t
    m = r.metrics
    chosen = ", ".join(f"{k} {v:.3g}" for k, v in m["best"].items())
    if "auto" in m:
        chosen = f"{describe_choice(m['auto'])}; {chosen}"
    if m.get("refit"):
        chosen += f"; refit on {m['refit']['images']:,} rows"
    return {"name": name, "seconds": seconds, "val_acc": m["val_acc"], "chosen": chosen}


if __name__ == "__main__":
    main()
