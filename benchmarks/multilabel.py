"""Several labels per image, from real photos: grocery81 with three labels a photo (its fine
class, its coarse class and its kind, from the set's classes.csv: Golden-Delicious, Apple,
Fruit), the default head against scikit-learn's one-vs-rest logistic regression on the same
features.

    python benchmarks/multilabel.py ../shared/data/grocery81

Writes a manifest (path,labels,split; labels joined by '|', the set's own files by absolute
path) in a work folder, never in the set. The set is extracted once through that manifest
(efficientnet_lite0), train-head trains the
default head (chosen on val), evaluate scores it on test. The reference is
OneVsRestClassifier(LogisticRegression) on the same standardised features, its C chosen on
val by mAP over a grid, then scored on test. Both: mAP (the mean over classes of average
precision), micro and macro F1 (the head at its per-class thresholds chosen on val; the
reference at 0.5 and at thresholds chosen on val the same way), CPU time.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import save

from embedcache import evaluate, extract, open_cache, train_head
from embedcache.multilabel import choose_thresholds, f1_scores, mean_average_precision

C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def write_manifest(data: Path, out: Path) -> tuple[Path, list[str]]:
    """DATA/<split>/<fine>/<file> as rows of (absolute path, fine|coarse|kind, split)."""
    kinds = {}
    with (data / "classes.csv").open() as f:
        for row in csv.DictReader(f):
            kinds[row["fine"]] = (row["coarse"], row["kind"])
    rows = []
    for split in ("train", "val", "test"):
        for folder in sorted((data / split).iterdir()):
            if not folder.is_dir():
                continue
            coarse, kind = kinds[folder.name]
            labels = "|".join(dict.fromkeys([folder.name, coarse, kind]))  # fine may equal coarse
            for f in sorted(folder.iterdir()):
                rows.append((str(f.resolve()), labels, split))
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels", "split"])
        w.writerows(rows)
    return out, sorted({label for _, labels, _ in rows for label in labels.split("|")})


def _sklearn(cache: Path) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    with open_cache(cache) as c:
        x = {s: c.features(s)[:].astype(np.float32) for s in ("train", "val", "test")}
        y = {s: c.label_matrix(s) for s in ("train", "val", "test")}
    scaler = StandardScaler().fit(x["train"])
    x = {s: scaler.transform(v) for s, v in x.items()}
    keep = y["train"].any(0)  # a class with no positive in train cannot be fitted one-vs-rest
    t0 = time.process_time()
    best = None
    for C in C_GRID:
        clf = OneVsRestClassifier(LogisticRegression(C=C, max_iter=1000)).fit(
            x["train"], y["train"][:, keep]
        )
        probs = np.zeros(y["val"].shape)
        probs[:, keep] = clf.predict_proba(x["val"])
        m = mean_average_precision(probs, y["val"])
        if best is None or m > best[0]:
            best = (m, C, clf)
    cpu = time.process_time() - t0
    _, C, clf = best
    probs = {s: np.zeros(y[s].shape) for s in ("val", "test")}
    for s in probs:
        probs[s][:, keep] = clf.predict_proba(x[s])
    th = choose_thresholds(probs["val"], y["val"])
    return {
        "C": C,
        "val_map": best[0],
        "map": mean_average_precision(probs["test"], y["test"]),
        "at_half": f1_scores(probs["test"] >= 0.5, y["test"]),
        "at_val_thresholds": f1_scores(probs["test"] >= th, y["test"]),
        "cpu_s": cpu,
    }


def _extracted(seconds: float) -> str:
    # an up-to-date cache answers at once: the work folder kept it from an earlier run
    return f"{seconds:.0f} s" if seconds > 5 else "the cache of an earlier run, up to date"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data", type=Path)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--work", type=Path, help="keep the manifest and cache here")
    args = p.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        manifest, names = write_manifest(args.data, work / "labels.csv")
        cache = work / "multilabel.h5"
        t = time.perf_counter()
        extract(manifest, out=cache, backbone=args.backbone, device="cpu", progress=False)
        extract_s = time.perf_counter() - t
        t0, c0 = time.perf_counter(), time.process_time()
        r = train_head(cache, out=work / "head.pt", device="cpu", progress=False)
        head_s, head_cpu = time.perf_counter() - t0, time.process_time() - c0
        test = evaluate(work / "head.pt", cache, split="test", progress=False, plot=work / "p.png")
        ref = _sklearn(cache)
        with open_cache(cache) as c:
            sizes = {s: c.num_images(s) for s in c.splits}
    m = r.metrics
    ours = {
        "chosen": m.get("auto", {}).get("chosen"),
        "val_map": m["val_map"],
        "map": test["map"],
        "micro_f1": test["micro_f1"],
        "macro_f1": test["macro_f1"],
        "cpu_s": head_cpu,
        "wall_s": head_s,
        "calibration": m.get("calibration"),
        "test_calibration": test["calibration"],
    }
    md = [
        f"grocery81 as a multi-label set: {len(names)} labels (81 fine classes, their coarse "
        f"classes and kinds), 2 or 3 per photo; images {sizes}. Features: {args.backbone}, "
        f"extracted once through the manifest ({_extracted(extract_s)}). Load average {load:.2f} "
        "at the start.",
        "",
        "| head | test mAP | micro F1 | macro F1 | val mAP | CPU s |",
        "|---|---:|---:|---:|---:|---:|",
        f"| embedcache default head ({ours['chosen']}; thresholds chosen on val) "
        f"| {ours['map']:.2%} | {ours['micro_f1']:.2%} | {ours['macro_f1']:.2%} "
        f"| {ours['val_map']:.2%} | {ours['cpu_s']:.1f} |",
        f"| scikit-learn OneVsRest(LogisticRegression), C={ref['C']:g} chosen on val, at 0.5 "
        f"| {ref['map']:.2%} | {ref['at_half']['micro_f1']:.2%} "
        f"| {ref['at_half']['macro_f1']:.2%} | {ref['val_map']:.2%} | {ref['cpu_s']:.1f} |",
        f"| the same, thresholds chosen on val | {ref['map']:.2%} "
        f"| {ref['at_val_thresholds']['micro_f1']:.2%} "
        f"| {ref['at_val_thresholds']['macro_f1']:.2%} | | |",
        "",
        "CPU s: the head's training and choice (train-head), and the reference's fits over its "
        f"{len(C_GRID)} values of C (process CPU time, both threads).",
    ]
    cal, tc = ours["calibration"], ours["test_calibration"]
    md.append(
        f"\nCalibration of the default head (one temperature fitted on val, every (image, "
        f"label) probability in 15 bins): T = {cal['temperature']:.3f}; val ECE "
        f"{cal['val_ece_before']:.2%} -> {cal['val_ece_after']:.2%}, test ECE "
        f"{tc['ece_before']:.2%} -> {tc['ece_after']:.2%}."
    )
    save("multilabel_grocery81", {"ours": ours, "sklearn": ref, "sizes": sizes}, "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
