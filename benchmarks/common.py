"""Shared helpers for the benchmark scripts: machine description, peak memory, result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU, cores, memory, GPU and library versions of this machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem_gib, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (2**20 bytes; the name says MB).

    VmHWM belongs to the address space, so a child started with subprocess
    reports its own peak; ru_maxrss would carry the parent's over fork/exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def command() -> str:
    """The command line that ran this script, for the results file."""
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def save(name: str, payload: dict, markdown: str) -> Path:
    """Write results/NAME.json and results/NAME.md; return the Markdown path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        **payload,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    m = payload["machine"]
    header = (
        f"Command: `{payload['command']}`  \n"
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB"
        f"{', ' + m['gpu'] if m['gpu'] else ', no GPU'}; torch {m['torch']}; {payload['date']}\n\n"
    )
    path = RESULTS / f"{name}.md"
    path.write_text(header + markdown + "\n")
    return path


def forward_args(doc: str, backbones: tuple[str, ...]) -> argparse.Namespace:
    """The arguments of the forward-pass benchmarks: --rounds, --batches, --backbones."""
    p = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=10, help="batches of 8 images per round")
    p.add_argument("--backbones", default=",".join(backbones))
    return p.parse_args()


def forward_setup(name: str):
    """(net, x) for a forward-pass benchmark of backbone ``name``: the net in eval mode and
    channels_last, efficientnet_lite0 with its offline ImageNet weights and the others random-init
    (speed does not depend on the weights); x a normalised batch of 8 random 224 px images."""
    import torch

    from embedcache.backbones import Normalise, build_backbone

    bb = build_backbone(name, weights="DEFAULT" if name == "efficientnet_lite0" else "none")
    net = bb.net.eval().to(memory_format=torch.channels_last)
    x = Normalise(bb.transform)(torch.randint(0, 255, (8, 224, 224, 3), dtype=torch.uint8))
    return net, x
