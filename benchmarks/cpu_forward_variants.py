"""A lead for issue 11: is there a faster exact fp32 forward pass on the CPU than eager PyTorch?

    python benchmarks/cpu_forward_variants.py --rounds 3

efficientnet_lite0 (offline weights), batch 8, channels_last, allocator tuned as extract does;
eager against TorchScript traced, frozen and optimize_for_inference'd (BatchNorm folded into the
convolutions, oneDNN layouts). Alternated rounds in one process; the largest relative difference
of the features says whether the variant is exact up to float rounding. Not used by extract yet.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from common import save

from embedcache.backbones import Normalise, build_backbone
from embedcache.runtime import tune_allocator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=25)
    args = p.parse_args()
    tune_allocator()
    bb = build_backbone("efficientnet_lite0")
    net = bb.net.eval().to(memory_format=torch.channels_last)
    x = Normalise(bb.transform)(torch.randint(0, 255, (8, 224, 224, 3), dtype=torch.uint8))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 marks TorchScript deprecated
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(copy.deepcopy(net), x)))  # fmt: skip
    variants = {"eager": net, "torchscript frozen": frozen}
    rates: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        ref = net(x).float()
        error = {k: float((f(x).float() - ref).abs().max() / ref.abs().max()) for k, f in variants.items()}  # fmt: skip
        for f in variants.values():
            for _ in range(3):
                f(x)
        for _ in range(args.rounds):
            for k, f in variants.items():
                t = time.perf_counter()
                for _ in range(args.batches):
                    f(x)
                rates[k].append(8 * args.batches / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    lines = [
        "| forward pass (fp32, batch 8, channels_last) | images/s (median) | all rounds | max relative difference |",
        "| --- | ---: | --- | ---: |",
        *(f"| {k} | {med[k]:.1f} | {', '.join(f'{r:.1f}' for r in rates[k])} | {error[k]:.1e} |" for k in variants),
        "",
        f"torchscript frozen / eager = **{med['torchscript frozen'] / med['eager']:.2f}x** (medians; alternated rounds).",
    ]  # fmt: skip
    print(save("cpu_forward_variants", {"rates": rates, "max_rel_error": error}, "\n".join(lines)).read_text())  # fmt: skip


if __name__ == "__main__":
    main()
