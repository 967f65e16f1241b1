"""Issue 11: the CPU forward pass eager against the frozen TorchScript graph extract runs
(runtime.FrozenGraph: traced, frozen, BatchNorm folded into the convolutions), per backbone.

    python benchmarks/cpu_forward_variants.py --rounds 3

fp32, batch 8, channels_last, allocator tuned as extract does. The first call of the frozen
graph traces and checks it against eager: its cost is reported apart (what a run pays once),
and the images it takes to pay back. Rounds alternate eager and frozen in one process; the
largest relative difference of the features says whether the graph is exact up to rounding.
efficientnet_lite0 runs with its offline ImageNet weights, the others random-init (speed does
not depend on the weights).
"""

from __future__ import annotations

import statistics
import time

import torch
from common import forward_args, forward_setup, save

from embedcache.runtime import FREEZE_FROM_IMAGES, compile_mode, compiled, tune_allocator

BACKBONES = ("efficientnet_lite0", "efficientnet_b0", "resnet50", "convnext_tiny", "vit_b_16")


def measure(name: str, rounds: int, batches: int) -> dict:
    net, x = forward_setup(name)
    frozen = compiled(net, "frozen")
    rates: dict[str, list[float]] = {"eager": [], "frozen": []}
    with torch.inference_mode():
        ref = net(x)
        start = time.perf_counter()
        frozen(x)  # eager, trace, freeze, check
        first = time.perf_counter() - start
        error = float((frozen(x) - ref).abs().max() / ref.abs().max())
        for f in (net, frozen):
            f(x), f(x)  # warm: oneDNN plans, the profiling executor's first runs
        for _ in range(rounds):
            for k, f in (("eager", net), ("frozen", frozen)):
                t = time.perf_counter()
                for _ in range(batches):
                    f(x)
                rates[k].append(8 * batches / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    saved = 1 / med["eager"] - 1 / med["frozen"]  # seconds per image
    return {
        "rates": rates,
        "median": med,
        "speedup": med["frozen"] / med["eager"],
        "max_rel_error": error,
        "first_call_s": first,
        "graph_ok": not frozen.eager_shapes,
        "auto": compile_mode("auto", torch.device("cpu"), 10**6, net) or "eager",
        "pays_back_after_images": first / saved if saved > 0 else None,
    }


def main() -> None:
    args = forward_args(__doc__, BACKBONES)
    tune_allocator()
    out = {}
    for name in args.backbones.split(","):
        out[name] = measure(name, args.rounds, args.batches)
        print(name, {k: v for k, v in out[name].items() if k != "rates"}, flush=True)
    lines = [
        "| backbone (fp32, batch 8, channels_last) | eager images/s | frozen images/s "
        "| frozen / eager | first call (trace + check) s | pays back after "
        "| max relative difference | --compile auto on a CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in out.items():
        eager, frozen, pays = (
            r["median"]["eager"],
            r["median"]["frozen"],
            r["pays_back_after_images"],
        )
        pays = f"{pays:.0f} images" if pays is not None else "never"
        lines.append(
            f"| {name} | {eager:.1f} ({', '.join(f'{v:.1f}' for v in r['rates']['eager'])}) | "
            f"{frozen:.1f} ({', '.join(f'{v:.1f}' for v in r['rates']['frozen'])}) | "
            f"**{r['speedup']:.2f}x** | {r['first_call_s']:.2f} | {pays} | "
            f"{r['max_rel_error']:.1e} | {r['auto']} |"
        )
    lines += [
        "",
        "Medians of alternated rounds. `auto` freezes nets with BatchNorm on fp32 runs of "
        f"{FREEZE_FROM_IMAGES:,}+ images (runtime.FREEZE_FROM_IMAGES).",
    ]
    print(save("cpu_forward_variants", out, "\n".join(lines)).read_text())


if __name__ == "__main__":
    main()
