"""Ranking backbones cheaply: does kNN accuracy on a small subsample order backbones as their
full default-head test accuracy does, and in what share of the time?

    OMP_WAIT_POLICY=PASSIVE nohup nice -n 10 .venv/bin/python benchmarks/rank_backbones.py \
        > rank_backbones.log 2>&1 &

OMP_WAIT_POLICY=PASSIVE: on 2 cores busy with another process, torch's OpenMP threads spin
while they wait and a niced extract ran 9x slower (mobilenet_v3_small over hymenoptera's 398
images: 47.9 s wall and 47.7 s CPU spinning, 5.1 s and 4.8 s passive, load average 3.5).

For every photo set in ../shared/data and every backbone (efficientnet_lite0/1/2 with their
offline ImageNet weights; resnet18 and mobilenet_v3_small random-init as a sanity floor):

- cheap: `rank_backbones` with --per-class K (each K in a fresh work folder, so every backbone
  is extracted): 5-fold kNN and linear-probe accuracy on K training images per class, and the
  wall time of each backbone's extract + scoring;
- full: `extract` over the whole set, `train_head` (the default head) and `evaluate` on the
  test split (hymenoptera: its val split, the head trained on train without refit; flowers12:
  test, validation held out of train; grocery81: test, as its val lacks 21 classes), and the
  wall time of the three.

Then Spearman's rho and Kendall's tau (scipy.stats, ties averaged) between each cheap score
and the full accuracy, per set and pooled over every (set, backbone), and the ratio of the
cheap ranking's time to the full grid's. Default image sizes, CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import save
from scipy import stats

from embedcache import evaluate, extract, rank_backbones, train_head

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {  # name: (split the full head is scored on, train_head options)
    "hymenoptera": ("val", {"refit": False}),
    "flowers12": ("test", {}),
    "grocery81": ("test", {}),
}
BACKBONES = (
    ("efficientnet_lite0", "DEFAULT"),
    ("efficientnet_lite1", "DEFAULT"),
    ("efficientnet_lite2", "DEFAULT"),
    ("resnet18", "none"),
    ("mobilenet_v3_small", "none"),
)
HEADLINE_K = 20


def _warm_imports() -> None:
    """Import what the first head report and the first backbone would otherwise pay for."""
    import matplotlib.figure  # noqa: F401
    import sklearn.metrics  # noqa: F401

    from embedcache.backbones import build_backbone

    build_backbone("resnet18", weights="none")


def cheap(data: Path, work: Path, per_class: int) -> dict:
    """The cheap ranking of every backbone at ``per_class``, from nothing cached: one
    rank_backbones call per backbone in one work folder, so that each backbone's wall and CPU
    seconds are measured around its own call (the scan and the manifest included)."""
    rows, load = [], os.getloadavg()[0]
    for backbone, weights in BACKBONES:
        t, cpu = time.perf_counter(), time.process_time()
        ranking = rank_backbones(
            data,
            workdir=work,
            backbones=[backbone],
            weights=weights,
            per_class=per_class,
            device="cpu",
            progress=False,
        )
        row = ranking.as_dict()["rows"][0]
        row["wall_s"], row["cpu_s"] = time.perf_counter() - t, time.process_time() - cpu
        rows.append(row)
    rows.sort(key=lambda r: (-r["knn_acc"], -r["probe_acc"], r["name"]))
    out = {k: v for k, v in ranking.as_dict().items() if k not in ("rows", "seconds")}
    out |= {"rows": rows, "loadavg_1min_before": load}
    for i, r in enumerate(rows, 1):
        print(
            f"  {i}. {r['name']:<26} kNN {r['knn_acc']:.3f}  probe {r['probe_acc']:.3f}  "
            f"{r['wall_s']:6.1f} s wall  {r['cpu_s']:6.1f} s CPU",
            flush=True,
        )
    return out


def full(data: Path, work: Path, backbone: str, weights: str, name: str) -> dict:
    """Extract the whole set, train the default head, evaluate it: accuracy and seconds."""
    split, options = SETS[name]
    cache, head = work / f"{backbone}.h5", work / f"{backbone}.pt"
    load, t0, c0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
    extract(data, out=cache, backbone=backbone, weights=weights, device="cpu", progress=False)
    t1 = time.perf_counter()
    m = train_head(cache, out=head, device="cpu", progress=False, **options).metrics
    t2 = time.perf_counter()
    test = evaluate(head, cache, split=split, tta=False, progress=False)
    t3, c3 = time.perf_counter(), time.process_time()
    row = {"backbone": backbone, "weights": weights, "split": split, "images": test["images"]}
    row["loadavg_1min_before"] = load
    row |= {"accuracy": test["accuracy"], "val_acc": m.get("val_acc")}
    row |= {"extract_s": t1 - t0, "head_s": t2 - t1, "evaluate_s": t3 - t2, "seconds": t3 - t0}
    row["cpu_s"] = c3 - c0
    print(
        f"  full {backbone} ({weights}): {split} acc {test['accuracy']:.4f} in {t3 - t0:.1f} s "
        f"wall, {c3 - c0:.1f} s CPU",
        flush=True,
    )
    return row


def correlation(a: list[float], b: list[float]) -> dict:
    """Spearman's rho and Kendall's tau (tau-b, ties averaged) of two equal-length lists."""
    rho = stats.spearmanr(a, b).statistic
    tau = stats.kendalltau(a, b).statistic
    return {"rho": float(rho), "tau": float(tau), "n": len(a)}


def _label(backbone: str, weights: str) -> str:
    return backbone if weights == "DEFAULT" else f"{backbone} ({weights})"


def one_set(data: Path, work: Path, ks: list[int]) -> dict:
    """Every K's cheap ranking, then the full grid, on one photo set."""
    name = data.name
    result = {"set": name, "cheap": {}, "full": []}
    for k in ks:
        print(f"{name}: cheap ranking, {k} per class", flush=True)
        result["cheap"][k] = cheap(data, work / f"rank{k}", k)
    print(f"{name}: full grid", flush=True)
    (work / "full").mkdir(parents=True, exist_ok=True)
    for backbone, weights in BACKBONES:
        result["full"].append(full(data, work / "full", backbone, weights, name))
    shutil.rmtree(work, ignore_errors=True)
    return result


