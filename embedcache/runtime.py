"""Device and precision decisions, made in one place and passed down."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

# the thresholds of compile_mode live beside --compile's help, which quotes them
from .config import COMPILE_FROM_IMAGES, DEVICES, FREEZE_FROM_IMAGES, PRECISIONS
from .errors import EmbedcacheError
from .folding import Folded


def resolve_device(name: str = "auto") -> torch.device:
    """Return the torch device for ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise EmbedcacheError(
                f"--device {name} was asked but no CUDA GPU is available; use --device cpu or auto"
            )
        return torch.device(name)
    raise EmbedcacheError(f"--device must be one of {', '.join(DEVICES)} or cuda:N, got {name!r}")


_PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def precision_name(dtype: torch.dtype | None) -> str:
    """fp32, bf16 or fp16: how an autocast dtype is written in caches and summaries."""
    return _PRECISION_NAMES[dtype]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (x86 AVX512-BF16 or AMX, Arm BF16).

    Elsewhere bf16 is emulated and slower than fp32 (measured: lite0 41 vs 62 images/s
    on an AVX512 Xeon without BF16).
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: macOS on Apple M2 and later has BF16; ask sysctl
        return _sysctl_flag("hw.optional.arm.FEAT_BF16")
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def similarity_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the audit's similarity matmuls: bf16 where the hardware computes it (a CUDA
    GPU with bf16, a CPU with native bf16), float32 elsewhere.

    bf16 ran 2.5-3.7x faster than float32 on a 2-core EPYC with AVX512-BF16 (2048 x 1280 rows
    against 32768: 1.4 vs 3.4 s); the search re-scores its candidates in float32, so the
    reported similarities stay float32-exact.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def _sysctl_flag(name: str) -> bool:
    import subprocess

    try:
        r = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.stdout.strip() == "1"


