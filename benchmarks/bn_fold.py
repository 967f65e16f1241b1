"""Issue 23: the CPU forward pass as built, with BatchNorm folded into the convolutions and
the activations apart (folding.Folded(fuse=False)), folded with each activation fused into its
convolution (folding.Folded, what extract runs: eager, no tracing), and as the frozen
TorchScript graph, in fp32 and bf16.

    python benchmarks/bn_fold.py --rounds 3

Batch 8, channels_last, allocator tuned as extract does; bf16 is autocast, as extract runs it.
Rounds alternate the variants in one process. Each variant's setup (the fold: a copy of the net
and three forward passes of one image; the graph: trace, freeze, check) is timed apart, and
every variant's features are compared with fp32 eager as built. efficientnet_lite0 runs with
its offline ImageNet weights (BatchNorm statistics that fold to something), the others
random-init (speed does not depend on the weights).
"""

from __future__ import annotations

import functools
import statistics
import time

import torch
from common import forward_args, forward_setup, save

from embedcache.folding import ConvAct, Folded
from embedcache.runtime import (
    FREEZE_FROM_IMAGES,
    compile_mode,
    compiled,
    cpu_has_native_bf16,
    tune_allocator,
)

BACKBONES = ("efficientnet_lite0", "efficientnet_b0", "resnet50", "mobilenet_v3_large")
VARIANTS = ("eager", "unfused", "folded", "frozen")  # unfused: folded, activations apart


def measure(name: str, rounds: int, batches: int) -> dict:
    net, x = forward_setup(name)
    with torch.inference_mode():
        ref = net(x).float()
    out: dict = {}
    for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        amp = functools.partial(torch.autocast, "cpu", dtype=dtype, enabled=dtype is not None)
        runs, setup, error = {}, {}, {}
        with torch.inference_mode():
            for v in VARIANTS:
                runs[v] = (
                    Folded(net, fuse=False)
                    if v == "unfused"
                    else compiled(net, None if v == "eager" else v)
                )
                t = time.perf_counter()
                with amp():
                    first = runs[v](x)  # the fold, or the trace and check
                setup[v] = time.perf_counter() - t
                error[v] = float((first.float() - ref).abs().max() / ref.abs().max())
                with amp():
                    runs[v](x), runs[v](x)  # warm: oneDNN plans, the profiling executor
            rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(rounds):
                for v in VARIANTS:
                    t = time.perf_counter()
                    with amp():
                        for _ in range(batches):
                            runs[v](x)
                    rates[v].append(8 * batches / (time.perf_counter() - t))
        med = {v: statistics.median(r) for v, r in rates.items()}
        out[precision] = {
            "rates": rates,
            "median": med,
            "folded_over_eager": med["folded"] / med["eager"],
            "fused_over_unfused": med["folded"] / med["unfused"],
            "frozen_over_folded": med["frozen"] / med["folded"],
            "setup_s": setup,
            "max_rel_error_vs_fp32_eager": error,
            "folded_batchnorms": runs["folded"].count,
            "fused_convolutions": sum(isinstance(m, ConvAct) for m in runs["folded"].net.modules()),
            "auto": compile_mode("auto", torch.device("cpu"), 10**6, net, dtype) or "eager",
        }
    return out


def _cell(med: dict, rates: dict, v: str) -> str:
    return f"{med[v]:.1f} ({', '.join(f'{x:.0f}' for x in rates[v])})"


def table(results: dict) -> list[str]:
    rows = [
        "| backbone | precision | as built images/s | folded, activations apart images/s "
        "| folded and fused images/s | frozen images/s | folded and fused / as built "
        "| fused / apart | convolutions fused | setup s: fold / trace "
        "| max relative error vs fp32: as built / apart / fused / frozen | auto on 1M images |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for name, per in results.items():
        for precision, r in per.items():
            med, rates, e, s = (
                r["median"],
                r["rates"],
                r["max_rel_error_vs_fp32_eager"],
                r["setup_s"],
            )
            cell = functools.partial(_cell, med, rates)
            errors = " / ".join(f"{e[v]:.1e}" for v in VARIANTS)
            rows.append(
                f"| {name} | {precision} | {cell('eager')} | {cell('unfused')} | {cell('folded')} "
                f"| {cell('frozen')} | **{r['folded_over_eager']:.2f}x** "
                f"| **{r['fused_over_unfused']:.2f}x** "
                f"| {r['fused_convolutions']} of {r['folded_batchnorms']} folded "
                f"| {s['folded']:.2f} / {s['frozen']:.2f} | {errors} | {r['auto']} |"
            )
    return rows


def main() -> None:
    args = forward_args(__doc__, BACKBONES)
    tune_allocator()
    results = {}
    for name in args.backbones.split(","):
        results[name] = measure(name, args.rounds, args.batches)
        print(name, {k: v["median"] for k, v in results[name].items()}, flush=True)
    lines = table(results) + [
        "",
        f"This CPU has native bf16: {cpu_has_native_bf16()}. Medians of alternated rounds "
        "(each round's figure in brackets). `auto` on a CPU: the frozen graph for fp32 runs "
        f"of {FREEZE_FROM_IMAGES:,}+ images with BatchNorm, the folded and fused net for every "
        "other run with BatchNorm (runtime.compile_mode).",
    ]
    save("bn_fold_cpu", {"results": results, "args": vars(args)}, "\n".join(lines))


if __name__ == "__main__":
    main()
