"""The README's quickstart, run as written on a real photo folder, and what it printed.

    python benchmarks/quickstart.py ../shared/data/flowers12 --photo test/iris/image_0406.jpg

The commands are the first block of README.md marked as tested, run in a temporary folder
where ``photos/`` is the given folder and ``photo.jpg`` the given image of it; progress bars
are left out (``-q``). The README shows this output and links to the results file.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import save

REPO = Path(__file__).resolve().parents[1]


def quickstart() -> list[str]:
    """The commands of README.md's first tested bash block."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- tested -->\n```bash\n(.*?)```", text, re.S)
    return [line for line in block.group(1).splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("photos", type=Path, help="a labelled image folder")
    p.add_argument("--photo", required=True, help="an image of it, relative to it")
    args = p.parse_args()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    lines, seconds, load = [], {}, os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "photos").symlink_to(args.photos.resolve())
        shutil.copy(args.photos / args.photo, Path(tmp) / "photo.jpg")
        for cmd in quickstart():
            t = time.perf_counter()
            r = subprocess.run(
                f"{cmd} -q", shell=True, cwd=tmp, env=env, capture_output=True, text=True
            )
            seconds[cmd] = round(time.perf_counter() - t, 1)
            if r.returncode:
                sys.exit(f"{cmd}: {r.stderr[-2000:]}")
            lines += [f"$ {cmd}", *r.stdout.rstrip().splitlines()]
    md = (
        f"The README's quickstart on `{args.photos.name}` (`photos/`), progress bars left out "
        f"(`-q`); load average {load:.2f} at the start.\n\n```text\n" + "\n".join(lines) + "\n```"
    )
    rows = "\n".join(f"| `{c}` | {s} |" for c, s in seconds.items())
    md += f"\n\n| command | wall time (s) |\n| --- | ---: |\n{rows}"
    payload = {"photos": str(args.photos), "output": lines, "seconds": seconds, "load": load}
    print(save(f"quickstart_{args.photos.name}", payload, md))


if __name__ == "__main__":
    main()
