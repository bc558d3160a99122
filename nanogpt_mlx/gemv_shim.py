"""Route MLX's single-row float32 matmuls to OpenBLAS's sgemv (Linux, used by backend.py).

Decoding one token multiplies one row by every weight matrix. MLX sends that to cblas_sgemm,
which in OpenBLAS moves the weights about half as fast as cblas_sgemv does, and decoding
speed is set by how fast the weights stream from memory. gemv_shim.c defines a cblas_sgemm
that forwards single rows to sgemv and the rest to OpenBLAS's sgemm. It is compiled once with
the system C compiler into the user cache; without a compiler everything works, just slower.
Set NANOGPT_MLX_NO_GEMV_SHIM=1 to turn it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from .files import atomic_path, cache_dir

DISABLE_ENV = "NANOGPT_MLX_NO_GEMV_SHIM"


def build() -> Path:
    """Compile gemv_shim.c into the cache (once per version of the source) and return the library."""
    source = resources.files(__package__).joinpath("gemv_shim.c").read_bytes()
    lib = cache_dir() / f"gemv_shim-{platform.machine()}-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if lib.is_file():
        return lib
    cc = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not cc[0]:
        raise OSError("no C compiler (cc) found")
    with tempfile.TemporaryDirectory() as tmp_dir, atomic_path(lib) as tmp:
        src = Path(tmp_dir) / "gemv_shim.c"
        src.write_bytes(source)
        proc = subprocess.run([*cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise OSError(f"{cc[0]} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return lib


def install(openblas: ctypes.CDLL) -> ctypes.CDLL:
    """Load the shim into the global symbol scope, wired to `openblas` (loaded RTLD_LOCAL so far).

    Must run before OpenBLAS is made global and before mlx.core is imported: the first
    cblas_sgemm in the global scope is the one MLX's calls bind to.
    """
    shim = ctypes.CDLL(str(build()), mode=ctypes.RTLD_GLOBAL)
    shim.nanogpt_gemv_shim_connect.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    shim.nanogpt_gemv_shim_connect(ctypes.cast(openblas.cblas_sgemm, ctypes.c_void_p),
                                   ctypes.cast(openblas.cblas_sgemv, ctypes.c_void_p))
    return shim


def _sgemm_address(lib: ctypes.CDLL) -> int | None:
    return ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value


def active(shim: ctypes.CDLL) -> bool:
    """Whether a global lookup of cblas_sgemm (what MLX binds to) finds the shim's."""
    return _sgemm_address(ctypes.CDLL(None)) == _sgemm_address(shim)
