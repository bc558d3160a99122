"""Decide the device once, at import, and describe it as a profile everything else reads.

A profile says which kernels to bind (kernels.py), the default compute dtype, how many rows of
logits the fused head + loss holds at a time, the HellaSwag batch, and how to measure the peak
matmul speed that MFU is reported against. It is chosen before `mlx.core` is imported (the Linux
CPU backend needs its BLAS loaded first, see cpu.py), from the platform and the installed MLX
build; NANOGPT_MLX_PROFILE=cpu-x86|cpu-arm|metal|cuda forces one, so that the GPU code paths can
run in CPU tests.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (mlx.core is imported once the profile is chosen)
    import mlx.core as mx

PROFILE_ENV = "NANOGPT_MLX_PROFILE"
# the widest model (n_embd) whose CPU step is split over threads by default: the share of one-core work falls as
# 1 / n_embd (its softmaxes and activations against the matmuls), and at GPT-2's 768 the threads gained no time
# for their extra head and gradient memory (README)
WIDEST_THREADED = 512
CUDNN_TILE = 128  # cuDNN's fused attention backward takes whole tiles of this many queries (MLX falls back otherwise)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    dtype: str  # default compute dtype of training (`--dtype` overrides)
    # MLX computes exp/tanh in scalar software and reduces rows one number at a time here: use cpu_math.py's
    software_math: bool
    cpu_backend: bool  # MLX's CPU backend: BLAS preload, malloc tuning, gemv shim (cpu.py, at its import)
    loss_rows: int  # rows of logits the fused head + loss computes at a time (0: all)
    eval_batch: int  # HellaSwag examples (4 rows each) per forward pass
    gemm_n: int  # size of the square matmul timed for MFU's peak
    fused_attention_backward: bool  # MLX's fused SDPA has a fused backward on this device (cuDNN)
    cuda_kernels: bool = False  # bind cuda.py's kernels (the head + loss) when MLX runs on an NVIDIA GPU
    saved_per_layer: int = 22  # values the backward keeps per token and layer, in n_embd units (memory.py),
    # fitted to measured peaks: MLX's CPU backend keeps LayerNorm ins and outs, qkv, the attention output, the
    # residual sums and the MLP's 4x-wide input and GELU output. The CUDA value is the H200 fit less what the
    # GPU profiles' MLP recomputation (kernels.py) saves under the same profile on the CPU: to refit on a GPU.
    # Metal takes the GPU's values until a Mac measures its own: its backend also holds queued work's buffers
    saved_float32: int = 0  # of saved_per_layer, the values a GELU MLP keeps in float32 in a bfloat16 step: on the
    # CPU backend its float32 graph (kernels.py; benchmarks/activation_memory.py measures it)
    checkpoint_frees: float = 1.0  # share of the activations that --activation-checkpointing frees, against
    # keeping only block inputs and one block: all of it on the CPU backend, less on a GPU (fitted there)
    backward_work: int = 0  # values per token, in n_embd units, that one layer's backward holds beside what the
    # layers keep (its gradients' temporaries; with checkpointing, its recomputation's too): fitted on the CPU
    # backend with a small vocab, where the head does not hide them; the GPUs' are part of saved_per_layer's fit

    def fused_attention(self, dtype: str, head_dim: int) -> bool | None:
        """How causal training attention runs (kernels.py): MLX's fused kernel both ways (True; cuDNN's, over a
        sequence padded to whole tiles of CUDNN_TILE queries where it is not one); MLX's fused forward and a
        backward that recomputes the probabilities (False); or plain ops (None): on the CPUs, where MLX's fused
        attention is those same ops (its CPU backend has no kernel for it), and where cuDNN does not apply."""
        if self.cpu_backend:
            return None
        if not self.fused_attention_backward:
            return False
        return None if _no_cudnn(dtype, head_dim) else True

    def dtype_note(self, dtype: str | mx.Dtype) -> str | None:
        """Why computing in `dtype` (a name, or mx.bfloat16...) is a poor choice here, or None."""
        name = dtype_name(dtype)
        if name != "float32" and self.cpu_backend:
            return f"{name} is slow on MLX's CPU backend (float32 is faster there)"
        return None

    def attention_note(self, dtype: str, head_dim: int, seq_len: int) -> str | None:
        """Why training attention will not use a fused kernel in both directions, or what it costs to, or None."""
        fused = self.fused_attention(dtype, head_dim)
        if fused:
            padded = -(-seq_len // CUDNN_TILE) * CUDNN_TILE
            return None if padded == seq_len else (
                f"{self.name}: attention pads seq_len {seq_len} to {padded} for cuDNN's fused backward (whole tiles "
                f"of {CUDNN_TILE} queries): {(padded / seq_len) ** 2 - 1:.0%} more attention work than at {seq_len}")
        if self.cpu_backend:
            return None  # on a CPU plain ops are what MLX has
        blocks = "the probabilities, 128 queries at a time (a causal block skips the keys after it)"
        if not self.fused_attention_backward:
            return f"{self.name}: MLX's fused attention has no fused backward here; the backward recomputes {blocks}"
        reasons = ", ".join(_no_cudnn(dtype, head_dim))
        return f"{self.name}: no cuDNN attention for {reasons}: plain ops that keep {blocks}"


def dtype_name(dtype: str | mx.Dtype) -> str:
    """A dtype's name as messages and the profiles' choices say it ("bfloat16"), of an MLX dtype or a name."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("mlx.core.")


