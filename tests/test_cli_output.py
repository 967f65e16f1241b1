"""What the verbs print: the answer first in plain words, then where the files went, then the
next command; the working (tables, choices) only with --verbose. And --help loads no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import make_tree

from embedcache.cli import main

TINY = ["-b", "timm:test_efficientnet", "-w", "none", "--image-size", "32"]


def _run(*args) -> list[str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output.strip().splitlines()


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow")
    make_tree(tmp / "photos", splits=("train", "val", "test"), classes=("a", "b", "c"))
    return tmp


@pytest.mark.parametrize("verb", ["", "extract", "train-head", "evaluate", "audit", "compare"])
def test_help_loads_no_torch(verb):
    """Issue 33: `embedcache --help` took 4.7-10 s, importing torch through cli.show."""
    code = (
        "import sys\nfrom embedcache.cli import main\n"
        f"try:\n    main({[verb, '--help'] if verb else ['--help']!r})\n"
        "except SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:5]\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "Usage: " in p.stdout


def test_each_verb_leads_with_its_result_and_ends_with_the_next_command(flow):
    c, h = flow / "c.h5", flow / "h.pt"
    out = _run("extract", flow / "photos", *TINY, "--out", c, "-q")
    assert out[0] == f"{c}: features of 54 images (train 18, val 18, test 18)", out
    assert out[-1].startswith(f"next: embedcache train-head {c} --out head.pt"), out
    out = _run("train-head", c, "--out", h, "-q")
    assert out[0].startswith(f"{h}: ") and "val accuracy " in out[0] and "%" in out[0], out
    assert out[-2].startswith(f"wrote {h}, h.metrics.json") and "h.curves.png" in out[-2], out
    assert out[-1] == f"next: embedcache evaluate {h} {c} --split test", out
    assert not any(line.lstrip().startswith("lam ") for line in out)  # the working: --verbose
    verbose = _run("train-head", c, "--out", h, "-q", "--verbose")
    assert any(line.lstrip().startswith("lam ") for line in verbose), verbose
    out = _run("evaluate", h, c, "--split", "test", "-q")
    assert out[0].startswith("test: accuracy ") and f"on 18 images of {c}" in out[0], out
    out = _run("audit", c, "--out", flow / "audit", "-q")
    assert out[0].startswith(f"{c}: ") and " exact-duplicate groups (" in out[0], out
    assert out[-1].startswith(f"next: embedcache train-head {c}"), out


def test_the_text_confusion_matrix_stops_at_twenty_classes(tmp_path):
    """Issue 33: an 81-class matrix printed 527-character lines."""
    names = tuple(f"k{i:02d}" for i in range(21))
    make_tree(tmp_path / "d", splits=("train", "val"), classes=names, per_class=2)
    c, h = tmp_path / "c.h5", tmp_path / "h.pt"
    _run("extract", tmp_path / "d", *TINY, "--out", c, "-q")
    _run("train-head", c, "--out", h, "--head", "linear", "--epochs", "2", "-q")
    out = _run("evaluate", h, c, "--split", "val", "-q", "--verbose")
    assert "confusion: 21 classes, in the plot and in --json" in out, out
    table = [line for line in out if str(tmp_path) not in line]  # the long paths aside
    assert max(len(line) for line in table) < 120, max(table, key=len)
