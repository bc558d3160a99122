#!/usr/bin/env bash
# Create .venv with nanogpt-mlx installed (plus extras given as arguments, e.g. `test`).
# Run by quickstart.sh and test.sh; safe to run again (offline too, once installed: an install whose
# pyproject.toml is unchanged and whose extras an earlier install covered is not repeated).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
extras="${1:-}"
python="${PYTHON:-python3}"  # the Python that makes .venv (PYTHON=python3.12 bash setup.sh)
# on Linux MLX's CPU build, unless asked for its CUDA one (`bash setup.sh cuda,test`): both hold MLX's library
if [ "$(uname -s)" = "Linux" ] && [[ ",$extras," != *,cuda,* ]]; then
    extras="cpu${extras:+,$extras}"
    if [ "$(uname -m)" = "x86_64" ] && grep -q GenuineIntel /proc/cpuinfo 2>/dev/null; then
        extras="$extras,mkl"  # Intel's BLAS: faster matmuls than OpenBLAS on Intel CPUs (cpu.py)
    fi
fi
# a venv without pip (ensurepip failed, an interrupted creation), from a Python older than 3.10, or moved or copied
# from another checkout (its scripts start that path's python, its package is that checkout's) is made anew
# shellcheck disable=SC2016
if ! .venv/bin/python -I -c 'import os, sys, pip, importlib.util as u
spec = u.find_spec("nanogpt_mlx")
here = os.path.realpath(sys.argv[1]) + os.sep
sys.exit(sys.version_info < (3, 10) or (spec is not None and not os.path.realpath(spec.origin).startswith(here)))' \
        "$PWD" 2>/dev/null; then
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        version="$("$python" -V 2>&1)" || version="not found"
        echo "setup: nanogpt-mlx needs Python >= 3.10, and $python is $version;" \
            "name another: PYTHON=python3.12 bash $0" >&2
        exit 1
    fi
    "$python" -m venv --clear .venv
fi
# one stamp per extra installed from this pyproject.toml: what an earlier install covers is not repeated (test.sh's
# cpu,test covers quickstart.sh's cpu, offline too)
sha256() { if command -v sha256sum >/dev/null; then sha256sum "$@"; else shasum -a 256 "$@"; fi; }  # (older macOS)
hash="$(sha256 pyproject.toml | cut -c1-16)"
wanted="base${extras:+,$extras}"
for extra in ${wanted//,/ }; do
    if [ ! -f ".venv/.installed-$hash-$extra" ]; then
        .venv/bin/python -m pip install -q --upgrade pip >/dev/null
        .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
        find .venv -maxdepth 1 -name '.installed-*' ! -name ".installed-$hash-*" -delete
        for e in ${wanted//,/ }; do touch ".venv/.installed-$hash-$e"; done
        break
    fi
done
# MLX's Linux wheel bundles a slow reference BLAS; MKL or the system's OpenBLAS, where cpu.py finds them, make
# float32 matmuls ~30x faster (`info` says "blas bundled" where it finds neither)
if [ "$(uname -s)" = "Linux" ]; then
    # (|| true: an `info` that fails says why when the package is used; set -e would end setup here, silently)
    blas="$(env -u NANOGPT_MLX_BLAS .venv/bin/python -m nanogpt_mlx info 2>/dev/null | sed -n 's/^blas  *//p' || true)"
    case "$blas" in bundled*)
        if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
            (apt-get install -y -qq libopenblas0-pthread \
                || { apt-get update -qq && apt-get install -y -qq libopenblas0-pthread; }) >/dev/null \
                || echo "setup: could not install libopenblas0-pthread; training will be slow" >&2
        else
            echo "setup: for fast training install OpenBLAS: sudo apt-get install libopenblas0-pthread (Debian," \
                "Ubuntu) or sudo dnf install openblas (Fedora)" >&2
        fi
    esac
fi
