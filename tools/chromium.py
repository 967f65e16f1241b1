"""Render an HTML page to a PNG in headless Chromium (the audit report's screenshot).

    python tools/chromium.py report.html shot.png --size 1280x2400

One home for the command line, used by tests/test_auditing.py and
benchmarks/audit_quality.py.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

# No sandbox and no GPU (as root on a server there are neither), and none of the background
# fetches (updates, sync, QUIC) that would wait on a network.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def screenshot(page: Path, png: Path, *, width: int, height: int, timeout_s: float = 120) -> Path:
    """Write ``page`` as Chromium draws it in a ``width`` x ``height`` window to ``png``."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                "chromium",
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--screenshot={png}",
                f"--window-size={width},{height}",
                Path(page).resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=timeout_s,
        )
    return Path(png)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("page", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--size", default="1280x2400", help="WIDTHxHEIGHT of the window [1280x2400]")
    args = p.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    print(screenshot(args.page, args.png, width=width, height=height))


if __name__ == "__main__":
    main()
