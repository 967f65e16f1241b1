"""The README and docs/ cannot rot: the site builds strictly, the blocks marked as tested run,
and every figure names the results file it comes from and matches it.

A block is tested when the line before its fence is ``<!-- tested -->``. The blocks of one
page run in order, in one folder holding ``photos/`` (a tiny labelled image folder with
train/val/test splits) and ``photo.jpg``, so a later block may use what an earlier one wrote.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_image, make_tree

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MARK = "<!-- tested -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
RESULTS_LINK = re.compile(r"\]\(([^)\s]*benchmarks/results/[^)\s#]+\.(?:md|json))[^)]*\)")
# a figure is a measurement: a percentage, a ratio, a time or a speed (97.08%, 2.17x, 12.5 s,
# 385 images/s), or a size with decimals (1.02 GB); settings (0.2, 3.10, 8 GB) are not
UNITS = r"%|x\b|\s?(?:s|ms|min|h|images/s|img/s|rows/s|points)\b"
FIGURE = re.compile(
    rf"(?<![\w.])(\d[\d,]*(?:\.\d+)?(?={UNITS})|\d[\d,]*\.\d+(?=\s?(?:kB|MB|GB)\b))"
)


def _blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each paragraph or table outside fenced code and HTML
    comments: a figure and the link to its results file belong to the same one."""
    out, fenced, lines, start = [], False, [], 0
    for n, line in enumerate([*text.splitlines(), ""], 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.lstrip().startswith("<!--"):
            continue
        if line.strip():
            start = start or n
            lines.append(line)
        elif lines:
            if lines[0].startswith("|") and out:  # a table: the paragraph above is its caption
                start, lines = out[-1][0], [out.pop()[1], *lines]
            out.append((start, "\n".join(lines)))
            lines, start = [], 0
    return out


def _tested_blocks(page: Path) -> list[tuple[str, str]]:
    """(language, code) of each block of ``page`` marked as tested, in page order."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if before.strip() == MARK:
            blocks.append((m.group(1), m.group(2)))
    return blocks


TESTED = [p for p in PAGES if _tested_blocks(p)]


def test_the_readme_and_at_least_the_python_page_have_tested_blocks():
    names = {p.relative_to(ROOT).as_posix() for p in TESTED}
    assert {"README.md", "docs/python.md"} <= names, names


# consecutive python blocks run in one interpreter (torch imported once), each in its own
# namespace, as a reader would paste them one after the other
RUNNER = """
import sys, traceback
for i, code in enumerate(sys.argv[1:]):
    try:
        exec(compile(code, f"<block {i}>", "exec"), {"__name__": "__main__"})
    except BaseException:
        traceback.print_exc()
        sys.exit(f"python block {i} of this run failed:\\n{code}")
"""


def _runs(page: Path) -> list[list[str]]:
    """The commands that run the tested blocks of ``page``, in order."""
    runs: list[list[str]] = []
    for i, (lang, code) in enumerate(_tested_blocks(page)):
        if lang in ("bash", "sh"):
            runs.append(["bash", "-euo", "pipefail", "-c", code])
        elif lang == "python":
            if runs and runs[-1][:2] == [sys.executable, "-c"]:
                runs[-1].append(code)
            else:
                runs.append([sys.executable, "-c", RUNNER, code])
        else:
            pytest.fail(f"{page.name} block {i}: a tested block must be bash or python")
    return runs


@pytest.mark.slow  # real weights: the blocks run the default backbone, as a user would
@pytest.mark.parametrize("page", TESTED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_tested_blocks_run(page, tmp_path):
    make_tree(tmp_path / "photos", splits=("train", "val", "test"), per_class=4, ext=".jpg")
    make_image(tmp_path / "photo.jpg", 1, 99, fmt="JPEG")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for cmd in _runs(page):
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert p.returncode == 0, f"{page.name}: {cmd[-1]}\n{p.stdout}{p.stderr}"


def _number(token: str) -> str:
    return token.replace(",", "")


def test_every_figure_links_to_its_results_file_and_matches_it():
    """A figure in prose (97.08%, 2.17x, 12.5 s) sits in a paragraph or table that links to the
    results file it comes from, and that file holds the same number."""
    problems = []
    for page in PAGES:
        for n, block in _blocks(page.read_text(encoding="utf-8")):
            text = re.sub(r"`[^`]*`|\]\([^)]*\)", "", block)  # code, link targets: no figures
            text = re.sub(r"\b95% (?:Wilson )?interval", "", text)  # a level, not a measurement
            figures = FIGURE.findall(text)
            if not figures:
                continue
            targets = [(page.parent / t).resolve() for t in RESULTS_LINK.findall(block)]
            where = f"{page.relative_to(ROOT)}:{n}"
            if not targets:
                problems.append(f"{where}: {figures} without a link to benchmarks/results/")
                continue
            missing = [t for t in targets if not t.is_file()]
            if missing:
                problems.append(f"{where}: links to missing {missing}")
                continue
            sources = " ".join(t.read_text(encoding="utf-8").replace(",", "") for t in targets)
            absent = [f for f in figures if _number(f) not in sources]
            if absent:
                problems.append(f"{where}: {absent} not in {[t.name for t in targets]}")
    assert not problems, "\n".join(problems)


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None,
    reason="mkdocs is not installed (make test installs it: pip install -e '.[dev]')",
)
def test_the_docs_site_builds_strictly(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert (tmp_path / "site" / "reference" / "api" / "index.html").is_file()


def test_the_readme_shows_what_its_quickstart_printed():
    """The quickstart's output in the README is the one benchmarks/quickstart.py recorded (a
    line may be cut short with '...'), and the README links to that file."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = re.search(
        r"\]\((benchmarks/results/quickstart_\w+\.md)\)[^`]*```text\n(.*?)```", text, re.S
    )
    assert shown, "the quickstart's output follows a link to its results file"
    recorded = (ROOT / shown.group(1)).read_text(encoding="utf-8").splitlines()
    for line in shown.group(2).splitlines():
        part = line.removesuffix("...").rstrip(", ")
        assert any(part in r for r in recorded), f"not in {shown.group(1)}: {line}"
