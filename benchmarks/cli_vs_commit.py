"""`embedcache extract` of this checkout vs an older commit, side by side, as a user runs it.

    python benchmarks/cli_vs_commit.py ../shared/data/hymenoptera --commit 0c5bfa9

The older commit is checked out into a temporary folder (git worktree) and run with this
environment's packages (PYTHONPATH), so only embedcache's code differs. Rounds alternate
old and new; each run writes a fresh cache; the figure is the images/s of the CLI's own
summary line, and the wall time of the whole command.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save

REPO = Path(__file__).resolve().parents[1]
RATE = re.compile(r"\(([\d.]+) images/s")


def run(code: Path, data: Path, out: Path, args) -> tuple[float, float]:
    """(images/s from the summary line, wall seconds) of one CLI run of the code in ``code``."""
    cmd = [
        sys.executable,
        "-c",
        "from embedcache.cli import main; main()",
        "extract",
        str(data),
        "--out",
        str(out),
        "-b",
        args.backbone,
        "--device",
        "cpu",
        "--overwrite",
        *(args.new_args.split() if code == REPO else []),
    ]
    t = time.perf_counter()
    r = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(code), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
        timeout=3600,
    )
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"{code}: {r.stderr[-2000:]}")
    return float(RATE.findall(r.stdout + r.stderr)[-1]), wall


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data", type=Path)
    p.add_argument("--commit", default="0c5bfa9")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--new-args",
        default="",
        help="extra extract options for this checkout only, e.g. "
        "'--precision fp32' to time what a CPU without native bf16 runs",
    )
    p.add_argument("--suffix", default="", help="appended to the result files' name")
    args = p.parse_args()
    rows: dict[str, list] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.commit],
            check=True,
            capture_output=True,
        )
        try:
            for _ in range(args.rounds):
                for name, code in (("old", old), ("new", REPO)):
                    rows[name].append(run(code, args.data, Path(tmp) / f"{name}.h5", args))
                    print(name, rows[name][-1], flush=True)
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=True
            )
    med = {k: statistics.median(r for r, _ in v) for k, v in rows.items()}
    per_round = [n[0] / o[0] for o, n in zip(rows["old"], rows["new"], strict=True)]
    md = [
        f"`embedcache extract {args.data.name} -b {args.backbone} --device cpu` "
        f"(a fresh cache each run), commit {args.commit} vs this checkout"
        f"{f' with `{args.new_args}`' if args.new_args else ''}, "
        f"{args.rounds} alternating rounds.",
        "",
        "| code | images/s (summary line) | wall s |",
        "| --- | --- | --- |",
        *(
            f"| {k} | {', '.join(f'{r:.1f}' for r, _ in v)} (median {med[k]:.1f}) | "
            f"{', '.join(f'{w:.1f}' for _, w in v)} |"
            for k, v in rows.items()
        ),
        "",
        f"new / old: **{med['new'] / med['old']:.2f}x** (medians); "
        f"per round {', '.join(f'{x:.2f}' for x in per_round)}.",
    ]
    print(
        save(
            f"cli_vs_{args.commit}{args.suffix}",
            {"rows": rows, "median": med, "per_round": per_round},
            "\n".join(md),
        ).read_text()
    )


if __name__ == "__main__":
    main()