def scored(result: dict, k: int) -> list[dict]:
    """One row per backbone (in BACKBONES order): cheap scores at ``k`` beside the full run."""
    by_name = {r["name"]: r for r in result["cheap"][k]["rows"]}
    rows = []
    for (backbone, weights), f in zip(BACKBONES, result["full"], strict=True):
        c = by_name[_label(backbone, weights)]
        rows.append(
            {
                "name": _label(backbone, weights),
                "knn": c["knn_acc"],
                "probe": c["probe_acc"],
                "cheap_s": c["wall_s"],
                "cheap_cpu_s": c["cpu_s"],
                "full": f["accuracy"],
                "full_s": f["seconds"],
                "full_cpu_s": f["cpu_s"],
                "real": weights != "none",
            }
        )
    return rows


def summary(results: list[dict], ks: list[int]) -> dict:
    """Correlations and time ratios per set and K, and pooled over the sets."""
    out = {}
    for k in ks:
        per_set, pooled = {}, []
        for r in results:
            rows = scored(r, k)
            pooled += rows
            per_set[r["set"]] = _stats(rows)
        out[k] = {"per_set": per_set, "pooled": _stats(pooled)}
    return out


def _stats(rows: list[dict]) -> dict:
    full = [r["full"] for r in rows]
    cheap_s, full_s = sum(r["cheap_s"] for r in rows), sum(r["full_s"] for r in rows)
    cheap_cpu, full_cpu = sum(r["cheap_cpu_s"] for r in rows), sum(r["full_cpu_s"] for r in rows)
    return {
        "knn": correlation([r["knn"] for r in rows], full),
        "probe": correlation([r["probe"] for r in rows], full),
        "cheap_s": cheap_s,
        "full_s": full_s,
        "ratio": cheap_s / full_s,
        "cheap_cpu_s": cheap_cpu,
        "full_cpu_s": full_cpu,
        "cpu_ratio": cheap_cpu / full_cpu,
    }


