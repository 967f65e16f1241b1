"""Issue 37's first question: can the default probe choose its strength on a subsample?

    python benchmarks/probe_subsample.py

Side by side in one process, on two sets of 100,000 x 1280 train rows and 10,000 val rows:
logreg_grid.py's synthetic rows (10 classes, labels a noisy linear function of the features),
and rows made from grocery81's EfficientNet-Lite0 features with noise of their per-dimension
spread (81 classes, as audit_scale.py makes them). For each:

- the default head's probe path as it is (`embedcache.probe.logreg_path` along the 23
  strengths of DEFAULT_LAMBDAS, tolerance DEFAULT_GRAD_TOL, patience 4) on every train row;
- the same path on a stratified subsample of --sub rows (`auditing.labels.capped`), then one
  fit on every row warm-started from it, at the chosen strength and at that strength scaled by
  sub / rows (the L2 term of a mean loss: the same prior over fewer rows weighs rows/sub more).

Reported: seconds, the strength, val accuracy. Nothing here changes the default head yet.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import save
from logreg_grid import _data

from embedcache.auditing.labels import capped
from embedcache.probe import DEFAULT_GRAD_TOL, DEFAULT_LAMBDAS, fit_logreg, logreg_path

PATH = {"lambdas": DEFAULT_LAMBDAS, "grad_tol": DEFAULT_GRAD_TOL, "patience": 4}


def _standardised(x: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    mean, std = x.mean(0), x.std(0).clip(1e-6)
    return [torch.from_numpy(((a - mean) / std).astype(np.float32)) for a in (x, *others)]


def _acc(fit, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((x @ fit.weight.T + fit.bias).argmax(1) == y).float().mean())


def _timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def compare(name: str, train, val, classes: int, sub: int) -> list[dict]:
    (x, xv), (y, yv) = (
        _standardised(train[0], val[0]),
        (torch.from_numpy(train[1]), torch.from_numpy(val[1])),
    )
    (full, _), s = _timed(lambda: logreg_path(x, y, xv, yv, classes, **PATH))
    rows = [
        {
            "set": name,
            "how": "path on every row",
            "seconds": s,
            "lam": full.lam,
            "val_acc": _acc(full, xv, yv),
        }
    ]
    keep = torch.from_numpy(capped(train[1], np.arange(len(y)), sub, 0))
    (small, _), s_sub = _timed(lambda: logreg_path(x[keep], y[keep], xv, yv, classes, **PATH))
    for scale in (1.0, len(keep) / len(y)):
        lam = small.lam * scale
        fit, s = _timed(
            lambda lam=lam: fit_logreg(
                x, y, classes, lam=lam, start=small, grad_tol=DEFAULT_GRAD_TOL
            )
        )
        how = f"path on {len(keep):,} rows, one fit on every row at its strength x {scale:.3g}"
        rows.append(
            {
                "set": name,
                "how": how,
                "seconds": s_sub + s,
                "lam": lam,
                "val_acc": _acc(fit, xv, yv),
            }
        )
    for r in rows:
        print(r, flush=True)
    return rows


def _grocery(cache: str, rows: int, seed: int = 0):
    from embedcache.cache import open_cache

    with open_cache(cache) as c:
        real = np.concatenate([c.features(s)[:].astype(np.float32) for s in c.splits])
        labels = np.concatenate([c.labels(s) for s in c.splits])
    rng, spread = np.random.default_rng(seed), real.std(0)

    def make(n: int):
        source = rng.integers(0, len(real), n)
        return real[source] + rng.normal(0, 1, (n, real.shape[1])).astype(
            np.float32
        ) * spread, labels[source]

    return make(rows), make(10_000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--sub", type=int, default=10_000)
    p.add_argument("--cache", default="/tmp/longtail/grocery81.h5", help="grocery81's features")
    args = p.parse_args()
    torch.set_num_threads(2)
    train, val = _data(args.rows, 1280, 10)
    rows = compare(
        "synthetic, 10 classes",
        (train[0].astype(np.float32), train[1]),
        (val[0].astype(np.float32), val[1]),
        10,
        args.sub,
    )
    train, val = _grocery(args.cache, args.rows)
    rows += compare("grocery81 + noise, 81 classes", train, val, 81, args.sub)
    lines = ["| set | how | seconds | strength | val acc |", "|---|---|---:|---:|---:|"]
    lines += [
        f"| {r['set']} | {r['how']} | {r['seconds']:.1f} | {r['lam']:.3g} | {r['val_acc']:.4f} |"
        for r in rows
    ]
    save("probe_subsample_cpu", {"rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
