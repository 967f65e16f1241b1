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
        match=rf"^--device {name} was asked but no CUDA GPU is available; "
        r"use --device cpu or auto$",
    ):
        resolve_device(name)
    assert resolve_device("auto") == CPU and resolve_device("cpu") == CPU


def test_half_precision_can_be_asked_for_on_cpu():
    assert autocast_dtype(CPU, "bf16") is torch.bfloat16
    assert autocast_dtype(CPU, "fp16") is torch.float16


@pytest.mark.parametrize(
    ("native", "allowed", "expected"),
    [(True, True, torch.bfloat16), (True, False, None), (False, True, None), (False, False, None)],
)
def test_auto_on_cpu_is_bf16_only_with_native_bf16_and_the_callers_consent(
    monkeypatch, native, allowed, expected
):
    from embedcache import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    assert autocast_dtype(CPU, "auto", cpu_bf16=allowed) is expected


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_similarity_matmuls_are_bf16_on_a_cpu_only_with_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(runtime_mod, "cpu_has_native_bf16", lambda: native)
    assert runtime_mod.similarity_dtype(CPU) is expected


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, tmp_path):
    import builtins

    from embedcache import runtime

    real_open = builtins.open
    for flags, expected in (
        ("fpu avx512f avx512_bf16", True),
        ("fpu amx_bf16 amx_tile", True),
        ("fpu avx512f avx2", False),
    ):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor : 0\nflags : {flags}\n")
        monkeypatch.setattr(
            builtins,
            "open",
            lambda f, *a, _i=info, **k: real_open(_i if f == "/proc/cpuinfo" else f, *a, **k),
        )
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

    r = subprocess.run(
        [sys.executable, "-c", ALLOC_PROBE],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )
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


