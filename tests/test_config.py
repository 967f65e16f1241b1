"""config.py: each verb's settings are validated once, with one-line messages, and frozen."""

from __future__ import annotations

import dataclasses

import pytest

from embedcache.config import CompareConfig, ExtractConfig, FinetuneConfig, HeadConfig
from embedcache.errors import EmbedcacheError

BAD_DEVICE = r"^--device must be one of auto, cpu, cuda or cuda:N, got 'tpu'$"


@pytest.mark.parametrize(
    "config, options, message",
    [
        (
            ExtractConfig,
            {"dtype": "int8"},
            r"^--dtype must be one of float16, float32, got 'int8'$",
        ),
        (ExtractConfig, {"batch_size": 0}, r"^--batch-size must be at least 1, got 0$"),
        (ExtractConfig, {"num_workers": -1}, r"^--num-workers must be at least 0, got -1$"),
        (ExtractConfig, {"image_size": 8}, r"^--image-size must be at least 16, got 8$"),
        (ExtractConfig, {"val_fraction": 1.0}, r"^--val-fraction must be below 1.0, got 1.0$"),
        (
            ExtractConfig,
            {"val_fraction": float("nan")},
            r"^--val-fraction must be a finite number, got nan$",
        ),
        (ExtractConfig, {"device": "tpu"}, BAD_DEVICE),
        (
            HeadConfig,
            {"head": "svm"},
            r"^--head must be one of auto, linear, mlp, logreg, knn, got 'svm'$",
        ),
        (HeadConfig, {"epochs": 0}, r"^--epochs must be at least 1, got 0$"),
        (HeadConfig, {"lr": [1e-3, -1.0]}, r"^--lr must be at least 0.0, got -1.0$"),
        (HeadConfig, {"weight_decay": []}, r"^--weight-decay needs at least one value$"),
        (HeadConfig, {"dropout": 1.0}, r"^--dropout must be below 1.0, got 1.0$"),
        (HeadConfig, {"lr": float("inf")}, r"^--lr must be a finite number, got inf$"),
        (HeadConfig, {"device": "tpu"}, BAD_DEVICE),
        (
            FinetuneConfig,
            {"augment": "heavy"},
            r"^--augment must be one of none, light, strong, got 'heavy'$",
        ),
        (
            FinetuneConfig,
            {"prefix_cache": "ram"},
            r"^--prefix-cache must be one of auto, memory, disk, off, got 'ram'$",
        ),
        (
            FinetuneConfig,
            {"precision": "fp8"},
            r"^--precision must be one of auto, fp32, bf16, fp16, got 'fp8'$",
        ),
        (FinetuneConfig, {"views": -1}, r"^--views must be at least 0, got -1$"),
        (
            FinetuneConfig,
            {"label_smoothing": 1.5},
            r"^--label-smoothing must be below 1.0, got 1.5$",
        ),
        (FinetuneConfig, {"lr": -0.1}, r"^--lr must be at least 0.0, got -0.1$"),
        (FinetuneConfig, {"device": "tpu"}, BAD_DEVICE),
        (
            CompareConfig,
            {"augment": "heavy"},
            r"^--augment must be one of none, light, strong, got 'heavy'$",
        ),
        (CompareConfig, {"tutorial_epochs": 0}, r"^--tutorial-epochs must be at least 1, got 0$"),
        (CompareConfig, {"finetune_epochs": 0}, r"^--finetune-epochs must be at least 1, got 0$"),
        (CompareConfig, {"device": "tpu"}, BAD_DEVICE),
    ],
)
def test_a_bad_setting_is_refused_in_one_line(config, options, message):
    with pytest.raises(EmbedcacheError, match=message):
        config(**options)


@pytest.mark.parametrize("config", [ExtractConfig, HeadConfig, FinetuneConfig, CompareConfig])
@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_every_device_form_is_accepted(config, device):
    assert config(device=device).device == device


def test_the_defaults_are_valid():
    for config in (ExtractConfig, HeadConfig, FinetuneConfig, CompareConfig):
        config()


@pytest.mark.parametrize(
    "value, expected",
    [(1e-3, (0.001,)), ([1e-3, 1e-2], (0.001, 0.01)), ([1], (1.0,)), ((0.5,), (0.5,))],
)
def test_a_head_learning_rate_becomes_a_tuple_of_floats(value, expected):
    cfg = HeadConfig(lr=value, weight_decay=value)
    assert cfg.lr == expected and cfg.weight_decay == expected
    assert all(type(v) is float for v in cfg.lr)


def test_the_finetune_head_lr_depends_on_whether_a_head_is_reattached():
    assert FinetuneConfig().head_lr == 1e-3
    assert FinetuneConfig(head="head.pt").head_lr == 3e-4
    assert FinetuneConfig(head="head.pt", lr=0.02).head_lr == 0.02
    assert FinetuneConfig(lr=0.02).head_lr == 0.02


def test_no_augmentation_caches_no_views():
    assert FinetuneConfig(augment="none", views=4).num_views == 0
    assert FinetuneConfig(augment="light", views=4).num_views == 4
    assert FinetuneConfig(augment="strong", views=0).num_views == 0


def test_values_are_normalised_to_their_plain_form():
    assert FinetuneConfig(unfreeze="ALL").unfreeze == "all"
    assert FinetuneConfig(unfreeze=3).unfreeze == "3"
    assert CompareConfig(unfreeze=[0, "all"]).unfreeze == ("0", "all")


def test_build_applies_changes_and_validates_them():
    base = HeadConfig(epochs=7, head="mlp")
    changed = HeadConfig.build(base, epochs=3)
    assert (changed.epochs, changed.head) == (3, "mlp")
    assert base.epochs == 7
    assert HeadConfig.build(None, epochs=4) == HeadConfig(epochs=4)
    assert base.replace(hidden=8).hidden == 8
    with pytest.raises(EmbedcacheError, match=r"^--epochs must be at least 1, got 0$"):
        HeadConfig.build(base, epochs=0)


@pytest.mark.parametrize("config", [ExtractConfig, HeadConfig, FinetuneConfig, CompareConfig])
def test_configs_are_frozen(config):
    cfg = config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.device = "cpu"


def test_batch_size_takes_a_number_or_auto_and_auto_is_the_default_batch_on_a_cpu(tmp_path):
    from click.testing import CliRunner
    from conftest import make_tree

    from embedcache import extract
    from embedcache.cli import main
    from embedcache.config import ExtractConfig

    assert ExtractConfig(batch_size="auto").batch_size == "auto"
    with pytest.raises(
        EmbedcacheError, match=r"^--batch-size must be a number or auto, got 'big'$"
    ):
        ExtractConfig(batch_size="big")
    r = CliRunner().invoke(main, ["extract", "d", "--out", "c.h5", "--batch-size", "big"])
    assert r.exit_code == 2 and "expected a whole number or auto, got 'big'" in r.output
    data = make_tree(tmp_path / "d", per_class=2)
    out = extract(
        data,
        out=tmp_path / "c.h5",
        backbone="resnet18",
        weights="none",
        image_size=32,
        batch_size="auto",
        num_workers=0,
        device="cpu",
        progress=False,
    )
    assert out.extracted == 8
