"""finetune --unfreeze 0..3 on hymenoptera with efficientnet_lite0 (offline weights).

    python benchmarks/finetune.py ../shared/data/hymenoptera

A. Speed, same arithmetic both ways (no augmentation): seconds per epoch with the
   prefix cache and without it (--prefix-cache off: the frozen prefix runs every
   epoch, without gradients), next to one epoch of the tutorial recipe (the whole
   frozen backbone forwarded over train and val, ImageFolder, no workers, NCHW).
B. Accuracy with the defaults (light augmentation, 4 cached views, 8 epochs),
   from the head trained on the cache and from a fresh head.
Every run is a fresh process, so that its peak memory (VmHWM) is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import peak_rss_mb, save

UNFREEZE = (0, 1, 2, 3)


def child(args: argparse.Namespace) -> None:
    from embedcache import finetune

    kw = json.loads(args.child)
    r = finetune(args.data, out=Path(kw.pop("out")), device="cpu", progress=False, **kw)
    m = r.metrics
    epochs = [
        s for e, s in zip(m["history"]["epoch"], m["history"]["seconds"], strict=True) if e > 0
    ]
    print(
        json.dumps(
            {
                "seconds_per_epoch": m["seconds_per_epoch"],
                "epoch_seconds": epochs,
                "prefix_seconds": m["prefix_cache"]["seconds"],
                "prefix_mb": m["prefix_cache"]["bytes"] / 1e6,
                "where": m["prefix_cache"]["where"],
                "best_val_acc": m["best_val_acc"],
                "best_epoch": m["best_epoch"],
                "epoch0_val_acc": m["head_val_acc_before"],
                "best_trained_val_acc": m["best_trained_val_acc"],
                "epochs_run": m["epochs_run"],
                "total_seconds": m["prefix_cache"]["seconds"] + sum(epochs),
                "peak_rss_mb": peak_rss_mb(),
                "trainable_params": sum(r["params"] for r in m["trainable"] if r["trainable"]),
            }
        )
    )


def run(data: Path, **kw) -> dict:
    p = subprocess.run(
        [sys.executable, __file__, str(data), "--child", json.dumps(kw)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data", type=Path)
    p.add_argument("--speed-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    from extract_throughput import tutorial

    from embedcache import build_backbone, extract, train_head

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        extract(
            args.data,
            out=tmp / "c.h5",
            backbone="efficientnet_lite0",
            weights="DEFAULT",
            progress=False,
        )
        head = str(train_head(tmp / "c.h5", out=tmp / "head.pt", device="cpu", progress=False).path)
        bb = build_backbone("efficientnet_lite0", weights="DEFAULT")
        tutorial_epoch = 398 / tutorial(args.data, bb, 32, "cpu")
        speed, accuracy = [], []
        for n in UNFREEZE:
            common = {
                "head": head,
                "unfreeze": n,
                "augment": "none",
                "views": 0,
                "epochs": args.speed_epochs,
                "patience": args.speed_epochs,
            }
            with_cache = run(args.data, out=str(tmp / f"s{n}.pt"), prefix_cache="auto", **common)
            without = run(args.data, out=str(tmp / f"o{n}.pt"), prefix_cache="off", **common)
            speed.append({"unfreeze": n, "cached": with_cache, "off": without})
            print(
                f"speed unfreeze {n}: {with_cache['seconds_per_epoch']:.2f} vs "
                f"{without['seconds_per_epoch']:.2f} s/epoch",
                flush=True,
            )
        for n in UNFREEZE:
            for start in ("cached head", "fresh head"):
                kw = {"unfreeze": n, "epochs": args.epochs, "patience": args.epochs}
                if start == "cached head":
                    kw["head"] = head
                else:
                    kw["backbone"] = "efficientnet_lite0"
                r = run(args.data, out=str(tmp / f"a{n}{start[0]}.pt"), **kw)
                accuracy.append({"unfreeze": n, "start": start, **r})
                print(f"accuracy unfreeze {n} {start}: {r['best_val_acc']:.4f}", flush=True)
    md = [
        "One tutorial-recipe epoch (frozen lite0 forwarded over 245 + 153 images, ImageFolder, "
        f"batch 32, no workers, NCHW): **{tutorial_epoch:.1f} s**.",
        "",
        f"A. Seconds per epoch, no augmentation ({args.speed_epochs} epochs, "
        "from the cached head), with and without the prefix cache:",
        "",
        "| --unfreeze | prefix cache: s/epoch | cache built in (s) | cache size (MB) "
        "| off: s/epoch | speed-up | epoch vs tutorial epoch | peak RSS cached / off (MB) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in speed:
        c, o = row["cached"], row["off"]
        md.append(
            f"| {row['unfreeze']} | {c['seconds_per_epoch']:.2f} | {c['prefix_seconds']:.1f} | "
            f"{c['prefix_mb']:.1f} | {o['seconds_per_epoch']:.2f} | "
            f"{o['seconds_per_epoch'] / c['seconds_per_epoch']:.1f}x | "
            f"{c['seconds_per_epoch'] / tutorial_epoch:.3f} | "
            f"{c['peak_rss_mb']:.0f} / {o['peak_rss_mb']:.0f} |"
        )
    md += [
        "",
        "B. Accuracy with the defaults (light augmentation, "
        "4 augmented views cached through the frozen prefix, lr 3e-4, blocks at 0.3x, "
        f"{args.epochs} epochs). "
        "Epoch 0 is the head as reattached, before any step; the best epoch on val is kept.",
        "",
        "| --unfreeze | start | best val acc | best epoch | epoch 0 val acc "
        "| best val acc of epochs >= 1 | trainable params | total s (cache + epochs) | s/epoch "
        "| peak RSS (MB) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in accuracy:
        md.append(
            f"| {r['unfreeze']} | {r['start']} | {100 * r['best_val_acc']:.2f}% | "
            f"{r['best_epoch']} | {100 * r['epoch0_val_acc']:.2f}% | "
            f"{100 * r['best_trained_val_acc']:.2f}% | {r['trainable_params']:,} | "
            f"{r['total_seconds']:.1f} | {r['seconds_per_epoch']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    path = save(
        "finetune",
        {"tutorial_epoch_seconds": tutorial_epoch, "speed": speed, "accuracy": accuracy},
        "\n".join(md),
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
