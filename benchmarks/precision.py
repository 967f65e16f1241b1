"""Are heads on bf16 features as good as on fp32 features? The table behind `--precision auto`.

    python benchmarks/precision.py ../shared/data/hymenoptera digits

For each data set: extract the same images twice with the same backbone (fp32 and bf16
forward pass, float16 storage both), train the linear head and the logreg head on each
cache with the same seed, and compare validation accuracy. Also the features' relative
error and the extract speed of each (on CPUs without native bf16 it is emulated and slow).
Rule (issue 11): auto may use bf16 on a CPU only if every head is within 0.3 points.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import h5py
import numpy as np
from common import save

HEADS = ("linear", "logreg")
LIMIT = 0.3  # points of validation accuracy


def one_dataset(data: str, tmp: Path, args) -> dict:
    from embedcache import extract, train_head
    from embedcache.quickstart import DEMO_IMAGE_SIZE, write_digits

    size = DEMO_IMAGE_SIZE if data == "digits" else None
    folder = write_digits(tmp / "digits") if data == "digits" else Path(data)
    row: dict = {"data": Path(data).name, "image_size": size}
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
        row[precision] = {"images_per_s": r.images_per_s, "val": {}}
        for head in HEADS:
            h = train_head(
                out, out=tmp / f"{row['data']}-{precision}-{head}.pt", head=head, progress=False
            )
            row[precision]["val"][head] = h.metrics["val_acc"]
    with (
        h5py.File(tmp / f"{row['data']}-fp32.h5") as a,
        h5py.File(tmp / f"{row['data']}-bf16.h5") as b,
    ):
        x, y = (f["train"]["features"][:].astype(np.float32) for f in (a, b))
    row["rel_error_median"] = float(
        np.median(np.linalg.norm(x - y, axis=1) / np.linalg.norm(x, axis=1))
    )
    row["rel_error_max"] = float(np.max(np.linalg.norm(x - y, axis=1) / np.linalg.norm(x, axis=1)))
    row["gap_points"] = {h: 100 * (row["bf16"]["val"][h] - row["fp32"]["val"][h]) for h in HEADS}
    return row


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data", nargs="+", help="image folders, or 'digits'")
    p.add_argument("--backbone", default="efficientnet_lite0")
    args = p.parse_args()
    from embedcache.runtime import cpu_has_native_bf16

    with tempfile.TemporaryDirectory() as tmp:
        rows = [one_dataset(d, Path(tmp), args) for d in args.data]
    ok = all(abs(g) <= LIMIT for r in rows for g in r["gap_points"].values())
    md = [
        f"Backbone {args.backbone}; features stored as float16 in both caches; heads with their defaults and the same seed. This CPU has native bf16: {cpu_has_native_bf16()}.",
        "",
        "| data | head | val acc fp32 | val acc bf16 | bf16 - fp32 (points) | feature error median / max | extract images/s fp32 / bf16 |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
        *(
            f"| {r['data']} | {h} | {100 * r['fp32']['val'][h]:.2f}% | {100 * r['bf16']['val'][h]:.2f}% | {r['gap_points'][h]:+.2f} | {100 * r['rel_error_median']:.2f}% / {100 * r['rel_error_max']:.2f}% | {r['fp32']['images_per_s']:.1f} / {r['bf16']['images_per_s']:.1f} |"
            for r in rows
            for h in HEADS
        ),
        "",
        f"Every head within {LIMIT} points: **{ok}**. "
        + (
            "`--precision auto` may use bf16 on CPUs with native bf16 (extraction.CPU_BF16_AUTO)."
            if ok
            else "`--precision auto` stays fp32 on every CPU (extraction.CPU_BF16_AUTO = False)."
        ),
    ]
    print(save("precision_cpu", {"rows": rows, "within_limit": ok}, "\n".join(md)).read_text())


if __name__ == "__main__":
    main()