def autocast_dtype(
    device: torch.device, precision: str = "auto", *, cpu_bf16: bool = False
) -> torch.dtype | None:
    """Return the autocast dtype for ``precision`` on ``device``, or None for plain fp32.

    ``auto`` means bf16 on a GPU that supports it, fp16 on an older GPU; on a CPU,
    bf16 when ``cpu_bf16`` (the caller measured it is good enough) and the CPU has
    native bf16, fp32 otherwise. bf16 and fp16 may be asked for on any device.
    """
    if precision not in PRECISIONS:
        raise EmbedcacheError(
            f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    if precision == "fp32":
        return None
    cuda = device.type == "cuda"
    if precision == "auto":
        if cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_bf16 and cpu_has_native_bf16() else None
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise EmbedcacheError(
            f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16; "
            "use --precision fp16 or auto"
        )
    return torch.bfloat16 if precision == "bf16" else torch.float16


def serving_autocast(device: torch.device, precision: str | None) -> torch.dtype | None:
    """The autocast dtype that computes, from images, the features a head was trained on: its
    cache's forward pass (``precision``: fp32, bf16, fp16, or None when not recorded) where
    ``device`` computes that in hardware, else fp32 (emulated bf16 runs slower than fp32, and
    heads scored the same on either features: benchmarks/results/precision_cpu.md)."""
    if precision == "bf16":
        cuda = device.type == "cuda"
        native = torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16()
        return torch.bfloat16 if native else None
    if precision == "fp16" and device.type == "cuda":
        return torch.float16
    return None


# glibc's mallopt parameters, and the size below which freed memory stays in the process.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
ALLOCATOR_KEEP_BYTES = 1 << 30
_allocator: list[bool] = []  # the outcome, once decided


def tune_allocator() -> bool:
    """Keep freed activation memory in the process instead of returning it to the kernel.

    By default glibc hands every buffer over a few MB back to the kernel when it is
    freed, so each forward pass maps fresh pages that the kernel must zero: measured
    here, a third of an ``extract`` run was system time, and lite0's forward pass ran
    at 44 images/s with it and 64 without (benchmarks/results/extract_throughput_*).
    Raising glibc's mmap and trim thresholds at run time keeps those pages. Applied
    once per process; a no-op (False) off Linux/glibc (macOS, musl, Windows) and when
    ``EMBEDCACHE_MALLOC=default``. Returns whether the allocator was tuned.
    """
    if not _allocator:
        _allocator.append(_set_thresholds())
    return _allocator[0]


def _glibc():
    """glibc (its mallopt typed), or None: off Linux/glibc, or ``EMBEDCACHE_MALLOC=default``."""
    if os.environ.get("EMBEDCACHE_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return None
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc


def _set_thresholds() -> bool:
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    # Both: raising the trim threshold alone made it slower (26 vs 44 images/s).
    mmap = mallopt(_M_MMAP_THRESHOLD, ALLOCATOR_KEEP_BYTES)
    trim = mallopt(_M_TRIM_THRESHOLD, ALLOCATOR_KEEP_BYTES)
    return bool(mmap and trim)


RETURN_BYTES = 8 << 20  # within returning_memory(), freed blocks of this size or more
# glibc's own threshold once a block of that size or more was freed (its dynamic ceiling)
GLIBC_MMAP_BYTES = 32 << 20


@contextlib.contextmanager
def returning_memory() -> Iterator[None]:
    """Within: every freed block of RETURN_BYTES or more goes back to the kernel at once, and
    on exit the free pages of the smaller ones (malloc_trim).

    glibc raises its mmap threshold to the size of the first large block freed (up to 32 MiB),
    so the blocks of a blockwise pass over a large array are carved from the heap after that
    and stay with the process when freed. The label check of a 1,000,000-row audit (rows of
    benchmarks/audit_scale.py, 2 cores) kept 530 MiB it had freed and peaked 860 MiB over
    the rows it had read; within this, 95 MiB and 606 MiB, in the same time. At 1 MiB the
    neighbour search of 100,000 rows, mapping and faulting in every 4 MB re-score block anew,
    ran 2.1x slower (1.5x at 8 MiB), so the audit holds this around its label check only.

    On exit the threshold is set back to tune_allocator's where it tuned this process (and
    nothing is trimmed), else to glibc's ceiling, where glibc's own stands once a large block
    was freed (its 128 KiB start mapped the re-score blocks anew: the search ran 1.4x slower).
    A no-op where tune_allocator is one (off Linux/glibc, or ``EMBEDCACHE_MALLOC=default``).
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, RETURN_BYTES)
    try:
        yield
    finally:
        kept = bool(_allocator and _allocator[0])
        libc.mallopt(_M_MMAP_THRESHOLD, ALLOCATOR_KEEP_BYTES if kept else GLIBC_MMAP_BYTES)
        if not kept:  # the free pages of the smaller blocks back too
            libc.malloc_trim(0)


_nvjpeg_ok: dict[str, bool] = {}


def choose_gpu_decode(decode: str, device: torch.device) -> bool:
    """Whether JPEGs are decoded on ``device``: ``gpu`` asks for it (a CUDA device needed),
    ``cpu`` never, ``auto`` on CUDA when torchvision can decode there (tried once)."""
    if decode == "cpu":
        return False
    if device.type != "cuda":
        if decode == "gpu":
            raise EmbedcacheError("--decode gpu needs a CUDA device; use --decode cpu or auto")
        return False
    if str(device) not in _nvjpeg_ok:
        _nvjpeg_ok[str(device)] = _decodes_on(device)
    if decode == "gpu" and not _nvjpeg_ok[str(device)]:
        raise EmbedcacheError(
            "--decode gpu: this torchvision cannot decode JPEG on the GPU (no nvJPEG); "
            "use --decode cpu or auto"
        )
    return _nvjpeg_ok[str(device)]


def _decodes_on(device: torch.device) -> bool:
    import io
    import warnings

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():  # torchvision 0.29 points to torchcodec; decode_jpeg works
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import decode_jpeg

            decode_jpeg(data, device=device)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def _cores() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


# Below this many multiply-adds per pass (rows x dim x classes) full-batch fits on the CPU run on
# one thread: on 930 x 1280 x 12 a pass took 2.6 ms on one thread and 43 ms on two beside another
# busy process (OpenMP threads spin waiting for a core), and small passes gain nothing from two.
ONE_THREAD_MACS = 1 << 27


@contextlib.contextmanager
def threads_for(macs: int, device: torch.device) -> Iterator[None]:
    """One torch thread for a CPU fit of ``macs`` multiply-adds per pass below ONE_THREAD_MACS."""
    before = torch.get_num_threads()
    if device.type == "cpu" and macs < ONE_THREAD_MACS:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_num_workers(device: torch.device) -> int:
    """Decoders: processes beside a GPU (every core but one), threads on a CPU (one per core)."""
    if device.type == "cuda":
        return max(1, min(16, _cores() - 1))
    return max(1, min(8, _cores()))


def read_ahead(device: torch.device) -> bool:
    """Whether streamed features are read in a background thread while the heads train.

    Yes beside a GPU, or when torch leaves a core free. Where torch's threads
    already use every core, the reader only takes cores from the training step:
    on a 2-core CPU, 2M x 1280 float16 rows streamed at 17.9 and 24.8 s/epoch
    without it, 19.8 and 49.5 with it (two rounds; benchmarks/head_stream.py).
    """
    return device.type == "cuda" or torch.get_num_threads() < _cores()


AUTO_BATCH_SIZES = (64, 128, 256, 512, 1024)
AUTO_BATCH_MEMORY = 0.8  # the share of the GPU's memory a probed batch may use at its peak


def auto_batch_size(
    net: torch.nn.Module, crop: int, device: torch.device, amp: torch.dtype | None
) -> int:
    """``--batch-size auto``: on a GPU the largest batch of ``crop`` px images that fits (see
    gpu_batch_fits), probed once; on a CPU the default, as small batches are the fast ones."""
    if device.type != "cuda":
        return default_batch_size(device)
    net = net.to(device).eval().to(memory_format=torch.channels_last)
    return choose_batch_size(gpu_batch_fits(net, crop, device, amp))


def choose_batch_size(fits, candidates: tuple[int, ...] = AUTO_BATCH_SIZES) -> int:
    """The largest of ``candidates`` (ascending) for which ``fits(n)`` holds, trying them in
    order and stopping at the first that does not; the smallest one if none fits."""
    chosen = candidates[0]
    for n in candidates:
        if not fits(n):
            break
        chosen = n
    return chosen


def gpu_batch_fits(net: torch.nn.Module, crop: int, device: torch.device, amp: torch.dtype | None):
    """``fits(n)``: a forward pass of ``n`` images on ``device`` (channels_last, under ``amp``)
    peaks below AUTO_BATCH_MEMORY of the GPU's memory and does not run out of it."""
    total = torch.cuda.get_device_properties(device).total_memory

    def fits(n: int) -> bool:
        x = torch.zeros((n, 3, crop, crop), device=device).to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=amp, enabled=amp is not None):
                net(x)
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del x
            torch.cuda.empty_cache()
        return torch.cuda.max_memory_allocated(device) <= AUTO_BATCH_MEMORY * total

    return fits


def compile_mode(
    compile: str,
    device: torch.device,
    images: int,
    net: torch.nn.Module,
    autocast: torch.dtype | None = None,
) -> str | None:
    """How to run ``net`` for a run of ``images`` on ``device`` (under ``autocast``):
    "inductor" (torch.compile, GPUs), "frozen" (a frozen TorchScript graph, CPUs), "folded"
    (eager, BatchNorm folded into the convolutions and, on a CPU, activations fused into them:
    folding.Folded) or None (eager as built).

    auto freezes large fp32 runs only: under bf16 autocast the traced graph drifted 2.5% from
    eager bf16 on lite0, ran no faster where bf16 is emulated, and 0.68-1.02x the folded and
    fused net where it is native, for 0.4-0.6 s of tracing (benchmarks/results/bn_fold_cpu.md).
    Every other run with BatchNorm is folded: that needs no tracing, so it pays from the first
    batch. ``off`` runs the net as built."""
    if compile == "off":
        return None
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    if device.type == "cuda":
        if compile == "on" or images >= COMPILE_FROM_IMAGES:
            return "inductor"
    elif compile == "on" or (images >= FREEZE_FROM_IMAGES and has_bn and autocast is None):
        return "frozen"
    return "folded" if has_bn else None


def compiled(net: torch.nn.Module, mode: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``net`` as ``mode`` (see :func:`compile_mode`) runs it; the last batch's other shape
    compiles once more."""
    if mode == "inductor":
        return torch.compile(net, dynamic=False)
    if mode == "folded":
        return Folded(net)
    return FrozenGraph(net) if mode == "frozen" else net


class FrozenGraph:
    """``net`` as frozen TorchScript graphs: BatchNorm folded into the convolutions, pointwise
    ops fused. Each new input shape is first run eager and the graph checked against it (a graph
    from another shape, else one traced on it); a shape no graph agrees on runs eager. Every
    batch of a shape a graph serves, its first included, is the graph's output, so a run gives
    the same features whichever batch it starts at."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net
        self.graphs: dict[tuple, torch.jit.ScriptModule | None] = {}  # (shape, dtype, autocast)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (
            tuple(x.shape),
            x.dtype,
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
        )
        if key in self.graphs:
            graph = self.graphs[key]
            return self.net(x) if graph is None else graph(x)
        ref = self.net(x)
        graph = next((g for g in self.graphs.values() if g is not None), None)
        out = _checked(graph, x, ref)
        if out is None:
            graph = _frozen(self.net, x)
            out = _checked(graph, x, ref)
        self.graphs[key] = graph if out is not None else None
        return ref if out is None else out

    @property
    def eager_shapes(self) -> list[tuple]:
        """Input shapes no graph agreed on (run eager)."""
        return [key[0] for key, graph in self.graphs.items() if graph is None]


def _frozen(net: torch.nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule | None:
    """``net`` traced on ``x`` and frozen; None where it does not trace."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript is deprecated (torch 2.14); tracer hints
            return torch.jit.freeze(torch.jit.trace(net, x, check_trace=False))
    except Exception:  # any op the tracer cannot record: the run goes on eager
        return None


def _checked(
    graph: torch.jit.ScriptModule | None, x: torch.Tensor, ref: torch.Tensor
) -> torch.Tensor | None:
    """``graph(x)`` if it matches ``ref`` up to rounding (folded BatchNorm reorders sums: 3e-6
    relative in fp32, 1% in bf16), else None."""
    if graph is None:
        return None
    try:
        out = graph(x)
    except Exception:  # traced with a shape baked in: this shape gets its own graph
        return None
    tol = 1e-3 if ref.dtype == torch.float32 else 5e-2
    scale = ref.float().abs().max().clamp_min(1e-12)
    ok = out.shape == ref.shape and bool((out.float() - ref.float()).abs().max() <= tol * scale)
    return out if ok else None


def default_batch_size(device: torch.device) -> int:
    """Images per forward pass: 8 on a CPU, 128 on a GPU.

    On a CPU small batches are faster per image (activations stay in cache and
    no large buffers are page-faulted in on every call): efficientnet_lite0 ran
    at 70 images/s with batch 8 and 40 with batch 64 on this project's 2-core
    machine; resnet50 at 20 and 17 (batch 8 vs 16).
    """
    return 128 if device.type == "cuda" else 8


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the body with torch's global generator seeded, then restore the caller's state.

    Dropout and stochastic depth inside backbones draw from the global generator
    and take no ``generator`` argument; forking keeps the library's seeding from
    leaking into the caller's random state.
    """
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class Run:
    """Where and how batches of images run: device, batch size, decoders,
    autocast, progress bars."""

    device: torch.device
    batch_size: int
    workers: int
    autocast: torch.dtype | None = None  # None: plain fp32
    progress: bool = False
    gpu_decode: bool = False  # JPEGs decoded on the device (see choose_gpu_decode)
    compile: str = "off"  # compile the network: auto, on, off (see compile_mode)

    def amp(self):
        """The autocast context for this run's device and dtype (a no-op for fp32)."""
        return torch.autocast(
            self.device.type, dtype=self.autocast, enabled=self.autocast is not None
        )


# The forward pass waiting this share of the run for decoded images makes it decode-bound.
DECODE_BOUND_SHARE = 0.2


@dataclass
class Pace:
    """Where a run's time went, measured as it ran: ``waited`` seconds blocked on the decoders
    (they had no batch ready), ``busy`` seconds in the forward pass and the write."""

    waited: float = 0.0
    busy: float = 0.0

    @property
    def bound(self) -> str:
        """decode or compute: which of the two held the run back."""
        total = self.waited + self.busy
        return "decode" if total and self.waited / total >= DECODE_BOUND_SHARE else "compute"

    def as_dict(self) -> dict:
        return {
            "waited_s": round(self.waited, 3),
            "busy_s": round(self.busy, 3),
            "bound": self.bound,
        }

    def verdict(self) -> str:
        """The summary's words: the bound and what would help."""
        share = self.waited / max(self.waited + self.busy, 1e-9)
        if self.bound == "decode":
            return (
                f"decode-bound: the backbone waited {share:.0%} of the time for decoded images "
                "(more cores or --num-workers would help, a GPU alone would not)"
            )
        return (
            f"compute-bound: the backbone waited {share:.0%} of the time for decoded images "
            "(a GPU or a smaller backbone would help, more decoders would not)"
        )


# A run's one bar counts work in estimated seconds (see finetuning.estimate); its ETA is the work
# left over the rate of the whole run so far (tqdm smoothing 0), not of the last steps, so that one
# phase's misestimate (a decode-bound prefix cache, say) does not swing the ETA of the next.
_OVERALL_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"


class Overall:
    """One progress bar with one ETA over a run of unequal phases: finetune's prefix cache and
    epochs, compare's rows. Work is counted in estimated seconds, so the bar moves with the time
    each step should take whatever its kind, and the ETA corrects the estimate as the run goes.

    A run inside a larger one (``Overall.of(larger)``) draws its own bar and moves the larger one
    through the share the larger run gave it (:meth:`part`)."""

    def __init__(self, desc: str, *, enabled: bool, parent: Overall | None = None):
        from tqdm.auto import tqdm

        self.parent, self.total, self.done = parent, 1.0, 0.0
        self._part: tuple[float, float] | None = None  # (work done at its start, its share)
        self.bar = tqdm(
            total=1.0,
            desc=desc,
            disable=not enabled,
            bar_format=_OVERALL_FORMAT,
            dynamic_ncols=True,
            smoothing=0.0,
        )

    @classmethod
    def of(cls, progress: bool | Overall, desc: str) -> Overall:
        """The bar of a run: its own (``progress`` True) or none (False); given a larger run's
        bar, one that also moves that bar."""
        if isinstance(progress, Overall):
            return cls(desc, enabled=progress.enabled, parent=progress)
        return cls(desc, enabled=bool(progress))

    @property
    def enabled(self) -> bool:
        return not self.bar.disable

    def expect(self, work: float) -> None:
        """The run's whole work, in estimated seconds."""
        self.total = self.bar.total = max(float(work), 1e-9)
        self.bar.refresh()

    def advance(self, work: float) -> None:
        """``work`` (estimated seconds) done; never past the end (an overrun waits there)."""
        step = max(0.0, min(float(work), self.total - self.done))
        self.done += step
        self.bar.update(step)
        if self.parent is not None:
            self.parent._share(step / self.total)

    def _share(self, fraction: float) -> None:
        if self._part is not None:
            start, share = self._part
            self.advance(min(fraction * share, start + share - self.done))

    @contextlib.contextmanager
    def part(self, share: float, text: str) -> Iterator[None]:
        """Count what runs in the block as ``share`` of this bar's work: a bar made
        :meth:`of` this one moves it in proportion, and what is left when the block ends (a run
        stopped early, a step with no bar of its own) is added then."""
        self._part = (self.done, float(share))
        self.phase(text)
        try:
            yield
        finally:
            start, _ = self._part
            self._part = None
            self.advance(start + share - self.done)

    def phase(self, text: str) -> None:
        """What runs now, shown after the ETA."""
        self.bar.set_postfix_str(text)

    def writer(self, say: Callable[[str], None]) -> Callable[[str], None]:
        """``say`` clearing the bars while it writes, so that a line never cuts through one."""
        if not self.enabled:
            return say

        def said(line: str) -> None:
            with self.bar.external_write_mode():
                say(line)

        return said

    def finish(self) -> None:
        """The run is done (sooner than planned, maybe): fill the bar and close it."""
        self.advance(self.total - self.done)
        self.close()

    def close(self) -> None:
        """Close the bar where it stands (an interrupted run's stays short)."""
        self.bar.close()
