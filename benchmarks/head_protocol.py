"""Heads on a test set they were never chosen on: plain vs cached views + TTA, ties, --refit.

    python benchmarks/head_protocol.py ../shared/data/hymenoptera --name hymenoptera
    python benchmarks/head_protocol.py digits --image-size 64 --name digits

The protocol of Kornblith et al. (2019): configurations are chosen on a validation set held
out of train (20%, stratified, seeded), the chosen one is optionally refitted on train + val,
and every head is scored once on a test set. DATA's val split is the test set (hymenoptera's
val/); data without one (digits) has 20% of it held out as the test set first.

One `extract --views K` of DATA gives both the plain and the views rows (its plain features are
bit for bit those of a plain extract). Each row is a train-head configuration on the train part,
scored with `evaluate` on the test part; "TTA" rows average the logits of each test image and
its mirror (logreg trains on the plain features whatever the cache holds, so its "+ TTA" rows
differ only at test time). The sweep rows also list the heads tied at the best validation accuracy and how each
would have scored on test, which is what the tie-break by validation loss decides between.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import save

from embedcache import evaluate, extract, open_cache, train_head, write_cache
from embedcache.data import holdout
from embedcache.quickstart import write_digits

LRS, WDS = (1e-3, 3e-3, 1e-2, 3e-2), (0.0, 1e-4, 1e-3, 1e-2)


def _protocol_cache(full: Path, out: Path) -> tuple[Path, int, int]:
    """A cache with train (val held out of it by train-head) and test splits, views kept."""
    with open_cache(full) as c:
        classes, names = c.classes, c.splits
        parts = {s: (c.features(s)[:], c.labels(s), c.paths(s), c.views(s)[:]) for s in names}
        meta = (c.backbone, c.weights, c.transform)
    if "val" in parts:
        train, test = parts["train"], parts["val"]
    else:  # digits: one folder; hold the test set out first
        x, y, p, v = parts["train"]
        tr, te = holdout(p, y, fraction=0.2, seed=1)
        train, test = ((x[i], y[i], [p[j] for j in i], v[i]) for i in (np.sort(tr), np.sort(te)))
    views = {"train": train[3], "test": test[3][:, :1]}  # the test set keeps its mirror only
    write_cache(out, {"train": train[:3], "test": test[:3]}, classes=classes, backbone=meta[0], weights=meta[1], transform=meta[2], views=views)  # fmt: skip
    return out, len(train[1]), len(test[1])


def _row(name: str, cache: Path, tmp: Path, tta: bool, **kw) -> dict:
    out = tmp / f"{len(list(tmp.glob('*.pt')))}.pt"
    t = time.perf_counter()
    m = train_head(cache, out=out, device="cpu", progress=False, **kw).metrics
    seconds = time.perf_counter() - t
    test = evaluate(out, cache, split="test", tta=tta, progress=False, plot=tmp / "c.png")
    return {
        "name": name, "val_acc": m["val_acc_tta"] if tta else m["val_acc"], "test_acc": test["accuracy"],
        "test_errors": test["images"] - round(test["accuracy"] * test["images"]), "best": m.get("best"),
        "best_epoch": m.get("best_epoch"), "refit": m.get("refit"), "train_s": seconds, "metrics": m,
    }  # fmt: skip


def _ties(cache: Path, tmp: Path, row: dict, views: str) -> list[dict]:
    """The sweep heads tied at the best validation accuracy, each trained alone and tested."""
    table = row["metrics"]["sweep"]
    top = max(r["best_val_acc"] for r in table)
    tied = [r for r in table if r["best_val_acc"] == top]
    out = []
    for r in tied:
        alone = _row("", cache, tmp, views == "use", lr=r["lr"], weight_decay=r["weight_decay"], views=views)  # fmt: skip
        out.append({**{k: r[k] for k in ("lr", "weight_decay", "best_val_loss")}, "test_acc": alone["test_acc"]})  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("data", help="an image folder, or 'digits'")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--name", required=True, help="results: head_protocol_NAME.md")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        data = write_digits(tmp / "digits") if args.data == "digits" else Path(args.data)
        t0 = time.perf_counter()
        plain = extract(data, out=tmp / "plain.h5", backbone=args.backbone, image_size=args.image_size, progress=False)  # fmt: skip
        plain_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        extract(data, out=tmp / "full.h5", backbone=args.backbone, image_size=args.image_size, views=args.views, progress=False)  # fmt: skip
        views_s = time.perf_counter() - t0
        cache, n_train, n_test = _protocol_cache(tmp / "full.h5", tmp / "protocol.h5")
        sweep = {"lr": LRS, "weight_decay": WDS}
        rows = []
        for views in ("ignore", "use"):
            tta, tag = views == "use", " + views + TTA" if views == "use" else ""
            rows.append(_row(f"linear{tag}", cache, tmp, tta, views=views))
            rows.append(_row(f"linear{tag} --refit", cache, tmp, tta, views=views, refit=True))
            rows.append(_row(f"4x4 sweep{tag}", cache, tmp, tta, views=views, **sweep))
            rows[-1]["ties"] = _ties(cache, tmp, rows[-1], views)
            rows.append(_row(f"4x4 sweep{tag} --refit", cache, tmp, tta, views=views, refit=True, **sweep))  # fmt: skip
            tag = " + TTA" if views == "use" else ""  # logreg fits the plain features alone
            rows.append(_row(f"logreg{tag}", cache, tmp, tta, head="logreg", views=views))
            rows.append(_row(f"logreg{tag} --refit", cache, tmp, tta, head="logreg", views=views, refit=True))  # fmt: skip
    md = _markdown(args, rows, n_train, n_test, plain_s, views_s, plain.images)
    for r in rows:
        r.pop("metrics")
    payload = {"rows": rows, "extract_s": {"plain": plain_s, "views": views_s}, "n_train": n_train, "n_test": n_test}  # fmt: skip
    print(save(f"head_protocol_{args.name}", payload, md).read_text())


def _markdown(args, rows: list[dict], n_train: int, n_test: int, plain_s: float, views_s: float, images: int) -> str:  # fmt: skip
    n_val = round(0.2 * n_train)
    lines = [
        f"`{args.backbone}` on {args.name}: heads trained on ~{n_train - n_val} images, chosen on ~{n_val} held out of them, scored once on {n_test} test images. "
        f"Extract of all {images} images: plain {plain_s:.1f} s, with `--views {args.views}` {views_s:.1f} s ({views_s / plain_s:.2f}x: {args.views} more forward passes per train image, 1 per test image).",
        "",
        "| head | val acc (selection) | test acc | test errors | chosen | refit on train+val |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]  # fmt: skip
    for r in rows:
        chosen = ", ".join(f"{k} {v:g}" for k, v in (r["best"] or {}).items())
        if r["best_epoch"]:
            chosen += f", epoch {r['best_epoch']}"
        refit = f"{r['refit']['images']} images" + (f", {r['refit']['epochs']} epochs" if "epochs" in r["refit"] else "") if r["refit"] else ""  # fmt: skip
        lines.append(f"| {r['name']} | {100 * r['val_acc']:.2f}% | {100 * r['test_acc']:.2f}% | {r['test_errors']} | {chosen} | {refit} |")  # fmt: skip
    for r in rows:
        if r.get("ties"):
            lines += ["", f"{r['name']}: {len(r['ties'])} of {len(LRS) * len(WDS)} heads tied at the best validation accuracy; the lowest validation loss wins:", "",
                      "| lr | weight decay | val loss | test acc (trained alone) |", "| ---: | ---: | ---: | ---: |"]  # fmt: skip
            lines += [f"| {t['lr']:g} | {t['weight_decay']:g} | {t['best_val_loss']:.4f} | {100 * t['test_acc']:.2f}% |" for t in sorted(r["ties"], key=lambda t: t["best_val_loss"])]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
