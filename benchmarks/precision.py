"""Are heads on bf16 features as good as on fp32 ones? The paired test behind `--precision auto`.

    python benchmarks/precision.py ../shared/data/hymenoptera ../shared/data/flowers12 digits

For each data set: extract the same images twice with the same backbone (fp32 and bf16 forward
pass, float16 storage both), train each head with its defaults and the same seed on each cache,
and score both heads on the same held-out images (the test split where there is one, else val).
The two are compared image by image (a paired design: one split's noise cancels, only the
images where exactly one of the two is right count):

- the exact McNemar test, one-sided: the chance that bf16 loses this many images more than it
  wins if bf16 did no harm;
- a paired bootstrap 95% interval of the accuracy difference (bf16 - fp32, points).

Rule: `--precision auto` may use bf16 on a CPU with native bf16 unless bf16 is significantly
worse (one-sided p < ALPHA) on some data set and head, or over the sets pooled (default head).
A split that moves two images is noise, not harm; a consistent loss across sets shows in the
pooled test.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import save

HEADS = ("auto", "logreg")
ALPHA = 0.05  # one-sided: bf16 worse than fp32
BOOTSTRAP = 10_000


def _right(head_path: Path, cache_path: Path, split: str) -> np.ndarray:
    """Which images of ``split`` the saved head classifies correctly."""
    from embedcache import open_cache
    from embedcache.train import load_head

    module, _ = load_head(head_path)
    with open_cache(cache_path) as c:
        x = torch.from_numpy(np.asarray(c.features(split)[:], np.float32))
        y = c.labels(split)
    with torch.no_grad():
        return module.eval()(x).argmax(1).numpy() == y


def _held_out(cache_path: Path) -> str:
    from embedcache import open_cache

    with open_cache(cache_path) as c:
        return "test" if "test" in c.splits else "val"


def paired(fp32: np.ndarray, bf16: np.ndarray, seed: int = 0) -> dict:
    """The paired comparison of two right/wrong vectors over the same images."""
    from embedcache.train import better_p_value

    diff = bf16.astype(np.float64) - fp32.astype(np.float64)
    picks = np.random.default_rng(seed).integers(0, len(diff), (BOOTSTRAP, len(diff)))
    boot = 100 * diff[picks].mean(1)
    return {
        "images": len(diff),
        "fp32_acc": float(fp32.mean()),
        "bf16_acc": float(bf16.mean()),
        "gap_points": float(100 * diff.mean()),
        "bf16_wins": int(np.sum(bf16 & ~fp32)),
        "bf16_losses": int(np.sum(~bf16 & fp32)),
        "p_bf16_worse": better_p_value(fp32, bf16),
        "ci95_points": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
    }


def one_dataset(data: str, tmp: Path, args) -> dict:
    from embedcache import extract, train_head
    from embedcache.quickstart import DEMO_IMAGE_SIZE, write_digits

    size = DEMO_IMAGE_SIZE if data == "digits" else None
    folder = write_digits(tmp / "digits") if data == "digits" else Path(data)
    row: dict = {"data": Path(data).name, "image_size": size, "heads": {}}
    right: dict = {}
    for precision in ("fp32", "bf16"):
        out = tmp / f"{row['data']}-{precision}.h5"
        r = extract(
            folder,
            out=out,
            backbone=args.backbone,
            precision=precision,
            image_size=size,
            progress=False,
        )
        row[f"{precision}_images_per_s"] = r.images_per_s
        row["split"] = _held_out(out)
        for head in HEADS:
            path = tmp / f"{row['data']}-{precision}-{head}.pt"
            train_head(out, out=path, head=head, progress=False)
            right[precision, head] = _right(path, out, row["split"])
    for head in HEADS:
        row["heads"][head] = paired(right["fp32", head], right["bf16", head])
        row["heads"][head]["right"] = {p: right[p, head].tolist() for p in ("fp32", "bf16")}
    x, y = (_train_features(tmp / f"{row['data']}-{p}.h5") for p in ("fp32", "bf16"))
    err = np.linalg.norm(x - y, axis=1) / np.linalg.norm(x, axis=1)
    row["rel_error_median"], row["rel_error_max"] = float(np.median(err)), float(err.max())
    return row


def _train_features(path: Path) -> np.ndarray:
    from embedcache import open_cache

    with open_cache(path) as c:
        return np.asarray(c.features("train")[:], np.float32)


def _table(rows: list[dict], pooled: dict, args) -> list[str]:
    from embedcache.runtime import cpu_has_native_bf16

    lines = [
        f"Backbone {args.backbone}; features stored as float16 in both caches; each head with "
        f"its defaults and the same seed. This CPU has native bf16: {cpu_has_native_bf16()}.",
        "",
        "| data (held-out images) | head | fp32 | bf16 | bf16 - fp32 (95% CI), points "
        "| bf16 wins / losses | p (bf16 worse) | feature error median / max "
        "| extract images/s fp32 / bf16 |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        for h, s in r["heads"].items():
            lo, hi = s["ci95_points"]
            lines.append(
                f"| {r['data']} {r['split']} ({s['images']}) | {h} | {100 * s['fp32_acc']:.2f}% "
                f"| {100 * s['bf16_acc']:.2f}% | {s['gap_points']:+.2f} ({lo:+.2f}, {hi:+.2f}) "
                f"| {s['bf16_wins']} / {s['bf16_losses']} | {s['p_bf16_worse']:.3f} "
                f"| {100 * r['rel_error_median']:.2f}% / {100 * r['rel_error_max']:.2f}% "
                f"| {r['fp32_images_per_s']:.1f} / {r['bf16_images_per_s']:.1f} |"
            )
    lo, hi = pooled["ci95_points"]
    lines.append(
        f"| all sets pooled ({pooled['images']}) | {HEADS[0]} | {100 * pooled['fp32_acc']:.2f}% "
        f"| {100 * pooled['bf16_acc']:.2f}% | {pooled['gap_points']:+.2f} ({lo:+.2f}, {hi:+.2f}) "
        f"| {pooled['bf16_wins']} / {pooled['bf16_losses']} | {pooled['p_bf16_worse']:.3f} | | |"
    )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data", nargs="+", help="image folders, or 'digits'")
    p.add_argument("--backbone", default="efficientnet_lite0")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one_dataset(d, Path(tmp), args) for d in args.data]
    every = [s for r in rows for s in r["heads"].values()]
    default = [r["heads"][HEADS[0]] for r in rows]  # pooled over the sets: each image once
    pooled = paired(
        np.concatenate([np.array(s["right"]["fp32"]) for s in default]),
        np.concatenate([np.array(s["right"]["bf16"]) for s in default]),
    )
    harmed = [s for s in [*every, pooled] if s["p_bf16_worse"] < ALPHA]
    md = [
        *_table(rows, pooled, args),
        "",
        f"bf16 significantly worse (one-sided exact McNemar p < {ALPHA}) anywhere: "
        f"**{bool(harmed)}**. "
        + (
            "`--precision auto` stays fp32 on every CPU."
            if harmed
            else "`--precision auto` may use bf16 on CPUs with native bf16 (runtime.CPU_BF16_AUTO)."
        ),
    ]
    result = {"rows": rows, "pooled": pooled, "alpha": ALPHA, "bf16_harms": bool(harmed)}
    print(save("precision_cpu", result, "\n".join(md)).read_text())


if __name__ == "__main__":
    main()
