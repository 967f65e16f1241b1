"""runtime.py: device and precision decided in one place; seeding that does not leak."""

from __future__ import annotations

import pytest
import torch

import embedcache.runtime as runtime_mod
from embedcache.errors import EmbedcacheError
from embedcache.runtime import Run, autocast_dtype, read_ahead, resolve_device, seeded

CPU = torch.device("cpu")


def test_seeded_gives_the_same_numbers_for_the_same_seed():
    with seeded(5):
        a = torch.rand(8)
    with seeded(5):
        b = torch.rand(8)
    with seeded(6):
        c = torch.rand(8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_seeded_leaves_the_callers_generator_as_it_was():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected = torch.rand(4)
    torch.set_rng_state(state)
    with seeded(5):
        torch.rand(100)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(4), expected)


def test_seeded_restores_the_generator_when_the_body_raises():
    state = torch.get_rng_state()
    with pytest.raises(ZeroDivisionError), seeded(5):
        torch.rand(10)
        1 / 0  # noqa: B018
    assert torch.equal(torch.get_rng_state(), state)


def test_an_unknown_device_is_refused():
    with pytest.raises(
        EmbedcacheError, match=r"^--device must be one of auto, cpu, cuda or cuda:N, got 'tpu'$"
    ):
        resolve_device("tpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_says_to_use_cpu(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        EmbedcacheError,
        match=rf"^--device {name} was asked but no CUDA GPU is available; use --device cpu or auto$",
    ):
        resolve_device(name)
    assert resolve_device("auto") == CPU and resolve_device("cpu") == CPU


def test_half_precision_on_cpu_is_refused():
    for precision in ("bf16", "fp16"):
        with pytest.raises(
            EmbedcacheError,
            match=rf"^--precision {precision} needs a CUDA device; use fp32 or auto on CPU$",
        ):
            autocast_dtype(CPU, precision)


def test_auto_and_fp32_precision_on_cpu_mean_no_autocast():
    assert autocast_dtype(CPU, "auto") is None and autocast_dtype(CPU, "fp32") is None
    with pytest.raises(
        EmbedcacheError, match=r"^--precision must be one of auto, fp32, bf16, fp16, got 'fp8'$"
    ):
        autocast_dtype(CPU, "fp8")


def test_amp_is_a_no_op_without_an_autocast_dtype():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with Run(CPU, batch_size=8, workers=0).amp():
        assert not torch.is_autocast_enabled("cpu")
        assert (a @ b).dtype == torch.float32
    with Run(CPU, batch_size=8, workers=0, autocast=torch.bfloat16).amp():
        assert torch.is_autocast_enabled("cpu")
        assert (a @ b).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize(
    "device, threads, cores, expected",
    [("cpu", 2, 2, False), ("cpu", 1, 2, True), ("cpu", 4, 4, False), ("cuda", 2, 2, True)],
)
def test_streamed_features_are_read_ahead_beside_a_gpu_or_a_free_core(
    monkeypatch, device, threads, cores, expected
):
    monkeypatch.setattr(runtime_mod.torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(runtime_mod, "_cores", lambda: cores)
    assert read_ahead(torch.device(device)) is expected
