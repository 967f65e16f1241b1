"""Heads on a test set they were never chosen on: the default head against every other head.

    python benchmarks/head_protocol.py ../shared/data/grocery81 --name grocery81
    python benchmarks/head_protocol.py ../shared/data/flowers12 --name flowers12
    python benchmarks/head_protocol.py ../shared/data/hymenoptera --name hymenoptera
    python benchmarks/head_protocol.py digits --image-size 64 --name digits

The protocol of Kornblith et al. (2019): each head's configuration is chosen on validation
(DATA's val split when it has one as well as a test split, else 20% of train held out,
stratified and seeded), optionally refitted on train + val, and scored once on the test set
(DATA's test split; hymenoptera's val/, which the tutorials test on; for digits 20% held out
first). Every row is a `train-head` configuration scored with `evaluate`: top-1, balanced
accuracy (mean per-class recall) and top-5 beyond five classes. With --finetune, the default
head is also reattached and fine-tuned (`finetune --unfreeze N`) and the model scored on the
test images. --work keeps the extracted caches between runs.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from common import save

from embedcache import evaluate, extract, finetune, open_cache, train_head, write_cache
from embedcache.data import holdout
from embedcache.quickstart import write_digits
from embedcache.train import describe_choice

SWEEP = {"lr": (1e-3, 3e-3, 1e-2, 3e-2), "weight_decay": (0.0, 1e-4, 1e-3, 1e-2)}
ROWS = [  # (name, train_head options)
    ("default", {}),
    ("default --refit", {"refit": True}),
    ("default --no-refit", {"refit": False}),
    ("linear (AdamW, the old default)", {"head": "linear", "refit": False}),
    ("linear --refit", {"head": "linear", "refit": True}),
    ("mlp", {"head": "mlp", "refit": False}),
    ("mlp --refit", {"head": "mlp", "refit": True}),
    ("4x4 linear sweep", {"head": "linear", "refit": False, **SWEEP}),
    ("4x4 linear sweep --refit", {"head": "linear", "refit": True, **SWEEP}),
    ("logreg (45 strengths)", {"head": "logreg", "refit": False}),
    ("logreg --refit", {"head": "logreg", "refit": True}),
    ("knn", {"head": "knn", "refit": False}),
]


def _protocol_cache(full: Path, out: Path) -> tuple[Path, dict]:
    """A cache with train, val (when DATA has both val and test) and test splits."""
    with open_cache(full) as c:
        parts = {s: (c.features(s)[:], c.labels(s), c.paths(s)) for s in c.splits}
        meta = {"classes": c.classes, "backbone": c.backbone, "weights": c.weights}
        meta["transform"] = c.transform
    if "test" not in parts:  # hymenoptera: val/ is the test set; digits: extract held it out
        parts["test"] = parts.pop("val")
    write_cache(out, parts, **meta)
    return out, {s: len(p[1]) for s, p in parts.items()}


def _digits(root: Path) -> Path:
    """The digits as train/ and test/ folders (20% held out, seeded), so finetune sees both."""
    flat = write_digits(root / "flat")
    files = sorted(p for p in flat.rglob("*.png"))
    paths = [str(p.relative_to(flat)) for p in files]
    labels = np.array([int(p.parent.name) for p in files])
    _, test = holdout(paths, labels, fraction=0.2, seed=1)
    test = set(test.tolist())
    for i, (p, rel) in enumerate(zip(files, paths, strict=True)):
        dest = root / "split" / ("test" if i in test else "train") / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            shutil.copyfile(p, dest)
    return root / "split"


def _row(name: str, cache: Path, tmp: Path, options: dict) -> dict:
    out = tmp / f"{len(list(tmp.glob('*.pt')))}.pt"
    t = time.perf_counter()
    m = train_head(cache, out=out, device="cpu", progress=False, **options).metrics
    seconds = time.perf_counter() - t
    test = evaluate(out, cache, split="test", tta=False, progress=False, plot=tmp / "c.png")
    return {
        "name": name,
        "val_acc": m["val_acc"],
        **{k: test.get(k) for k in ("accuracy", "balanced_accuracy", "top5", "images")},
        "errors": test["images"] - round(test["accuracy"] * test["images"]),
        "chosen": _chosen(m),
        "refit": m.get("refit", {}).get("images"),
        "train_s": seconds,
        "head": out,
    }


def _chosen(m: dict) -> str:
    best = ", ".join(f"{k} {v:.3g}" for k, v in (m.get("best") or {}).items())
    if "auto" in m:
        best = f"{describe_choice(m['auto'])}; {best}"
    return best + (f", epoch {m['best_epoch']}" if m.get("best_epoch") else "")


def _finetune_row(data: Path, head: Path, tmp: Path, args) -> dict:
    unfreeze, epochs = args.finetune, args.finetune_epochs
    t = time.perf_counter()
    r = finetune(
        data,
        head=str(head),
        backbone=args.backbone,
        weights="DEFAULT",  # the protocol cache records the weights' name, not the --weights value
        image_size=args.image_size,
        unfreeze=unfreeze,
        epochs=epochs,
        out=tmp / "model.pt",
        device="cpu",
        progress=False,
    )
    seconds = time.perf_counter() - t
    test = evaluate(tmp / "model.pt", data, split="test", progress=False, plot=tmp / "c.png")
    return {
        "name": f"default head + finetune --unfreeze {unfreeze} ({epochs} epochs max)",
        "val_acc": r.metrics["val_acc"],
        **{k: test.get(k) for k in ("accuracy", "balanced_accuracy", "top5", "images")},
        "errors": test["images"] - round(test["accuracy"] * test["images"]),
        "chosen": f"epoch {r.metrics['best_epoch']}",
        "refit": None,
        "train_s": seconds,
    }


def parser(doc: str, results: str) -> argparse.ArgumentParser:
    """The arguments of this script and of head_seeds.py: DATA, --backbone, --image-size,
    --name (of the results file ``results_NAME.md``), --work."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data", help="an image folder, or 'digits'")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--name", required=True, help=f"results: {results}_NAME.md")
    p.add_argument("--work", type=Path, default=None, help="keep extracted caches here")
    return p