def _order(rows: list[dict], key: str) -> str:
    """``lite1 = lite2 > lite0 > ...``: the rows by ``key``, best first, ties joined by ``=``."""
    ranked = sorted(rows, key=lambda r: -r[key])
    out = ""
    for i, r in enumerate(ranked):
        if i:
            out += " = " if r[key] == ranked[i - 1][key] else " > "
        out += r["name"].split(" (")[0].replace("efficientnet_", "")
    return out


def lite_only(results: list[dict], k: int) -> dict:
    """Per set, among the pretrained backbones alone: Kendall's tau of kNN against the full
    accuracy, and whether kNN's first is (one of) the full accuracy's best."""
    out = {}
    for r in results:
        rows = [row for row in scored(r, k) if row["real"]]
        best = max(row["full"] for row in rows)
        first = max(rows, key=lambda row: row["knn"])
        tau = correlation([row["knn"] for row in rows], [row["full"] for row in rows])["tau"]
        out[r["set"]] = {"tau": tau, "first_is_best": first["full"] == best}
    return out


def findings(results: list[dict], ks: list[int], table: dict) -> list[str]:
    """What the tables say, in words: the random-init floor, the pretrained order, the time."""
    floor = [
        all(f["knn"] < min(x["knn"] for x in rows if x["real"]) for f in rows if not f["real"])
        for k in ks
        for rows in (scored(r, k) for r in results)
    ]
    full_floor = all(
        f["full"] < min(x["full"] for x in rows if x["real"])
        for rows in (scored(r, ks[0]) for r in results)
        for f in rows
        if not f["real"]
    )
    lines = [
        f"- The random-init nets ranked below all three pretrained ones in {sum(floor)} of "
        f"{len(floor)} cheap kNN rankings (every set, every K) and "
        f"{'in every' if full_floor else 'not in every'} full run.",
    ]
    for k in ks:
        lite = lite_only(results, k)
        firsts = sum(v["first_is_best"] for v in lite.values())
        taus = ", ".join(f"{n} {v['tau']:.2f}" for n, v in lite.items())
        lines.append(
            f"- K = {k}: among lite0/1/2 alone kNN's first was the full accuracy's best on "
            f"{firsts} of {len(lite)} sets; Kendall's tau of the three {taus}."
        )
    under = [k for k in ks if table[k]["pooled"]["cpu_ratio"] < 0.1]
    lines.append(
        "- Under a tenth of the full grid's CPU time (pooled): "
        + (", ".join(f"K = {k} ({table[k]['pooled']['cpu_ratio']:.3f})" for k in under) or "none")
        + "; the ratio follows the share of the images the subsample holds, plus about a second "
        "per backbone of fixed cost (building it, the scan, the cross-validations)."
    )
    return lines


