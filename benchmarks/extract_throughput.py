"""Images/s of (a) the forward pass alone on pre-decoded tensors, (b) `embedcache extract`,
(c) the tutorial loop, measured in one run on the same images, backbone and batch size.

    python benchmarks/extract_throughput.py ../shared/data/hymenoptera --backbone efficientnet_lite0
    python benchmarks/extract_throughput.py --generate 2000     # 500x375 JPEGs made on the fly

(a) is the compute ceiling: the backbone in eval mode, inference_mode, channels_last,
on uint8 images already decoded and resized (normalised on the fly, as extract does).
(b) runs the public API end to end (decode in workers, forward, write HDF5, finalise).
(c) is what the transfer-learning tutorials write: torchvision ImageFolder with the
weights' transforms, DataLoader with no workers, fp32 NCHW, torch.no_grad, run in a
process of its own with glibc's default allocator (as the tutorial runs).
(a0) is (a) in such a process too: what the allocator tuning (runtime.tune_allocator)
gains. (a) and (b) run in this process with the allocator tuned, as extract runs;
(a-bf16) is (a) under bf16 autocast; (a-frozen) is (a) as a frozen TorchScript graph, which
extract runs on a CPU (runtime.compile_mode) from a few hundred images on.
Rounds alternate the three so that machine noise hits all of them alike; the median
round of each is reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import save

from embedcache import build_backbone, extract, scan
from embedcache.backbones import Normalise
from embedcache.data import preprocess
from embedcache.extraction import CPU_BF16_AUTO
from embedcache.runtime import (
    autocast_dtype,
    compile_mode,
    compiled,
    default_batch_size,
    default_num_workers,
    precision_name,
    resolve_device,
    tune_allocator,
)


def forward_only(
    bb, images: torch.Tensor, batch_size: int, device, channels_last: bool, amp=None, mode=None
) -> float:
    """Images/s of the backbone alone on pre-decoded uint8 images (under autocast ``amp``,
    compiled as ``mode`` is: see runtime.compile_mode)."""
    net = bb.net.to(device).eval()
    net = net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    net = compiled(net, mode)
    norm = Normalise(bb.transform).to(device)
    batches = [images[i : i + batch_size].to(device) for i in range(0, len(images), batch_size)]
    auto = torch.autocast(torch.device(device).type, dtype=amp, enabled=amp is not None)
    with torch.inference_mode(), auto:
        for b in (batches[0], batches[0], batches[-1]):  # warm-up: oneDNN plans, graph per shape
            net(norm(b) if channels_last else norm(b).contiguous())
        sync(device)
        t = time.perf_counter()
        for b in batches:
            x = norm(b)
            net(x if channels_last else x.contiguous())
        sync(device)
    return len(images) / (time.perf_counter() - t)


def decode_only(files: list[Path], bb, threads: int) -> float:
    """Images/s of decoding and resizing alone, on every core (what extract's decoders do)."""
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda f: preprocess(f, bb.transform), files))
    return len(files) / (time.perf_counter() - start)


def embedcache_extract(data: Path, bb, batch_size: int, device: str, workers: int | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        r = extract(
            data,
            out=Path(tmp) / "c.h5",
            model=bb,
            batch_size=batch_size,
            device=device,
            num_workers=workers,
            progress=False,
        )
    return r.images_per_s


def tutorial(data: Path, bb, batch_size: int, device) -> float:
    """The tutorial recipe: ImageFolder + transforms + DataLoader(num_workers=0), fp32 NCHW."""
    from torchvision import datasets, transforms

    t = bb.transform
    tf = transforms.Compose(
        [
            transforms.Resize(
                t.resize, interpolation=transforms.InterpolationMode(t.interpolation)
            ),
            transforms.CenterCrop(t.crop),
            transforms.ToTensor(),
            transforms.Normalize(t.mean, t.std),
        ]
    )
    net = bb.net.to(device).eval().to(memory_format=torch.contiguous_format)
    n = 0
    start = time.perf_counter()
    for split in sorted(p for p in data.iterdir() if p.is_dir()):
        loader = torch.utils.data.DataLoader(
            datasets.ImageFolder(split, tf), batch_size=batch_size, shuffle=False, num_workers=0
        )
        with torch.no_grad():
            for x, _ in loader:
                net(x.to(device))
                n += len(x)
    sync(device)
    return n / (time.perf_counter() - start)


def in_own_process(what: str, args) -> float:
    """Images/s of ``what`` (tutorial or forward) run by this script in a fresh process, with
    glibc's default allocator: nothing this process did (tuning, warm caches) carries over."""
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        __file__,
        str(args.data),
        "--only",
        what,
        "--backbone",
        args.backbone,
        "--weights",
        args.weights,
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--tutorial-batch-size",
        str(args.tutorial_batch_size),
    ]
    env = {**os.environ, "EMBEDCACHE_MALLOC": "default"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, check=True)
    return float(r.stdout.split()[-1])


