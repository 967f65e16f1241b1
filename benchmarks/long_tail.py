"""Skewed classes: a photo set's train split cut to a long tail, heads with and without balanced
class weights, scored on the untouched test split.

    python benchmarks/long_tail.py ../shared/data/grocery81 ../shared/data/flowers12

For each set the train split is cut, seeded, to a RATIO:1 long tail: the largest class keeps
RATIO images, the others (in a seeded random order) an exponentially falling share down to 1
image (each at most what it has); validation and test are not cut, as a user's would not be.
Rows: the default head as it decides by itself (it tries balanced weights where the largest
class is over 5x the smallest), the default head forced to none and to balanced, and the
linear head with the balanced sampler. Each is chosen on validation and scored once on test
(balanced accuracy, the mean per-class recall, first). The uncut set's default head is the
reference. --work keeps the extracted caches between runs.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
from common import save

from embedcache import evaluate, extract, open_cache, train_head

ROWS = [  # (name, train_head options)
    ("default (decides by itself)", {}),
    ("default --class-weight none", {"class_weight": "none"}),
    ("default --class-weight balanced", {"class_weight": "balanced"}),
    (
        "linear --sampler balanced",
        {"head": "linear", "sampler": "balanced", "class_weight": "none"},
    ),
    ("linear", {"head": "linear", "class_weight": "none"}),
]


def long_tail(labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Rows of train kept: the largest class keeps ``ratio`` images (or all it has), class k
    of C in a seeded order ``ratio ** (1 - k / (C - 1))`` of them, at least 1."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    counts = np.bincount(labels)
    first = classes[np.argmax(counts[classes])]  # the one class sure to have the most
    order = [first, *rng.permutation([c for c in classes if c != first])]
    kept = []
    for k, c in enumerate(order):
        want = max(1, round(ratio ** (1 - k / (len(order) - 1))))
        rows = np.flatnonzero(labels == c)
        kept.append(rng.permutation(rows)[: min(want, len(rows))])
    return np.sort(np.concatenate(kept))


def _exclusion(cache: Path, kept: np.ndarray, out: Path) -> Path:
    with open_cache(cache) as c:
        paths = c.paths("train")
    drop = sorted(set(range(len(paths))) - set(kept.tolist()))
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"])
        w.writerows([paths[i]] for i in drop)
    return out


def _row(name, cache, tmp: Path, options: dict) -> dict:
    out = tmp / f"{len(list(tmp.glob('*.pt')))}.pt"
    t = time.perf_counter()
    m = train_head(cache, out=out, device="cpu", progress=False, **options).metrics
    seconds = time.perf_counter() - t
    test = evaluate(out, cache, split="test", tta=False, progress=False, plot=tmp / "c.png")
    recall = sorted(c["recall"] for c in test["per_class"].values() if c["support"])
    return {
        "name": name,
        "weights": m["class_weight"]["used"],
        "tried": m["class_weight"].get("val_balanced_acc"),
        "p_value": m["class_weight"].get("p_value"),
        "val_balanced_acc": m["val_balanced_acc"],
        "balanced_accuracy": test["balanced_accuracy"],
        "accuracy": test["accuracy"],
        "worst_recall": float(np.mean(recall[: max(1, len(recall) // 10)])),
        "temperature": m["calibration"]["temperature"],
        "test_ece_before": test["calibration"]["ece_before"],
        "test_ece_after": test["calibration"]["ece_after"],
        "train_s": round(seconds, 2),
    }


def _one_set(data: Path, work: Path, args, seed: int) -> dict:
    cache = work / f"{data.name}.h5"
    if not cache.exists():
        extract(data, out=cache, backbone=args.backbone, device="cpu", progress=False)
    with open_cache(cache) as c:
        labels, splits = c.labels("train"), c.splits
    if "test" not in splits:
        raise SystemExit(f"{data} has no test split")
    kept = long_tail(labels, args.ratio, seed)
    counts = np.bincount(labels[kept])
    counts = counts[counts > 0]
    excl = _exclusion(cache, kept, work / f"{data.name}_tail{seed}.csv")
    uncut = [{**_row("default, uncut train", cache, work, {}), "cut": False}]
    rows = uncut if seed == 0 else []
    for name, options in ROWS:
        rows.append({**_row(name, cache, work, {"exclude": str(excl), **options}), "cut": True})
    return {
        "set": data.name,
        "seed": seed,
        "train_images": int(len(labels)),
        "kept": int(len(kept)),
        "largest": int(counts.max()),
        "smallest": int(counts.min()),
        "rows": rows,
    }


def _summary(sets: list[dict]) -> str:
    """Per set, over the seeds: test balanced accuracy of each cut row, and how often the
    default head's own choice matched the better of none and balanced on test."""
    lines = [
        "| set | seeds | default (decides) | none | balanced | linear --sampler balanced "
        "| default chose the better on test |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in dict.fromkeys(s["set"] for s in sets):
        mine = [s for s in sets if s["set"] == name]
        acc = {}
        for s in mine:
            for r in s["rows"]:
                if r["cut"]:
                    acc.setdefault(r["name"], []).append(r["balanced_accuracy"])
        mean = {k: float(np.mean(v)) for k, v in acc.items()}
        none, bal = acc["default --class-weight none"], acc["default --class-weight balanced"]
        auto = acc["default (decides by itself)"]
        right = sum(a >= max(n, b) - 1e-12 for a, n, b in zip(auto, none, bal, strict=True))
        lines.append(
            f"| {name} | {len(mine)} | {mean['default (decides by itself)']:.2%} "
            f"| {mean['default --class-weight none']:.2%} "
            f"| {mean['default --class-weight balanced']:.2%} "
            f"| {mean['linear --sampler balanced']:.2%} | {right} of {len(mine)} |"
        )
    return "Mean test balanced accuracy over the seeds:\n\n" + "\n".join(lines)


def _markdown(sets: list[dict], args, load: float) -> str:
    lines = [
        f"Train cut to a {args.ratio:g}:1 long tail (seeds {args.seeds}: which classes are "
        "rare, which images kept); validation and test untouched (flowers12 has no val split: "
        f"its validation is held out of the cut train); backbone {args.backbone}. Load average "
        f"{load:.2f} at the start.",
        "",
        _summary(sets),
        "",
        "Test balanced accuracy is the mean per-class recall; 'worst 10%' the mean recall of "
        "the tenth of classes recalled worst. 'tried' is the default head's own comparison on "
        "validation (balanced accuracy without / with balanced weights, and the one-sided "
        "p-value of the weights' gain: it takes them below 0.2).",
    ]
    for s in sets:
        lines += [
            "",
            f"## {s['set']}, seed {s['seed']}: {s['kept']} of {s['train_images']} train "
            "images kept, "
            f"{s['largest']} in the largest class, {s['smallest']} in the smallest",
            "",
            "| head | train | weights | test balanced acc | test acc | worst 10% recall "
            "| val balanced acc | tried (none / balanced) | T | test ECE before -> after | s |",
            "|---|---|---|---:|---:|---:|---:|---|---:|---|---:|",
        ]
        for r in s["rows"]:
            tried = r["tried"]
            tried = f"{tried['none']:.1%} / {tried['balanced']:.1%}" if tried else ""
            tried += f", p={r['p_value']:.2g}" if r["p_value"] is not None else ""
            lines.append(
                f"| {r['name']} | {'long tail' if r['cut'] else 'all'} | {r['weights']} "
                f"| {r['balanced_accuracy']:.2%} | {r['accuracy']:.2%} | {r['worst_recall']:.1%} "
                f"| {r['val_balanced_acc']:.2%} | {tried} | {r['temperature']:.3f} "
                f"| {r['test_ece_before']:.2%} -> {r['test_ece_after']:.2%} | {r['train_s']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data", nargs="+", type=Path)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--ratio", type=float, default=50.0)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--work", type=Path, help="keep the caches here")
    args = p.parse_args()
    import os

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        seeds = [int(v) for v in args.seeds.split(",")]
        sets = [_one_set(d, work, args, seed) for d in args.data for seed in seeds]
    payload = {"ratio": args.ratio, "seeds": seeds, "sets": sets}
    save("long_tail", payload, _markdown(sets, args, load))
    print((Path(__file__).parent / "results" / "long_tail.md").read_text())


if __name__ == "__main__":
    main()
