"""Single-row float32 matmuls (the ones gemv_shim.c sends to sgemv) give BLAS's exact semantics."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from nanogpt_mlx import cpu, cpu_jit
from nanogpt_mlx.errors import UserError


def test_these_tests_run_under_openblas_too():
    """The shim serves OpenBLAS only: where another BLAS is this process's (MKL), the tests below run again in a
    process of OpenBLAS's, so that they test the shim."""
    if cpu.blas.startswith("OpenBLAS") or cpu._find_openblas() is None:
        pytest.skip("OpenBLAS is this process's BLAS already, or is not installed")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "not openblas_too"], env={**os.environ, cpu.BLAS_ENV: "openblas"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize("cc, said", [("/nonexistent/cc", "C compiler /nonexistent/cc not found"),
                                      ("false", "false failed (exit status 1)")])
def test_a_failed_compile_names_the_compiler(cc, said, tmp_path, monkeypatch):
    """It read "cannot write" the cache's file, which was writable."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", cc)
    with pytest.raises(OSError, match=re.escape(said)):
        cpu.build_gemv_shim()
    assert not any(tmp_path.rglob("*.so*"))


def test_the_compiler_keeps_the_systems_temporary_directory(tmp_path, monkeypatch):
    """Its temporary files went among MLX's kernels, where TMPDIR points for MLX (cpu_jit._vectorize_jit)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cc = tmp_path / "cc"
    cc.write_text(f"#!/bin/sh\necho \"$TMPDIR\" > {tmp_path / 'tmpdir'}\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    with pytest.raises(OSError, match="failed"):
        cpu.build_gemv_shim()
    assert (tmp_path / "tmpdir").read_text().strip() == cpu_jit.child_env().get("TMPDIR", "")
    if cpu_jit.jit_avx2:
        assert cpu_jit.child_env()["TMPDIR"] == os.environ[cpu_jit.SYSTEM_TMPDIR_ENV] != os.environ["TMPDIR"]


def close(ours: mx.array, ref: np.ndarray) -> None:
    np.testing.assert_allclose(np.array(ours), ref, rtol=1e-4, atol=1e-3)  # fp32 sums of ~3000 terms


@pytest.mark.parametrize("K, N", [(768, 2304), (3072, 768), (7, 3), (64, 50257)])
def test_single_row_products(K, N):
    rng = np.random.default_rng(K + N)
    a = rng.standard_normal((1, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)  # Linear layout: y = a @ w.T
    bias = rng.standard_normal((N,)).astype(np.float32)
    ref = a.astype(np.float64) @ w.T.astype(np.float64)
    A, W = mx.array(a), mx.array(w)
    close(A @ W.T, ref)  # b transposed
    close(A @ mx.contiguous(W.T), ref)  # b not transposed
    close(mx.contiguous(A.T).T @ W.T, ref)  # a stored as a column (transposed, lda = 1)
    for b in (W.T, mx.contiguous(W.T)):
        close(mx.addmm(mx.array(bias), A, b, alpha=0.5, beta=2.0), 2.0 * bias + 0.5 * ref)
    # a batch of single rows (attention heads during decoding) is one call per row
    a3 = rng.standard_normal((3, 1, K)).astype(np.float32)
    close(mx.array(a3) @ W.T, a3.astype(np.float64) @ w.T.astype(np.float64))


def test_output_buffer_is_not_read_when_beta_is_zero():
    """sgemm with beta = 0 must ignore C; a recycled buffer may hold NaN."""
    a = mx.ones((1, 16))
    w = mx.ones((8, 16))
    for _ in range(3):  # buffers are reused between ops
        junk = mx.full((1, 8), mx.nan)
        mx.eval(junk)
        del junk
        out = a @ w.T
        assert np.array(out).tolist() == [[16.0] * 8]


def test_multi_row_products_are_untouched():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 64)).astype(np.float32)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    close(mx.array(a) @ mx.array(w).T, a.astype(np.float64) @ w.T.astype(np.float64))


needs_cc = pytest.mark.skipif(shutil.which("cc") is None or cpu._find_openblas() is None,
                              reason="needs a C compiler (cc) and OpenBLAS")


@needs_cc
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_a_cxx_compiler_as_cc_builds_the_shim(tmp_path):
    """g++ compiled gemv_shim.c as C++, whose names Python did not find: every later start was a traceback."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), cpu.BLAS_ENV: "openblas"}
    env.pop(cpu.NO_GEMV_SHIM_ENV, None)
    said = "import nanogpt_mlx; from nanogpt_mlx import cpu; print(cpu.gemv)"
    for cc in ("g++", ""):  # built, then from the cache
        proc = subprocess.run([sys.executable, "-c", said], env={**env, "CC": cc}, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() == "on", proc.stderr[-2000:]


@needs_cc
def test_an_unusable_library_is_not_cached_nor_loaded(tmp_path, monkeypatch):
    """A library without the shim's function was cached, and loading it from there failed every later start."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    empty = tmp_path / "empty-cc"  # a compiler that builds a library of nothing
    empty.write_text("#!/bin/sh\nfor a; do [ \"$p\" = -o ] && out=$a; p=$a; done\n"
                     "echo 'int x;' | cc -x c -shared -fPIC -o \"$out\" -\n")
    empty.chmod(0o755)
    monkeypatch.setenv("CC", str(empty))
    with pytest.raises(UserError, match="built no usable library .it defines no nanogpt_gemv_shim_connect"):
        cpu.build_gemv_shim()
    assert not any(tmp_path.rglob("*.so*"))
    monkeypatch.delenv("CC")
    lib = cpu.build_gemv_shim()  # one of the system's compiler, in its place
    subprocess.run([str(empty), "-o", str(lib)], check=True)  # damaged since
    with pytest.raises(OSError, match="was unusable .* removed, to be built again at the next start"):
        cpu.build_gemv_shim()
    assert not lib.exists()
    assert cpu.build_gemv_shim() == lib and lib.is_file()


def test_a_noexec_cache_builds_no_shim(tmp_path, monkeypatch):
    """It was built in a cache mounted noexec, where it could never be loaded."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")  # not run
    statvfs = os.statvfs
    monkeypatch.setattr(cpu.os, "statvfs", lambda p: os.statvfs_result(
        (*statvfs(p)[:8], statvfs(p).f_flag | os.ST_NOEXEC, *statvfs(p)[9:])))
    with pytest.raises(OSError, match=f"^{re.escape(str(tmp_path))} is on a noexec mount$"):
        cpu.build_gemv_shim()