RETURN_PROBE = """
import sys
import numpy as np
from embedcache.runtime import returning_memory


def rss():
    return int(next(x for x in open("/proc/self/status") if x.startswith("VmRSS")).split()[1])


def churn():
    np.ones(3 << 20)  # a 24 MB block freed: glibc's mmap threshold rises above 12 MB
    before, big, small = rss(), [], []
    for _ in range(40):
        big.append(np.ones(3 << 19))  # 12 MB blocks, all freed below
        small.append(np.ones(16 << 10))  # 128 KB kept after each: the heap cannot shrink
    del big
    return (rss() - before) >> 10


if sys.argv[1] == "within":
    with returning_memory():
        print(churn())
else:
    print(churn())
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_memory_freed_within_returning_memory_goes_back_to_the_kernel():
    import subprocess

    def kept_mb(how: str) -> int:
        run = [sys.executable, "-c", RETURN_PROBE, how]
        r = subprocess.run(run, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return int(r.stdout)

    # 40 x 12 MB freed: kept by the heap outside, unmapped within
    assert kept_mb("outside") > 300 and kept_mb("within") < 50


def test_returning_memory_restores_the_threshold_it_found(monkeypatch):
    calls = []

    class Libc:
        def mallopt(self, *a):
            calls.append(a)
            return 1

        def malloc_trim(self, pad):
            calls.append(("trim", pad))

    monkeypatch.setattr(runtime_mod, "_glibc", Libc)
    monkeypatch.setattr(runtime_mod, "_allocator", [])
    threshold = runtime_mod._M_MMAP_THRESHOLD
    with runtime_mod.returning_memory():
        assert calls == [(threshold, runtime_mod.RETURN_BYTES)]
    assert calls[1:] == [(threshold, runtime_mod.GLIBC_MMAP_BYTES), ("trim", 0)]
    monkeypatch.setattr(runtime_mod, "_allocator", [True])  # tune_allocator tuned this process
    calls.clear()
    with runtime_mod.returning_memory():
        pass
    # the memory tune_allocator keeps is not trimmed away
    assert calls[1:] == [(threshold, runtime_mod.ALLOCATOR_KEEP_BYTES)]


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


def test_auto_batch_size_takes_the_largest_that_fits_and_stops_at_the_first_that_does_not():
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


def _conv_bn(bn: bool = True) -> torch.nn.Module:
    norm = torch.nn.BatchNorm2d(4) if bn else torch.nn.GroupNorm(2, 4)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        norm,
        torch.nn.ReLU6(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    if bn:  # statistics that are not the identity, so that folding them shows
        with torch.no_grad():
            (
                norm.running_mean.uniform_(-1, 1),
                norm.running_var.uniform_(0.5, 2),
                norm.weight.uniform_(0.5, 2),
            )
    return net.eval()


def test_compile_auto_compiles_big_gpu_runs_freezes_big_fp32_cpu_runs_and_folds_the_rest():
    from embedcache.runtime import FREEZE_FROM_IMAGES, compile_mode

    cuda, bn, no_bn = torch.device("cuda", 0), _conv_bn(), _conv_bn(bn=False)
    assert compile_mode("auto", cuda, 10_000, bn) == "inductor"
    assert compile_mode("auto", cuda, 9_999, bn) == "folded"
    assert compile_mode("auto", cuda, 9_999, no_bn) is None
    assert compile_mode("auto", CPU, FREEZE_FROM_IMAGES, bn) == "frozen"
    # tracing would not pay: folding needs none
    assert compile_mode("auto", CPU, FREEZE_FROM_IMAGES - 1, bn) == "folded"
    assert compile_mode("auto", CPU, 10**6, no_bn) is None  # nothing to fold: no gain measured
    # bf16: the traced graph is no faster than the folded net (bn_fold_cpu.md)
    assert compile_mode("auto", CPU, 10**6, bn, torch.bfloat16) == "folded"
    assert compile_mode("on", CPU, 1, bn, torch.bfloat16) == "frozen"
    assert (
        compile_mode("on", CPU, 1, no_bn) == "frozen"
        and compile_mode("on", cuda, 1, bn) == "inductor"
    )
    assert (
        compile_mode("off", cuda, 10**6, bn) is None and compile_mode("off", CPU, 10**6, bn) is None
    )


def test_compiled_hands_gpu_runs_to_torch_compile(monkeypatch):
    from embedcache.runtime import FrozenGraph, compiled

    net = _conv_bn()
    monkeypatch.setattr(torch, "compile", lambda m, **kw: ("compiled", m, kw))
    assert compiled(net, "inductor") == ("compiled", net, {"dynamic": False})
    assert compiled(net, None) is net and isinstance(compiled(net, "frozen"), FrozenGraph)


def test_a_frozen_graph_folds_batchnorm_matches_eager_and_serves_other_shapes(monkeypatch):
    from embedcache.runtime import FrozenGraph

    traced = []
    trace = runtime_mod._frozen
    monkeypatch.setattr(
        runtime_mod, "_frozen", lambda net, x: traced.append(x.shape) or trace(net, x)
    )
    net = _conv_bn()
    frozen = FrozenGraph(net)
    x, y = torch.randn(4, 3, 16, 16), torch.randn(3, 3, 16, 16)
    with torch.inference_mode():
        outs = [frozen(z) for z in (x, x, y, y)]
        for z, out in zip((x, x, y, y), outs, strict=True):
            torch.testing.assert_close(out, net(z), rtol=1e-4, atol=1e-5)
    # a shape's first batch is the graph's too: the same bits whichever batch a run starts at
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[2], outs[3])
    graphs = list(frozen.graphs.values())
    assert len(graphs) == 2 and graphs[0] is graphs[1] is not None  # one graph, checked on both
    assert traced == [x.shape]  # the second shape was not traced again
    kinds = {n.kind() for n in graphs[0].graph.nodes()}
    assert "aten::batch_norm" not in kinds and frozen.eager_shapes == []  # folded away


class _Counting(torch.nn.Module):
    """Python state a trace bakes in: the graph multiplies by the count at trace time."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.calls


class _Untraceable(torch.nn.Module):
    def forward(self, x):
        if torch.jit.is_tracing():
            raise RuntimeError("not traceable")
        return x + 1


@pytest.mark.parametrize("net", [_Counting(), _Untraceable()], ids=["disagrees", "fails"])
def test_a_shape_no_graph_agrees_on_runs_eager(net):
    from embedcache.runtime import FrozenGraph

    frozen, x = FrozenGraph(net), torch.ones(2, 3)
    with torch.inference_mode():
        first, second = frozen(x), frozen(x)
    assert frozen.eager_shapes == [(2, 3)] and list(frozen.graphs.values()) == [None]
    if isinstance(net, _Counting):  # eager each time: 1, (the trace ran 2), then 3
        assert torch.equal(first, x) and torch.equal(second, 3 * x)
    else:
        assert torch.equal(first, x + 1) and torch.equal(second, x + 1)
