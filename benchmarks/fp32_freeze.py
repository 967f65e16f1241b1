"""Issue 23: fp32 `embedcache extract` on a CPU, end to end, with the frozen TorchScript graph
against the folded net with its activations fused (folding.Folded), to set where `--compile
auto` starts freezing (runtime.FREEZE_FROM_IMAGES).

    python benchmarks/fp32_freeze.py ../shared/data/hymenoptera:efficientnet_lite0 \\
        ../shared/data/flowers12:efficientnet_lite0 ../shared/data/hymenoptera:efficientnet_b0

Each run is the CLI in a fresh process writing a fresh cache with `--precision fp32 --device
cpu`; "frozen" sets the threshold to 0 images (every run freezes), "fused" above any cache.
Rounds alternate the two; the figure is the summary line's images/s. Backbones other than
efficientnet_lite0 run random-init (`-w none`: speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
from common import save

RATE = re.compile(r"\(([\d.]+) images/s")
CODE = """
import sys
import embedcache.runtime as runtime
runtime.FREEZE_FROM_IMAGES = 0 if sys.argv[1] == "frozen" else 10**12
from embedcache.cli import main
main(sys.argv[2:], prog_name="embedcache")
"""
VARIANTS = ("frozen", "fused")


def run(variant: str, data: str, backbone: str, out: Path) -> float:
    weights = "DEFAULT" if backbone == "efficientnet_lite0" else "none"
    args = ["extract", data, "--out", str(out), "-b", backbone, "-w", weights]
    args += ["--precision", "fp32", "--device", "cpu", "--overwrite"]
    r = subprocess.run([sys.executable, "-c", CODE, variant, *args], capture_output=True, text=True)
    found = RATE.findall(r.stdout + r.stderr)
    if r.returncode != 0 or not found:
        raise SystemExit(f"{variant} run failed:\n{r.stderr[-2000:]}")
    return float(found[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("sets", nargs="+", help="DATA:BACKBONE")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--suffix", default="", help="appended to the results file's name")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for entry in args.sets:
            data, _, backbone = entry.rpartition(":")
            rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(args.rounds):
                for v in VARIANTS:
                    rates[v].append(run(v, data, backbone, Path(tmp) / f"{v}.h5"))
            with h5py.File(Path(tmp) / "fused.h5") as f:
                images = sum(len(f[s]["features"]) for s in f if "features" in f[s])
            med = {v: statistics.median(r) for v, r in rates.items()}
            results[entry] = {"images": images, "rates": rates, "median": med}
            print(entry, med, flush=True)
    rows = [
        "| data | backbone | images | frozen images/s | fused images/s | fused / frozen |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for entry, r in results.items():
        data, _, backbone = entry.rpartition(":")
        cells = [
            f"{r['median'][v]:.1f} ({', '.join(f'{x:.0f}' for x in r['rates'][v])})"
            for v in VARIANTS
        ]
        ratio = r["median"]["fused"] / r["median"]["frozen"]
        rows.append(
            f"| {Path(data).name} | {backbone} | {r['images']} | {cells[0]} | {cells[1]} "
            f"| **{ratio:.2f}x** |"
        )
    rows += [
        "",
        f"Medians of {args.rounds} alternated rounds (each round's figure in brackets), the CLI's "
        "summary line, `--precision fp32 --device cpu`, a fresh process and cache per run.",
    ]
    save(f"fp32_freeze_cpu{args.suffix}", {"results": results, "args": vars(args)}, "\n".join(rows))


if __name__ == "__main__":
    main()
