"""How long the CLI takes before any work: `embedcache --help`, every verb's `--help`, and an
`extract` whose cache is already up to date, for this checkout and an older commit side by side.

    python benchmarks/cli_startup.py ../shared/data/hymenoptera --commit 77e9f70

The older commit is checked out into a temporary folder (git worktree) and run with this
environment's packages (PYTHONPATH), so only embedcache's code differs. Rounds alternate old
and new; each figure is the median wall time of a whole command, as a user's shell times it.
Also recorded: whether `import embedcache.cli` loads torch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save

REPO = Path(__file__).resolve().parents[1]
VERBS = (
    "extract",
    "train-head",
    "finetune",
    "evaluate",
    "predict",
    "compare",
    "audit",
    "export",
    "export-features",
    "info",
    "backbones",
    "demo",
)
CLI = "from embedcache.cli import main; main()"


def _env(code: Path) -> dict:
    return {"PYTHONPATH": str(code), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}


def timed(code: Path, *args: str) -> float:
    """Wall seconds of ``embedcache ARGS`` run from the code in ``code``."""
    t = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", CLI, *args], capture_output=True, text=True, env=_env(code)
    )
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"{code}: embedcache {' '.join(args)}: {r.stderr[-2000:]}")
    return wall


def loads_torch(code: Path) -> bool:
    probe = "import sys, embedcache.cli; print('torch' in sys.modules)"
    r = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=_env(code), check=True
    )
    return r.stdout.strip() == "True"


def measure(codes: dict[str, Path], data: Path, tmp: Path, rounds: int) -> dict:
    """{what: {code name: [seconds per round]}}, rounds alternating the codes."""
    commands = {"embedcache --help": ["--help"]}
    commands |= {f"embedcache {v} --help": [v, "--help"] for v in VERBS}
    for name, code in codes.items():  # the caches the up-to-date runs find, made untimed
        timed(code, "extract", str(data), "--out", str(tmp / f"{name}.h5"), "-q")
        commands[f"up-to-date extract ({name} cache)"] = None
    times: dict[str, dict[str, list]] = {k: {n: [] for n in codes} for k in commands}
    for _ in range(rounds):
        for name, code in codes.items():
            for what, args in commands.items():
                if args is None:
                    if not what.endswith(f"({name} cache)"):
                        continue
                    args = ["extract", str(data), "--out", str(tmp / f"{name}.h5"), "-q"]
                times[what][name].append(timed(code, *args))
    return {k: v for k, v in times.items()}


def _markdown(times: dict, torch: dict, args) -> str:
    lines = [
        f"Old: {args.commit}; new: this checkout. Median wall time of {args.rounds} alternated "
        f"rounds (seconds); load average {args.load:.2f} at the start.",
        "",
        "| command | old (s) | new (s) | new / old |",
        "| --- | ---: | ---: | ---: |",
    ]
    for what, by in times.items():
        if what.startswith("up-to-date"):
            continue
        old, new = (statistics.median(by[k]) for k in ("old", "new"))
        lines.append(f"| `{what}` | {old:.2f} | {new:.2f} | {new / old:.2f} |")
    old = statistics.median(times["up-to-date extract (old cache)"]["old"])
    new = statistics.median(times["up-to-date extract (new cache)"]["new"])
    lines.append(
        f"| up-to-date `embedcache extract {args.data.name}` | {old:.2f} | {new:.2f} "
        f"| {new / old:.2f} |"
    )
    lines += ["", f"`import embedcache.cli` loads torch: old {torch['old']}, new {torch['new']}."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data", type=Path, help="an image folder for the up-to-date extract")
    p.add_argument("--commit", required=True, help="the older commit to compare with")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    args.load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.commit],
            check=True,
            capture_output=True,
        )
        try:
            codes = {"old": old, "new": REPO}
            torch = {n: loads_torch(c) for n, c in codes.items()}
            times = measure(codes, args.data.resolve(), Path(tmp), args.rounds)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)])
    payload = {"commit": args.commit, "rounds": args.rounds, "seconds": times, "torch": torch}
    print(save("cli_startup_cpu", payload, _markdown(times, torch, args)))


if __name__ == "__main__":
    main()