def generate(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` photo-sized JPEGs (500x375, quality 90, smooth random content: the size and
    entropy of a typical photo, not its pixels) in train/ and val/ (4:1), two classes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / ("val" if i % 5 == 4 else "train") / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        noise = rng.integers(-12, 13, (375, 500, 3))
        pixels = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _rounds(args, bb, decoded, files, device) -> dict[str, list[float]]:
    """Every measurement once per round, rounds alternating, so drift hits all alike."""
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "forward_default_alloc",
            "forward_nchw",
            "forward_channels_last",
            "forward_frozen",
            "forward_bf16",
            "decode",
            "extract",
            "tutorial",
        )
    }
    for r in range(args.rounds):
        rows["forward_default_alloc"].append(in_own_process("forward", args))
        rows["forward_nchw"].append(
            forward_only(bb, decoded, args.batch_size, device, channels_last=False)
        )
        rows["forward_channels_last"].append(
            forward_only(bb, decoded, args.batch_size, device, channels_last=True)
        )
        rows["forward_frozen"].append(
            forward_only(bb, decoded, args.batch_size, device, channels_last=True, mode="frozen")
        )
        rows["forward_bf16"].append(
            forward_only(
                bb, decoded, args.batch_size, device, channels_last=True, amp=torch.bfloat16
            )
        )
        rows["decode"].append(
            decode_only(files, bb, args.num_workers or default_num_workers(device))
        )
        rows["extract"].append(
            embedcache_extract(args.data, bb, args.batch_size, str(device), args.num_workers)
        )
        rows["tutorial"].append(in_own_process("tutorial", args))
        print(
            f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rows.items()), flush=True
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "data", type=Path, nargs="?", help="an image folder with split folders (train/, val/)"
    )
    p.add_argument(
        "--generate", type=int, metavar="N", help="instead of DATA: N generated 500x375 JPEGs"
    )
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument(
        "--weights", default="none", help="weights do not change speed; default random init"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="[default: embedcache's own, 8 on CPU, 128 on GPU]",
    )
    p.add_argument("--tutorial-batch-size", type=int, default=32, help="the courses' batch size")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", choices=("tutorial", "forward"), help=argparse.SUPPRESS)
    p.add_argument(
        "--name",
        default=None,
        help="results file stem [default: extract_throughput_BACKBONE_DEVICE]",
    )
    args = p.parse_args()
    if (args.data is None) == (args.generate is None):
        p.error("give DATA or --generate N")
    if args.generate:
        with tempfile.TemporaryDirectory() as tmp:
            args.data = generate(Path(tmp) / f"generated-{args.generate}", args.generate)
            measure(args)
    else:
        measure(args)


def measure(args) -> None:
    device = resolve_device(args.device)
    args.batch_size = args.batch_size or default_batch_size(device)
    bb = build_backbone(args.backbone, weights=args.weights, device=device)
    images = scan(args.data)
    files = [images.root / s.path for split in images.splits.values() for s in split]
    decoded = torch.stack([torch.from_numpy(preprocess(f, bb.transform)) for f in files])
    if device.type == "cuda":
        decoded = decoded.pin_memory()
    if args.only:  # a fresh process for in_own_process: print images/s and stop
        run = (
            tutorial(args.data, bb, args.tutorial_batch_size, device)
            if args.only == "tutorial"
            else forward_only(bb, decoded, args.batch_size, device, channels_last=True)
        )
        print(run)
        return
    tuned = tune_allocator()
    amp = autocast_dtype(device, "auto", cpu_bf16=CPU_BF16_AUTO)
    rows = _rounds(args, bb, decoded, files, device)
    best = {k: statistics.median(v) for k, v in rows.items()}
    mode = compile_mode("auto", device, len(files), bb.net)  # what extract runs
    ceiling_key = (
        "forward_bf16"
        if amp is not None
        else {"frozen": "forward_frozen"}.get(mode, "forward_channels_last")
    )
    ceiling = best[ceiling_key]
    # On a CPU, decoding and the forward pass share the cores, so the best a pipeline can do
    # is one after the other: 1 / (1/forward + 1/decode).
    bound = 1 / (1 / ceiling + 1 / best["decode"]) if device.type == "cpu" else ceiling
    ratios = {
        "extract_over_forward": best["extract"] / ceiling,
        "extract_over_tutorial": best["extract"] / best["tutorial"],
        "extract_over_shared_core_bound": best["extract"] / bound,
        "allocator_gain": best["forward_channels_last"] / best["forward_default_alloc"],
    }
    # The same ratios taken within each round (the three ran minutes apart at most), then the
    # median: steadier than a ratio of medians on a machine whose speed drifts between rounds.
    per_round = {
        "extract_over_forward": [
            e / f for e, f in zip(rows["extract"], rows[ceiling_key], strict=True)
        ],
        "extract_over_tutorial": [
            e / t for e, t in zip(rows["extract"], rows["tutorial"], strict=True)
        ],
    }
    labels = {
        "forward_default_alloc": (
            "(a0) forward only, fp32 channels_last, own process, glibc's default allocator"
        ),
        "forward_nchw": "(a') forward only, fp32 NCHW",
        "forward_channels_last": "(a) forward only, fp32 channels_last",
        "forward_frozen": "(a-frozen) forward only, fp32 channels_last, frozen TorchScript graph",
        "forward_bf16": "(a-bf16) forward only, bf16 autocast channels_last",
        "decode": "(d) decode + resize alone, all cores",
        "extract": "(b) embedcache extract",
        "tutorial": (
            f"(c) tutorial loop (ImageFolder, no workers, NCHW, batch {args.tutorial_batch_size})"
        ),
    }
    md = [
        f"Backbone `{args.backbone}` (weights {args.weights}), "
        f"{len(files)} images of {args.data.name}, batch {args.batch_size}, device {device}; "
        f"allocator tuned in this process: {tuned}; "
        f"extract's precision (auto): {precision_name(amp)}, "
        f"compiled as (--compile auto): {mode or 'eager'}, "
        f"so its ceiling is {labels[ceiling_key].split(')')[0]}).",
        "",
        "| what | images/s (median of rounds) | all rounds |",
        "| --- | ---: | --- |",
    ]
    md += [
        f"| {labels[k]} | {best[k]:.1f} | {', '.join(f'{v:.1f}' for v in rows[k])} |" for k in rows
    ]
    md += [
        "",
        f"(b)/ceiling = **{ratios['extract_over_forward']:.2f}**, "
        f"(b)/(c) = **{ratios['extract_over_tutorial']:.2f}** (ratios of the medians)  ",
        "within each round: "
        f"(b)/ceiling {', '.join(f'{v:.2f}' for v in per_round['extract_over_forward'])} "
        f"(median {statistics.median(per_round['extract_over_forward']):.2f}); "
        f"(b)/(c) {', '.join(f'{v:.2f}' for v in per_round['extract_over_tutorial'])} "
        f"(median {statistics.median(per_round['extract_over_tutorial']):.2f})",
    ]
    md += [
        "",
        f"Allocator: (a)/(a0) = **{ratios['allocator_gain']:.2f}** "
        "(the same fp32 forward pass, glibc's thresholds raised vs default).",
    ]
    if device.type == "cpu":
        md += [
            "",
            f"On a CPU the decoders and the backbone share the cores, so no pipeline beats "
            f"1 / (1/ceiling + 1/(d)) = {bound:.1f} images/s; (b) reaches "
            f"**{ratios['extract_over_shared_core_bound']:.2f}** of that.",
        ]
    name = args.name or f"extract_throughput_{args.backbone.replace(':', '_')}_{device.type}"
    if args.generate and not args.name:
        name += f"_generated{args.generate}"
    path = save(
        name,
        {
            "backbone": args.backbone,
            "weights": args.weights,
            "images": len(files),
            "batch_size": args.batch_size,
            "tutorial_batch_size": args.tutorial_batch_size,
            "device": str(device),
            "rounds": rows,
            "median": best,
            "ratios": ratios,
            "per_round_ratios": per_round,
        },
        "\n".join(md),
    )
    print(path.read_text())


if __name__ == "__main__":
    main()
