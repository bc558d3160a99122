"""Everything that exists only because MLX's CPU backend is slow on Linux, used by the CPU profiles.

Importing this module sets up the process, so it must happen before `mlx.core` is imported
(device.setup does it for the CPU profiles only):
- MLX's Linux CPU wheel links the slow reference BLAS. Loading another BLAS with RTLD_GLOBAL first
  makes its `cblas_*` symbols win (fp32 matmuls much faster): on an Intel CPU, Intel's MKL where
  the `mkl` package is installed in this Python environment (nanogpt-mlx[mkl]; its GEMMs are faster
  than OpenBLAS's there, and as fast for a single row), else the system OpenBLAS.
  NANOGPT_MLX_BLAS=mkl, openblas or bundled chooses (bundled: MLX's own).
- Decoding one token multiplies one row by every weight matrix; OpenBLAS's sgemm moves the
  weights about half as fast as sgemv. gemv_shim.c defines a cblas_sgemm that forwards single
  rows to sgemv; it is compiled once with the system C compiler into the user cache (without a
  compiler everything works, just slower). NANOGPT_MLX_NO_GEMV_SHIM=1 turns it off.
- glibc's malloc thresholds are raised so MLX's large per-step temporaries stay in the heap, and every
  thread allocates from that one heap (threads.py runs steps from threads of their own).
- While a training step's rows are split over threads (threads.py), each thread's GEMMs run on one
  core: set_blas_threads.
- MLX's kernel compiler is set up for this CPU (cpu_jit.py).

The kernels that the CPU profiles bind instead of MLX's slow CPU exp, tanh and row reductions are cpu_math.py's.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import platform
import shlex
import shutil
import site
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from . import cpu_jit
from .cpu_jit import child_env, cpuinfo, noexec
from .errors import UserError
from .files import cache_dir, cannot, existing_ancestor, make_dirs

BLAS_ENV = "NANOGPT_MLX_BLAS"
BLAS_CHOICES = ("mkl", "openblas", "bundled")
NO_GEMV_SHIM_ENV = "NANOGPT_MLX_NO_GEMV_SHIM"
_SHIM_CONNECT = "nanogpt_gemv_shim_connect"  # gemv_shim.c's function that is given OpenBLAS's
_OPENBLAS_GLOBS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas*.so.0",
    "/usr/lib/libopenblas.so.0",
)

# What happened at import time, reported by `nanogpt-mlx info`.
blas: str = "bundled"
gemv: str = "off (it needs OpenBLAS)"  # single-row matmuls through sgemv
notes: list[str] = []  # problems with the set-up, said once at a command's start and by `nanogpt-mlx info`
# the loaded BLAS's thread count of its GEMMs: how to read and set it (None: MLX's bundled BLAS, or Accelerate)
_threads: tuple[Callable[[], int], Callable[[int], None]] | None = None


def _find_openblas() -> str | None:
    for pattern in _OPENBLAS_GLOBS:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def _find_mkl() -> str | None:
    """The `mkl` package's MKL in this Python environment (or the user's site, where Python reads it), its newest
    version, beside the Intel OpenMP it runs its threads on (the `intel-openmp` package it depends on): MKL ends
    the process where that cannot load."""
    bases = [sys.prefix] + ([site.getuserbase()] if site.ENABLE_USER_SITE else [])
    for lib in (Path(base) / "lib" for base in dict.fromkeys(bases)):
        found = sorted(lib.glob("libmkl_rt.so.*"), key=lambda p: [int(n) if n.isdigit() else -1
                                                                  for n in p.name.split(".so.")[1].split(".")])
        if found and (lib / "libiomp5.so").is_file():
            return str(found[-1])
    return None


def _intel_cpu() -> bool:
    return cpuinfo("vendor_id") == "GenuineIntel"


def _tune_malloc() -> None:
    """Keep freed buffers in the heap instead of returning them to the OS each step.

    MLX allocates and frees large temporaries on every training step; glibc's default
    thresholds turn each into mmap/munmap plus page faults, and trimming the heap top after a
    step made the next one fault it all in again. Same as exporting
    MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_/MALLOC_TOP_PAD_/MALLOC_ARENA_MAX, but in-process.
    MLX allocates an operation's output in the thread that evaluates it: a thread's own arena (a step
    evaluated outside the main thread, threads.py) would take none of these settings, and its heaps shrink.
    """
    if any(k.startswith("MALLOC_") for k in os.environ):
        return  # the user tuned it already
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold, m_mmap_max, m_arena_max = -1, -2, -3, -4, -8
    libc.mallopt(m_arena_max, 1)  # every thread in the main arena, which the rest tunes
    libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # glibc's maximum on 64-bit
    libc.mallopt(m_mmap_max, 0)  # larger blocks (logits: 100s of MB) from the heap too: faster to fill
    libc.mallopt(m_trim_threshold, -1)  # SIZE_MAX (glibc takes it as size_t): never trim
    libc.mallopt(m_top_pad, 64 * 1024 * 1024)


def _shim_problem(path: Path) -> str:
    """Why the library at `path` is no gemv shim that this process can load ('' where it is one)."""
    try:
        shim = ctypes.CDLL(str(path))  # local: the global scope takes it once it is known to be the shim
    except OSError as e:
        return str(e)
    return "" if hasattr(shim, _SHIM_CONNECT) else f"it defines no {_SHIM_CONNECT}"


def build_gemv_shim() -> Path:
    """Compile gemv_shim.c into the cache (once per version of the source) and return the library."""
    source = resources.files(__package__).joinpath("gemv_shim.c").read_bytes()
    lib = cache_dir() / f"gemv_shim-{platform.machine()}-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if lib.is_file():
        if why := _shim_problem(lib):  # another compiler's (an older version's C++ names), a damaged file
            # not rebuilt now: dlopen would hand back the library loaded from this path above
            try:
                lib.unlink()
            except OSError as e:
                raise OSError(f"{lib} is unusable ({why}) and cannot be removed ({e.strerror})") from None
            raise OSError(f"{lib} was unusable ({why}): removed, to be built again at the next start")
        return lib
    if noexec(lib.parent):  # it could be built, never loaded
        raise OSError(f"{existing_ancestor(lib.parent)} is on a noexec mount")
    cc = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not cc[0]:
        raise OSError("no C compiler (cc) found")
    # built and loaded beside its place in the cache, under a name of its own (dlopen finds a library again by its
    # path, then by its file): only a library that this process can load from there and that is the shim goes there
    try:
        build_dir = tempfile.TemporaryDirectory(dir=make_dirs(lib.parent), prefix=".gemv_shim-")
    except OSError as e:
        raise cannot("write", lib.parent, e) from None
    with build_dir as tmp_dir:
        src, built = Path(tmp_dir) / "gemv_shim.c", Path(tmp_dir) / "gemv_shim.so"
        src.write_bytes(source)
        try:
            proc = subprocess.run([*cc, "-O2", "-shared", "-fPIC", "-o", str(built), str(src)],
                                  capture_output=True, text=True, timeout=120, env=child_env())
        except FileNotFoundError:
            raise OSError(f"C compiler {cc[0]} not found") from None
        if proc.returncode != 0:
            said = proc.stderr.strip().splitlines()
            raise OSError(f"{cc[0]} failed (exit status {proc.returncode}{': ' + said[-1] if said else ''})")
        if why := _shim_problem(built):
            raise UserError(f"{cc[0]} built no usable library ({why})")
        try:
            os.replace(built, lib)
        except OSError as e:
            raise cannot("write", lib, e) from None
    return lib


def _sgemm_address(lib: ctypes.CDLL) -> int | None:
    return ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value


def _install_gemv_shim(openblas: ctypes.CDLL) -> None:
    """Load the shim into the global symbol scope, wired to `openblas` (loaded RTLD_LOCAL so far).

    Must run before OpenBLAS is made global and before mlx.core is imported: the first
    cblas_sgemm in the global scope is the one MLX's calls bind to.
    """
    global gemv
    if os.environ.get(NO_GEMV_SHIM_ENV, "") not in ("", "0"):
        gemv = f"off ({NO_GEMV_SHIM_ENV} is set)"
        return
    try:
        shim = ctypes.CDLL(str(build_gemv_shim()), mode=ctypes.RTLD_GLOBAL)
    except (OSError, UserError, subprocess.SubprocessError) as e:  # no compiler, a cache it cannot write, no shim
        gemv = f"off ({e}); with it token-by-token sampling is faster"
        return
    connect = getattr(shim, _SHIM_CONNECT)
    connect.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    connect(ctypes.cast(openblas.cblas_sgemm, ctypes.c_void_p), ctypes.cast(openblas.cblas_sgemv, ctypes.c_void_p))
    gemv = "on" if _sgemm_address(ctypes.CDLL(None)) == _sgemm_address(shim) else \
        "off (another cblas_sgemm was loaded first)"


def _setup() -> None:
    """Tune malloc, compile kernels for AVX2 and load a BLAS globally (_load_blas), on Linux."""
    global blas
    if platform.system() != "Linux":
        blas = "Accelerate" if platform.system() == "Darwin" else "bundled"
        return
    _tune_malloc()
    cpu_jit.setup(notes)
    _load_blas()


def _choose_blas() -> str:
    """mkl, openblas or bundled: NANOGPT_MLX_BLAS's choice, else MKL on an Intel CPU where it is installed (its
    GEMMs are faster than OpenBLAS's there; elsewhere that is not known), else OpenBLAS."""
    choice = os.environ.get(BLAS_ENV, "").strip().lower()
    if choice in BLAS_CHOICES:
        return choice
    if choice not in ("", "auto"):
        notes.append(f"{BLAS_ENV}={choice!r} is none of {', '.join(BLAS_CHOICES)}: chosen as by default")
    return "mkl" if _intel_cpu() and _find_mkl() else "openblas"


