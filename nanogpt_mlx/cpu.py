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
- MLX's x86-64 wheel compiles `mx.compile`'s fused kernels with `g++ -O3` for baseline x86-64:
  SSE2, four lanes, and no per-lane shifts, so a kernel that shifts by a computed count (exp's 2**k
  below) runs one number at a time. On a CPU with AVX2 and FMA a `g++` wrapper first on PATH adds
  `-mavx2 -mfma -mf16c` (the flags MLX's own AVX2 builds add), and TMPDIR points MLX's kernel cache
  at a directory of its own, so no baseline build is reused. The rounding is unchanged: MLX compiles
  in ISO C++ mode, where g++ contracts no multiply-add into an FMA. NANOGPT_MLX_NO_AVX2=1 turns it off.
  Elsewhere a wrapper without the flags is first on PATH: either way each kernel's library appears whole (_WRAPPER).

The kernels below are what kernels.py binds on x86-64, where MLX's CPU build evaluates exp and
tanh in scalar software: the softmaxes of attention and of the loss and GELU's tanh would cost more
than the matmuls of a small GPT. exp is rebuilt from multiply-adds that `mx.compile` fuses:
exp(x) = 2**k * exp(r) with k = round(x / ln 2), |r| <= ln(2) / 2, a degree-7 polynomial for
exp(r) and 2**k from per-lane shifts (AVX2; else from its float32 bits, whose bit cast splits the
kernel), accurate to ~2e-7 relative, like a library's. It is written to stay one fused kernel:
mx.compile fuses at most 11 operations deep, and a min, max or select in a kernel keeps it from
being vectorized. (A Newton square root for AdamW lost to mx.sqrt once the update is one fused
kernel: its bit casts split the kernel.) The same build reduces a contiguous row one number at a
time: row_max and row_sum (softmaxes, the loss) reduce across the rows of a (n / lanes, lanes) view
instead, lanes at a time, and square_sum (clipping's norm; on ARM too, as MLX's CPU sum adds one number
after another) is one BLAS dot product.
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
from importlib import metadata, resources
from pathlib import Path

from .errors import UserError
from .files import LOW_SPACE, atomic_path, cache_dir, cannot, existing_ancestor, make_dirs

BLAS_ENV = "NANOGPT_MLX_BLAS"
BLAS_CHOICES = ("mkl", "openblas", "bundled")
NO_GEMV_SHIM_ENV = "NANOGPT_MLX_NO_GEMV_SHIM"
NO_AVX2_ENV = "NANOGPT_MLX_NO_AVX2"
SYSTEM_TMPDIR_ENV = "NANOGPT_MLX_SYSTEM_TMPDIR"  # the TMPDIR before _vectorize_jit, for child processes
_SHIM_CONNECT = "nanogpt_gemv_shim_connect"  # gemv_shim.c's function that is given OpenBLAS's
JIT_FLAGS = ("-mavx2", "-mfma", "-mf16c")
_EXPANDED = '$`"\\'  # what a shell takes as its own within double quotes: in a path there, MLX's g++ fails
KERNEL_ROOM = 32 * 2**20  # free bytes wanted where MLX compiles: a run's kernels (~16 kB each) and g++'s temporaries
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
jit: str = "MLX's default flags"  # how MLX compiles fused kernels
jit_avx2: bool = False  # whether they are compiled for AVX2 (exp's 2**k by per-lane shifts)
_kernels_tmpdir: str | None = None  # the TMPDIR that _vectorize_jit set, for MLX alone (child_env)
_paths: tuple[str, str] | None = None  # the PATH that _vectorize_jit set, g++'s wrapper first, and the one before
notes: list[str] = []  # problems with the set-up, said once at a command's start and by `nanogpt-mlx info`
# the loaded BLAS's thread count of its GEMMs: how to read and set it (None: MLX's bundled BLAS, or Accelerate)
_threads: tuple[Callable[[], int], Callable[[int], None]] | None = None


# ------------------------------------------------------------------------------ process setup
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


def _cpuinfo(field: str) -> str:
    """The value of a field of the first CPU in /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":")[0].strip() == field), "")
    except OSError:
        return ""


def _intel_cpu() -> bool:
    return _cpuinfo("vendor_id") == "GenuineIntel"


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
    if _noexec(lib.parent):  # it could be built, never loaded
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


def _vectorize_jit() -> None:
    """Have MLX compile its fused CPU kernels through a g++ wrapper (_WRAPPER) first on PATH: for AVX2 (see the
    module docstring) into a kernel cache of their own where the CPU has it, else with MLX's flags in MLX's cache."""
    global jit, jit_avx2, _kernels_tmpdir
    flags = set(_cpuinfo("flags").split())
    avx2 = platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma", "f16c"} <= flags
    if os.environ.get(NO_AVX2_ENV, "") not in ("", "0"):
        jit, avx2 = f"MLX's default flags ({NO_AVX2_ENV} is set)", False
    wrappers = None
    try:
        wrappers = cache_dir() / ("jit-avx2" if avx2 else "jit") / "bin"
    except UserError as e:
        jit = f"MLX's default flags ({e})"
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d) != wrappers]
    gxx = shutil.which("g++", path=os.pathsep.join(path))
    if gxx is None:  # MLX runs `g++ --version` from PATH, once: where it fails, it compiles nothing, ever
        jit = "none: no g++ on PATH; fused graphs run op by op"
        notes.append("no g++ on PATH: MLX compiles no fused kernels, and training steps take about twice as long. "
                     "Install it with `sudo apt-get install g++` (Debian/Ubuntu).")
        return
    if wrappers is None:  # no cache to keep the wrapper in
        return
    home = wrappers.parent
    script = _WRAPPER.replace("GXX", " ".join([shlex.quote(gxx), *(JIT_FLAGS if avx2 else ())]))
    wrapper, kernels = wrappers / "g++", home / "kernels"
    try:
        if not wrapper.is_file() or wrapper.read_text() != script or not os.access(wrapper, os.X_OK):
            with atomic_path(wrapper) as tmp:
                tmp.write_text(script)
                tmp.chmod(0o755)
        if avx2:
            kernels.mkdir(parents=True, exist_ok=True)
    except (OSError, UserError) as e:  # a read-only cache: MLX's default build still works
        jit = f"MLX's default flags (could not write {wrapper}: {e})"
        return
    if not os.access(wrapper, os.X_OK):  # a noexec mount: MLX could neither run the wrapper nor load kernels there
        jit = f"MLX's default flags ({wrapper.parent} does not allow executing)"
        return
    if not avx2:  # MLX's own build, in its own cache: only whole libraries
        _put_first(wrappers, path)
        return
    if why := _cannot_compile_in(kernels):  # a full cache, as a read-only one: the system's temporary directory
        jit = f"MLX's default flags ({_kernel_dir(kernels)} {why})"
        return
    # MLX keeps compiled kernels in $TMPDIR/mlx/<version>/cpu, by name only: a directory of our own keeps
    # baseline builds out. MLX reads TMPDIR from this process's environment, at each kernel, so it is set here;
    # this process's Python temporary files stay where they were, and so do those of the children this package
    # starts (child_env) and of a child that imports nanogpt_mlx.
    system_tmp = os.environ.get(SYSTEM_TMPDIR_ENV) if os.environ.get("TMPDIR") == str(kernels) else None
    tempfile.tempdir = system_tmp or tempfile.gettempdir()
    os.environ[SYSTEM_TMPDIR_ENV] = tempfile.tempdir
    os.environ["TMPDIR"] = _kernels_tmpdir = str(kernels)
    _put_first(wrappers, path)
    jit, jit_avx2 = f"g++ {' '.join(JIT_FLAGS)} (kernels in {kernels})", True


def _put_first(wrappers: Path, path: list[str]) -> None:
    """PATH as `path` after `wrappers`, where MLX finds g++'s wrapper; the PATH before, without it, for child_env."""
    global _paths
    before = [d for d in os.environ["PATH"].split(os.pathsep) if Path(d) != wrappers]  # (a child of an older one's)
    os.environ["PATH"] = os.pathsep.join([str(wrappers), *path])
    _paths = (os.environ["PATH"], os.pathsep.join(before))


# MLX's `g++ ... SOURCE -o LIBRARY` (GXX: the compiler, and the AVX2 flags where they are used).
# - Ctrl-C in a terminal signals the whole process group: a compiler killed mid-kernel fails MLX's step with a
#   missing library, where the trainer would finish the step and save. The kernel takes seconds; it completes.
# - MLX loads a library that it finds at its path without compiling it, so one that the linker is still writing there
#   for another process (the ranks of `--ranks N` compile the same kernels at once) could be loaded half written:
#   2 ranks on an empty kernel cache were seen to train on wrong numbers. Each compiler writes a file of its own,
#   renamed to the path once whole. A compile that fails, as one whose source the other process was rewriting (MLX
#   writes it before compiling), is tried again, unless the other process's library is there by then.
_WRAPPER = """#!/bin/sh
trap '' INT TERM
n=$# out= prev=
for a in "$@"; do
  if [ "$prev" = -o ]; then out=$a; a=$a.$$.tmp; fi
  set -- "$@" "$a"
  prev=$a
done
shift "$n"
[ -n "$out" ] || exec GXX "$@"
for try in 1 2; do
  GXX "$@" && mv -f "$out.$$.tmp" "$out" && exit 0
  rm -f "$out.$$.tmp"
  [ -f "$out" ] && exit 0
done
exit 1
"""


def child_env() -> dict[str, str]:
    """os.environ for a child process: TMPDIR back at the system's where _vectorize_jit pointed it at MLX's kernels
    (the temporary files of a compiler, `mktemp`, a rank were left among them), and PATH back at the user's, without
    the g++ wrapper for MLX (a child's own g++ would compile with its flags; a child that imports nanogpt_mlx puts
    it first again)."""
    env = dict(os.environ)
    if _kernels_tmpdir is not None and env.get("TMPDIR") == _kernels_tmpdir:
        env["TMPDIR"] = env[SYSTEM_TMPDIR_ENV]
    if _paths is not None and env.get("PATH") == _paths[0]:
        env["PATH"] = _paths[1]
    return env


def _kernel_dir(tmp: str | os.PathLike | None = None) -> Path:
    """Where MLX's CPU backend writes and compiles its kernels: $TMPDIR/mlx/<its version>/cpu."""
    try:
        version = metadata.version("mlx")
    except metadata.PackageNotFoundError:  # a build of MLX not installed as a package: its parent, at least
        version = ""
    return Path(tmp or os.environ.get("TMPDIR") or tempfile.gettempdir()) / "mlx" / version / "cpu"


def _free_bytes(place: str | os.PathLike) -> int:
    """The bytes this user can still write on `place`'s disk: 0 where it has no inodes left."""
    disk = os.statvfs(place)
    return 0 if disk.f_files and not disk.f_favail else disk.f_bavail * disk.f_frsize


def _noexec(place: str | os.PathLike) -> bool:
    """Whether `place` (or, where it is not there yet, the directory it would be made in) is on a mount that lets
    no program or library be loaded from it (mount -o noexec, a common hardening of /tmp)."""
    return bool(os.statvfs(existing_ancestor(place)).f_flag & os.ST_NOEXEC)


def _shell_expanded(path: Path) -> str:
    """The characters of `path` that a shell takes as its own within double quotes (_EXPANDED; '' where none)."""
    return "".join(c for c in _EXPANDED if c in str(path))


def _cannot_compile_in(tmp: str | os.PathLike) -> str:
    """Why MLX could not compile its kernels under `tmp` ('' where it can)."""
    kernels = _kernel_dir(tmp)
    if expanded := _shell_expanded(kernels):
        return f"has {expanded} in its path, which MLX's g++ command, in double quotes, leaves to the shell"
    try:
        kernels.mkdir(parents=True, exist_ok=True)
    except OSError:  # a full disk (MLX would fail with a traceback), a read-only one
        return "cannot be written"
    if not os.access(kernels, os.W_OK | os.X_OK):  # another user's /tmp/mlx, say
        return "cannot be written"
    if _noexec(kernels):  # g++ would build kernels there that MLX could not load (a traceback at the first)
        return "is on a noexec mount"
    # g++ would fail on a full disk mid-run, at the first kernel not built yet, leaving its files behind
    if _free_bytes(kernels) < KERNEL_ROOM:
        return f"has under {KERNEL_ROOM // 2**20} MB free"
    return ""


def _usable_tmpdir() -> None:
    """MLX compiles its kernels in _kernel_dir() and fails every compiled function where it cannot make or write
    there: a TMPDIR that names no writable directory, another user's /tmp/mlx on a shared machine, a full disk.
    Make that directory now, or point TMPDIR where it can be made and has room: Python's temporary directory, then
    one in this user's cache (where _vectorize_jit has not moved TMPDIR already)."""
    global jit
    tmp = os.environ.get("TMPDIR")
    if tmp and not (os.path.isdir(tmp) and os.access(tmp, os.W_OK | os.X_OK)):
        os.environ["TMPDIR"] = tempfile.gettempdir()  # Python's own fallback: /tmp, /var/tmp, ... or the cwd
        jit += f" [TMPDIR={tmp} is not a writable directory: kernels in {os.environ['TMPDIR']}]"
    why = _cannot_compile_in(os.environ.get("TMPDIR") or tempfile.gettempdir())
    if not why:
        return
    try:
        mine = cache_dir() / "mlx-tmp"
    except UserError:
        return  # explain() says what is wrong when a kernel fails
    if not _cannot_compile_in(mine):
        jit += f" [{_kernel_dir().parent.parent} {why}: kernels in {mine}]"
        os.environ["TMPDIR"] = str(mine)


def _setup() -> None:
    """Tune malloc, compile kernels for AVX2 and load a BLAS globally (_load_blas), on Linux."""
    global blas
    if platform.system() != "Linux":
        blas = "Accelerate" if platform.system() == "Darwin" else "bundled"
        return
    _tune_malloc()
    _vectorize_jit()
    _usable_tmpdir()
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
    return [("blas", blas), ("gemv shim", gemv), ("kernel jit", jit)] + [("note", n) for n in notes]


def explain(e: RuntimeError) -> str | None:
    """One line for MLX's CPU backend failing to compile or load a kernel or to make its kernel directory
    (_kernel_dir), or None for another error, with what is wrong with that directory where that can be seen."""
    where = _kernel_dir()
    if "Could not load C++ shared library" in str(e):  # MLX's dlopen of a kernel that it compiled
        said = str(e).strip().splitlines()[-1][-300:]
        why = "a noexec mount: set TMPDIR to a directory that allows executing" if _noexec(where) else \
            "see the loader's message"
        return f"MLX could not load a kernel that it compiled in {where} ({why}): {said}"
    if "[Compile::eval_cpu]" not in str(e) and not ("filesystem error" in str(e) and str(where.parent.parent) in
                                                     str(e)):
        return None
    said = str(e).strip().splitlines()[-1][-300:]
    place = existing_ancestor(where)
    if expanded := _shell_expanded(where):
        why = f"its path has {expanded}, which MLX's g++ command leaves to the shell: set TMPDIR to another"
    elif not os.access(place, os.W_OK | os.X_OK):
        why = f"{place} is not writable by this user"
    else:
        why = "its disk is full" if _free_bytes(place) < LOW_SPACE else "see the compiler's message"
    return f"MLX could not compile a kernel in {where} ({why}): {said}"


_setup()

# ------------------------------------------------------------------------------ kernels
import math  # noqa: E402

import mlx.core as mx  # noqa: E402  (only now: the BLAS had to be loaded first)

# exp is 0 at and below this: exp(-64) ~ 1.6e-28 is nothing next to the 1 that every caller adds it to (a row sum
# with exp(max - max), GELU's and the soft-cap's 1 +- e), and it keeps products of exp's small results normal
# floats (see _exp_kernel)
_EXP_MIN = -64.0
_EXP_COEFFS = [1 / math.factorial(n) for n in range(8)]  # exp(r)'s Taylor coefficients, r**0 first
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187e-06  # ln 2 in two parts: k * _LN2_HI is exact
_ROUND = 1.5 * 2**23
_GELU_C = math.sqrt(2 / math.pi)


def exp(x: mx.array) -> mx.array:
    """exp(x) for float32 x <= 0, -inf included; 0 at and below _EXP_MIN (-64). Under mx.compile the clamp joins
    the kernel that made x, and the rest is a kernel of its own: a max keeps a kernel from being vectorized (its
    NaN branch), and x's kernel is often a row-wise subtraction, which runs one number at a time anyway."""
    return _exp_clamped(mx.maximum(x, _EXP_MIN))


@mx.custom_function  # a primitive of its own, which mx.compile cannot merge with the clamp
def _exp_clamped(x: mx.array) -> mx.array:
    return _exp_kernel(x)


@_exp_clamped.vjp
def _exp_vjp(x, cotangent, output):
    return cotangent * output


# The element-wise bodies are compiled (once per shape) so that eager calls, as in token-by-token
# sampling, are one fused kernel each rather than a dozen small ops.
@mx.compile
def _exp_kernel(x: mx.array) -> mx.array:
    """exp(x) for _EXP_MIN < x <= 0 (0 at _EXP_MIN) as one fused kernel: 2**k * exp(r) with k = round(x / ln 2) and
    |r| <= ln(2) / 2. mx.compile fuses at most 11 operations deep, hence Estrin's scheme for the polynomial
    rather than Horner's."""
    t = x * (1 / math.log(2)) + _ROUND  # k = t - _ROUND: adding 1.5 * 2**23 leaves no fraction bits in float32
    k = t - _ROUND
    r = (x - k * _LN2_HI) - k * _LN2_LO
    r2, c = r * r, _EXP_COEFFS
    p = ((c[0] + c[1] * r) + r2 * (c[2] + c[3] * r)) + (r2 * r2) * ((c[4] + c[5] * r) + r2 * (c[6] + c[7] * r))
    # / 2**-k, or / inf where x was clamped: exactly 0 there. (Some x86 CPUs take a microcode assist for every
    # denormal operand or result: a causal attention backward ran several times slower while its masked scores'
    # exp was ~1e-38 rather than 0, and products of exp(-80)-sized probabilities with gradients are denormal too.
    # A compare or select would keep the kernel scalar; x > _EXP_MIN is at least 3.8e-6 above it, so
    # 1e-30 / (x - _EXP_MIN) is below 2**-k's rounding.)
    return p / (_two_to_the((_ROUND - t).astype(mx.int32)) + 1e-30 / (x - _EXP_MIN))


def _two_to_the(j: mx.array) -> mx.array:
    """2.0**j for int32 j in [0, 126], exactly."""
    if jit_avx2:  # per-lane shifts: (2**(j >> 2))**4 * 2**(j & 3); 1 << 31 is -2**31, whose 4th power is 2**124
        q = mx.left_shift(1, mx.right_shift(j, 2)).astype(mx.float32)
        q = q * q
        return (q * q) * mx.left_shift(1, mx.bitwise_and(j, 3)).astype(mx.float32)
    return mx.view(mx.left_shift(j + 127, 23), mx.float32)  # its float32 bits (a view ends the fused kernel)


def square_sum(x: mx.array) -> mx.array:
    """mx.sum(mx.square(x)), as one dot product for float32 (the BLAS's: no squares written, all cores)."""
    if x.dtype != mx.float32:
        return mx.sum(mx.square(x))
    flat = x.reshape(-1)
    return (flat[None] @ flat[:, None]).reshape(())


def _lanes(n: int) -> int:
    """How many lanes a row of n numbers is reduced in (0: as one row). MLX's x86 build reduces a contiguous row
    one number at a time, but a reduction across the rows of an (n / lanes, lanes) view runs lanes at a time."""
    for lanes in ((128,) if n >= 4096 else ()) + (32, 16, 8):
        if n % lanes == 0 and n >= 2 * lanes:
            return lanes
    return 0


def _reduce_rows(x: mx.array, reduce: Callable[..., mx.array]) -> mx.array:
    lanes = _lanes(x.shape[-1])
    if lanes:
        x = reduce(x.reshape(*x.shape[:-1], -1, lanes), axis=-2)
    return reduce(x, axis=-1, keepdims=True)


def row_max(x: mx.array) -> mx.array:
    """x.max(axis=-1, keepdims=True), lanes at a time."""
    return _reduce_rows(x, mx.max)


def row_sum(x: mx.array) -> mx.array:
    """x.sum(axis=-1, keepdims=True), lanes at a time."""
    return _reduce_rows(x, mx.sum)


def gelu(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (GPT-2's "gelu_new"), computed in float32."""
    return _gelu(x.astype(mx.float32)).astype(x.dtype)


def _signed_tanh_gelu(x: mx.array) -> mx.array:
    """tanh z for z = sqrt(2/pi) (x + 0.044715 x^3), from exp(-2|z|), which cannot overflow."""
    e = exp((-2 * _GELU_C) * mx.abs(x + 0.044715 * x * x * x))
    # z has x's sign, taken as x / |x| (a select would keep the kernel from being vectorized); below 1e-22,
    # where the factor is not +-1, |tanh z| is 0 anyway
    return (1 - e) / (1 + e) * (x / (mx.abs(x) + 1e-30))


@mx.custom_function
def _gelu(x: mx.array) -> mx.array:
    return _gelu_forward(x)


@_gelu.vjp
def _gelu_vjp(x, cotangent, output):  # a one-argument function gets its primal as is
    return _gelu_backward(x, cotangent)


@mx.compile
def _gelu_forward(x: mx.array) -> mx.array:
    return 0.5 * x * (1 + _signed_tanh_gelu(x))


@mx.compile
def _gelu_backward(x: mx.array, cotangent: mx.array) -> mx.array:
    t = _signed_tanh_gelu(x)
    # d/dx 0.5 x (1 + t) = 0.5 (1 + t) + 0.5 x (1 - t^2) dz/dx, with s = x (1 - t^2) multiplied in first: far out,
    # 1 - t^2 is exactly 0, so every product is 0 (x * x * x first would overflow to inf, and inf * 0 is nan)
    s = (1 - t * t) * x
    return cotangent * (0.5 * (1 + t) + (0.5 * _GELU_C) * (s + (3 * 0.044715) * (s * x) * x))
