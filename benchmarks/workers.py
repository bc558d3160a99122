"""Run a benchmark's engine in its own process: `python SCRIPT --worker ARGS...` prints `RESULT <json>`.

Engines run in separate processes because MLX loads MKL or OpenBLAS globally on Linux CPUs, which would change
PyTorch's BLAS in the same process, and so that each engine's peak memory is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def spawn(script: str, *args: str, env: dict[str, str] | None = None):
    """The JSON value the worker printed last as `RESULT ...` (run with `env` added to this environment); exits
    with the worker's stderr if it failed."""
    proc = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def blas(choice: str = "") -> str:
    """What nanogpt-mlx's CPU matmuls run on (cpu.blas) with NANOGPT_MLX_BLAS=choice ('': its default), asked in a
    process of its own: a BLAS, once loaded, stays."""
    code = "import nanogpt_mlx\nfrom nanogpt_mlx import device\nif device.PROFILE.cpu_backend:\n" \
           "    from nanogpt_mlx import cpu\n    print(cpu.blas)\nelse:\n    print('-')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "NANOGPT_MLX_BLAS": choice})
    return proc.stdout.strip()


def openblas_beside_mkl() -> bool:
    """Whether MKL is nanogpt-mlx's BLAS here and the system OpenBLAS could be instead: then the benchmarks also
    run OpenBLAS, to compare."""
    return blas().startswith("MKL") and blas("openblas").startswith("OpenBLAS")


def missing_gpu(engines: list[str]) -> str:
    """Which of `engines`' frameworks see no CUDA GPU here ('' if each does), asked in processes of their own (MLX's
    BLAS and PyTorch's stay out of the caller's): before a GPU benchmark, not minutes into it."""
    probes = {"mlx": "import mlx.core as mx; print(mx.cuda.is_available())",
              "torch": "import torch; print(torch.cuda.is_available())"}
    missing = []
    for name, code in probes.items():
        if any(e.startswith(name) for e in engines):
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if proc.stdout.strip() != "True":
                missing.append(f"{'MLX' if name == 'mlx' else 'PyTorch'} sees no CUDA GPU")
    return "; ".join(missing)
