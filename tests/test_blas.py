"""Which BLAS MLX's CPU backend runs its matmuls on (cpu.py): each one's products and thread count."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys

import pytest

from nanogpt_mlx import cpu, device

# a GPU profile imports mlx.core before cpu.py could load a BLAS (it needs none)
pytestmark = pytest.mark.skipif(platform.system() != "Linux" or not device.PROFILE.cpu_backend,
                                reason="MLX's CPU backend takes a BLAS on Linux only")
THREADS = min(2, os.cpu_count() or 1)  # OpenBLAS runs no more threads than the CPUs it may use

PROBE = """
import json
import numpy as np
import nanogpt_mlx
from nanogpt_mlx import cpu
import mlx.core as mx
rng = np.random.default_rng(0)
a, b = rng.standard_normal((64, 96), dtype=np.float32), rng.standard_normal((96, 80), dtype=np.float32)
right = [bool(np.allclose(np.array(mx.array(x) @ mx.array(b)), x.astype(np.float64) @ b, rtol=1e-4, atol=1e-4))
         for x in (a, a[:1])]  # a single row: the gemv shim's, under OpenBLAS
before = cpu.blas_threads()
cpu.set_blas_threads(1)
threads = [before, cpu.blas_threads()]
cpu.set_blas_threads(before)
print(json.dumps({"blas": cpu.blas, "gemv": cpu.gemv, "notes": cpu.notes, "right": right,
                  "threads": threads + [cpu.blas_threads()]}))
"""


def probe(blas: str) -> dict:
    env = {**os.environ, cpu.BLAS_ENV: blas, "MKL_NUM_THREADS": str(THREADS), "OPENBLAS_NUM_THREADS": str(THREADS)}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("blas, found", [("mkl", cpu._find_mkl), ("openblas", cpu._find_openblas),
                                         ("bundled", lambda: "MLX's own")])
def test_each_blas_computes_products_and_takes_a_thread_count(blas, found):
    path = found()
    if path is None:
        pytest.skip(f"{blas} is not installed here")
    got = probe(blas)
    assert got["right"] == [True, True] and not any(n.startswith("could not") for n in got["notes"]), got
    if blas == "bundled":  # not ours to set
        assert got["blas"] == "bundled" and got["threads"] == [1, 1, 1]
        return
    assert got["blas"] == f"{'MKL' if blas == 'mkl' else 'OpenBLAS'} ({path})"
    assert got["threads"] == [THREADS, 1, THREADS]
    if blas == "mkl":
        assert got["gemv"].startswith("off (MKL's")
    elif shutil.which("cc") is not None and not os.environ.get(cpu.NO_GEMV_SHIM_ENV):
        assert got["gemv"] == "on"


@pytest.mark.parametrize("env, intel, mkl, chosen", [
    ("", True, "/x/libmkl_rt.so.3", "mkl"),
    ("", True, None, "openblas"),
    ("", False, "/x/libmkl_rt.so.3", "openblas"),  # MKL's speed on other CPUs is not known
    ("auto", True, "/x/libmkl_rt.so.3", "mkl"),
    ("MKL", False, None, "mkl"),  # asked for: _load_blas says if it is missing, and loads OpenBLAS
    ("openblas", True, "/x/libmkl_rt.so.3", "openblas"),
    ("bundled", True, "/x/libmkl_rt.so.3", "bundled"),
])
def test_mkl_is_the_default_on_an_intel_cpu_where_installed(env, intel, mkl, chosen, monkeypatch):
    monkeypatch.setenv(cpu.BLAS_ENV, env)
    monkeypatch.setattr(cpu, "_intel_cpu", lambda: intel)
    monkeypatch.setattr(cpu, "_find_mkl", lambda: mkl)
    monkeypatch.setattr(cpu, "notes", [])
    assert cpu._choose_blas() == chosen and cpu.notes == []


def test_an_unknown_choice_is_said_and_the_default_taken(monkeypatch):
    monkeypatch.setenv(cpu.BLAS_ENV, "atlas")
    monkeypatch.setattr(cpu, "_intel_cpu", lambda: False)
    monkeypatch.setattr(cpu, "notes", [])
    assert cpu._choose_blas() == "openblas"
    assert cpu.notes == ["NANOGPT_MLX_BLAS='atlas' is none of mkl, openblas, bundled: chosen as by default"]


def test_every_note_is_said(monkeypatch):
    """A mistyped choice went unsaid where the BLAS then failed to load: each note overwrote the one before."""
    monkeypatch.setenv(cpu.BLAS_ENV, "opneblas")
    monkeypatch.setattr(cpu, "_intel_cpu", lambda: False)
    monkeypatch.setattr(cpu, "_find_openblas", lambda: "/nonexistent/libopenblas.so.0")
    monkeypatch.setattr(cpu, "notes", [])
    monkeypatch.delitem(sys.modules, "mlx.core")  # (imported by now: _load_blas would stop at that)
    cpu._load_blas()
    typo, load = device.notes()[-2:]
    assert typo.startswith("NANOGPT_MLX_BLAS='opneblas' is none of")
    assert load.startswith("could not load /nonexistent/libopenblas.so.0: ")
    assert cpu.info()[-2:] == [("note", typo), ("note", load)]


def test_mkl_is_found_only_beside_its_openmp_and_newest_first(tmp_path, monkeypatch):
    """MKL ends the process where its threading library cannot load: without libiomp5 beside it, it is not used.
    The user's site counts only where Python reads it (not in a venv that leaves it out)."""
    monkeypatch.setattr(cpu.sys, "prefix", str(tmp_path / "env"))
    monkeypatch.setattr(cpu.site, "getuserbase", lambda: str(tmp_path / "user"))
    monkeypatch.setattr(cpu.site, "ENABLE_USER_SITE", False)
    for base in ("env", "user"):
        (tmp_path / base / "lib").mkdir(parents=True)
        for name in ("libmkl_rt.so.2", "libmkl_rt.so.10", "libmkl_rt.so.3"):
            (tmp_path / base / "lib" / name).touch()
    assert cpu._find_mkl() is None
    (tmp_path / "user" / "lib" / "libiomp5.so").touch()
    assert cpu._find_mkl() is None
    monkeypatch.setattr(cpu.site, "ENABLE_USER_SITE", True)
    assert cpu._find_mkl() == str(tmp_path / "user" / "lib" / "libmkl_rt.so.10")
    (tmp_path / "env" / "lib" / "libiomp5.so").touch()
    assert cpu._find_mkl() == str(tmp_path / "env" / "lib" / "libmkl_rt.so.10")


def test_python_code_hears_the_notes_once(tiny_hf_dir, tmp_path):
    """A notebook that imported mlx.core first ran every matmul on MLX's slow reference BLAS (30x slower here) and
    nothing said so: only the CLI said the notes. A command says each once, though it loads a model too."""
    from conftest import run_cli

    code = f"import mlx.core\nimport nanogpt_mlx\nfrom nanogpt_mlx.weights import load_model\n" \
           f"load_model({str(tiny_hf_dir)!r})\nload_model({str(tiny_hf_dir)!r})\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    note = "nanogpt-mlx: note: mlx.core was imported before nanogpt_mlx; import nanogpt_mlx first to use a fast BLAS"
    assert proc.stderr.count(note) == 1, proc.stderr
    proc = run_cli("sample", "--model", str(tiny_hf_dir), "--num-samples", "1", "--max-new-tokens", "2",
                   env={cpu.BLAS_ENV: "atlas"}, check=True)
    assert proc.stderr.count("NANOGPT_MLX_BLAS='atlas' is none of") == 1, proc.stderr
