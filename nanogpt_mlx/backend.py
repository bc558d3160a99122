"""Set up MLX's CPU backend before `mlx.core` is imported.

MLX's Linux CPU wheel links the slow reference BLAS. Loading a system OpenBLAS with
RTLD_GLOBAL first makes its `cblas_*` symbols win, which speeds fp32 matmuls ~30x.
Set NANOGPT_MLX_NO_OPENBLAS=1 to keep the bundled BLAS.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import subprocess
import sys

from . import gemv_shim

DISABLE_ENV = "NANOGPT_MLX_NO_OPENBLAS"
_OPENBLAS_GLOBS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas*.so.0",
    "/usr/lib/libopenblas.so.0",
)

# What happened at import time, reported by `nanogpt-mlx info`.
blas: str = "bundled"
gemv: str = "off"  # single-row matmuls through sgemv (gemv_shim.py)
note: str = ""


def _find_openblas() -> str | None:
    for pattern in _OPENBLAS_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def _tune_malloc() -> None:
    """Keep freed buffers in the heap instead of returning them to the OS each step.

    MLX allocates and frees large temporaries on every training step; glibc's default
    thresholds turn each into mmap/munmap plus page faults, and trimming the heap top after a
    step made the next one fault it all in again (~0.8 s a step at B8xT256). Same as exporting
    MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_/MALLOC_TOP_PAD_, but in-process.
    """
    if any(k.startswith("MALLOC_") for k in os.environ):
        return  # the user tuned it already
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold, m_mmap_max = -1, -2, -3, -4
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
    libc.mallopt(m_mmap_max, 0)  # larger blocks (logits: 100s of MB) from the heap too: ~8x faster to fill
    libc.mallopt(m_trim_threshold, -1)  # SIZE_MAX (glibc takes it as size_t): never trim
    libc.mallopt(m_top_pad, 64 * 1024 * 1024)


def setup() -> None:
    """Load OpenBLAS globally (Linux only) unless disabled or too late."""
    global blas, gemv, note
    if platform.system() != "Linux":
        blas = "Accelerate" if platform.system() == "Darwin" else "bundled"
        return
    _tune_malloc()
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        note = f"OpenBLAS disabled by {DISABLE_ENV}"
        return
    if "mlx.core" in sys.modules:
        note = "mlx.core was imported before nanogpt_mlx; import nanogpt_mlx first to use OpenBLAS"
        return
    path = _find_openblas()
    if path is None:
        note = ("OpenBLAS not found: fp32 matmuls use MLX's slow reference BLAS. "
                "Install it with `sudo apt-get install libopenblas0-pthread` (Debian/Ubuntu).")
        return
    try:
        openblas = ctypes.CDLL(path)  # not global yet: the gemv shim has to come first
    except OSError as e:
        note = f"could not load {path}: {e}"
        return
    shim = _install_gemv_shim(openblas)
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    blas = f"OpenBLAS ({path})"
    if shim is not None:
        gemv = "on" if gemv_shim.active(shim) else "off (another cblas_sgemm was loaded first)"


def _install_gemv_shim(openblas: ctypes.CDLL) -> ctypes.CDLL | None:
    global gemv
    if os.environ.get(gemv_shim.DISABLE_ENV, "") not in ("", "0"):
        gemv = f"off ({gemv_shim.DISABLE_ENV} is set)"
        return None
    try:
        return gemv_shim.install(openblas)
    except (OSError, subprocess.SubprocessError) as e:
        gemv = f"off ({e}); with a C compiler token-by-token sampling is ~2x faster"
        return None