def _load_blas() -> None:
    """Load what _choose_blas chooses: MKL, or OpenBLAS with the gemv shim (also where MKL cannot be loaded); MLX's
    bundled BLAS where neither can, or when mlx.core was imported first (too late)."""
    global blas, gemv, _threads
    choice = _choose_blas()
    if choice == "bundled":
        notes.append(f"MLX's bundled BLAS, as {BLAS_ENV} asks")
        return
    if "mlx.core" in sys.modules:
        notes.append("mlx.core was imported before nanogpt_mlx; import nanogpt_mlx first to use a fast BLAS")
        return
    if choice == "mkl":
        mkl = _find_mkl()
        if mkl is None:
            notes.append("MKL not found (pip install mkl, or nanogpt-mlx[mkl]): OpenBLAS instead")
        else:
            try:
                lib = ctypes.CDLL(mkl, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                notes.append(f"could not load {mkl}: {e}; OpenBLAS instead")
            else:
                _threads = (lib.MKL_Get_Max_Threads, lib.MKL_Set_Num_Threads)
                blas, gemv = f"MKL ({mkl})", "off (MKL's sgemm takes single rows as fast)"
                return
    path = _find_openblas()
    if path is None:
        notes.append("OpenBLAS not found: fp32 matmuls use MLX's slow reference BLAS. "
                     "Install it with `sudo apt-get install libopenblas0-pthread` (Debian/Ubuntu).")
        return
    try:
        openblas = ctypes.CDLL(path)  # not global yet: the gemv shim has to come first
    except OSError as e:
        notes.append(f"could not load {path}: {e}")
        return
    _install_gemv_shim(openblas)
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    _threads = (lib.openblas_get_num_threads, lib.openblas_set_num_threads)
    blas = f"OpenBLAS ({path})"


def blas_threads() -> int:
    """The threads MKL or OpenBLAS runs a GEMM on (MKL_NUM_THREADS / OPENBLAS_NUM_THREADS, else the cores; a rank
    of launch.py gets its share), or 1: MLX's bundled BLAS, or Accelerate on a Mac, is not ours to set."""
    return max(1, _threads[0]()) if _threads else 1


def set_blas_threads(n: int) -> None:
    """Have MKL or OpenBLAS run each GEMM on n threads (between GEMMs: none may be running)."""
    if _threads:
        _threads[1](n)


def info() -> list[tuple[str, str]]:
    """(label, value) lines for `nanogpt-mlx info`: the BLAS, the gemv shim, the kernel compiler, then each note."""
    return [("blas", blas), ("gemv shim", gemv), ("kernel jit", cpu_jit.jit)] + [("note", n) for n in notes]


_setup()