def _no_cudnn(dtype: str, head_dim: int) -> list[str]:
    """Why cuDNN's fused attention cannot take this dtype and head size (empty if it can)."""
    reasons = [] if dtype in ("bfloat16", "float16") else [f"dtype {dtype} (needs bfloat16/float16)"]
    if head_dim % 8 or head_dim > 128:
        reasons.append(f"head dim {head_dim} (needs a multiple of 8, <= 128)")
    return reasons


# MLX's CPU backend's saved_per_layer, saved_float32 and backward_work (memory.py)
BACKEND_SAVED, BACKEND_FLOAT32, BACKEND_WORK = 26, 12, 26
PROFILES = {
    p.name: p
    for p in [
        Profile("cpu-x86",
                "MLX CPU backend on x86-64 (MKL or OpenBLAS where found, multiply-add exp, reductions by lanes)",
                "float32", software_math=True, cpu_backend=True, loss_rows=128, eval_batch=1, gemm_n=1024,
                fused_attention_backward=False, saved_per_layer=BACKEND_SAVED, saved_float32=BACKEND_FLOAT32,
                backward_work=BACKEND_WORK),
        Profile("cpu-arm", "MLX CPU backend on ARM", "float32", software_math=False, cpu_backend=True,
                loss_rows=128, eval_batch=1, gemm_n=1024, fused_attention_backward=False,
                saved_per_layer=BACKEND_SAVED, saved_float32=BACKEND_FLOAT32,
                backward_work=BACKEND_WORK),
        Profile("metal", "Apple silicon GPU (Metal)", "bfloat16", software_math=False, cpu_backend=False,
                loss_rows=2048, eval_batch=8, gemm_n=4096, fused_attention_backward=False, saved_per_layer=28,
                checkpoint_frees=0.25),
        Profile("cuda", "NVIDIA GPU (mlx[cuda])", "bfloat16", software_math=False, cpu_backend=False,
                loss_rows=4096, eval_batch=8, gemm_n=8192, fused_attention_backward=True, cuda_kernels=True,
                saved_per_layer=28, checkpoint_frees=0.25),
    ]
}

note: str = ""  # a problem with the decision, shown once by the CLI


def _cuda_build_installed() -> bool:
    for name in ("mlx-cuda-13", "mlx-cuda-12", "mlx-cuda"):
        try:
            metadata.version(name)
            return True
        except metadata.PackageNotFoundError:
            pass
    return False


def detect() -> str:
    """The profile name for this machine, from the platform and the installed MLX build (no mlx import)."""
    machine = platform.machine().lower()
    if sys.platform == "darwin" and machine == "arm64":
        return "metal"
    if sys.platform.startswith("linux") and _cuda_build_installed():
        return "cuda"
    return "cpu-x86" if machine in ("x86_64", "amd64") else "cpu-arm"


def choose() -> Profile:
    """NANOGPT_MLX_PROFILE if set (and valid), else the detected profile."""
    global note
    forced = os.environ.get(PROFILE_ENV, "").strip()
    if forced and forced not in PROFILES:
        note = f"{PROFILE_ENV}={forced!r} is not a profile ({', '.join(PROFILES)}); using the detected one"
        forced = ""
    return PROFILES[forced or detect()]


PROFILE = choose()


def setup() -> None:
    """Prepare the process for the chosen profile; must run before `mlx.core` is imported."""
    if PROFILE.cpu_backend:
        from . import cpu  # noqa: F401  (importing it loads a BLAS and tunes malloc, before mlx.core)
    atexit.register(_finish_queued_work)  # registered first, it runs after the atexit work of later modules


def _finish_queued_work() -> None:
    """Wait, at exit, for the work queued on MLX's default stream and not waited for (mx.async_eval: generate queues
    the next token's step before yielding one, and a caller that stops early leaves it running). MLX never stops
    its stream thread, so that work ran on through the process's C teardown: it freed buffers into MLX's allocator
    cache after exit had destroyed it (a SIGSEGV, or a corrupted heap that glibc aborted on later: "corrupted
    double-linked list"), and on the CPU called OpenBLAS while it shut its threads down (a hang)."""
    import mlx.core as mx

    with contextlib.suppress(RuntimeError):  # a failed step's error was the caller's to see; the process is ending
        mx.synchronize()


