"""runtime.py: device and precision decided in one place; seeding that does not leak."""

from __future__ import annotations

import os
import platform
import sys

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


def test_half_precision_can_be_asked_for_on_cpu():
    assert autocast_dtype(CPU, "bf16") is torch.bfloat16
    assert autocast_dtype(CPU, "fp16") is torch.float16


@pytest.mark.parametrize(("native", "allowed", "expected"), [
    (True, True, torch.bfloat16), (True, False, None), (False, True, None), (False, False, None)])  # fmt: skip
def test_auto_on_cpu_is_bf16_only_with_native_bf16_and_the_callers_consent(monkeypatch, native, allowed, expected):  # fmt: skip
    from embedcache import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert autocast_dtype(CPU, "auto", cpu_bf16=allowed) is expected


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    import builtins

    from embedcache import runtime

    real_open = builtins.open
    for flags, expected in (("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True), ("fpu avx512f avx2", False)):  # fmt: skip
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor : 0\nflags : {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda f, *a, _i=info, **k: real_open(_i if f == "/proc/cpuinfo" else f, *a, **k))  # fmt: skip
        assert runtime.cpu_has_native_bf16() is expected, flags


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


ALLOC_PROBE = """
import resource, sys
import numpy as np
from embedcache.runtime import tune_allocator
tuned = tune_allocator()
assert tune_allocator() == tuned  # decided once
np.ones(8 << 20)  # one 64 MB buffer first, so both runs start alike
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    np.ones(8 << 20)  # 64 MB, allocated and freed: what forward passes do with activations
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env) -> tuple[str, int]:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", ALLOC_PROBE], capture_output=True, text=True, env={**os.environ, **env}, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    tuned, faults = r.stdout.split()
    return tuned, int(faults)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_the_tuned_allocator_keeps_freed_buffers_instead_of_faulting_in_new_pages():
    tuned, faults = _probe()
    default, default_faults = _probe(EMBEDCACHE_MALLOC="default")
    assert (tuned, default) == ("True", "False")
    # default glibc maps each buffer anew (above its 32 MB ceiling) and the kernel faults in and
    # zeroes fresh pages every time (fewer faults with huge pages, still some per buffer);
    # tuned, the freed pages are reused
    assert default_faults >= 20 * 100 and faults < default_faults / 10


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


def test_auto_batch_size_takes_the_largest_candidate_that_fits_and_stops_at_the_first_that_does_not():
    from embedcache.runtime import choose_batch_size

    tried = []

    def fits_up_to(limit):
        return lambda n: tried.append(n) or n <= limit

    assert choose_batch_size(fits_up_to(300)) == 256 and tried == [64, 128, 256, 512]
    assert choose_batch_size(fits_up_to(10**6)) == 1024
    assert (
        choose_batch_size(fits_up_to(10)) == 64
    )  # nothing fits: the smallest, and let it fail loudly
    tried.clear()
    choose_batch_size(lambda n: tried.append(n) or n != 128)  # stops at the first failure
    assert tried == [64, 128]


def test_compile_auto_is_for_gpu_runs_of_ten_thousand_images_or_more():
    from embedcache.runtime import should_compile

    cuda = torch.device("cuda", 0)
    assert should_compile("auto", cuda, 10_000) and not should_compile("auto", cuda, 9_999)
    assert not should_compile("auto", CPU, 10**6)
    assert should_compile("on", CPU, 1) and not should_compile("off", cuda, 10**6)
