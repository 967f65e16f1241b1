"""Heads on cached features: time and validation accuracy, and a large synthetic sweep.

    python benchmarks/train_head.py ../shared/data/hymenoptera

1. Extracts the hymenoptera photos with efficientnet_lite0 and its offline ImageNet
   weights (timed), then trains on that cache: a linear head for exactly 30 epochs
   (the "30 epochs" target), the default linear and mlp heads, the logreg and knn
   references, and 4x4 learning-rate x weight-decay sweeps.
2. Writes 100,000 x 2,048 synthetic features (10 classes, float16 in HDF5, plus
   10,000 validation rows) and trains a 16-head sweep on them for 30 epochs, in a
   fresh process so that its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import peak_rss_mb, save

LRS = [1e-3, 3e-3, 1e-2, 3e-2]
WDS = [0.0, 1e-4, 1e-3, 1e-2]


def hymenoptera(data: Path, workdir: Path) -> list[dict]:
    from embedcache import extract, train_head

    cache = workdir / "lite0.h5"
    r = extract(data, out=cache, backbone="efficientnet_lite0", weights="DEFAULT", progress=False)
    rows = [
        {
            "what": "extract (efficientnet_lite0, offline weights)",
            "seconds": r.seconds,
            "val_acc": None,
            "epochs": None,
        }
    ]
    runs = [
        ("linear, exactly 30 epochs", {"head": "linear", "epochs": 30, "patience": 30}),
        ("linear (defaults)", {"head": "linear"}),
        ("mlp (defaults)", {"head": "mlp"}),
        ("logreg (C picked on val)", {"head": "logreg"}),
        ("knn (k picked on val)", {"head": "knn"}),
        ("linear 4x4 sweep", {"head": "linear", "lr": LRS, "weight_decay": WDS}),
        ("mlp 4x4 sweep", {"head": "mlp", "lr": [1e-4, 3e-4, 1e-3, 3e-3], "weight_decay": WDS}),
    ]
    for name, kw in runs:
        t = time.perf_counter()
        m = train_head(cache, device="cpu", progress=False, **kw).metrics
        rows.append(
            {
                "what": name,
                "seconds": time.perf_counter() - t,
                "val_acc": m["val_acc"],
                "epochs": m.get("epochs_run"),
                "best": m.get("best"),
            }
        )
    return rows


def write_synthetic(workdir: Path, n: int, dim: int, classes: int) -> Path:
    """100,000 x 2,048 float16 features around 10 class centres, and a 10% validation split."""
    import numpy as np

    from embedcache.cache import write_cache

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (classes, dim)).astype(np.float32)

    def make(rows: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        labels = rng.integers(0, classes, rows)
        feats = np.empty((rows, dim), np.float16)
        for lo in range(0, rows, 10_000):
            hi = min(rows, lo + 10_000)
            feats[lo:hi] = centres[labels[lo:hi]] + rng.normal(0, 4, (hi - lo, dim)).astype(
                np.float32
            )
        return feats, labels, [str(i) for i in range(rows)]

    splits = {"train": make(n), "val": make(n // 10)}
    return write_cache(
        workdir / "synthetic.h5",
        splits,
        classes=[str(c) for c in range(classes)],
        backbone="synthetic",
        weights="none",
        transform="{}",
    )


def train_synthetic(cache: Path, epochs: int) -> dict:
    """Run in a fresh process, so that the peak memory is the training's own."""
    import h5py

    from embedcache.train import train_head

    base = peak_rss_mb()
    t = time.perf_counter()
    m = train_head(
        cache,
        lr=LRS,
        weight_decay=WDS,
        epochs=epochs,
        patience=epochs,
        device="cpu",
        progress=False,
    ).metrics
    seconds = time.perf_counter() - t
    with h5py.File(cache) as f:
        shape, dtype = f["train/features"].shape, str(f["train/features"].dtype)
    return {
        "seconds": seconds,
        "epochs": m["epochs_run"],
        "heads": len(m["sweep"]),
        "batch_size": m["batch_size"],
        "val_acc": m["val_acc"],
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_imports_mb": base,
        "train_shape": list(shape),
        "dtype": dtype,
        "features_mb": shape[0] * shape[1] * 2 / 1e6,
        "streamed": m["streamed"],
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data", type=Path, nargs="?", help="the hymenoptera folder (train/, val/)")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--train-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.train_child:
        print(json.dumps(train_synthetic(args.train_child, args.epochs)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        rows = hymenoptera(args.data, Path(tmp)) if args.data else []
        cache = write_synthetic(Path(tmp), args.rows, args.dim, 10)
        child = subprocess.run(
            [sys.executable, __file__, "--train-child", str(cache), "--epochs", str(args.epochs)],
            check=True,
            capture_output=True,
            text=True,
        )
        big = json.loads(child.stdout.strip().splitlines()[-1])
    md = []
    if rows:
        extract_s = rows[0]["seconds"]
        md += [
            "Hymenoptera (244 + 153 photos; 245 train files incl. one GIF), "
            "efficientnet_lite0 with the offline weights, CPU:",
            "",
            "| what | seconds | share of extract time | val accuracy | epochs run | chosen |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in rows:
            acc = f"{100 * r['val_acc']:.2f}%" if r["val_acc"] is not None else ""
            share = f"{100 * r['seconds'] / extract_s:.1f}%" if r["val_acc"] is not None else ""
            md.append(
                f"| {r['what']} | {r['seconds']:.2f} | {share} | {acc} | "
                f"{r['epochs'] or ''} | {r.get('best') or ''} |"
            )
        md.append("")
    md += [
        f"Synthetic {args.rows:,} x {args.dim:,} float16 features (10 classes) + "
        f"{args.rows // 10:,} val rows, "
        f"{big['heads']}-head linear sweep (4 lr x 4 weight decay), {big['epochs']} epochs, "
        f"batch {big['batch_size']}, CPU: "
        f"**{big['seconds']:.1f} s**, "
        f"peak RSS of the training process {big['peak_rss_mb']:.0f} MB "
        f"({big['rss_after_imports_mb']:.0f} MB after imports; "
        f"features {big['features_mb']:.0f} MB as float16, "
        f"{'streamed from the file' if big['streamed'] else 'held in memory as stored'})."
    ]
    path = save("train_head", {"hymenoptera": rows, "synthetic": big}, "\n".join(md))
    print(path.read_text())


if __name__ == "__main__":
    main()