def child_env() -> dict[str, str]:
    """os.environ for a child process: without what the CPU profiles set for MLX alone (cpu_jit.child_env)."""
    if PROFILE.cpu_backend:
        from . import cpu_jit

        return cpu_jit.child_env()
    return dict(os.environ)


@lru_cache(maxsize=None)
def peak_flops(dtype: str = "float32", seconds: float = 0.3) -> float:
    """Measured matmul throughput (FLOP/s) of the default device in `dtype`: the denominator of MFU. The fastest
    of the matmuls run in `seconds`: on a machine shared with other work the mean reads low (MFU over 100%)."""
    import mlx.core as mx

    n = PROFILE.gemm_n if mx.default_device() == mx.gpu else 1024  # a forced GPU profile may run on the CPU
    a = mx.random.normal((n, n)).astype(getattr(mx, dtype))
    mx.eval(a @ a)  # warm up
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        t = time.perf_counter()
        mx.eval(a @ a)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def mfu_peak(dtype: str) -> float:
    """The denominator of MFU for a step computing in `dtype`: peak_flops(dtype), except on MLX's CPU backend,
    whose bfloat16 matmuls are emulated, slower than the float32 ones a bfloat16 step also runs: float32's there."""
    import mlx.core as mx

    return peak_flops("float32" if mx.default_device() == mx.cpu else dtype)


def cores() -> int:
    """The CPUs this process may run on: its affinity (a container's cpuset, taskset), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def step_threads(n_embd: int) -> int:
    """Threads a training micro-batch's rows are split over by default (threads.py): on MLX's CPU backend, which
    runs its elementwise kernels, reductions and copies on one core and only its GEMMs on more, one per BLAS
    thread (MKL counts a CPU's physical cores by default, OpenBLAS its hardware threads), for a model narrow enough
    that that work counts; 1 on a GPU, which parallelizes one stream's work itself."""
    if not PROFILE.cpu_backend or n_embd > WIDEST_THREADED:
        return 1
    from . import cpu

    return cpu.blas_threads()


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Each GEMM on one thread while the block runs: the threads of threads.py run theirs side by side."""
    if not PROFILE.cpu_backend:
        yield
        return
    from . import cpu

    before = cpu.blas_threads()
    cpu.set_blas_threads(1)
    try:
        yield
    finally:
        cpu.set_blas_threads(before)


def system_memory() -> tuple[float, float | None]:
    """(total, available) system memory in GiB; available is None where the OS does not say."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return total, int(fields["MemAvailable"].split()[0]) / 2**20  # kB -> GiB
    except (OSError, KeyError, ValueError):
        return total, None


def memory_bytes() -> int:
    """Memory the device can use: GPU memory (Metal's recommended working set) or system RAM."""
    import mlx.core as mx

    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if isinstance(info.get(key), int) and info[key] > 0:
            return info[key]
    return int(system_memory()[0] * 2**30)


def notes() -> list[str]:
    """Problems with the set-up that the user should hear about once (a bad forced profile, no fast BLAS)."""
    found = [note] if note else []
    if PROFILE.cpu_backend:
        from . import cpu

        found += cpu.notes
    return found


def say_notes(dtype: str | mx.Dtype | None = None) -> None:
    """notes(), and why `dtype` is slow here (Profile.dtype_note) where it is, each said once a process: at a
    command's start, and where Python code loads a model or makes a Trainer (a notebook that imported mlx.core first
    ran on MLX's slow reference BLAS, and nothing said so)."""
    from .console import warn_once

    for text in filter(None, [*notes(), dtype and PROFILE.dtype_note(dtype)]):
        warn_once(text, "note")


def explain(e: RuntimeError) -> str | None:
    """One line for an MLX error whose cause the profile knows (cpu_jit.explain), or None."""
    if not PROFILE.cpu_backend:
        return None
    from . import cpu_jit

    return cpu_jit.explain(e)


def info() -> list[tuple[str, str]]:
    """(label, value) lines for `nanogpt-mlx info`."""
    import mlx.core as mx

    narrow, wide = step_threads(WIDEST_THREADED), step_threads(WIDEST_THREADED + 1)  # (a GPU's: 1 and 1)
    threads = f"{narrow} (n_embd <= {WIDEST_THREADED}), else {wide}" if narrow != wide else str(narrow)
    lines = [("profile", f"{PROFILE.name}: {PROFILE.description}" + (f"  [{note}]" if note else "")),
             ("device", str(mx.default_device())),
             ("dtype", f"{PROFILE.dtype} by default (--dtype overrides)"),
             ("loss chunk", f"{PROFILE.loss_rows or 'all'} rows of logits at a time"),
             ("step threads", f"{threads}: a micro-batch's rows split over them in training (--threads)")]
    if PROFILE.cpu_backend:
        from . import cpu

        lines += cpu.info()
    return lines