def markdown(results: list[dict], ks: list[int], table: dict, meta: dict) -> str:
    load, end, policy = meta["loadavg_start"], meta["loadavg_end"], meta["omp_wait_policy"]
    k = HEADLINE_K if HEADLINE_K in table else ks[-1]
    head = table[k]
    p = head["pooled"]
    lines = [
        f"With {k} training images per class, the cheap kNN score ranked the {len(BACKBONES)} "
        f"backbones with Spearman's rho {p['knn']['rho']:.2f} (Kendall's tau "
        f"{p['knn']['tau']:.2f}) against the full default-head test accuracy, pooled over "
        f"{len(results)} photo sets (per set: "
        + ", ".join(f"{n} {s['knn']['rho']:.2f}" for n, s in head["per_set"].items())
        + f"), in {p['cpu_ratio']:.2f} of the full grid's CPU time ({p['cheap_cpu_s']:.0f} s "
        f"against {p['full_cpu_s']:.0f} s; {p['ratio']:.2f} of its wall time).",
        "",
        *findings(results, ks, table),
        "",
        f"Load average at the start: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} (1, 5, 15 min), "
        f"at the end: {end[0]:.2f}, {end[1]:.2f}, {end[2]:.2f}; 2 cores shared with another "
        f"session's runs, this one under `nice -n 10` with OMP_WAIT_POLICY={policy or 'unset'}, "
        "so its wall time stretched whenever "
        "they ran: CPU seconds (this process, all its threads: time.process_time) are the "
        "steadier measure and the ratio to read. A cheap row is one rank_backbones call for the "
        "backbone from an empty cache (scan, manifest, backbone built, subsample extracted, both "
        "5-fold cross-validations); a full row is extract of the whole set + train_head (the "
        "default head) + evaluate. Pooled correlations are over every (set, backbone) pair, so "
        "they also reward telling an easy set from a hard one; the per-set rows are the ranking "
        "question itself.",
        "",
        "## Rank correlation with the full default-head accuracy",
        "",
        "| set | K per class | kNN rho | kNN tau | probe rho | probe tau | cheap CPU s | "
        "full CPU s | CPU ratio | cheap wall s | full wall s | wall ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kk in ks:
        rows = list(table[kk]["per_set"].items()) + [("pooled", table[kk]["pooled"])]
        for name, s in rows:
            lines.append(
                f"| {name} | {kk} | {s['knn']['rho']:.2f} | {s['knn']['tau']:.2f} | "
                f"{s['probe']['rho']:.2f} | {s['probe']['tau']:.2f} | {s['cheap_cpu_s']:.0f} | "
                f"{s['full_cpu_s']:.0f} | {s['cpu_ratio']:.3f} | {s['cheap_s']:.0f} | "
                f"{s['full_s']:.0f} | {s['ratio']:.3f} |"
            )
    for kk in ks:
        lines += ["", f"## Per backbone, {kk} per class", ""]
        for r in results:
            lines += _set_table(r, kk)
    return "\n".join(lines)


def _set_table(result: dict, k: int) -> list[str]:
    rows = scored(result, k)
    split = SETS[result["set"]][0]
    full_rows = {_label(f["backbone"], f["weights"]): f for f in result["full"]}
    images = result["cheap"][k]["images"]
    lines = [
        f"**{result['set']}**: cheap on {images} training images; full scored on "
        f"{result['full'][0]['images']} {split} images. kNN order: {_order(rows, 'knn')}; "
        f"probe order: {_order(rows, 'probe')}; full order: {_order(rows, 'full')}.",
        "",
        "| backbone | kNN acc | probe acc | cheap CPU s | cheap wall s | full acc | full CPU s "
        "| full wall s (extract + head + evaluate) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        f = full_rows[r["name"]]
        lines.append(
            f"| {r['name']} | {r['knn']:.3f} | {r['probe']:.3f} | {r['cheap_cpu_s']:.1f} | "
            f"{r['cheap_s']:.1f} | {r['full']:.4f} | {f['cpu_s']:.1f} | {f['seconds']:.1f} "
            f"({f['extract_s']:.1f} + {f['head_s']:.1f} + {f['evaluate_s']:.1f}) |"
        )
    return [*lines, ""]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, default=DATA, help="folder of the photo sets")
    p.add_argument("--sets", default=",".join(SETS))
    p.add_argument("--per-class", default="5,10,20", help="K values, comma-separated")
    p.add_argument("--name", default="rank_backbones_cpu")
    args = p.parse_args()
    ks = [int(k) for k in args.per_class.split(",")]
    load = os.getloadavg()
    _warm_imports()
    results = []
    with tempfile.TemporaryDirectory(prefix="rank_backbones_") as tmp:
        for name in args.sets.split(","):
            results.append(one_set(args.data / name, Path(tmp) / name, ks))
    table, end = summary(results, ks), os.getloadavg()
    payload = {
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_start": load,
        "loadavg_end": end,
        "backbones": [list(b) for b in BACKBONES],
        "per_class": ks,
        "summary": {str(k): v for k, v in table.items()},
        "results": [r | {"cheap": {str(k): v for k, v in r["cheap"].items()}} for r in results],
    }
    print(save(args.name, payload, markdown(results, ks, table, payload)).read_text())


if __name__ == "__main__":
    main()