def prepared(args, tmp: Path) -> tuple[Path, Path, dict]:
    """(image folder, protocol cache in ``tmp``, its split sizes): DATA (the digits written
    as folders for 'digits') extracted once into --work (default ``tmp``)."""
    work = args.work or tmp
    work.mkdir(parents=True, exist_ok=True)
    data = _digits(work / "digits") if args.data == "digits" else Path(args.data)
    full = work / f"{args.name}_{args.backbone}.h5"
    extract(data, out=full, backbone=args.backbone, image_size=args.image_size, progress=False)
    return data, *_protocol_cache(full, tmp / "protocol.h5")


def main() -> None:
    p = parser(__doc__, "head_protocol")
    p.add_argument("--finetune", default=None, metavar="N", help="also finetune --unfreeze N")
    p.add_argument("--finetune-epochs", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        data, cache, sizes = prepared(args, tmp)
        rows = [_row(name, cache, tmp, options) for name, options in ROWS]
        if args.finetune is not None and (Path(data) / "test").is_dir():
            _save(args, rows, sizes)  # the heads' rows, in case finetune fails
            rows.append(_finetune_row(data, rows[0]["head"], tmp, args))
    _save(args, rows, sizes)


def _save(args, rows: list[dict], sizes: dict) -> None:
    rows = [{k: v for k, v in r.items() if k != "head"} for r in rows]
    payload = {"rows": rows, "splits": sizes}
    print(save(f"head_protocol_{args.name}", payload, _markdown(args, rows, sizes)).read_text())


def _markdown(args, rows: list[dict], sizes: dict) -> str:
    val = f"{sizes['val']} val images" if "val" in sizes else "20% of train held out"
    one = 100 / sizes["test"]
    lines = [
        f"`{args.backbone}` on {args.name}: {sizes['train']} train images, chosen on {val}, "
        f"scored once on {sizes['test']} test images (one test image = {one:.2f} points).",
        "",
        "| head | val acc (selection) | test top-1 | balanced | top-5 | test errors | chosen "
        "| refit on | train s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        top5 = f"{100 * r['top5']:.2f}%" if r.get("top5") is not None else ""
        refit = f"{r['refit']} images" if r["refit"] else ""
        lines.append(
            f"| {r['name']} | {100 * r['val_acc']:.2f}% | {100 * r['accuracy']:.2f}% | "
            f"{100 * r['balanced_accuracy']:.2f}% | {top5} | {r['errors']} | {r['chosen']} | "
            f"{refit} | {r['train_s']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
